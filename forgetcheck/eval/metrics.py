"""The lm-eval metric names forgetcheck gives a meaning of its own: the perplexity metrics (lower is better,
each the documents' log-likelihood over a count) and the primary metric of a task that names none."""

from __future__ import annotations

WORD_PERPLEXITY, BYTE_PERPLEXITY, BITS_PER_BYTE = "word_perplexity", "byte_perplexity", "bits_per_byte"

PERPLEXITY_METRICS = {WORD_PERPLEXITY: "words", BYTE_PERPLEXITY: "bytes", BITS_PER_BYTE: "bytes"}
"""lm-eval's perplexity metrics, each with the per-item record's count its log-likelihood is divided by."""

DEFAULT_PRIMARY = {"multiple_choice": "acc", "perplexity": WORD_PERPLEXITY}
"""The primary metric of a task of each kind whose metadata names none."""


def higher_is_better(metric: str) -> bool:
    """The direction of a metric whose task does not say: every metric but a perplexity is a score."""
    return metric not in PERPLEXITY_METRICS
