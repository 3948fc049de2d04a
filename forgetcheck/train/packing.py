"""Training rows: the only place where the arms' data differ (docs/design.md, "Data flow").

  * `sft` (and `lora`, `freeze`): each prompt/response pair is rendered with the tokenizer's chat template (a
    plain "### Instruction / ### Response" template when it has none); loss on the response tokens (and the
    EOS) only, or on everything with `include_prompt_loss`. Each example is truncated to seq_len.
  * `cpt`: raw text + EOS, loss on every token.
  * `replay`: the SFT stream with general-text pieces (data/replay.py) inserted after each example while
    replay tokens < replay_frac x tokens so far; loss on every replay token.

Every arm then goes through the same packer: examples are concatenated, each with its own label mask, and the
stream is cut into rows of exactly seq_len tokens (TRL's "wrapped" packing). An example that does not fit the
rest of a row continues in the next row, so every row is full and no row is padded. The examples are
reshuffled each epoch from `data_seed + epoch`, so rows are a pure function of the data and the seed.

Records that carry a `unit` (the packaged `med` writes one on every SFT pair and CPT document: the facts of one
page) are shuffled by unit instead, a unit's records kept together in file order. Both files list the same units
in the same order, so the SFT and CPT streams meet the same facts in the same order whatever their shapes: the
facts that every arm trained on within its budget are a prefix of the units (train/recall.py asks them).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forgetcheck import config
from forgetcheck.errors import BadInput

IGNORE = -100
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def render_sft(tok, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, response text) of one pair: the chat template when the tokenizer has one."""
    if getattr(tok, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head):]
    return PLAIN_TEMPLATE.format(prompt=prompt), response


