"""A faster lm-eval backend: each distinct context is run once for all of its continuations.

`FastLM` is lm-eval's own `HFLM` with two methods replaced, `_loglikelihood_tokens` and `loglikelihood_rolling`
(which builds HFLM's windows with the same lm-eval utilities, then scores all of them in one
`_loglikelihood_tokens` call instead of `batch_size` at a time in document order). Everything that decides
*what* is scored stays HFLM's: tokenization (`_encode_pair`, which moves a context's trailing spaces onto the
continuation), the left-truncation window, the rolling windows, `generate_until`. Only *how* the scores are
computed changes, so the results equal HFLM's item by item (to float rounding).

HFLM scores request i as the window `S = (context + continuation)[-(max_length + 1):]`, feeding `S[:-1]` and
reading the log-probabilities of the continuation's tokens at the last `len(continuation)` positions. Each
request thus has a scored prefix `P = S[:-len(continuation)]`. FastLM groups requests by `P`:

* a group whose requests all feed the same tokens (one request, or every continuation one token long, as
  in MMLU's " A".." D") becomes one *direct* row `S[:-1]`;
* any other group (choices of several tokens) becomes one *shared* row `P[:-1]`, run once with its
  key/value cache kept, and one short child row `[P[-1]] + continuation[:-1]` per distinct continuation,
  run over that cache. So a four-choice item costs one pass over its context, not four.

Rows that begin with the same >= `MIN_STEM` tokens (a few-shot preamble, a task's fixed instruction, a
WinoGrande pair up to the blank) hang under one *stem* row, run once. The result is a tree of rows, run
level by level: each level's rows sit after their parent's cached columns (the cache is expanded across the
batch with `index_select`), with explicit position ids and a 2D attention mask that hides the parent
batch's padding. Root rows are right-padded from position 0 and called without a mask, exactly like HFLM.

Rows are sorted by length (longest first, like HFLM) and cut into forward passes of at most `batch_size` rows
and `token_budget` padded tokens, the cut chosen to minimise padding plus a per-pass cost (`_batches`), several
contexts (of several tasks, when lm-eval hands them over together) per pass. The vocabulary projection is
computed only at the scored positions (transformers' `logits_to_keep`). Log-softmax, greedy check and sum are
HFLM's own operations, in the model's dtype (or `softmax_dtype`), taken `SCORE_CHUNK` positions at a time (a
long rolling window holds no second full [positions, vocab] tensor), so fp32 results agree to ~1e-5 per token
(batch shapes differ from HFLM's, so does float rounding) and bf16 to bf16 rounding. Truncated contexts share
only when their truncated windows agree (HFLM's window depends on the continuation's length).

Models whose cache is not a plain full-attention `DynamicCache` (sliding-window layers, for example) and
encoder-decoder models fall back to HFLM's own method.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


MIN_STEM = 8  # shortest common prefix worth running once for several rows (a pass over it, a cache copy)
TOKEN_BUDGET = 4096  # at most this many (padded) tokens per forward pass: long rows go fewer to a batch
# A forward pass costs about as much as this many more tokens: packing decides whether to start another pass
# by it (measured: docs/design.md, "Measured constants").
PASS_OVERHEAD = 64
SCORE_CHUNK = 256  # positions scored at a time (bounds the [positions, vocab] temporaries of long rows)


@dataclass
class _Scored:
    """Requests scored on one row: all share the row's tokens, so their continuations have the same length."""

    n_tokens: int  # continuation length: the last n_tokens positions of the row are scored
    requests: list[int] = field(default_factory=list)  # indices into the request list


@dataclass
class _Row:
    """Tokens run in one pass, after the cached keys/values of the parent row (if any)."""

    tokens: list[int]
    start: int = 0  # position id of tokens[0] (the parent's rows end there)
    scored: _Scored | None = None  # None: nothing scored on this row, it only feeds its children's cache
    children: list[_Row] = field(default_factory=list)  # rows run over this row's cache

    def free(self) -> int:
        """How many leading tokens could move into a shared stem (scored positions must stay here)."""
        return len(self.tokens) - (self.scored.n_tokens if self.scored else 1)


