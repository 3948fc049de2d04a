"""GPT-2's exact byte-level BPE tokenizer, rebuilt offline from PyPI `blingfire` (its `gpt2.i2w` file).

`gpt2.i2w` holds GPT-2's 50,257 tokens as raw bytes, in id order. GPT-2's ids 256..50255 are its merges in
rank order, so each merge is recovered by running BPE over a token's characters with the merges ranked
before it: what is left is exactly the two pieces that merge into it. The result is `vocab.json` +
`merges.txt` as OpenAI published them (the test checks known encodings).
"""

from __future__ import annotations

import importlib.util
import json
import struct
from functools import lru_cache
from pathlib import Path

from forgetcheck.errors import BadInput

N_TOKENS = 50257
EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _i2w_path() -> Path:
    spec = importlib.util.find_spec("blingfire")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("the tiny-gpt2 tokenizer needs PyPI blingfire==0.1.8: run `make install` "
                       "(or `pip install blingfire==0.1.8`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "gpt2.i2w"
    if not path.exists():
        raise BadInput(f"{path} missing: reinstall blingfire==0.1.8")
    return path


def read_i2w(path: Path) -> list[bytes]:
    data = path.read_bytes()
    header = 100  # fixed-size header, then N+1 int32 offsets, then the concatenated token bytes
    offsets = struct.unpack_from(f"<{N_TOKENS + 1}i", data, header)
    blob = header + 4 * (N_TOKENS + 1)
    return [data[blob + offsets[i]: blob + offsets[i + 1]] for i in range(N_TOKENS)]


def _bpe(chars: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    word = chars
    while len(word) > 1:
        best = None
        for pair in zip(word, word[1:]):
            r = ranks.get(pair)
            if r is not None and (best is None or r < best[0]):
                best = (r, pair)
        if best is None:
            break
        a, b = best[1]
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = bytes_to_unicode()
    tokens = read_i2w(_i2w_path())
    # Ids 0..255 are the single bytes in bytes_to_unicode order (i2w stores byte 0 as a space, so these are
    # taken from the map itself); ids 256.. are the merged tokens.
    byte_order = list(b2u)
    strings = [b2u[byte_order[i]] for i in range(256)]
    strings += ["".join(b2u[b] for b in t) if t != EOS.encode() else EOS for t in tokens[256:]]
    vocab = {s: i for i, s in enumerate(strings)}
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for i in range(256, N_TOKENS - 1):
        parts = _bpe(list(strings[i]), ranks)
        if len(parts) != 2:
            raise RuntimeError(f"cannot recover the merge for GPT-2 token {i} ({strings[i]!r}): got {parts}")
        pair = (parts[0], parts[1])
        ranks[pair] = len(merges)
        merges.append(pair)
    return vocab, merges


def write_tokenizer_files(folder: Path) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json loadable by GPT2TokenizerFast."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
        "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
    }), encoding="utf-8")
