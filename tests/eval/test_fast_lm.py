"""FastLM gives stock HFLM's results item by item, while running each distinct context once."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from forgetcheck.eval.fast_lm import FastLM, plan_rows
from forgetcheck.models import registry

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fast_lm"
MAX_LENGTH = 48  # small, so that some contexts are left-truncated
WORDS = "the cat sat on a mat while dogs barked loudly at night and people walked past the old mill".split()

logging.getLogger("lm_eval").setLevel(logging.ERROR)


def mc_requests(seed: int = 0) -> list[Instance]:
    """Multiple-choice loglikelihood requests: 4 choices per context (letters, multi-token phrases, a choice
    without a leading space, a context with a trailing space), contexts short and longer than MAX_LENGTH,
    one empty context."""
    rng = random.Random(seed)
    reqs = []
    for q, n_words in enumerate([3, 12, 30, 45, 80, 120, 7, 60]):
        ctx = "Question: " + " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\nAnswer:"
        if q % 3 == 2:
            ctx += " "  # HFLM moves trailing spaces of the context onto the continuation
        if q % 2:
            choices = [" A", " B", " C", " D"]
        else:
            choices = [" yes", " the old mill", "cat sat", " dogs barked loudly at night"]
        reqs += [Instance("loglikelihood", {}, (ctx, c), i, metadata=("fixture", q, 1)) for i, c in enumerate(choices)]
    reqs.append(Instance("loglikelihood", {}, ("", " people walked past"), 0, metadata=("fixture", 99, 1)))
    # a shared few-shot-like preamble before different questions (runs once as a stem for all of them)
    preamble = "Answer each question about the old mill by the river, where the cat sat.\n\n"
    for q, n_words in enumerate([4, 9, 15], start=100):
        ctx = preamble + "Question: " + " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\nAnswer:"
        reqs += [Instance("loglikelihood", {}, (ctx, c), i, metadata=("fixture", q, 1))
                 for i, c in enumerate([" yes", " no", " the dogs", " A"])]
    # WinoGrande-style partial scoring: two contexts that differ at the blank, one shared continuation
    start = "In the evening the people walked past the old mill by the river because"
    for q, option in enumerate([" the cat", " the dogs"], start=200):
        reqs.append(Instance("loglikelihood", {}, (start + option, " barked loudly at night."), 0,
                             metadata=("fixture", q, 1)))
    return reqs


def assert_same(expected, got, tol: float = 1e-4) -> None:
    assert len(expected) == len(got)
    for i, ((ll_a, greedy_a), (ll_b, greedy_b)) in enumerate(zip(expected, got, strict=True)):
        assert math.isfinite(ll_b), i
        assert abs(ll_a - ll_b) <= tol, (i, ll_a, ll_b)
        assert greedy_a == greedy_b, (i, greedy_a, greedy_b)


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    model, tok = registry.load(tiny_ref)
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    fast = FastLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    return model, tok, hf, fast


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("forgetcheck-fast") is FastLM


def test_plan_runs_each_context_once():
    ctx_a, ctx_b = [5, 6, 7, 8], [9, 10, 11]
    reqs = [(None, ctx_a, [1, 2]), (None, ctx_a, [3]), (None, ctx_a, [1, 4, 4]),  # shared: 1 prefix row
            (None, ctx_b, [1]), (None, ctx_b, [2]), (None, ctx_b, [3])]  # all one token: 1 direct row
    rows = plan_rows(reqs, max_length=100)
    assert [r.tokens for r in rows] == [ctx_a[:-1], ctx_b]  # longest first, then by tokens
    shared, direct = rows
    assert sorted(direct.scored.requests) == [3, 4, 5] and not direct.children
    assert shared.scored is None
    assert sorted((c.tokens, c.start) for c in shared.children) == [([8], 3), ([8, 1], 3), ([8, 1, 4], 3)]
    # left truncation as HFLM: (context + continuation)[-(max_length + 1):], so the prefix depends on the
    # continuation's length and truncated contexts with continuations of different lengths do not share
    rows = plan_rows([(None, list(range(10)), [50]), (None, list(range(10)), [50, 51])], max_length=6)
    assert sorted(r.tokens for r in rows) == [[4, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 50]]


def test_plan_shares_common_stems():
    preamble = list(range(100, 112))  # 12 tokens shared by three contexts
    reqs = [(None, preamble + [1, 2], [7]), (None, preamble + [1, 2], [8]),  # direct row, 15 tokens
            (None, preamble + [3, 4, 5], [7, 7]), (None, preamble + [3, 4, 5], [8]),  # shared row
            (None, preamble + [6], [9, 9, 9]),  # direct row: its scored positions stay out of the stem
            (None, [1, 2, 3], [4])]  # nothing in common: a root of its own
    rows = plan_rows(reqs, max_length=100, min_stem=8)
    assert [r.tokens for r in rows] == [preamble, [1, 2, 3]]
    stem = rows[0]
    assert stem.scored is None and all(c.start == len(preamble) for c in stem.children)
    assert sorted(c.tokens for c in stem.children) == [[1, 2], [3, 4], [6, 9, 9]]
    shared = next(c for c in stem.children if c.tokens == [3, 4])
    assert sorted((g.tokens, g.start) for g in shared.children) == [([5], 14), ([5, 7], 14)]
    assert plan_rows(reqs, max_length=100, min_stem=13)[0].tokens != preamble  # shorter than min_stem


def test_flat_rows_see_only_their_ancestors_and_split_big_trees():
    from forgetcheck.eval.fast_lm import _flatten, _size, _split

    preamble = list(range(100, 112))
    reqs = [(None, preamble + [1, 2], [7]), (None, preamble + [3, 4, 5], [7, 7]), (None, preamble + [3, 4, 5], [8])]
    (stem,) = plan_rows(reqs, max_length=100, min_stem=8)
    seg = _flatten(stem)
    assert seg.tokens[:12] == preamble and len(seg.tokens) == _size(stem)
    # every token keeps its position in its own context; a node sees its ancestors' spans, never a sibling's
    by_start = {a: (b, anc) for a, b, anc in seg.nodes}
    assert by_start[0] == (12, [])
    for a, (_end, anc) in by_start.items():
        if a:
            assert (0, 12) in anc and seg.positions[a] == seg.positions[anc[-1][1] - 1] + 1
    assert sorted(sc.requests[0] for _, sc in seg.scored) == [0, 1, 2]
    # a stem over many questions becomes trees of at most the capacity, each with the stem, each request once
    many = [(None, preamble + [q, q + 1, q + 2], [7, q]) for q in range(0, 60, 3)]
    (big,) = plan_rows(many, max_length=100, min_stem=8)
    parts = _split(big, 40)
    assert len(parts) > 1 and all(_size(p) <= 40 and p.tokens == preamble for p in parts)
    asked = sorted(r for p in parts for _, sc in _flatten(p).scored for r in sc.requests)
    assert asked == list(range(len(many)))


def test_llama_style_model_matches_hflm(tiny):
    """Rotary positions and grouped-query attention: the flattened trees give HFLM's results."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, _, _ = tiny
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    fast = FastLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    reqs = mc_requests(seed=7)
    assert_same(hf.loglikelihood(reqs, disable_tqdm=True), fast.loglikelihood(reqs, disable_tqdm=True))


