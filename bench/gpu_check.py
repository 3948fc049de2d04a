"""One-shot GPU check: every memory technique on a real CUDA device, planned vs measured, and the fast scoring
backend against stock lm-eval -- one command, one table, no network.

    bash bench/gpu_check.sh            # on the GPU machine (installs the carried wheels, then runs this file)
    python bench/gpu_check.py          # the same, when lm-eval and torchao are already installed
    python bench/gpu_check.py --dry    # the short CPU version (tiny model, 2 steps; what CI runs)
    python bench/gpu_check.py --prepare   # on a machine with PyPI: fill .whl/ and .gpu_check/ (see below)

Training rows (each in a fresh process, so each peak-memory reading is its own): forgetcheck's own loop
(`train.train_arm`, CPT arm) on a Llama-style ~0.9B-parameter config with RANDOM WEIGHTS (memory and speed do not
depend on the weights' values), seq-len 2048, for bf16-mixed, fp16-mixed (with the loss scaler), gradient
checkpointing, 8-bit AdamW (torchao), all three together, and an fp32 baseline. Columns:
  * planned W+G+O vs measured W+G+O: `forgetcheck.train.memory` bytes of weights + gradients + optimizer state against
    the bytes of those tensors after the first optimizer step (the +/-15% check);
  * planned total (with the activation estimate) vs measured peak (`torch.cuda.max_memory_allocated`);
  * tokens/s (median over the steps after the first) and MFU = model FLOPs/s / the GPU's dense bf16 peak, with
    model FLOPs per token = 6 x (parameters of the matrix multiplies) + 12 x layers x hidden x seq-len
    (PaLM, Chowdhery et al. 2022, appendix B); recomputation under checkpointing is not counted.
Scoring rows: a SmolLM2-135M-shaped model (its real tokenizer, RANDOM WEIGHTS), the same items scored by stock
lm-eval (`simple_evaluate(model="hf")`) and by forgetcheck's fast backend, fp32: items/s (model load included)
and per-item agreement (largest |loglikelihood difference| over every choice, items whose correctness differs).

Robustness: every row runs in its own process under try/except; a failing row prints its error and the rest
still run. A global time guard (--budget-s, default 420 s) stops starting new rows and caps each row's time.
The table goes to stdout, and to $OUT/gpu_check.md (+ gpu_check.json) when OUT is set.

What travels to a machine without network (`--prepare` writes both, git-ignored):
  * .whl/: lm_eval 0.4.13 and what it imports that a torch/transformers image typically lacks (datasets, dill,
    multiprocess, evaluate, more_itertools), and torchao (8-bit AdamW); ~14 MB. `bench/gpu_check.sh` installs
    them with `pip install --no-index --no-deps --target` into a temp folder.
  * .gpu_check/: the SmolLM2 tokenizer and config (from the prepared smollm2-135m model) and three benchmark
    JSONL files (fc_mmlu_stem, fc_social_iqa, fc_hellaswag data; ~2 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/gpu_check.py` from a checkout: import this forgetcheck
    sys.path.insert(0, str(REPO))
CARRY = REPO / ".gpu_check"
WHEELS = REPO / ".whl"
RESULT = "GPU_CHECK_RESULT "
SCORING_TASKS = ("fc_mmlu_stem", "fc_social_iqa", "fc_hellaswag")
BENCH_FILES = {"fc_mmlu_stem": "mmlu_stem.jsonl", "fc_social_iqa": "social_iqa.jsonl",
               "fc_hellaswag": "hellaswag.jsonl", "drift text": "general_text.jsonl"}
# Wheels for a Python 3.12 x86-64 image with torch/transformers/accelerate/pyarrow/pandas/scipy but without
# lm-eval, datasets or torchao (the pure-Python ones work on any Python 3; multiprocess is per Python version).
WHEEL_PINS = ("lm_eval==0.4.13", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "evaluate==0.4.6",
              "more_itertools==11.2.1", "torchao==0.18.0")

# name, TrainConfig overrides. Order = priority (the time guard drops rows from the end).
TRAIN_ROWS = [
    ("bf16-mixed", {"precision": "bf16-mixed"}),
    ("fp16-mixed (loss scaler)", {"precision": "fp16-mixed"}),
    ("bf16-mixed + compile", {"precision": "bf16-mixed", "compile": True}),
    ("bf16-mixed + grad-ckpt", {"precision": "bf16-mixed", "grad_checkpointing": True}),
    ("bf16-mixed + adamw8bit", {"precision": "bf16-mixed", "optim": "adamw8bit"}),
    ("all: bf16-mixed + grad-ckpt + adamw8bit", {"precision": "bf16-mixed", "grad_checkpointing": True,
                                                 "optim": "adamw8bit"}),
    ("fp32 (baseline)", {}),
]
BASELINE = "fp32 (baseline)"

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendor's data sheets; first match wins.
PEAKS = [("H200", 989.4, "H200 (SXM) dense bf16"), ("H100 PCIe", 756.0, "H100 PCIe dense bf16"),
         ("H100 NVL", 835.0, "H100 NVL dense bf16"), ("H100", 989.4, "H100 SXM dense bf16"),
         ("A100", 312.0, "A100 dense bf16")]

GPU_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)
SCORE_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                   rope_theta=100000.0)  # SmolLM2-135M's shape
DRY_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    for key, tf, what in PEAKS:
        if key.lower() in name.lower():
            return tf, f"{tf:g} TFLOP/s ({what}, data sheet)"
    return None, "unknown for this device (give --peak-tflops): MFU not computed"


# ---- preparing what travels ------------------------------------------------------------------------------

def prepare() -> None:
    """Fill .whl/ (pip download, Python 3.12 x86-64) and .gpu_check/ (tokenizer + benchmark data) here."""
    from forgetcheck.data import benchmarks
    from forgetcheck.models import registry

    WHEELS.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(WHEELS), *WHEEL_PINS]
    subprocess.run(cmd, check=True)
    ref = registry.resolve("smollm2-135m")
    tok_dir = CARRY / "smollm2-tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(ref.path).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "forgetcheck.json":
            shutil.copy2(f, tok_dir / f.name)
    benchmarks.prepare_bench()
    (CARRY / "bench").mkdir(exist_ok=True)
    for name in BENCH_FILES.values():
        shutil.copy2(benchmarks.bench_dir() / name, CARRY / "bench" / name)
    size = sum(f.stat().st_size for d in (WHEELS, CARRY) for f in d.rglob("*") if f.is_file())
    print(f"prepared {WHEELS} and {CARRY}: {size / 2**20:.1f} MiB")


# ---- children (one per row) --------------------------------------------------------------------------------

def _llama_folder(folder: Path, shape: dict, tok_src: Path, device: str) -> None:
    """A Llama-style model with random weights (seed 0) and the tokenizer of `tok_src`, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_src)
    # vocabulary padded to a multiple of 256 (as is usual): the embedding then is a whole number of torchao's
    # 256-value blocks and gets 8-bit state like every other large matrix
    vocab = -(-len(tok) // 256) * 256
    cfg = LlamaConfig(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "forgetcheck.json").write_text(json.dumps({"random_weights": True, "source": "random init (seed 0)"}))


def child_build(spec: dict) -> dict:
    t0 = time.perf_counter()
    _llama_folder(Path(spec["folder"]), spec["shape"], Path(spec["tokenizer"]), spec["device"])
    return {"wall_s": time.perf_counter() - t0}


def child_train(spec: dict) -> dict:
    import torch

    from forgetcheck.config import TrainConfig
    from forgetcheck.data.domain import DomainData
    from forgetcheck.models.registry import resolve
    from forgetcheck.rundir import RunDir
    from forgetcheck.train import loop

    cfg = TrainConfig(**spec["cfg"])
    ref = resolve(spec["model"])
    data = Path(spec["data"])
    dom = DomainData(name="gpu-check", root=data, sft=None, cpt=data / "cpt.jsonl", heldout=None, packaged=False)
    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as tmp:
        rec = loop.train_arm("cpt", ref, dom, cfg, RunDir(tmp), device=spec["device"])
    mem = rec["memory"]
    steps = rec["step_s"]
    s_step = statistics.median(steps[1:] if len(steps) > 1 else steps)
    return {
        "planned_states": sum(mem["planned"][k] for k in ("weights", "gradients", "optimizer_state")),
        "measured_states": sum(mem["measured_components"][k] for k in ("weights", "gradients", "optimizer_state")),
        "measured_optimizer": mem["measured_components"]["optimizer_state"],
        "planned_total": mem["planned"]["total"],
        "measured_peak": mem["measured_peak_bytes"],
        "method": mem["method"],
        "s_step": s_step,
        "steps": rec["optimizer_steps"],
        "tokens_per_step": loop.tokens_per_step(cfg),
        "tokens_per_s": loop.tokens_per_step(cfg) / s_step,
        "final_loss": rec["loss_curve"][-1][1],
        "torch": torch.__version__,
    }


def _eval_throughput():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_throughput", REPO / "bench" / "eval_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child_score(spec: dict) -> dict:
    import logging

    from forgetcheck.config import EvalConfig
    from forgetcheck.data import benchmarks
    from forgetcheck.eval.suites import resolve_tasks, select_items
    from forgetcheck.models.registry import resolve

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    et = _eval_throughput()
    ref = resolve(spec["model"])
    names = list(spec["tasks"])
    tasks_dir = benchmarks.render_tasks_dir()
    specs = resolve_tasks(EvalConfig(tasks=tuple(names)), tasks_dir)
    samples = {s.name: idx for s in specs if (idx := select_items(s.task, spec["limit"], s.kind)) is not None}
    stock_wall, out = et._stock(ref, tasks_dir, names, samples, spec["batch_size"], spec["device"])
    items = sum(len(out["samples"][n]) for n in names)
    fast_wall, drift_s, doc = et._forgetcheck(ref, tasks_dir, names, spec["limit"], "fast", spec["batch_size"],
                                             spec["device"])
    agree = et.agreement(out, doc)
    return {"items": items, "stock_wall_s": stock_wall, "fast_wall_s": fast_wall, "drift_s": drift_s,
            "stock_items_per_s": items / stock_wall, "fast_items_per_s": items / fast_wall, **agree}


def child(kind: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    for k, v in spec.get("env", {}).items():
        os.environ[k] = v
    fn = {"build": child_build, "train": child_train, "score": child_score}[kind]
    out = fn(spec)
    print(RESULT + json.dumps(out), flush=True)


# ---- the parent -----------------------------------------------------------------------------------------

class Guard:
    """Stops new rows after `budget_s` and caps each child at what is left (+ a grace for the running row)."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def _no_compile(fn=None, **_kw):
    """torch.compile stand-in for the dry run: the function itself, uncompiled."""
    return fn if fn is not None else (lambda f: f)


IN_PROCESS = False  # the dry run: rows in this process (seconds instead of a torch import per row)


def run_child(kind: str, spec: dict, timeout: float, log) -> dict:
    if IN_PROCESS:
        return {"build": child_build, "train": child_train, "score": child_score}[kind](spec)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, timeout), cwd=str(REPO))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write(out[-4000:])
        raise RuntimeError(f"timed out after {timeout:.0f} s (global time guard)") from None
    log.write(f"\n===== {kind} {spec.get('name', '')}: rc {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}\n")
    log.flush()
    for line in r.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
    raise RuntimeError(tail[-1][:300] if tail else f"exit code {r.returncode}, no output")


def flops_per_token(folder: Path, seq_len: int) -> tuple[float, int]:
    """(model FLOPs per trained token, parameters), from the config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    params = sum(p.numel() for p in model.parameters())
    return 6 * matmul + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len, params


def write_cpt(folder: Path, n_docs: int) -> None:
    words = ("the patient presented with fever and cough after a week of travel ; the clinician ordered a chest "
             "radiograph , blood cultures and a full count , and started empirical therapy pending results . "
             "renal function was normal and the rash resolved without treatment").split()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cpt.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(300))}) + "\n")