def sft_example(tok, row: dict, seq_len: int, include_prompt_loss: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of one pair: prompt tokens masked (unless include_prompt_loss), EOS appended."""
    head, tail = render_sft(tok, row["prompt"], row["response"])
    p = tok(head, add_special_tokens=False)["input_ids"]
    r = tok(tail, add_special_tokens=False)["input_ids"]
    if not r or r[-1] != tok.eos_token_id:
        r = r + [tok.eos_token_id]
    ids = (p + r)[:seq_len]
    labels = ((p if include_prompt_loss else [IGNORE] * len(p)) + r)[:seq_len]
    return ids, labels


def cpt_example(tok, row: dict) -> tuple[list[int], list[int]]:
    ids = tok(row["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids, list(ids)


@dataclass
class Rows:
    """Training rows in the order they are consumed: [n, seq_len] tensors."""

    input_ids: object
    labels: object
    attention_mask: object
    replay: dict | None = None
    """replay arm: the measured replay share (`Replay.stats`)."""
    whole: list[int] = field(default_factory=list)
    """The examples whose every token lies inside the rows (indices into the records, in the order first met)."""


@dataclass
class Replay:
    """General-text pieces mixed into a stream: after each example, pieces are appended while replay tokens
    < frac x tokens so far (so the share of the packed rows is frac, to within one piece)."""

    pieces: list[list[int]]
    frac: float
    used: int = 0
    tokens: int = 0
    source: list[int] = field(default_factory=list)  # per stream token: 1 replay, 0 example

    def after_example(self, ids: list[int], labels: list[int], n_example: int, need: int) -> None:
        self.source.extend([0] * n_example)
        while len(ids) < need and self.tokens < self.frac * len(ids):
            piece = self.pieces[self.used % len(self.pieces)]
            self.used += 1
            ids.extend(piece)
            labels.extend(piece)
            self.source.extend([1] * len(piece))
            self.tokens += len(piece)

    def stats(self, need: int) -> dict:
        tokens = sum(self.source[:need])
        return {"frac": self.frac, "tokens": tokens, "share": round(tokens / need, 6), "pieces_used": self.used,
                "pieces_available": len(self.pieces)}


def replay_pieces(tok, texts: list[str], max_len: int, seed: int) -> list[list[int]]:
    """The replay paragraphs tokenized (+EOS), in a seeded order, cut into pieces of at most max_len tokens."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    pieces = []
    for i in order:
        ids = tok(texts[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pieces += [ids[j:j + max_len] for j in range(0, len(ids), max_len)]
    return pieces


def epoch_order(n_examples: int, seed: int, units: list | None = None) -> list[int]:
    """The examples of one epoch in their shuffled order (`seed` = data_seed + epoch): by unit when `units` (each
    example's unit) is given, else one by one."""
    if units is None:
        order = list(range(n_examples))
        random.Random(seed).shuffle(order)
        return order
    members: dict = {}
    for i, u in enumerate(units):
        members.setdefault(u, []).append(i)
    keys = list(members)  # in the order the file first names them
    random.Random(seed).shuffle(keys)
    return [i for k in keys for i in members[k]]


def pack(example: Callable[[int], tuple[list[int], list[int]]], n_examples: int, n_rows: int, seq_len: int,
         data_seed: int, *, replay: Replay | None = None, units: list | None = None) -> Rows:
    """Concatenate examples (shuffled per epoch with data_seed + epoch, by unit when `units` gives each example's
    unit), with `replay` pieces mixed in when given, and cut the stream into n_rows full rows of seq_len.
    `example(i)` tokenizes example i (once)."""
    import torch

    if n_examples == 0:
        raise BadInput("the training data has no examples: check the domain's sft.jsonl / cpt.jsonl")
    if replay is not None and not replay.pieces:
        raise BadInput("the replay text is empty: rebuild it with `forgetcheck data prepare med`")
    need = n_rows * seq_len
    cache: dict[int, tuple[list[int], list[int]]] = {}
    ids: list[int] = []
    labels: list[int] = []
    whole: dict[int, None] = {}  # ordered set
    epoch = 0
    while len(ids) < need:
        order = epoch_order(n_examples, data_seed + epoch, units)
        before = len(ids)
        for i in order:
            if i not in cache:
                cache[i] = example(i)
            a, b = cache[i]
            ids.extend(a)
            labels.extend(b)
            if len(ids) <= need:
                whole.setdefault(i)
            if replay is not None:
                replay.after_example(ids, labels, len(a), need)
            if len(ids) >= need:
                break
        if len(ids) == before:
            raise BadInput("the training data tokenizes to nothing: check the domain's data files")
        epoch += 1
    t_ids = torch.tensor(ids[:need], dtype=torch.long).view(n_rows, seq_len)
    t_lab = torch.tensor(labels[:need], dtype=torch.long).view(n_rows, seq_len)
    return Rows(t_ids, t_lab, torch.ones_like(t_ids), replay=None if replay is None else replay.stats(need),
                whole=list(whole))


def build_rows(arm: str, tok, data_path: Path, cfg: config.TrainConfig, n_rows: int) -> Rows:
    """The rows `arm` trains on, from its domain file (`config.ARM_DATA`)."""
    from forgetcheck.data import domain

    if config.ARM_DATA.get(arm, arm) == "cpt":
        records = domain.read_cpt(data_path)
        return pack(lambda i: cpt_example(tok, records[i]), len(records), n_rows, cfg.seq_len, cfg.data_seed,
                    units=record_units(records))
    records = domain.read_sft(data_path)
    mix = None  # the replay arm's general text, interleaved
    if arm == "replay":
        from forgetcheck.data import replay

        mix = Replay(replay_pieces(tok, replay.load(), max(8, cfg.seq_len // 2), cfg.data_seed), cfg.replay_frac)
    cut: set[int] = set()  # pairs longer than a row, truncated: not trained on whole

    def example(i: int) -> tuple[list[int], list[int]]:
        ids, labels = sft_example(tok, records[i], cfg.seq_len, cfg.include_prompt_loss)
        if len(ids) == cfg.seq_len and labels[-1] != tok.eos_token_id:
            cut.add(i)
        return ids, labels

    rows = pack(example, len(records), n_rows, cfg.seq_len, cfg.data_seed, replay=mix, units=record_units(records))
    rows.whole = [i for i in rows.whole if i not in cut]
    return rows


def record_units(records: list[dict]) -> list | None:
    """Each record's `unit` when every record names one (a JSON string or integer), else None (shuffled one by one)."""
    units = [r.get("unit") for r in records]
    return units if all(isinstance(u, (str, int)) and not isinstance(u, bool) for u in units) else None