def test_loglikelihood_matches_hflm(tiny):
    _, _, hf, fast = tiny
    reqs = mc_requests()
    # the preamble items form a three-level tree: stem, each context's shared row, its choices
    encoded = [(r.args, *fast._encode_pair(*r.args)) for r in reqs if r.doc_id in (100, 101, 102)]
    (stem,) = plan_rows(encoded, MAX_LENGTH)
    assert len(stem.children) == 3 and stem.scored is None
    for row in stem.children:  # one-token choices share a row: " yes", " no", " A" one, " the dogs" another
        assert sorted(len(g.scored.requests) for g in row.children) == [1, 3]
    assert_same(hf.loglikelihood(reqs, disable_tqdm=True), fast.loglikelihood(reqs, disable_tqdm=True))


def test_greedy_continuations_match_hflm(tiny):
    """Token-level requests whose continuations are the model's own greedy tokens (is_greedy True), beside
    perturbed ones (False), sharing contexts, some longer than max_length."""
    model, _, hf, fast = tiny
    rng = random.Random(1)
    reqs = []
    for n_ctx in (2, 9, 30, 47, 70):
        ctx = [rng.randrange(50000) for _ in range(n_ctx)]
        seq = list(ctx)
        with torch.no_grad():
            for _ in range(3):
                seq.append(int(model(torch.tensor([seq[-MAX_LENGTH:]])).logits[0, -1].argmax()))
        greedy = seq[n_ctx:]
        for cont in (greedy, greedy[:1], greedy[:2], [greedy[0], (greedy[1] + 1) % 50000], [7, 8]):
            reqs.append((("ctx", "cont"), ctx, cont))
    expected = hf._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert_same(expected, got)
    assert sum(g for _, g in got) >= 10 and not all(g for _, g in got)