def write_dry_bench(folder: Path) -> None:
    """A few built-in items in the benchmark files' formats (the CPU dry run needs no prepared data)."""
    folder.mkdir(parents=True, exist_ok=True)
    adj = ["old", "red", "small", "wooden", "round", "new", "blue", "large"]
    nouns = ["cat", "table", "ship", "house", "book", "lamp"]
    with open(folder / "hellaswag.jsonl", "w") as f:
        for i in range(12):
            a, b, n = adj[i % 8], adj[(i + 3) % 8], nouns[i % 6]
            f.write(json.dumps({"ind": i, "query": f"Furniture: The {a} {n} stands by the door. It",
                                "choices": [f"is {b}.", f"is {a}.", "swims away.", "sings."], "label": i % 4}) + "\n")
    with open(folder / "mmlu_stem.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"question": f"What is {i} plus {i + 1}?",
                                "choices": [str(2 * i + 1), str(2 * i), str(i), str(i + 7)], "answer": i % 4,
                                "subject": "elementary mathematics"}) + "\n")
    with open(folder / "general_text.jsonl", "w") as f:  # the drift text forgetcheck's eval also scores
        for i in range(6):
            f.write(json.dumps({"title": f"t{i}", "text": " ".join(adj[(i + j) % 8] + " " + nouns[j % 6]
                                                                  for j in range(40))}) + "\n")
    with open(folder / "social_iqa.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"context": f"Person {i} opened the {nouns[i % 6]}.", "question": "Why did they do this?",
                                "answerA": "to look inside", "answerB": "to sleep", "answerC": "to swim",
                                "label": str(i % 3 + 1)}) + "\n")


