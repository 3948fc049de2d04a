"""The informative screen (issue #28): whether a retention task is gated is decided on the base's screen items,
items never compared with an arm, so the gated set is fixed before the gated items are seen. Synthetic run folders
(tests/runfixture.py) with screen items written beside the base's; no model, no torch."""

from __future__ import annotations

import pytest
from runfixture import _set_correct, make_run

from forgetcheck.config import GateConfig
from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from forgetcheck.verdict.compare import MIN_SCREEN, compare_run, uninformative_tasks
from forgetcheck.verdict.gate import decide
from forgetcheck.verdict.rollup import gated_tasks

LIMIT = 50
# gated items far above chance (90 % right of 4 choices) / at chance (10 %); the screen items are planted apart
TASKS = {"ret_gated_high": ("retention", "multiple_choice", "acc", 4, 0.9),
         "ret_gated_low": ("retention", "multiple_choice", "acc", 4, 0.1),
         "ret_ppl": ("retention", "perplexity", "word_perplexity", 0, 0.0),
         "dom": ("domain", "multiple_choice", "acc", 4, 0.5)}


def screen_rows(task: str, n: int, right: int) -> list[dict]:
    """`n` screen items of a 4-choice task, the first `right` of them answered right by the base."""
    rows = []
    for i in range(n):
        row = {"doc_id": 10_000 + i, "doc_hash": f"{task}-screen-{i:05d}", "target": i % 4,
               "loglikelihoods": [-3.0, -4.0, -5.0, -6.0], "metrics": {}}
        _set_correct(row, i < right)
        rows.append(row)
    return rows


def add_screen(run, screens: dict[str, tuple[int, int]], asked: int = LIMIT) -> None:
    """Write the base's screen items as eval/runner.py does: samples/base/screen/<task>.jsonl and the task's `screen`
    entry; `screens`: {task: (items, right)}."""
    doc = read_json(run.eval_json("base"))
    doc["screen_items"] = asked
    for task, (n, right) in screens.items():
        rows = screen_rows(task, n, right)
        atomic_write_jsonl(run.samples_dir("base") / "screen" / f"{task}.jsonl", rows)
        acc = right / n
        doc["tasks"][task]["screen"] = {"samples": f"samples/base/screen/{task}.jsonl", "n": n,
                                        "metrics": {"acc": {"value": acc, "stderr": None, "higher_is_better": True}}}
    atomic_write_json(run.eval_json("base"), doc)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """ret_gated_high: the base is far above chance on its gated items, at chance on its screen items (12/50 right,
    chance 25 %); ret_gated_low the reverse (40/50 right on the screen)."""
    run = make_run(tmp_path_factory.mktemp("screen") / "r", tasks=TASKS, n=LIMIT,
                   flips={("sft", "ret_gated_high"): (5, 0), ("sft", "ret_gated_low"): (0, 2)})
    plain = compare_run(run, n_boot=200)  # before the screen items exist: the old screen on the gated items
    add_screen(run, {"ret_gated_high": (LIMIT, 12), "ret_gated_low": (LIMIT, 40)})
    return run, plain, compare_run(run, n_boot=200)


def test_informative_decision_follows_the_screen_items(planted):
    run, plain, c = planted
    # on the gated items alone the decision was the other way round
    assert plain["tasks"]["ret_gated_high"]["informative"]["value"] is True
    assert plain["tasks"]["ret_gated_low"]["informative"]["value"] is False
    high, low = c["tasks"]["ret_gated_high"]["informative"], c["tasks"]["ret_gated_low"]["informative"]
    assert high["value"] is False and low["value"] is True
    for inf, right in ((high, 12), (low, 40)):
        assert inf["items"] == "screen" and inf["separate"] is True and inf["screen"] == LIMIT == inf["n"]
        assert inf["correct"] == right and inf["note"] is None and "50 screen items" in inf["reason"]
    assert c["suites"]["retention"]["mean_over"] == ["ret_gated_low"]
    assert c["suites"]["retention"]["uninformative"] == ["ret_gated_high"]
    assert gated_tasks(c["tasks"], "sft") == ["ret_gated_low"]
    g = decide(c, GateConfig())
    assert [e["task"] for e in g["excluded"]] == ["ret_gated_high"]
    assert "screen items" in g["excluded"][0]["reason"] and "gated items themselves" not in g["excluded"][0]["reason"]
    # what `run` and `check` skip for the arms follows the same items
    skip = uninformative_tasks(run.eval_json("base"))
    assert list(skip) == ["ret_gated_high"] and "12/50 right on its screen items" in skip["ret_gated_high"]


