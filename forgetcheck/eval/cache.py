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

from forgetcheck.config import forgetcheck_home
from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl, package_versions, read_json, read_jsonl

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


def read(key: str) -> tuple[dict, list[dict]] | None:
    d = cache_dir() / key
    if not (d / "result.json").is_file() or not (d / "samples.jsonl").is_file():
        return None
    return read_json(d / "result.json"), read_jsonl(d / "samples.jsonl")


def write(key: str, result: dict, rows: list[dict]) -> None:
    d = cache_dir() / key
    atomic_write_jsonl(d / "samples.jsonl", rows)
    atomic_write_json(d / "result.json", result)  # written last: its presence means the entry is whole