def test_fewer_tokens_through_the_model(tiny):
    model, _, hf, fast = tiny
    choices = [" yes", " the old mill", " cat sat", " dogs barked loudly at night"]
    reqs = [Instance("loglikelihood", {}, ("Question: " + " ".join((WORDS[k:] + WORDS)[:30]) + "\nAnswer:", c), i,
                     metadata=("fixture", k, 1)) for k in (0, 5) for i, c in enumerate(choices)]
    seen = []

    def count(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input_ids"]).numel())

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        hf.loglikelihood(reqs, disable_tqdm=True)
        hf_tokens = sum(seen)
        seen.clear()
        fast.loglikelihood(reqs, disable_tqdm=True)
        fast_tokens = sum(seen)
    finally:
        handle.remove()
    assert fast_tokens < 0.4 * hf_tokens  # 4 choices: ~1/4 as contexts grow, (fast_tokens, hf_tokens)


def test_rolling_matches_hflm(tiny):
    _, _, hf, fast = tiny
    rng = random.Random(2)
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (5, 40, 130)]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), 0, metadata=("fixture", i, 1)) for i, t in enumerate(texts)]
    expected = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    got = fast.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(got) == 3
    for a, b in zip(expected, got, strict=True):
        assert abs(a - b) <= 1e-4, (a, b)


def test_scoring_in_chunks_matches_hflm(tiny, monkeypatch):
    """Positions scored a few at a time (as long rolling windows are) give the same results."""
    import forgetcheck.eval.fast_lm as fast_lm

    _, _, hf, fast = tiny
    monkeypatch.setattr(fast_lm, "SCORE_CHUNK", 5)
    rng = random.Random(4)
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (3, 17, 90)]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), 0, metadata=("fixture", i, 1)) for i, t in enumerate(texts)]
    for a, b in zip(hf.loglikelihood_rolling(reqs, disable_tqdm=True),
                    fast.loglikelihood_rolling(reqs, disable_tqdm=True), strict=True):
        assert abs(a - b) <= 1e-4, (a, b)
    reqs = mc_requests(seed=5)
    assert_same(hf.loglikelihood(reqs, disable_tqdm=True), fast.loglikelihood(reqs, disable_tqdm=True))


