"""`forgetcheck models`: the packaged aliases and whether each is built; `--prepare` builds them; `--convert` copies
a folder of pickle weights as safetensors (models/registry.py and models/files.py do the work)."""

from __future__ import annotations

from pathlib import Path

from forgetcheck.errors import BadInput


def echo(msg: str = "") -> None:
    print(msg)


def cmd_models(*, prepare: bool, convert: Path | None, out: Path | None) -> None:
    from forgetcheck.models import registry

    if convert is not None or out is not None:
        if convert is None or out is None:
            raise BadInput("give both --convert FOLDER and --out NEW_FOLDER (e.g. --out FOLDER-safetensors)")
        from forgetcheck.models.files import convert_pickle_folder

        echo(f"wrote {convert_pickle_folder(convert, out)}: use it as --base / --model")
        return
    if prepare:
        for name in registry.ALIASES:
            registry.resolve(name, prepare=True)
    rows = registry.describe_aliases()
    echo(f"{'alias':<14} {'ready':<6} {'params':>10} {'on disk':>9}  source / notes")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r["parameters"] else "-"
        size = f"{r['size_bytes'] / 1e6:.0f} MB" if r["size_bytes"] else "-"
        echo(f"{r['name']:<14} {'yes' if r['ready'] else 'no':<6} {params:>10} {size:>9}  {r['source']}")
        echo(f"{'':<14} {'':<6} {'':>10} {'':>9}  {r['description']}")
    if not all(r["ready"] for r in rows):
        echo("\nnot ready: `forgetcheck models --prepare` builds them (smollm2-135m: one GGUF conversion, ~20 s).")
    echo("Also accepted by --base: a hub id (gpt2, EleutherAI/pythia-160m, ...; needs hub access or the HF "
         "cache), a local HF folder, a .gguf file.")
