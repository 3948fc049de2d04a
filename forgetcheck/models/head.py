"""The output projection at chosen positions only.

The vocabulary projection is the largest matrix of a small model, and most positions of a training row (an SFT
prompt) or a scoring pass (a context) need no logits. `project_at` lets the model run unchanged and hands its
output embeddings the hidden states of the chosen positions only: training (train/loop.py `micro_batch_loss`) and
scoring (eval/fast_lm.py) both use it.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def project_at(model, positions):
    """While active, the model's output projection (`get_output_embeddings()`) sees only the hidden states at
    `positions` (a [batch, seq] bool mask): it returns logits [n, vocab] for those n positions instead of
    [batch, seq, vocab]. Whatever the model does after the projection (a logit scale, a soft cap) is
    elementwise and applies unchanged. Yields a dict whose "fired" says whether the projection ran through the
    hook (a model that computes its logits another way gets its full logits, and the caller falls back)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    state = {"fired": False}
    if head is None:
        yield state
        return

    def pick(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        if hidden is None or hidden.dim() != 3 or hidden.shape[:2] != positions.shape:
            return None  # not the call we expect (already sliced, another shape): leave it alone
        state["fired"] = True
        picked = hidden[positions]
        return ((picked, *args[1:]), kwargs) if args else (args, {**kwargs, "input": picked})

    handle = head.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
