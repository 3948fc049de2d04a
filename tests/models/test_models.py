"""--base resolution: each kind, the offline failure, and the packaged models."""

from __future__ import annotations

import json
import time

import pytest
from conftest import forgetcheck_cli

from forgetcheck.errors import BadInput
from forgetcheck.models import registry

ENGLISH = (
    "The history of the city goes back more than two thousand years. It was founded as a small trading post on "
    "the river, and over the centuries it grew into one of the largest ports in the region. Today it is known "
    "for its old churches, its markets and its university, which attracts students from all over the world."
)




def test_gpt2_tokenizer_rebuilt_from_blingfire_matches_openai(tiny_ref):
    tok = registry.load_tokenizer(tiny_ref)
    # Reference encodings from OpenAI's GPT-2 tokenizer.
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" The quick brown fox jumps over the lazy dog.")["input_ids"] == [
        383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    assert tok.eos_token_id == 50256 and len(tok) == 50257


def test_tiny_gpt2_alias_is_random_and_says_so(tiny_ref):
    assert tiny_ref.kind == "alias" and tiny_ref.random_weights
    marker = json.loads((registry.Path(tiny_ref.path) / registry.MARKER).read_text())
    assert marker["random_weights"] is True
    model, tok = registry.load(tiny_ref)
    assert model.config.n_layer == 2


def test_local_folder_keeps_random_flag(tiny_ref):
    ref = registry.resolve(tiny_ref.path)
    assert ref.kind == "local" and ref.random_weights


def test_folder_without_config_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="config.json"):
        registry.resolve(str(tmp_path))


def test_missing_gguf_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such .gguf"):
        registry.resolve(str(tmp_path / "nope.gguf"))


def test_hub_id_offline_names_packaged_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="smollm2-135m"):
        registry.resolve("gpt2-this-model-is-not-cached")


def test_cli_unknown_model_exits_2_one_line(fc_home):
    r = forgetcheck_cli("run", "--base", "no-such-org/no-such-model", "--data", "med", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "smollm2-135m" in lines[0] and "Traceback" not in r.stderr


def test_models_command_lists_aliases(tiny_ref):
    r = forgetcheck_cli("models")
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m" in r.stdout and "tiny-gpt2" in r.stdout
    tiny_line = next(line for line in r.stdout.splitlines() if line.startswith("tiny-gpt2"))
    assert " yes " in tiny_line


def test_gguf_file_is_converted_once(tmp_path, tiny_ref):
    """A .gguf --base is converted into a cached folder keyed by the file's hash (here: SmolLM2's own GGUF)."""
    pytest.importorskip("gguf")
    gguf = registry.smollm2_gguf_path()
    ref = registry.resolve(str(gguf), prepare=False)
    assert ref.kind == "gguf" and ref.path.endswith(ref.path.split("/")[-1])
    assert "SmolLM2-135M-Instruct.Q4_1-" in ref.path


@pytest.mark.slow
def test_smollm2_is_real_pretrained_and_loads_fast(smollm2_ref):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    model, tok = registry.load(smollm2_ref)
    load_s = time.perf_counter() - t0
    assert load_s < 10, f"loading from the cache took {load_s:.1f}s"
    ids = tok(ENGLISH, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=ids).loss).item()
    assert ppl < 100, ppl
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_ref.path))
    with torch.no_grad():
        random_ppl = torch.exp(random_model(ids, labels=ids).loss).item()
    assert random_ppl > 10_000, random_ppl


@pytest.mark.slow
def test_gguf_file_conversion_roundtrip(tmp_path):
    """Converting the GGUF gives a folder that from_pretrained loads with the GGUF's config."""
    gguf = registry.smollm2_gguf_path()
    ref = registry.resolve(str(gguf))
    model, tok = registry.load(ref)
    assert model.config.num_hidden_layers == 30
    assert registry.resolve(str(gguf)).path == ref.path  # cached: second resolve reuses the folder
