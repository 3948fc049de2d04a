"""A task the base model answers right by construction, and two copies of the base (unchanged, damaged):
the planted regression of tests/cli/test_run.py, shared by the check and CI-recipe tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "river stone cloud apple tiger lamp music garden paper silver window candle ocean forest".split()

TASK_YAML = """task: planted
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  suite: retention
  chance: 0.25
"""


# Two more kinds of lm-eval task on the same documents, for the lm-eval-outputs path (any task): rolling
# perplexity of the question text, and a short greedy generation scored by exact match.
PPL_YAML = """task: planted_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: question
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  suite: retention
"""

GEN_YAML = """task: planted_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  suite: domain
"""


def _items(n: int) -> list[dict]:
    rng = random.Random(1)
    return [{"question": " ".join(rng.choices(WORDS, k=8)),
             "choices": [" ".join(rng.choices(WORDS, k=3)) for _ in range(4)], "answer": 0} for _ in range(n)]


def write_task(tasks_dir: Path, items: list[dict], yaml_text: str = TASK_YAML) -> Path:
    tasks_dir.mkdir(parents=True, exist_ok=True)
    data = tasks_dir / "planted.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (tasks_dir / "planted.yaml").write_text(yaml_text.format(data=data))
    (tasks_dir / "planted_ppl.yaml").write_text(PPL_YAML.format(data=data))
    (tasks_dir / "planted_gen.yaml").write_text(GEN_YAML.format(data=data))
    return tasks_dir


def planted_task(tasks_dir: Path, model_dir: Path, n: int = 24) -> Path:
    """Write `planted` into tasks_dir with, for every item, the answer the model in `model_dir` prefers (its
    loglikelihood argmax over the four choices, scored as lm-eval scores them: context, one space, choice)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = _items(n)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for it in items:
            ctx = tok(f"{it['question']}\nAnswer:")["input_ids"]
            lls = []
            for c in it["choices"]:
                cont = tok(" " + c)["input_ids"]
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                tgt = ids[0, 1:]
                lls.append(float(logp[len(ctx) - 1:].gather(-1, tgt[len(ctx) - 1:, None]).sum()))
            it["answer"] = max(range(4), key=lambda k: lls[k])
    return write_task(tasks_dir, items)


def copies(model_dir: Path, out: Path, noise: float = 5.0) -> tuple[Path, Path]:
    """(unchanged copy, damaged copy: Gaussian noise on every weight of the first block), as HF folders."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    same, damaged = out / "same", out / "damaged"
    # one extra config field: another content hash, so the copy is evaluated afresh rather than read back from
    # the base's cache entries (its weights are byte-identical)
    model.config.forgetcheck_note = "unchanged copy"
    model.save_pretrained(same)
    tok.save_pretrained(same)
    del model.config.forgetcheck_note
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    model.save_pretrained(damaged)
    tok.save_pretrained(damaged)
    return same, damaged


def lmeval_outputs(model_dir: Path, tasks_dir: Path, output_path: Path, tasks: tuple[str, ...] = ("planted",),
                   **kwargs) -> Path:
    """Stock lm-eval on `model_dir` (model="hf", fp32, CPU) with log_samples, saved by lm-eval's own
    EvaluationTracker exactly as `lm_eval --output_path DIR --log_samples` saves it. Returns the model folder."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={model_dir},dtype=float32"
    tracker = EvaluationTracker(output_path=str(output_path))
    out = simple_evaluate(model="hf", model_args=model_args, device="cpu", batch_size=32, tasks=list(tasks),
                          log_samples=True, evaluation_tracker=tracker,
                          task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), **kwargs)
    samples = out.pop("samples")
    tracker.save_results_aggregated(results=out, samples=samples)
    for name in out["configs"]:
        tracker.save_results_samples(task_name=name, samples=samples[name])
    return output_path / tracker.general_config_tracker.model_name_sanitized
