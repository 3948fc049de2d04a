"""Typed schema of every JSON file in the run directory, and a check that a file matches.

Each file carries `schema_version`; readers refuse a version they do not know, with the fix.
This module imports nothing heavy: compare, report and gate use it on JSON alone.
"""

from __future__ import annotations

from typing import Any, TypedDict

from forgetcheck.errors import BadInput

SCHEMA_VERSION = 1


class MetricValue(TypedDict):
    value: float
    stderr: float | None
    higher_is_better: bool


class TaskResult(TypedDict, total=False):
    suite: str  # "retention" | "domain"
    kind: str  # "multiple_choice" | "perplexity"
    primary_metric: str  # e.g. "acc", "word_perplexity"
    metrics: dict[str, MetricValue]
    n: int  # items evaluated
    chance: float | None  # primary metric of random guessing (None for perplexity)
    samples: str  # path of the per-item JSONL, relative to the eval JSON's folder


class EvalFile(TypedDict, total=False):
    """eval/<model>.json. Per-item lines in eval/samples/<model>/<task>.jsonl:
    multiple choice: {doc_id, doc_hash, target, loglikelihoods: [...], correct: bool, metrics: {acc, acc_norm}}
    perplexity:      {doc_id, doc_hash, loglikelihood, words, bytes, tokens}
    """

    schema_version: int
    kind: str  # "eval"
    model: dict[str, Any]  # name, path, content_hash, random_weights
    limit: int | None
    backend: str
    versions: dict[str, str | None]
    tasks: dict[str, TaskResult]
    drift: dict[str, Any]  # {"kl": {...}} when a reference (base) distribution was given


class TrainFile(TypedDict, total=False):
    """train/<arm>.json."""

    schema_version: int
    kind: str  # "train"
    arm: str
    base: str
    tokens_seen: dict[str, int]  # forward (padding excluded), padding, label (tokens with loss)
    budget_tokens: int
    optimizer_steps: int
    loss_curve: list[list[float]]  # [[step, loss], ...]
    lr_curve: list[list[float]]  # [[step, lr], ...]
    wall_s: float
    tokens_per_s: float
    memory: dict[str, Any]  # planned (bytes per component), measured_peak_bytes, method
    config: dict[str, Any]
    checkpoint: str
    base_ref: dict[str, Any]  # the resolved --base (models.ModelRef)
    random_weights: bool  # copied from the base: a random-init base makes every result a plumbing check
    data: str  # the domain file the arm read
    tokens_per_step: int
    step_s: list[float]  # wall seconds of each optimizer step
    packing: str  # how rows were built (both arms: wrapped packing, no padding)


def require(obj: Any, kind: str, path: str = "") -> dict:
    """Check a loaded JSON object is a forgetcheck `kind` file of a version we read."""
    where = path or kind
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: not a forgetcheck {kind} file (expected a JSON object)")
    version = obj.get("schema_version")
    if version is None:
        raise BadInput(f"{where}: no schema_version; is this a forgetcheck {kind} file?")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BadInput(f"{where}: schema_version {version!r} is not a version number (1, 2, ...): the file was "
                       f"edited or is not forgetcheck's; re-run the command that writes it")
    if version > SCHEMA_VERSION:
        raise BadInput(f"{where}: schema_version {version} is newer than this forgetcheck reads "
                       f"({SCHEMA_VERSION}): upgrade forgetcheck")
    if obj.get("kind") not in (None, kind):
        raise BadInput(f"{where}: is a '{obj.get('kind')}' file, expected '{kind}'")
    return obj
