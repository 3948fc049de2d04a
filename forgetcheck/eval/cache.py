"""The evaluation cache: each task's records and metrics under `$FORGETCHECK_HOME/eval_cache/<key>/`.

The key hashes the model's weights and config, the task's rendered config and data files, the limit, the
backend, the device/dtype, the cache format and the library versions, so evaluating the same model again reads
the result back unchanged, without loading the model. An entry is whole once its result.json exists (written
last).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from forgetcheck import console
from forgetcheck.config import forgetcheck_home
from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl, package_versions

CACHE_FORMAT = 6  # 4: records hold every choice's text and the model's picks; WinoGrande's target is the gold index;
# 5: the fast backend scores perplexity (rolling) windows itself (rounding differs from HFLM's by ~1e-7 relative);
# 6: a target given as a choice's text (CommonsenseQA's "A") is that choice's index, not null


def versions() -> dict:
    v = package_versions()
    return {k: v.get(k) for k in ("forgetcheck", "torch", "transformers", "lm_eval")}


def key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    return forgetcheck_home() / "eval_cache"


def entry(versions: dict):
    """The cache folder of one result: `cache_entry(**key_parts)` (the format and versions always in the key)."""
    return lambda **parts: cache_dir() / key(fmt=CACHE_FORMAT, versions=versions, **parts)


RESULT_KEYS = {"suite": str, "kind": str, "primary_metric": str, "metrics": dict, "n": int, "backend_used": str}


def _entry_problem(result, rows: list) -> str | None:
    """Why a cache entry cannot be used (None: it is whole): result.json is the record `write` stores, and
    samples.jsonl holds exactly its `n` per-item records, one per item."""
    if not isinstance(result, dict):
        return f"result.json holds a {type(result).__name__}, not a result record"
    for k, kind in RESULT_KEYS.items():
        if not isinstance(result.get(k), kind) or isinstance(result.get(k), bool):
            return f"result.json has no {k} of type {kind.__name__}"
    if any(not isinstance(r, dict) or "doc_id" not in r for r in rows):
        return "samples.jsonl holds a line that is not a per-item record"
    if len(rows) != result["n"]:
        return f"samples.jsonl holds {len(rows)} records, result.json counts {result['n']}"
    if len({json.dumps(r["doc_id"]) for r in rows}) != len(rows):
        return "samples.jsonl holds an item twice"
    return None


def _load(path: Path, lines: bool):
    """A cache file's JSON value (a list of values for JSON lines), or the reason it is not readable JSON."""
    try:
        text = path.read_text(encoding="utf-8")
        if not lines:
            return json.loads(text), None
        if text and not text.endswith("\n"):
            return None, f"{path.name} ends in the middle of a line"
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()], None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, f"{path.name} is not readable JSON: {type(e).__name__}"


def read(key: str) -> tuple[dict, list[dict]] | None:
    """The cached (result, per-item rows) of `key`; None when there is no whole entry. An entry that is
    damaged (truncated, edited, lost lines) is never used: it is reported in one line and read as a miss, so
    the task is scored again and the entry rewritten."""
    d = cache_dir() / key
    if not (d / "result.json").is_file() or not (d / "samples.jsonl").is_file():
        return None
    result, why = _load(d / "result.json", lines=False)
    if why is None:
        rows, why = _load(d / "samples.jsonl", lines=True)
    if why is None:
        why = _entry_problem(result, rows)
    if why is None:
        return result, rows
    console.say(f"note: eval cache entry {d} is damaged ({why}); scoring the task again")
    return None


def write(key: str, result: dict, rows: list[dict]) -> None:
    d = cache_dir() / key
    atomic_write_jsonl(d / "samples.jsonl", rows)
    atomic_write_json(d / "result.json", result)  # written last: its presence means the entry is whole