def test_screen_items_never_enter_the_paired_estimates(tmp_path):
    """With screen items that agree with the gated ones (so the gated set is the same), compare.json is the same
    with and without them but for the informative test: n paired is the limit, the base's scores are its gated
    items', and no estimate, mean, arm-against-arm comparison or seed group moves."""
    flips = {("sft", "ret_gated_high"): (5, 0), ("cpt", "ret_gated_high"): (1, 3), ("sft", "dom"): (0, 4)}
    run = make_run(tmp_path / "r", tasks=TASKS, n=LIMIT, flips=flips)
    plain = compare_run(run, n_boot=200)
    add_screen(run, {"ret_gated_high": (LIMIT, 45), "ret_gated_low": (LIMIT, 3)})
    c = compare_run(run, n_boot=200)
    for t in c["tasks"].values():
        assert t["base"]["n"] == LIMIT
        for a in t["arms"].values():
            assert a["n_paired"] == LIMIT and a["unpaired"] == {"base_only": 0, "arm_only": 0}
    assert c["tasks"]["ret_gated_high"]["informative"]["items"] == "screen"
    for doc in (c, plain):
        for t in doc["tasks"].values():
            t.pop("informative")
    assert c == plain


def test_without_screen_items_the_test_falls_back_to_the_gated_items_and_says_so(planted):
    _, plain, _ = planted
    inf = plain["tasks"]["ret_gated_low"]["informative"]
    assert inf["separate"] is False and inf["items"] == "compared" and inf["screen"] == LIMIT
    assert inf["note"].startswith("screened on the gated items themselves")
    assert "before screen items" in inf["note"]  # make_run writes an eval file of an older forgetcheck
    assert inf["note"] in inf["reason"]
    g = decide(plain, GateConfig())
    assert [e["task"] for e in g["excluded"]] == ["ret_gated_low"]
    assert "screened on the gated items themselves" in g["excluded"][0]["reason"]
    # perplexity tasks run no test: nothing is said about a screen
    assert plain["tasks"]["ret_ppl"]["informative"]["separate"] is None


def test_the_report_lists_the_tasks_screened_on_their_gated_items(planted):
    from forgetcheck.report.html import screened_on_gated
    from forgetcheck.schema import compare_doc

    _, plain, c = planted
    assert screened_on_gated(compare_doc(c)) == []
    (entry,) = screened_on_gated(compare_doc(plain))
    assert entry["tasks"] == ["ret_gated_high", "ret_gated_low"] and "before screen items" in entry["note"]


@pytest.mark.parametrize("asked, limit, says", [(0, LIMIT, "--screen-items 0"),
                                                (0, None, "no --limit: every item is compared"),
                                                (LIMIT, LIMIT, "are every item of the task")])
def test_fallback_note_says_why_there_are_no_screen_items(tmp_path, asked, limit, says):
    run = make_run(tmp_path / "r", tasks=TASKS, n=LIMIT)
    doc = read_json(run.eval_json("base"))
    doc["screen_items"], doc["limit"] = asked, limit
    atomic_write_json(run.eval_json("base"), doc)
    inf = compare_run(run, n_boot=200)["tasks"]["ret_gated_high"]["informative"]
    assert inf["separate"] is False and says in inf["note"]


def test_too_few_screen_items_fall_back_rather_than_leave_the_task_out(tmp_path):
    """A task with barely more items than --limit (fc_us_state_abbreviation: 51 items at --limit 50) has a screen
    of one item, which could never show it above chance: the test falls back to the gated items, with a note."""
    run = make_run(tmp_path / "r", tasks=TASKS, n=LIMIT)
    add_screen(run, {"ret_gated_high": (1, 1), "ret_gated_low": (MIN_SCREEN, MIN_SCREEN)})
    c = compare_run(run, n_boot=200)
    high = c["tasks"]["ret_gated_high"]["informative"]
    assert high["value"] is True and high["separate"] is False and high["screen"] == LIMIT
    assert "only 1 screen item(s), fewer than 20" in high["note"]
    low = c["tasks"]["ret_gated_low"]["informative"]  # MIN_SCREEN items are enough
    assert low["separate"] is True and low["screen"] == MIN_SCREEN and low["value"] is True


def test_base_items_no_arm_has_serve_as_the_screen(tmp_path):
    """lm-eval outputs of the base at a larger limit than the candidates': the base-only items are the screen."""
    run = make_run(tmp_path / "r", tasks=TASKS, n=2 * LIMIT)
    for arm in ("sft", "cpt"):  # the arms keep the first LIMIT items
        doc = read_json(run.eval_json(arm))
        for entry in doc["tasks"].values():
            path = run.eval_json(arm).parent / entry["samples"]
            rows = [r for r in read_jsonl(path) if r["doc_id"] < LIMIT]
            atomic_write_jsonl(path, rows)
            entry["n"] = len(rows)
        atomic_write_json(run.eval_json(arm), doc)
    c = compare_run(run, n_boot=200)
    t = c["tasks"]["ret_gated_high"]
    base_rows = read_jsonl(run.samples_dir("base") / "ret_gated_high.jsonl")
    assert t["informative"]["items"] == "unpaired" and t["informative"]["separate"] is True
    assert t["informative"]["screen"] == LIMIT
    assert t["informative"]["correct"] == sum(r["correct"] for r in base_rows if r["doc_id"] >= LIMIT)
    assert t["arms"]["sft"]["n_paired"] == LIMIT and t["arms"]["sft"]["unpaired"]["base_only"] == LIMIT
