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
* any other group (choices of several tokens) becomes one *shared* row `P[:-1]` and one short child row
  `[P[-1]] + continuation[:-1]` per distinct continuation. So a four-choice item costs one pass over its
  context, not four.

Rows that begin with the same >= `MIN_STEM` tokens (a few-shot preamble, a task's fixed instruction, a
WinoGrande pair up to the blank) hang under one *stem* row. Each tree of rows is then laid out flat as one row
of the forward pass (`_flatten`, tree attention): every node's tokens one after the other, each token with its
own position id, and an additive attention mask in which a token sees its own node up to itself and its
ancestors' nodes, never a sibling: a child continuation sees exactly the context HFLM would feed before it. One
pass scores a context and all its continuations; no key/value cache is copied or expanded. A tree larger than
`SEGMENT_TOKENS` (a stem over hundreds of questions) is split into trees that each repeat the shared rows
(`_split`), since attention runs over the whole flattened row. A tree that is a single row from position 0 (a
lone context, a rolling window) runs in passes of its own without mask or positions, exactly as HFLM calls the
model.

Rows are sorted by length (longest first, like HFLM) and cut into forward passes of at most `batch_size` rows
and `token_budget` padded tokens, the cut chosen to minimise padding plus a per-pass cost (`_batches`), several
contexts (of several tasks, when lm-eval hands them over together) per pass. The vocabulary projection is
computed only at the scored positions (models/head.py `project_at`). Log-softmax, greedy check and sum are
HFLM's own operations, in the model's dtype (or `softmax_dtype`), taken `SCORE_CHUNK` positions at a time (a
long rolling window holds no second full [positions, vocab] tensor), so fp32 results agree to ~1e-5 per token
(batch shapes differ from HFLM's, so does float rounding) and bf16 to bf16 rounding. Truncated contexts share
only when their truncated windows agree (HFLM's window depends on the continuation's length).

Models with other than full attention in every layer (sliding-window layers: a custom mask would overrule their
window) and encoder-decoder models fall back to HFLM's own method.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from forgetcheck.models.head import project_at

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


MIN_STEM = 8  # shortest common prefix worth sharing as a stem row
TOKEN_BUDGET = 4096  # at most this many (padded) tokens per forward pass: long rows go fewer to a batch
# A forward pass costs about as much as this many more tokens: packing decides whether to start another pass
# by it (measured: docs/design.md, "Measured constants").
PASS_OVERHEAD = 64
SCORE_CHUNK = 256  # positions scored at a time (bounds the [positions, vocab] temporaries of long rows)
# A row tree larger than this is split into trees of at most this many tokens (`_split`): attention runs over the
# whole flattened tree, masked, so a huge tree (a stem over hundreds of questions) wastes most of it.
SEGMENT_TOKENS = 512
MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that apply a custom additive 4D mask


@dataclass
class _Scored:
    """Requests scored on one row: all share the row's tokens, so their continuations have the same length."""

    n_tokens: int  # continuation length: the last n_tokens positions of the row are scored
    requests: list[int] = field(default_factory=list)  # indices into the request list


@dataclass
class _Row:
    """A node of a row tree: tokens that follow the parent row's (if any) in one context."""

    tokens: list[int]
    start: int = 0  # position id of tokens[0] (the parent's rows end there)
    scored: _Scored | None = None  # None: nothing scored on this row, its children see it
    children: list[_Row] = field(default_factory=list)  # rows that continue this one (they see it, not each other)

    def free(self) -> int:
        """How many leading tokens could move into a shared stem (scored positions must stay here)."""
        return len(self.tokens) - (self.scored.n_tokens if self.scored else 1)


def hflm_window(context, continuation, max_length: int) -> list[int]:
    """The tokens HFLM scores a request on: context + continuation, left-truncated to max_length + 1 (it feeds all
    but the last)."""
    return (list(context) + list(continuation))[-(max_length + 1):]


def plan_rows(requests, max_length: int, min_stem: int = MIN_STEM) -> list[_Row]:
    """The tree of rows for `requests` ((key, context_tokens, continuation_tokens) triples, as HFLM gets
    them): root rows longest first. Pure bookkeeping; no model."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], _Scored]] = {}
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(f"request {i}: empty context or continuation, or continuation longer than "
                             f"max_length {max_length}")
        window = hflm_window(context, continuation, max_length)
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


def _batches(rows: list, per_pass: int, token_budget: int | None, overhead: int = PASS_OVERHEAD) -> list[list]:
    """`rows` (anything with `tokens`, longest first) cut into consecutive batches of at most `per_pass` rows
    and, when `token_budget` is set, at most that many padded tokens (rows x the first row's length; a longer
    row goes alone). The cut minimises padded tokens plus `overhead` per forward pass (dynamic programming
    over the sorted rows), so rows of very different lengths are not padded to the longest of them."""
    lengths = [len(row.tokens) for row in rows]
    best = [0.0] + [math.inf] * len(rows)  # best[j]: cost of the first j rows
    cut = [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        for i in range(j - 1, max(-1, j - 1 - per_pass), -1):  # batch rows[i:j], padded to lengths[i]
            n = j - i
            if token_budget and n > 1 and n * lengths[i] > token_budget:
                break
            cost = best[i] + n * lengths[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(rows)
    while j > 0:
        out.append(rows[cut[j]: j])
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


@dataclass
class _Segment:
    """One row tree laid out flat: every node's tokens one after the other (depth first), with their positions."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    nodes: list[tuple[int, int, list[tuple[int, int]]]] = field(default_factory=list)  # (start, end, ancestors)
    scored: list[tuple[int, _Scored]] = field(default_factory=list)  # (end of the node, what it scores)
    plain: bool = False  # a single node from position 0: plain causal attention


def _flatten(root: _Row) -> _Segment:
    """`root` and its descendants as one segment: a node's tokens keep their positions (`_Row.start`), and the
    node's (start, end) columns with its ancestors' spans say what each token may attend to."""
    seg = _Segment(plain=not root.children and root.start == 0)

    def visit(row: _Row, ancestors: list[tuple[int, int]]) -> None:
        a = len(seg.tokens)
        seg.tokens.extend(row.tokens)
        seg.positions.extend(range(row.start, row.start + len(row.tokens)))
        b = len(seg.tokens)
        seg.nodes.append((a, b, ancestors))
        if row.scored:
            seg.scored.append((b, row.scored))
        for child in row.children:
            visit(child, [*ancestors, (a, b)])

    visit(root, [])
    return seg


def _size(row: _Row) -> int:
    return len(row.tokens) + sum(_size(child) for child in row.children)


def _split(row: _Row, capacity: int) -> list[_Row]:
    """`row`'s tree as trees of at most `capacity` tokens where it can be: each copy keeps the row's own tokens
    and a share of its children (first fit, largest first; a child too big on its own is split the same way).
    A stem with hundreds of children (every MMLU question of a subject after its shared instruction) would be
    one segment of thousands of tokens, with attention computed over all of them; split, the instruction is run
    once per copy instead."""
    if not row.children or _size(row) <= capacity:
        return [row]
    room = max(1, capacity - len(row.tokens))
    bundles: list[list[_Row]] = []
    sizes: list[int] = []
    for part in sorted((p for child in row.children for p in _split(child, room)), key=_size, reverse=True):
        n = _size(part)
        i = next((i for i, used in enumerate(sizes) if used + n <= room), None)
        if i is None:
            bundles.append([])
            sizes.append(0)
            i = len(bundles) - 1
        bundles[i].append(part)
        sizes[i] += n
    return [_Row(row.tokens, start=row.start, scored=row.scored if i == 0 else None, children=_by_length(b))
            for i, b in enumerate(bundles)]


@functools.lru_cache(maxsize=1024)
def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril_()


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
        self.min_stem = MIN_STEM
        self.token_budget = TOKEN_BUDGET
        self.segment_tokens = SEGMENT_TOKENS

    # ---- helpers ---------------------------------------------------------------------------------------

    def _fast_path_ok(self) -> bool:
        """A causal model with full attention in every layer (a sliding window would be overruled by the tree mask;
        read from the layers of its DynamicCache), whose attention takes an additive 4D mask: SDPA or eager (flash
        attention kernels ignore a custom mask, so siblings would see each other)."""
        if getattr(self, "_fast_ok", None) is None:
            self._fast_ok = False
            attention = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
            if self.backend == "causal" and attention not in MASKED_ATTENTION:
                log.warning("FastLM: attention %r takes no custom mask; using HFLM's scoring", attention)
            elif self.backend == "causal":
                try:
                    from transformers import DynamicCache
                    from transformers.cache_utils import DynamicLayer

                    layers = DynamicCache(config=self.model.config).layers
                    self._fast_ok = all(type(layer) is DynamicLayer for layer in layers)
                except (ImportError, AttributeError, TypeError, ValueError):
                    pass
                if not self._fast_ok:
                    log.warning("FastLM: this model has other than full attention in some layer; using HFLM's "
                                "scoring")
        return self._fast_ok

    def _rows_per_pass(self, override_bs: int | None) -> int:
        if self.batch_size == "auto":
            if override_bs:
                return int(override_bs)
            if not getattr(self, "_auto_rows", None):
                self._auto_rows = int(self._detect_batch_size())
            return self._auto_rows
        return int(self.batch_size)

    def _forward(self, input_ids, pick, **kwargs):
        """One no-grad forward pass (with HFLM's autocast); logits [n, vocab] at the n positions of `pick` ([rows,
        columns] bool), in row-major order: the vocabulary projection runs only there (models/head.py)."""
        with (torch.inference_mode(), project_at(self.model, pick) as head,
              torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                             enabled=self.mixed_precision_dtype is not None)):
            logits = self.model(input_ids=input_ids, use_cache=False, **kwargs).logits
        return logits if head["fired"] and logits.dim() == 2 else logits[pick]

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
        self._run_flat(rows, requests, res, self._rows_per_pass(override_bs), pbar)
        pbar.close()
        assert all(r is not None for r in res)
        return res

    def _run_flat(self, roots: list[_Row], requests, res: list, per_pass: int, pbar) -> None:
        """Score every row tree of `roots`, each flattened into one row (`_split`, `_flatten`): rows longest first,
        cut into passes of at most `per_pass` rows and `token_budget` padded tokens (`_batches`). A pass of plain
        rows (one causal node from position 0: a lone context, a rolling window) is called without mask or
        positions, exactly as HFLM calls the model; a pass of trees gets each token's position id and a [rows, 1,
        columns, columns] additive mask in which a token sees its own node up to itself and its ancestors' nodes,
        nothing of its siblings or of the padding."""
        dev = self.device
        segments = _by_length([_flatten(part) for root in roots for part in _split(root, self.segment_tokens)])
        chunks = [c for group in ([g for g in segments if g.plain], [g for g in segments if not g.plain]) if group
                  for c in _batches(group, per_pass, self.token_budget)]
        for rows in chunks:
            width = max(len(seg.tokens) for seg in rows)
            plain = rows[0].plain
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # right padding, built on the host
            pick = torch.zeros(len(rows), width, dtype=torch.bool)
            positions = None if plain else torch.zeros(len(rows), width, dtype=torch.long)
            sees = None if plain else torch.zeros(len(rows), width, width, dtype=torch.bool)
            # what each row scores, in row-major order (rows in turn, a segment's nodes in column order): the order
            # of the logits `pick` gathers
            scored: list[_Scored] = []
            for k, seg in enumerate(rows):
                n = len(seg.tokens)
                input_ids[k, :n] = torch.tensor(seg.tokens, dtype=torch.long)
                for end, sc in seg.scored:
                    pick[k, end - sc.n_tokens: end] = True
                    scored.append(sc)
                if plain:
                    continue
                positions[k, :n] = torch.tensor(seg.positions)
                for a, b, ancestors in seg.nodes:
                    sees[k, a:b, a:b] = _causal(b - a)
                    for x, y in ancestors:
                        sees[k, a:b, x:y] = True
                pad = torch.arange(n, width)  # a padding column sees itself (a query that sees nothing gives NaN)
                sees[k, pad, pad] = True
            kwargs = {}
            if not plain:
                mask = torch.zeros(sees.shape, dtype=self.model.dtype)
                mask.masked_fill_(~sees, torch.finfo(self.model.dtype).min)
                kwargs = {"attention_mask": mask[:, None].to(dev), "position_ids": positions.to(dev)}
            logits = self._forward(input_ids.to(dev), pick.to(dev), **kwargs)
            first = 0
            for sc in scored:
                self._score(logits[first: first + sc.n_tokens], sc, requests, res, pbar)
                first += sc.n_tokens
            del logits