def test_batches_cut_to_least_padding():
    from forgetcheck.eval.fast_lm import _batches, _Row

    rows = [_Row(list(range(n))) for n in (300, 200, 100, 50, 10, 10, 5)]

    def widths(**kw):
        return [[len(r.tokens) for r in b] for b in _batches(rows, **kw)]

    # a pass costs 64 tokens more: padding 100 to 200 (or 10 to 50) costs more than a pass, 50 to 100 less
    assert widths(per_pass=4, token_budget=400, overhead=64) == [[300], [200], [100, 50], [10, 10, 5]]
    # costly passes: fewer, padded batches, within 4 rows and 400 padded tokens (300 alone)
    assert widths(per_pass=4, token_budget=400, overhead=1000) == [[300], [200, 100], [50, 10, 10, 5]]
    assert widths(per_pass=2, token_budget=None, overhead=1000) == [[300, 200], [100], [50, 10], [10, 5]]
    assert widths(per_pass=4, token_budget=100, overhead=0)[0] == [300]  # a long row still runs, alone


def test_bf16_smoke(tiny_ref, tiny):
    _, _, _, fast32 = tiny
    model, tok = registry.load(tiny_ref, dtype="bfloat16")
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    fast = FastLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    reqs = mc_requests()
    got = fast.loglikelihood(reqs, disable_tqdm=True)
    ref16 = hf.loglikelihood(reqs, disable_tqdm=True)
    ref32 = fast32.loglikelihood(reqs, disable_tqdm=True)
    for (a16, _), (b, _), (a32, _) in zip(ref16, got, ref32, strict=True):
        assert math.isfinite(b)
        assert abs(a16 - b) <= 0.02 * abs(a16) + 0.1, (a16, b)
        assert abs(a32 - b) <= 0.02 * abs(a32) + 0.1, (a32, b)


def test_path_string_and_generate(tiny_ref, tiny):
    _, _, hf, _ = tiny
    fast = FastLM(pretrained=tiny_ref.path, batch_size=2, device="cpu", max_length=MAX_LENGTH)
    assert fast.model.dtype == torch.float32 and fast.device.type == "cpu"
    reqs = mc_requests()[:8]
    assert_same(hf.loglikelihood(reqs, disable_tqdm=True), fast.loglikelihood(reqs, disable_tqdm=True))
    out = fast.generate_until([Instance("generate_until", {}, ("The cat", {"until": ["\n"], "max_gen_toks": 4}),
                                        0, metadata=("fixture", 0, 1))], disable_tqdm=True)
    assert len(out) == 1 and isinstance(out[0], str)


def fixture_tasks() -> list[dict]:
    def task(name: str, data: str, **kw) -> dict:
        return {"task": name, "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(FIXTURES / data)}}, **kw}

    return [
        task("fast_lm_mc", "mc.jsonl", output_type="multiple_choice", doc_to_text="Question: {{question}}\nAnswer:",
             doc_to_choice="{{choices}}", doc_to_target="answer", metric_list=[{"metric": "acc"}]),
        task("fast_lm_ppl", "text.jsonl", output_type="loglikelihood_rolling", doc_to_text="",
             doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}]),
    ]


