"""The import direction of docs/design.md ("Import direction"): the ground floor imports nothing above it, each
stage imports only what comes before it in the data flow (so there is no import cycle), and compare, gate and
report never import torch. Every import counts, module level or inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "forgetcheck"

GROUND = ("errors", "config", "rundir", "schema", "device", "console")
"""The ground floor: imported by everything, importing only each other (in this order)."""

ORDER = GROUND + (
    "forecast",  # pure numpy/scipy: fits curves' forgetting series (curves.py), imports nothing of ours
    "gpt2_tokenizer", "modelfiles", "models",  # model + data
    "med", "sources", "overlap", "standard_tasks", "probes", "prose", "benchdata", "general_text", "data",
    "sharding",  # processes: torchrun launching, FSDP2, data-parallel ranks (eval and train use it)
    "suites", "fast_lm", "drift", "curves", "records", "evalcache", "evaluation",  # eval; curves: signals during training
    "arms", "packing", "training_curve", "plan", "optim", "checkpoint", "train", "train_command", "interpolate",  # train
    "stats", "flips", "rollup", "budget", "compare", "policy", "verdict_text", "gate", "lmeval_samples", "lmeval_pairing",
    "history", "charts", "report_curves", "report",  # verdict: JSON only
    "resume", "inputs", "check", "pipeline", "options", "cli", "__main__", "__init__",  # commands
)
"""Every module of the package, each after everything it imports."""

NO_TORCH = ("forecast", "stats", "flips", "rollup", "budget", "compare", "policy", "verdict_text", "gate", "lmeval_samples",
            "lmeval_pairing", "history", "charts", "report_curves", "report")


def _imports(path: Path) -> set[str]:
    """The forgetcheck modules `path` imports, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "forgetcheck":
                out |= {a.name for a in node.names}
            elif node.module.startswith("forgetcheck."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import; write `from forgetcheck.x import ...`")
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("forgetcheck.")}
    out.discard(path.stem)
    return out


def test_every_module_has_a_place_in_the_order():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert not modules - set(ORDER), f"place {sorted(modules - set(ORDER))} in ORDER (tests/test_imports.py)"
    assert not set(ORDER) - modules, f"ORDER names modules that no longer exist: {sorted(set(ORDER) - modules)}"
    assert not [p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()], \
        "a subpackage: extend this test to walk it"


def test_each_module_imports_only_what_comes_before_it():
    wrong = []
    for i, mod in enumerate(ORDER):
        later = {m for m in _imports(PACKAGE / f"{mod}.py") if m not in ORDER[:i]}
        if mod in GROUND:
            later |= {m for m in _imports(PACKAGE / f"{mod}.py") if m not in GROUND}
        wrong += [f"{mod} imports {m}" for m in sorted(later)]
    assert not wrong, "imports against the direction of docs/design.md: " + "; ".join(wrong)


def test_order_check_catches_a_backward_import(tmp_path):
    probe = tmp_path / "config.py"
    probe.write_text("def f():\n    from forgetcheck import train\n    from forgetcheck.models import ModelRef\n")
    assert _imports(probe) == {"train", "models"}


def test_compare_gate_report_never_import_torch():
    code = ("import sys\nimport forgetcheck.cli, " + ", ".join(f"forgetcheck.{m}" for m in NO_TORCH) + "\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'lm_eval', 'datasets', 'accelerate'))\nprint(','.join(heavy))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"importing compare/gate/report/cli loaded {r.stdout.strip()[:300]}"
