"""What a model path holds, checked without running any of its code: safetensors files whole, pickle weights
refused (and converted to safetensors on request, `forgetcheck models --convert`), GGUF headers readable, a hub
id reachable. models/registry.py resolves `--base` through these checks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

from forgetcheck.errors import BadInput
from forgetcheck.rundir import check_output_dir

OFFLINE_ALTERNATIVES = (
    "use smollm2-135m (packaged, real pretrained SmolLM2-135M-Instruct), "
    "tiny-gpt2 (random weights, plumbing only), a local HF folder or a .gguf file"
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
GGUF_MAGIC = b"GGUF"


def safetensors_problem(f: Path) -> str | None:
    """Why a .safetensors file cannot be whole (None when its size matches its own header): catches a
    truncated copy or an interrupted download without reading the tensors."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f.name} is {size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n <= 1 or 8 + n > size:
                return f"{f.name} is truncated or not a safetensors file (header of {n} bytes, file of {size})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{f.name} cannot be read as safetensors ({type(e).__name__})"
    if not isinstance(header, dict):
        return f"{f.name} is not a safetensors file (its header is not a JSON object)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        return f"{f.name} is not a safetensors file (malformed header)"
    if size != 8 + n + end:
        return f"{f.name} is truncated ({size:,} bytes of {8 + n + end:,})"
    return None


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle weight files) of a model folder."""
    st = sorted(folder.glob("*.safetensors"))
    pk = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES
                and f.name != "training_args.bin")
    return st, pk


def pickle_message(what: str, folder: Path, files: list[Path]) -> str:
    return (f"{what}: the weights are pickle files ({', '.join(f.name for f in files[:3])}), which can run code "
            f"when loaded; forgetcheck reads safetensors only: convert them once with `forgetcheck models "
            f"--convert {folder} --out {folder}-safetensors` (plain tensors only; nothing else is unpickled) "
            f"and give that folder")


def check_model_folder(folder: Path, what: str) -> None:
    """A local HF folder forgetcheck can load: config.json a readable model config, safetensors weights, each
    whole. Pickle weights are refused (naming the conversion); nothing is unpickled here."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise BadInput(f"{what}: folder has no config.json; give a Hugging Face model folder "
                       f"(save_pretrained output) or {OFFLINE_ALTERNATIVES}")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{what}: {cfg_file} is not valid JSON ({getattr(e, 'msg', type(e).__name__)}): "
                       f"re-save the model (save_pretrained) or restore the file") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise BadInput(f"{what}: {cfg_file} is not a Hugging Face model config (no model_type): re-save the "
                       f"model with save_pretrained")
    from transformers import CONFIG_MAPPING

    if cfg["model_type"] not in CONFIG_MAPPING:
        raise BadInput(f"{what}: {cfg_file} names model_type '{cfg['model_type']}', which this transformers "
                       f"does not know (forgetcheck never runs a model's own code): give a model of a known "
                       f"architecture")
    st, pk = _weight_files(folder)
    if not st:
        if pk:
            raise BadInput(pickle_message(what, folder, pk))
        raise BadInput(f"{what}: no *.safetensors weights in the folder; give a folder written by "
                       f"save_pretrained (safetensors)")
    for f in st:
        problem = safetensors_problem(f)
        if problem:
            raise BadInput(f"{what}: {problem}: copy or save the model again")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BadInput(f"{what}: {index} is not a valid safetensors index: save the model again") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise BadInput(f"{what}: shard {missing[0]} listed in {index.name} is missing: copy the whole folder")


def check_gguf(path: Path, what: str) -> None:
    """A .gguf that exists and parses (header, metadata, tensor table within the file)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{what}: no such .gguf file{' (it is a folder)' if path.is_dir() else ''}: check the "
                       f"path, or use {OFFLINE_ALTERNATIVES.removeprefix('use ')}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BadInput(f"{what}: cannot read it ({e.strerror}): check its permissions") from None
    if magic != GGUF_MAGIC:
        raise BadInput(f"{what}: not a GGUF file (it does not start with the GGUF magic bytes): give a valid "
                       f".gguf (download it again) or a Hugging Face model folder")
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"{what}: the GGUF file is corrupt or truncated ({first}): download it again") from None
    if not reader.tensors:
        raise BadInput(f"{what}: the GGUF file holds no tensors: download it again")
    if end > size:
        raise BadInput(f"{what}: the GGUF file is truncated ({size:,} bytes of {end:,}): download it again")


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


def check_hub_model(name: str, flag: str = "--base") -> None:
    """Fail fast, with the alternatives, when a hub id can be neither downloaded nor found in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return
    if not hub_reachable():
        raise BadInput(f"{flag} {name}: the Hugging Face hub cannot be reached and '{name}' is not in the local "
                       f"HF cache; {OFFLINE_ALTERNATIVES}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{flag} {name}: cannot load it from the hub ({first}); {OFFLINE_ALTERNATIVES}") from None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only swap)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_modes(folder: Path) -> None:
    """Give every file in `folder` the mode a file the user creates gets (0666 less the umask): safetensors
    writes weights 0600, which would hide a shared cache's or a run's weights from those the umask lets read."""
    mode = 0o666 & ~current_umask()
    for f in Path(folder).iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


def convert_pickle_folder(src: Path, dst: Path) -> Path:
    """Write a copy of the HF folder `src` with its pickle weights (pytorch_model*.bin, ...) as one
    model.safetensors. Each pickle is read with torch's weights-only unpickler, which builds tensors and plain
    containers and refuses anything else, so a pickle that would run code is refused, not run. Other files
    (config, tokenizer) are copied; pickles other than the weights are left out."""
    import torch
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    what = f"--convert {src}"
    if not src.is_dir() or not (src / "config.json").is_file():
        raise BadInput(f"{what}: not a Hugging Face model folder (no config.json): give the folder holding "
                       f"pytorch_model.bin")
    if dst.exists():
        raise BadInput(f"--out {dst} already exists: give a new folder for the converted model")
    _, pk = _weight_files(src)
    if not pk:
        raise BadInput(f"{what}: no pickle weights (*.bin, *.pt) to convert")
    tensors: dict = {}
    for f in pk:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (forbidden global), RuntimeError (not a torch file), ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise BadInput(f"{what}: {f.name} is not a plain tensor file, refused without running it ({first}); "
                           f"get the model as safetensors from its source") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise BadInput(f"{what}: {f.name} does not hold a name -> tensor state dict: get the model as "
                           f"safetensors from its source")
        for k, v in sd.items():
            tensors[k] = v.detach().clone().contiguous()  # tied weights share storage: safetensors wants copies
    check_output_dir(dst.parent, "--out")
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix.lower() not in PICKLE_SUFFIXES and not f.name.endswith(".bin.index.json"):
                shutil.copyfile(f, tmp / f.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        give_usual_modes(tmp)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