def plan_rows(requests, max_length: int, min_stem: int = MIN_STEM) -> list[_Row]:
    """The tree of rows for `requests` ((key, context_tokens, continuation_tokens) triples, as HFLM gets
    them): root rows longest first. Pure bookkeeping; no model."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], _Scored]] = {}
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(f"request {i}: empty context or continuation, or continuation longer than "
                             f"max_length {max_length}")
        window = (list(context) + list(continuation))[-(max_length + 1):]  # HFLM's left truncation
        prefix = tuple(window[: len(window) - len(continuation)])
        inputs = groups.setdefault(prefix, {})
        scored = inputs.setdefault(tuple(continuation[:-1]), _Scored(len(continuation)))
        scored.requests.append(i)

    rows: list[_Row] = []
    for prefix, inputs in groups.items():
        if len(inputs) == 1 or len(prefix) == 1:
            # every request of the group feeds the same tokens (or there is no prefix to share): direct rows
            for head, scored in inputs.items():
                rows.append(_Row(list(prefix + head), scored=scored))
        else:
            shared = _Row(list(prefix[:-1]))
            for head, scored in inputs.items():
                shared.children.append(_Row([prefix[-1], *head], start=len(prefix) - 1, scored=scored))
            _by_length(shared.children)
            rows.append(shared)
    return _by_length(_share_stems(rows, min_stem))


def _by_length(rows: list[_Row]) -> list[_Row]:
    rows.sort(key=lambda r: (-len(r.tokens), r.tokens))  # longest first, as HFLM
    return rows


def _batches(nodes: list, per_pass: int, token_budget: int | None, overhead: int = PASS_OVERHEAD) -> list[list]:
    """`nodes` ((parent index, row), longest first) cut into consecutive batches of at most `per_pass` rows
    and, when `token_budget` is set, at most that many padded tokens (rows x the first row's length; a longer
    row goes alone). The cut minimises padded tokens plus `overhead` per forward pass (dynamic programming
    over the sorted rows), so rows of very different lengths are not padded to the longest of them."""
    lengths = [len(row.tokens) for _, row in nodes]
    best = [0.0] + [math.inf] * len(nodes)  # best[j]: cost of the first j nodes
    cut = [0] * (len(nodes) + 1)
    for j in range(1, len(nodes) + 1):
        for i in range(j - 1, max(-1, j - 1 - per_pass), -1):  # batch nodes[i:j], padded to lengths[i]
            rows = j - i
            if token_budget and rows > 1 and rows * lengths[i] > token_budget:
                break
            cost = best[i] + rows * lengths[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(nodes)
    while j > 0:
        out.append(nodes[cut[j]: j])
        j = cut[j]
    return out[::-1]


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _share_stems(rows: list[_Row], min_stem: int) -> list[_Row]:
    """Rows that begin with the same >= min_stem tokens (a few-shot preamble, a task's instruction, the
    two sentences of a WinoGrande pair up to the blank) become children of one stem row run once.
    Greedy over the rows in token order; one level of stems."""
    if min_stem <= 0:
        return rows
    out: list[_Row] = []
    cluster: list[_Row] = []
    stem = 0

    def flush() -> None:
        if len(cluster) >= 2 and stem >= min_stem:
            root = _Row(cluster[0].tokens[:stem])
            for row in cluster:
                row.tokens, row.start = row.tokens[stem:], stem
                root.children.append(row)
            _by_length(root.children)
            out.append(root)
        else:
            out.extend(cluster)

    for row in sorted(rows, key=lambda r: r.tokens):
        if cluster:
            common = min(stem, _common_length(cluster[-1].tokens, row.tokens), row.free())
            if common >= min_stem:
                cluster.append(row)
                stem = common
                continue
            flush()
        cluster, stem = [row], row.free()
    flush()
    return out


@register_model("forgetcheck-fast")
class FastLM(HFLM):
    """lm-eval `HFLM` that runs each distinct context once for all its continuations.

    `pretrained` is a transformers model (used as is, on its own device and dtype, as HFLM does with a model
    object) or a path / hub id, loaded with `AutoModelForCausalLM` in `dtype` (default: the checkpoint's) on
    `device` (default: CUDA when available, else CPU). `batch_size` is rows per forward pass.
    """

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 max_length: int | None = None, **kwargs) -> None:
        if isinstance(pretrained, str):
            from transformers import AutoModelForCausalLM

            tokenizer = tokenizer if tokenizer is not None else pretrained
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            load_dtype = dtype if dtype is not None else "auto"
            if isinstance(load_dtype, str) and load_dtype != "auto":
                load_dtype = getattr(torch, load_dtype)
            pretrained = AutoModelForCausalLM.from_pretrained(pretrained, dtype=load_dtype).to(device)
        elif device is not None and torch.device(device) != pretrained.device:
            log.warning("FastLM: device=%s ignored, the model object stays on %s (as HFLM does)",
                        device, pretrained.device)
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        kwargs.pop("dtype", None)
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size,
                         max_length=max_length, **kwargs)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        self.min_stem = MIN_STEM
        self.token_budget = TOKEN_BUDGET

    # ---- helpers ---------------------------------------------------------------------------------------

    def _fast_path_ok(self) -> bool:
        """A causal model whose cache is plain full attention (what the expanded-cache rows rely on)."""
        if getattr(self, "_fast_ok", None) is None:
            self._fast_ok = False
            if self.backend == "causal":
                try:
                    from transformers import DynamicCache
                    from transformers.cache_utils import DynamicLayer

                    layers = DynamicCache(config=self.model.config).layers
                    self._fast_ok = all(type(layer) is DynamicLayer for layer in layers)
                except (ImportError, AttributeError, TypeError, ValueError):
                    pass
            if not self._fast_ok:
                log.warning("FastLM: this model's cache is not a plain DynamicCache; using HFLM's scoring")
        return self._fast_ok

    def _rows_per_pass(self, override_bs: int | None) -> int:
        if self.batch_size == "auto":
            if override_bs:
                return int(override_bs)
            if not getattr(self, "_auto_rows", None):
                self._auto_rows = int(self._detect_batch_size())
            return self._auto_rows
        return int(self.batch_size)

    def _forward(self, input_ids, keep=None, **kwargs):
        """One no-grad forward pass (with HFLM's autocast); logits at positions `keep` (1D) or all."""
        if keep is not None and self._keeps_logits:
            whole = keep.numel() == input_ids.shape[1]  # every position (rolling windows): no index copy
            kwargs["logits_to_keep"] = 0 if whole else keep
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits
        if keep is not None and not self._keeps_logits:
            logits = logits[:, keep]
        return logits, getattr(out, self._cache_kwarg, None)

    def _score(self, logits: torch.Tensor, scored: _Scored, requests, res: list, pbar) -> None:
        """HFLM's scoring of one row's continuation logits [n, vocab] for every request that shares them:
        log_softmax (in HFLM's `softmax_dtype`), greedy check, sum of the continuation's log-probabilities.
        Positions are taken `SCORE_CHUNK` at a time, so a long row (a rolling window of thousands of positions)
        never materialises its whole [n, vocab] log-probabilities next to the logits."""
        n = logits.shape[0]
        conts = [torch.tensor(requests[i][2], dtype=torch.long, device=logits.device) for i in scored.requests]
        picked: list[list[torch.Tensor]] = [[] for _ in conts]
        greedy = [True] * len(conts)
        for a in range(0, n, SCORE_CHUNK):
            logprobs = F.log_softmax(logits[a: a + SCORE_CHUNK], dim=-1, dtype=self.softmax_dtype)
            best = logprobs.argmax(dim=-1)
            for r, cont in enumerate(conts):
                part = cont[a: a + SCORE_CHUNK]
                picked[r].append(torch.gather(logprobs, 1, part.unsqueeze(1)).squeeze(1))
                greedy[r] = greedy[r] and bool((best == part).all())
        for r, i in enumerate(scored.requests):
            answer = (float(torch.cat(picked[r]).sum()), greedy[r])  # summed as HFLM sums: one tensor sum
            res[i] = answer
            key = requests[i][0]
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            pbar.update(1)

    # ---- the methods lm-eval calls: loglikelihood_rolling, and _loglikelihood_tokens (under loglikelihood) ----

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows (the same lm-eval utilities, the same prefix token and max_length), scored
        all together by `_loglikelihood_tokens`: sorted by length and batched to least padding across every
        document. HFLM scores them `batch_size` windows at a time in document order, each batch padded to its
        longest window and projected to the vocabulary at every padded position (on the med and SQuAD
        perplexity tasks, over twice the work: bench/fast_lm_throughput.py). A document's loglikelihood is the
        sum of its windows', as in HFLM; only float rounding differs (~1e-5 relative)."""
        from lm_eval import utils

        if not requests:
            return []
        if not self._fast_path_ok():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _greedy) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not requests:
            return []
        if not self._fast_path_ok():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        rows = plan_rows(requests, self.max_length, self.min_stem)
        res: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0),
                    desc="Running loglikelihood requests (fast)")
        self._run_level([(None, row) for row in rows], None, requests, res, self._rows_per_pass(override_bs), pbar)
        pbar.close()
        assert all(r is not None for r in res)
        return res

    def _run_level(self, nodes: list[tuple[int | None, _Row]], parent, requests, res: list, per_pass: int,
                   pbar) -> None:
        """Run `nodes` ((parent row index, row), longest first), `per_pass` rows per forward pass, then their
        children. `parent` is None for root rows (right-padded from position 0: no mask, exactly HFLM's
        call) or (cache, attention mask [rows, columns]) of the parent batch, expanded to each row's parent:
        the row's tokens then sit after the parent's columns, with explicit position ids."""
        from transformers import DynamicCache

        dev = self.device
        for chunk in _batches(nodes, per_pass, self.token_budget):
            width = max(len(row.tokens) for _, row in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)  # right padding, built on the host
            own_mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for k, (_, row) in enumerate(chunk):
                input_ids[k, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
                own_mask[k, : len(row.tokens)] = 1
            input_ids, own_mask = input_ids.to(dev), own_mask.to(dev)
            kwargs = {"use_cache": any(row.children for _, row in chunk)}
            if parent is None:
                mask = own_mask  # causal + right padding: real tokens never see the padding, no mask needed
            else:
                cache, parent_mask = parent
                index = torch.tensor([j for j, _ in chunk], dtype=torch.long, device=dev)
                kwargs[self._cache_kwarg] = DynamicCache(
                    [(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                     for layer in cache.layers])
                mask = torch.cat([parent_mask.index_select(0, index), own_mask], dim=1)
                starts = torch.tensor([row.start for _, row in chunk], dtype=torch.long, device=dev)
                kwargs["attention_mask"] = mask
                kwargs["position_ids"] = starts[:, None] + torch.arange(width, device=dev)[None, :]
                kwargs["use_cache"] = True  # the expanded copy is ours; some models only read it with use_cache
            # logits only where something is scored; with nothing scored, one (the projection is then ~free)
            positions = sorted({p for _, row in chunk if row.scored
                                for p in range(len(row.tokens) - row.scored.n_tokens, len(row.tokens))})
            keep = torch.tensor(positions or [width - 1], dtype=torch.long, device=dev)
            logits, out_cache = self._forward(input_ids, keep=keep, **kwargs)
            column = {p: k for k, p in enumerate(positions)}
            for k, (_, row) in enumerate(chunk):
                if row.scored:  # the row's scored positions are a run of consecutive kept columns
                    first = column[len(row.tokens) - row.scored.n_tokens]
                    self._score(logits[k, first: first + row.scored.n_tokens], row.scored, requests, res, pbar)
            del logits
            children = [(k, child) for k, (_, row) in enumerate(chunk) for child in row.children]
            if children:
                children.sort(key=lambda kc: (-len(kc[1].tokens), kc[1].tokens))
                self._run_level(children, (out_cache, mask), requests, res, per_pass, pbar)