def cell(e: Exception) -> str:
    """An error as one table cell: one line, no pipes, at most 240 characters."""
    return " ".join(str(e).split()).replace("|", "/")[:240]


def mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:,.0f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="Short CPU version: tiny model, 2 steps (also when no CUDA).")
    ap.add_argument("--prepare", action="store_true", help="Download the wheels and copy the data that travel.")
    ap.add_argument("--budget-s", type=float, default=420.0, help="Stop starting rows after this many seconds.")
    ap.add_argument("--steps", type=int, default=None, help="Optimizer steps per training row (first untimed).")
    ap.add_argument("--peak-tflops", type=float, default=None, help="The GPU's dense bf16 peak, if not detected.")
    ap.add_argument("--limit", type=int, default=None, help="Items per scoring task.")
    ap.add_argument("--rows", default=None, help="Only training rows whose name contains one of these (comma list).")
    ap.add_argument("--no-scoring", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="Markdown file (default $OUT/gpu_check.md if OUT is set).")
    a = ap.parse_args(argv)
    if a.prepare:
        prepare()
        return 0

    import torch

    gpu = torch.cuda.is_available() and not a.dry
    device = "cuda" if gpu else "cpu"
    guard = Guard(a.budget_s)
    out_md = a.out or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else None)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log_path = (out_md.parent if out_md else work) / "gpu_check.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    from forgetcheck.models import registry

    # tokenizer: SmolLM2's (carried in .gpu_check/ by --prepare, else the prepared smollm2-135m model); the dry run
    # without it takes tiny GPT-2's. Resolved before FORGETCHECK_HOME points at the throwaway home below.
    tok_src = CARRY / "smollm2-tokenizer"
    if not (tok_src / "tokenizer.json").exists():
        tok_src = Path(registry.resolve("smollm2-135m" if gpu else "tiny-gpt2", prepare=not gpu).path)
    bench_src = CARRY / "bench"
    if gpu and not all((bench_src / f).exists() for f in BENCH_FILES.values()):
        from forgetcheck.data import benchmarks

        bench_src = benchmarks.bench_dir()
    home = work / "home"
    home.mkdir()
    env = {"FORGETCHECK_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    os.environ.update(env)
    if not gpu:  # the dry run: rows in this process; torchao's step eager (compiling it costs ~60 s on 2 cores)
        global IN_PROCESS
        IN_PROCESS = True
        torch.compile = _no_compile  # torchao compiles its step with torch.compile(fn, fullgraph=True)(...)

    if not gpu:
        write_dry_bench(home / "bench")
    else:
        shutil.copytree(bench_src, home / "bench", dirs_exist_ok=True)

    name = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    peak, peak_note = peak_tflops(name, a.peak_tflops) if gpu else (None, "CPU: MFU not computed")
    steps = a.steps or (8 if gpu else 2)
    seq_len, micro = (2048, 8) if gpu else (32, 2)
    limit = a.limit or (100 if gpu else 4)
    header = [f"# forgetcheck GPU check ({'CUDA' if gpu else 'CPU dry run'})", "",
              f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device {name}; torch {torch.__version__}"
              + (f", CUDA {torch.version.cuda}" if gpu else "") + f"; peak used for MFU: {peak_note}", ""]
    results: dict = {"device": name, "torch": torch.__version__, "peak_tflops": peak, "train": [], "score": None}
    lines = list(header)
    print("\n".join(header), flush=True)

    # ---- training rows ----
    train_model = work / "train-model"
    fpt = params = None
    try:
        run_child("build", {"folder": str(train_model), "shape": GPU_SHAPE if gpu else DRY_SHAPE,
                            "tokenizer": str(tok_src), "device": device, "env": env}, guard.left(), log)
        fpt, params = flops_per_token(train_model, seq_len)
        build_err = None
    except Exception as e:  # noqa: BLE001  (every row reports its error, the rest still run)
        build_err = f"building the training model failed: {e}"
        traceback.print_exc(file=log)
    data_dir = work / "data"
    write_cpt(data_dir, 400 if gpu else 20)
    shape = GPU_SHAPE if gpu else DRY_SHAPE
    model_line = (f"Training model: Llama-style config, {params / 1e6:,.0f}M parameters" if params else
                  "Training model: Llama-style config") + (
        f" ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, {shape['num_attention_heads']} heads / "
        f"{shape['num_key_value_heads']} KV, MLP {shape['intermediate_size']}), RANDOM WEIGHTS (no pretrained weights "
        f"travel; memory and speed do not depend on them); tokenizer {tok_src.name}; seq-len {seq_len} x micro-batch "
        f"{micro}, {steps} optimizer steps per row (tokens/s: median of steps 2..{steps}); forgetcheck's own loop "
        f"(train.train_arm), " + ("each row in a fresh process." if gpu else
                                  "rows in one process, torchao's step not compiled (dry run)."))
    print(model_line, flush=True)
    th = ("| technique | planned W+G+O (MB) | measured W+G+O (MB) | diff | planned total (MB) | measured peak (MB) "
          "| s/step | tokens/s | MFU | note |")
    lines += [model_line, "", th, "|" + "---|" * (th.count("|") - 1)]
    print(th, flush=True)
    wanted = [r for r in TRAIN_ROWS if a.rows is None or any(w.strip() in r[0] for w in a.rows.split(","))]
    train_lines: dict[str, str] = {}

    # time kept for the scoring rows, which run after the main training rows (the baseline row runs last)
    reserve = 0.0 if a.no_scoring else (90.0 if gpu else 0.0)

    def train_row(row_name: str, over: dict) -> None:
        res: dict = {"name": row_name}
        try:
            if build_err:
                raise RuntimeError(build_err)
            if guard.left() - (reserve if row_name != BASELINE else 0.0) <= 0:
                raise RuntimeError(f"not run: global time guard ({a.budget_s:.0f} s) reached")
            if not gpu and over.get("precision") == "fp16-mixed":
                raise RuntimeError("not run on CPU: fp16 autocast needs CUDA (the GPU run covers it)")
            cfg = {"seq_len": seq_len, "micro_batch": micro, "grad_accum": 1, "lr": 1e-4, "warmup_frac": 0.0,
                   "budget_tokens": steps * seq_len * micro, "force": True, **over}
            r = run_child("train", {"name": row_name, "cfg": cfg, "model": str(train_model), "data": str(data_dir),
                                    "device": device, "env": env}, guard.left() + 60, log)
            res.update(r)
            diff = r["planned_states"] / r["measured_states"] - 1
            mfu = (fpt * r["tokens_per_s"] / (peak * 1e12)) if (peak and fpt) else None
            res.update(diff=diff, mfu=mfu)
            ok = abs(diff) <= 0.15
            line = (f"| {row_name} | {mb(r['planned_states'])} | {mb(r['measured_states'])} | {diff:+.1%}"
                    f"{'' if ok else ' (OUTSIDE +/-15%)'} | {mb(r['planned_total'])} | {mb(r['measured_peak'])} "
                    f"| {r['s_step']:.3f} | {r['tokens_per_s']:,.0f} | {'-' if mfu is None else f'{mfu:.1%}'} "
                    f"| loss {r['final_loss']:.3f} |")
        except Exception as e:  # noqa: BLE001  (one failing row must not stop the others)
            res["error"] = str(e)
            line = f"| {row_name} | - | - | - | - | - | - | - | - | ERROR: {cell(e)} |"
        results["train"].append(res)
        train_lines[row_name] = line
        print(line, flush=True)

    for row_name, over in wanted:  # the baseline row last, after the scoring rows (the time guard drops it first)
        if row_name != BASELINE:
            train_row(row_name, over)

    # ---- scoring rows ----
    score_lines: list[str] = []
    if not a.no_scoring:
        sh = ("| scoring | items | stock lm-eval HFLM items/s | forgetcheck fast items/s | speed-up "
              "| max abs loglik diff | correctness differs | is_greedy differs |")
        print(sh, flush=True)
        try:
            if guard.left() <= 0:
                raise RuntimeError(f"not run: global time guard ({a.budget_s:.0f} s) reached")
            score_model = work / "score-model"
            run_child("build", {"folder": str(score_model), "shape": SCORE_SHAPE if gpu else DRY_SHAPE,
                                "tokenizer": str(tok_src), "device": device, "env": env}, guard.left(), log)
            r = run_child("score", {"model": str(score_model), "tasks": list(SCORING_TASKS), "limit": limit,
                                    "batch_size": 32 if gpu else 8, "device": device, "env": env},
                          guard.left() + 60, log)
            results["score"] = r
            score_line = (f"| {', '.join(SCORING_TASKS)} (fp32) | {r['items']} | {r['stock_items_per_s']:.1f} "
                          f"| {r['fast_items_per_s']:.1f} | {r['fast_items_per_s'] / r['stock_items_per_s']:.2f}x "
                          f"| {r['max_abs_diff_mc']:.2e} | {r['correct_differs']} of {r['items']} "
                          f"| {r['greedy_differs']} |")
        except Exception as e:  # noqa: BLE001
            results["score"] = {"error": str(e)}
            score_line = f"| {', '.join(SCORING_TASKS)} | - | - | - | - | - | - | ERROR: {cell(e)} |"
        print(score_line, flush=True)
        what = ("SmolLM2-135M config (30 layers, hidden 576) with RANDOM WEIGHTS and the real SmolLM2 tokenizer"
                if gpu else "the tiny dry-run config, RANDOM WEIGHTS")
        score_lines = [sh, "|" + "---|" * (sh.count("|") - 1), score_line, "",
                       f"Scoring model: {what}; {limit} items per task (forgetcheck's --limit subset, the same items "
                       "for both engines); fp32; wall time includes loading the model; forgetcheck's drift pass "
                       "excluded.", ""]

    for row_name, over in wanted:
        if row_name == BASELINE:
            train_row(row_name, over)
    lines += [train_lines[name] for name, _ in wanted]
    method = next((r.get("method") for r in results["train"] if r.get("method")), None)
    lines += ["", f"Measured peak: {method or '-'}. W+G+O: weights + gradients + optimizer state; diff = planned / "
              f"measured - 1 (acceptance: within +/-15%). MFU: model FLOPs per token {fpt or 0:,.0f} "
              f"(6 x matmul parameters + 12 x layers x hidden x seq-len; recomputation not counted) x tokens/s / peak.",
              ""]
    lines += score_lines
    lines.append(f"Total wall time {guard.elapsed():.0f} s (time guard {a.budget_s:.0f} s). Log: {log_path.name}.")
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    log.close()
    if out_md:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
        out_md.with_suffix(".json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
