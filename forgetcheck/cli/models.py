"""`forgetcheck models`: the packaged aliases and whether each is built; `--prepare` builds them; `--convert` copies
a folder of pickle weights as safetensors (models/registry.py and models/files.py do the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from forgetcheck import console
from forgetcheck.errors import BadInput


def models(
    prepare: bool = typer.Option(False, "--prepare", help="Build the cached folder of every alias that is not ready."),
    convert: Optional[Path] = typer.Option(None, "--convert", help="HF folder with pickle weights (pytorch_model.bin) "
                                           "to copy as safetensors (tensors only; code in the pickle is refused)."),
    out: Optional[Path] = typer.Option(None, "--out", help="New folder for --convert."),
) -> None:
    """List the packaged model aliases: source, parameter count, size on disk, ready or not."""
    with console.session(verbose=True):  # no log file: every line stays on the terminal
        _models(prepare=prepare, convert=convert, out=out)


def _models(*, prepare: bool, convert: Path | None, out: Path | None) -> None:
    from forgetcheck.models import registry

    if convert is not None or out is not None:
        if convert is None or out is None:
            raise BadInput("give both --convert FOLDER and --out NEW_FOLDER (e.g. --out FOLDER-safetensors)")
        from forgetcheck.models.files import convert_pickle_folder

        console.say(f"wrote {convert_pickle_folder(convert, out)}: use it as --base / --model")
        return
    if prepare:
        for name in registry.ALIASES:
            registry.resolve(name, prepare=True)
    rows = registry.describe_aliases()
    console.say(f"{'alias':<14} {'ready':<6} {'params':>10} {'on disk':>9}  source / notes")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r["parameters"] else "-"
        size = f"{r['size_bytes'] / 1e6:.0f} MB" if r["size_bytes"] else "-"
        console.say(f"{r['name']:<14} {'yes' if r['ready'] else 'no':<6} {params:>10} {size:>9}  {r['source']}")
        console.say(f"{'':<14} {'':<6} {'':>10} {'':>9}  {r['description']}")
    if not all(r["ready"] for r in rows):
        console.say("\nnot ready: `forgetcheck models --prepare` builds them (smollm2-135m: one GGUF conversion, ~20 s).")
    console.say("Also accepted by --base: a hub id (gpt2, EleutherAI/pythia-160m, ...; needs hub access or the HF "
         "cache), a local HF folder, a .gguf file.")
