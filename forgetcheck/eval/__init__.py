"""Evaluation: the lm-eval runner, suites, per-item records, the cache, the fast backend, drift, and
reading and pairing stock lm-eval outputs."""