def test_simple_evaluate_per_item(tiny):
    """End to end through lm-eval's simple_evaluate: per-sample loglikelihoods and metrics equal HFLM's."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, _, hf, fast = tiny
    runs = {}
    for name, lm in (("hf", hf), ("fast", fast)):
        runs[name] = simple_evaluate(model=lm, tasks=fixture_tasks(), log_samples=True,
                                     task_manager=TaskManager(include_defaults=False), verbosity="ERROR")
    for task in ("fast_lm_mc", "fast_lm_ppl"):
        a, b = runs["hf"]["samples"][task], runs["fast"]["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["doc_id"] == y["doc_id"]
            for (ra,), (rb,) in zip(x["resps"], y["resps"], strict=True):
                ra, rb = (ra, rb) if task == "fast_lm_ppl" else (ra[0], rb[0])
                assert abs(float(ra) - float(rb)) <= 1e-4, (task, ra, rb)
            if task == "fast_lm_mc":
                assert x["acc"] == y["acc"]
        metric = "acc,none" if task == "fast_lm_mc" else "word_perplexity,none"
        assert runs["hf"]["results"][task][metric] == pytest.approx(runs["fast"]["results"][task][metric],
                                                                    rel=1e-5)


@pytest.mark.slow
def test_smollm2_matches_hflm(smollm2_ref):
    model, tok = registry.load(smollm2_ref)
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=96)
    fast = FastLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=96)
    reqs = mc_requests(seed=3)
    assert_same(hf.loglikelihood(reqs, disable_tqdm=True), fast.loglikelihood(reqs, disable_tqdm=True))
    texts = [Instance("loglikelihood_rolling", {}, (" ".join(WORDS * 8),), 0, metadata=("fixture", 0, 1))]
    (a,), (b,) = hf.loglikelihood_rolling(texts, disable_tqdm=True), fast.loglikelihood_rolling(texts, disable_tqdm=True)
    assert abs(a - b) <= 1e-3, (a, b)


def suite_tasks_dir(tmp_path: Path) -> tuple[Path, list[str]]:
    """The project's task YAMLs rendered against the session's benchmark data, built here when missing (a
    source that cannot be had fails the test: no skip)."""
    from forgetcheck.data import benchmarks
    from forgetcheck.data.domain import prepare_dataset

    prepare_dataset("med")
    man = benchmarks.prepare_bench()
    assert not man["missing"], man["lines"]
    names = benchmarks.suite_tasks("retention") + benchmarks.suite_tasks("domain")
    return benchmarks.render_tasks_dir(), names


@pytest.mark.slow
@pytest.mark.parametrize("ref_name", ["tiny_ref", "smollm2_ref"])
def test_suite_tasks_match_hflm(ref_name, request, tmp_path):
    """Every task of the retention and domain suites, the first items of each: per-item loglikelihoods
    within 1e-4 (perplexity: whole-document sums) and identical correctness."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir, names = suite_tasks_dir(tmp_path)
    model, tok = registry.load(request.getfixturevalue(ref_name))
    runs = {}
    for name, cls in (("hf", HFLM), ("fast", FastLM)):
        lm = cls(pretrained=model, tokenizer=tok, batch_size=8)
        runs[name] = simple_evaluate(model=lm, tasks=names, limit=6, log_samples=True, verbosity="ERROR",
                                     task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    for task in names:
        a, b = runs["hf"]["samples"][task], runs["fast"]["samples"][task]
        assert len(a) == len(b) > 0, task
        for x, y in zip(a, b, strict=True):
            assert x["doc_id"] == y["doc_id"]
            for ra, rb in zip(x["resps"], y["resps"], strict=True):
                ra, rb = ra[0], rb[0]
                if isinstance(ra, tuple | list):
                    assert abs(ra[0] - rb[0]) <= 1e-4 and ra[1] == rb[1], (task, ra, rb)
                else:
                    assert abs(ra - rb) <= 1e-4, (task, ra, rb)
            for metric in ("acc", "acc_norm"):
                assert x.get(metric) == y.get(metric), (task, metric)


def test_sliding_window_model_falls_back_to_hflm(tiny):
    """A cache FastLM cannot expand (sliding-window layers) is scored by HFLM's own method, same results."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tok, _, _ = tiny
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
                           max_position_embeddings=MAX_LENGTH)
    model = MistralForCausalLM(config).eval()
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    fast = FastLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    assert not fast._fast_path_ok()
    reqs = mc_requests()[:12]
    assert_same(hf.loglikelihood(reqs, disable_tqdm=True), fast.loglikelihood(reqs, disable_tqdm=True), tol=1e-6)


def test_attention_without_custom_masks_falls_back_to_hflm(tiny_ref, monkeypatch):
    """Flash-attention kernels ignore a custom 4D mask (a continuation would see its siblings): HFLM's scoring."""
    model, tok = registry.load(tiny_ref)
    fast = FastLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    assert fast._fast_path_ok()
    other = FastLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert not other._fast_path_ok()

