"""Same verdict before and after a change: one fixed tiny run with the code of a git revision and with the working
tree, and compare.json and gate.json compared field by field (timings and paths aside).

    python bench/same_verdict.py --against 40a5553          # the commit before the subpackage move

The fixed run: tiny-gpt2 on the packaged med data, arms sft and cpt, `--limit 5`, seed 0, the quick preset with a
small token budget, on CPU. Each side runs in its own folder with its own source tree on PYTHONPATH and the same
$FORGETCHECK_HOME (models and benchmarks are content-addressed, so both read the same bytes). Exit 0 when both
files agree, 1 with the first differing field otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = ["run", "--base", "tiny-gpt2", "--data", "med", "--arms", "sft,cpt", "--limit", "5", "--seed", "0",
       "--preset", "quick", "--budget-tokens", "4096", "--device", "cpu", "--run-id", "fixed"]
# Fields that differ between two identical runs: wall-clock time, where the run lives, which code ran it.
VOLATILE = {"seconds", "wall_s", "started", "finished", "created", "timings", "elapsed_s", "duration_s", "path",
            "run_dir", "written", "time", "git", "version", "report", "tokens_per_s", "peak_mem_gb"}


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE and not k.endswith(("_s", "_at"))}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    if isinstance(x, str) and ("/" in x and x.startswith("/")):
        return "<path>"
    return x


def _first_difference(a, b, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where or '.'}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: only on one side"
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} != {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _run(src: Path, out: Path) -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=str(src), CUDA_VISIBLE_DEVICES="")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "forgetcheck", *RUN, "--out", str(out)], cwd=src, env=env,
                       capture_output=True, text=True)
    print(f"  {src}: exit {r.returncode} in {time.perf_counter() - t:.0f} s")
    if r.returncode not in (0, 1, 3) or not (out / "fixed" / "gate.json").exists():
        sys.exit(f"the run with {src} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return {name: _strip(json.loads((out / "fixed" / name).read_text())) for name in ("compare.json", "gate.json")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="git revision to compare the working tree with")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.against],
                       check=True, capture_output=True)
        try:
            print(f"fixed run: forgetcheck {' '.join(RUN)}")
            before = _run(old, Path(tmp) / "runs-old")
            after = _run(REPO, Path(tmp) / "runs-new")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    bad = 0
    for name in before:
        d = _first_difference(before[name], after[name])
        print(f"{name}: {'same' if d is None else 'DIFFERENT at ' + d}")
        bad += d is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
