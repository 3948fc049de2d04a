"""The folder order of docs/design.md ("The package"): the ground floor (the modules at the top of the package)
imports nothing above it, each folder imports only itself and the folders below it, nothing forms an import
cycle, and verdict/ and report/ never import torch. Every import counts, module level or inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "forgetcheck"

GROUND = ("errors", "config", "rundir", "schema", "device", "console")
"""The ground floor: imported by everything, importing only each other (each only those before it)."""

FOLDERS = ("models", "data", "eval", "train", "verdict", "report", "cli")
"""The stages, bottom to top: a folder imports the ground floor, itself and the folders before it."""

ENTRY = ("__init__", "__main__")
"""`python -m forgetcheck`: may import anything."""

NO_TORCH = ("verdict", "report")


def _module(path: Path) -> str:
    """forgetcheck-relative dotted name: 'config', 'train.loop', 'cli.app'."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The forgetcheck modules (dotted, package-relative) that `path` imports, anywhere in the file."""
    out: set[str] = set()
    known = set(_modules())
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import; write `from forgetcheck.x import ...`")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "forgetcheck":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                out.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("forgetcheck.")}
    out.discard("")
    out.discard(_module(path))
    return out


def _floor(mod: str) -> tuple[int, int]:
    """(floor, rank within the ground floor): the ground floor is 0, FOLDERS are 1.., ENTRY is the top."""
    top = mod.split(".")[0]
    if top in GROUND:
        return 0, GROUND.index(top)
    if top in FOLDERS:
        return 1 + FOLDERS.index(top), 0
    return 1 + len(FOLDERS), 0


def _wrong(imports: dict[str, set[str]]) -> list[str]:
    wrong = []
    for mod, deps in sorted(imports.items()):
        for dep in sorted(deps):
            (f, r), (df, dr) = _floor(mod), _floor(dep)
            if df > f or (f == 0 and df == 0 and dr >= r):
                wrong.append(f"{mod} imports {dep}")
    return wrong


def _cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(imports.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(imports):
        if m not in state:
            visit(m, [m])
    return found


def test_every_module_is_on_a_floor():
    stray = [m for m in _modules() if m.split(".")[0] not in GROUND + FOLDERS + ENTRY]
    assert not stray, f"{stray}: put each in a folder of FOLDERS or on the ground floor (tests/contract/test_imports.py)"
    nested = [m for m in _modules() if m.count(".") > 1]
    assert not nested, f"{nested}: one level of folders"


def test_each_folder_imports_only_itself_and_below():
    imports = {m: _imports(p) for m, p in _modules().items()}
    wrong = _wrong(imports)
    assert not wrong, "imports against the folder order of docs/design.md: " + "; ".join(wrong)


def test_no_import_cycle():
    imports = {m: _imports(p) for m, p in _modules().items()}
    assert not _cycles(imports), f"import cycles: {_cycles(imports)}"


def test_the_checks_catch_a_backward_import_and_a_cycle(tmp_path):
    probe = PACKAGE / "data" / "_probe_backward.py"
    try:
        probe.write_text("def f():\n    from forgetcheck.train import loop\n    from forgetcheck.verdict.gate import x\n")
        assert _imports(probe) == {"train.loop", "verdict.gate"}
    finally:
        probe.unlink()
    assert _wrong({"data.x": {"train.loop", "models.registry"}}) == ["data.x imports train.loop"]
    assert _wrong({"config": {"console"}}) == ["config imports console"]
    assert _cycles({"eval.a": {"eval.b"}, "eval.b": {"eval.a"}})


def test_verdict_and_report_never_import_torch():
    mods = sorted(m for m in _modules() if m.split(".")[0] in NO_TORCH) + ["cli.app"]
    code = ("import sys\nimport " + ", ".join(f"forgetcheck.{m}" for m in mods) + "\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'lm_eval', 'datasets', 'accelerate'))\nprint(','.join(heavy))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"importing verdict/, report/ and the CLI loaded {r.stdout.strip()[:300]}"
