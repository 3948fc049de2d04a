"""What autograd really keeps for backward: the bytes of one training forward's saved tensors, per block.

`saved_bytes` runs one forward + backward of a model the way the training loop does (train/loop.py
`micro_batch_loss`: autocast for the mixed precisions, the vocabulary projection only at label positions) and
counts, through `torch.autograd.graph.saved_tensors_hooks`, every storage autograd saves for backward. This is the
activation memory the planner (train/memory.py `activation_bytes`) estimates, measured exactly and independently of
the device's allocator: a storage saved by several ops (a tensor and its views) is counted once, by its untyped
storage, at its full size.

What is counted where:

  * `blocks[i]`: storages first saved while transformer block i runs (forward pre/post hooks on the blocks);
    `embeddings`: before the first block; `head`: after the last block (final norm, the projection at the label
    positions, the loss); `shared`: storages saved in more than one of those places (Llama's rotary cos/sin, which
    every layer multiplies by; counted once, as they are held once).
  * Parameters and their views (a Linear's weight, kept for its input gradient) are the model's weights, planned
    apart: not counted. Under autocast each weight's 16-bit copy (the cast cache, one per weight per forward) IS
    extra memory held until backward; it goes to `weight_casts`, not to the blocks.
  * With non-reentrant checkpointing (torch.utils.checkpoint, as `_load_model` asks), a checkpointed block saves
    nothing through our hooks during the forward (the checkpoint's own hook, innermost, replaces each saved tensor
    by an empty holder) and keeps its inputs alive instead: `kept_inputs[i]` is the storages of block i's tensor
    arguments (the hidden states; shared ones once). During backward each block is recomputed, and its saved tensors
    go to the checkpoint's recomputation hook, not to ours (hooks do not nest: only the innermost pack hook runs),
    so `saved_bytes` wraps that hook for the run to see them: `recomputed[i]` is what block i's recompute saved.
    The checkpointed peak is then `embeddings + shared + kept inputs + head + weight_casts + max(recomputed)`
    (`Saved.peak`): one block's rebuilt tensors are alive at a time.

bench/activation_plan.py prints planned against measured at realistic sizes; tests/train/test_activations.py holds
the planner to +/-15% of this measurement on tiny GPT-2 and Llama configs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

_VIEWS = {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "ReshapeAliasBackward0",
          "ExpandBackward0", "UnsafeViewBackward0", "AsStridedBackward0"}


@dataclass
class Saved:
    """Bytes of the storages autograd saved during one forward (and, with checkpointing, each block's recompute)."""

    embeddings: int = 0
    blocks: list[int] = field(default_factory=list)
    head: int = 0
    shared: int = 0
    weight_casts: int = 0  # autocast's 16-bit copies of the weights
    recomputed: list[int] = field(default_factory=list)  # what each block's recompute saved (checkpointing)
    checkpointed: bool = False

    @property
    def peak(self) -> int:
        """Saved bytes alive at once: everything the forward saved, plus the largest recomputed block when the
        blocks are checkpointed (the bytes the planner's `activation_bytes` estimates)."""
        base = self.embeddings + self.head + self.shared + self.weight_casts + sum(self.blocks)
        if self.checkpointed:
            return base + max(self.recomputed, default=0)
        return base

    @property
    def per_layer(self) -> int:
        """One block's saved bytes: the largest block of the forward, or of the recompute when checkpointed."""
        return max(self.recomputed if self.checkpointed else self.blocks, default=0)


@contextlib.contextmanager
def _seeing_recompute(record: list, record_one):
    """While active, each recomputation torch.utils.checkpoint runs appends a dict to `record`, and every tensor it
    saves is passed to `record_one(that dict, tensor)`. The recomputation pushes its own saved-tensors hook
    (innermost, so ours does not run); this wraps its pack hook. Private to torch: when the class is missing the
    recompute is not seen (the caller checks)."""
    from torch.utils import checkpoint as ckpt

    original = getattr(ckpt, "_recomputation_hook", None)
    if original is None:
        yield False
        return

    class Seeing(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inner, one = self.pack_hook, {}  # one instance per block recompute
            record.append(one)

            def pack_hook(x):
                record_one(one, x)
                return inner(x)

            self.pack_hook = pack_hook

    ckpt._recomputation_hook = Seeing
    try:
        yield True
    finally:
        ckpt._recomputation_hook = original


def saved_bytes(model, input_ids, labels=None, *, autocast=None) -> Saved:
    """Run one training forward + backward of `model` on `input_ids` ([batch, seq]; `labels` defaults to the
    inputs) as train/loop.py `micro_batch_loss` does, under `autocast` (a context factory or None), and measure
    the saved bytes (the module docstring). Checkpointing is whatever the model has switched on
    (`gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`); the gradients it
    leaves in `.grad` are the caller's to clear."""
    import torch

    from forgetcheck.train.arms import blocks as transformer_blocks
    from forgetcheck.train.loop import micro_batch_loss

    labels = input_ids if labels is None else labels
    blocks = list(transformer_blocks(model))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where = {"now": "embeddings"}
    seen: dict[int, tuple[int, set]] = {}  # storage pointer -> (bytes, places that saved it)
    # every storage counted is held here until the end, so no later tensor (a recompute's) can take its address
    # and be mistaken for it; this holds nothing autograd would not hold anyway until its backward step
    alive: list = []
    casts: dict[int, int] = {}
    kept: dict[int, tuple[int, set]] = {}
    recomputes: list[dict] = []  # one per block recompute, in the order backward runs them

    def is_weight_cast(t) -> bool:
        # autocast's copy of a parameter, or a view of it (F.linear saves the transposed weight): views back to
        # a ToCopy node whose input is the parameter's gradient accumulator
        fn = t.grad_fn
        while fn is not None and type(fn).__name__ in _VIEWS and fn.next_functions:
            fn = fn.next_functions[0][0]
        if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
            return False
        return isinstance(getattr(fn.next_functions[0][0], "variable", None), torch.nn.Parameter)

    def pack(t):
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        if n == 0 or ptr in params:
            return t
        alive.append(st)
        if is_weight_cast(t):
            casts[ptr] = n
            return t
        entry = seen.setdefault(ptr, (n, set()))
        entry[1].add(where["now"])
        return t

    def record_recompute(one: dict, t) -> None:
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        # what is already held (the block's input, rotary cos/sin) is no new memory; the recompute runs its own
        # autocast, whose 16-bit weight copies are new and live until the block's backward is done
        if n and ptr not in params and ptr not in seen and ptr not in kept:
            one[ptr] = n

    handles = []
    for i, block in enumerate(blocks):
        def pre(_m, args, kwargs, i=i):
            where["now"] = f"block {i}"
            if getattr(_m, "gradient_checkpointing", False) and _m.training and torch.is_grad_enabled():
                for x in [*args, *kwargs.values()]:
                    for y in (x if isinstance(x, (tuple, list)) else (x,)):  # Llama's (cos, sin)
                        if isinstance(y, torch.Tensor):
                            st = y.untyped_storage()
                            if st.nbytes() and st.data_ptr() not in params:
                                alive.append(st)
                                kept.setdefault(st.data_ptr(), (st.nbytes(), set()))[1].add(i)
            return None

        def post(_m, _args, _out, i=i):
            where["now"] = "head" if i == len(blocks) - 1 else f"between {i}"
            return None

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))
    autocast = autocast or contextlib.nullcontext
    try:
        with _seeing_recompute(recomputes, record_recompute) as sees_recompute:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = micro_batch_loss(model, input_ids, labels, torch.ones_like(input_ids), 1, autocast)
            loss.backward()
    finally:
        for h in handles:
            h.remove()

    out = Saved(blocks=[0] * len(blocks), weight_casts=sum(casts.values()), checkpointed=bool(kept))
    for ptr, (n, users) in kept.items():  # inputs a checkpoint holds without saving them through the hooks
        if ptr not in seen:
            seen[ptr] = (n, {f"block {i}" for i in users})
    for n, places in seen.values():
        if len(places) > 1:
            out.shared += n
        else:
            place = next(iter(places))
            if place.startswith("block"):
                out.blocks[int(place[6:])] += n
            elif place == "embeddings":
                out.embeddings += n
            else:  # "between" blocks (nothing in GPT-2 or Llama) and after the last one
                out.head += n
    if kept:
        if not sees_recompute:
            raise RuntimeError("this torch's checkpoint has no _recomputation_hook: the recompute cannot be seen")
        # backward recomputes the blocks last to first; transformers checkpoints the blocks' `forward`, not their
        # `__call__`, so the block hooks do not run during the recompute and the order tells which block it is
        out.recomputed = [sum(r.values()) for r in reversed(recomputes)]
    return out
