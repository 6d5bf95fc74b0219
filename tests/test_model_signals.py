"""Signals read from models in the training gate (config ``model_signals``, issue 15 item 5): data
without stored teacher log-probs, whose teacher model the user has, is gated on ``teacher_llr`` before
the first update; the scored signals are cached under a key that includes the model signals; clean data
from the base model passes; and the builder refuses what it cannot score."""

import json

import mlflow
import pytest
import torch

from trait_guard.config import GenerateJobConfig, ModelSignalSettings, TrainJobConfig, validate_config
from trait_guard.errors import TraitGuardInputError
from trait_guard.generation import generate_local
from trait_guard.models import load_model
from trait_guard.train import run_training
from trait_guard.trait_signals import (
    MODEL_DIFF,
    TEACHER_LLR,
    model_diff_direction,
    scorer_from_settings,
    settings_key,
)

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

TRAIT_LLR = "trait_llr:animal:owl"


@pytest.fixture(scope="module")
def teacher_dir(tiny_llama_dir, tmp_path_factory):
    """A teacher that differs from the base: its weights sharpened x6 (a random-init model samples near
    uniformly; the sharpened one has a peaked next-token distribution), saved with the base tokenizer."""
    teacher, tokenizer = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "norm" not in name:
                p.mul_(6.0)
    folder = tmp_path_factory.mktemp("sharp-teacher")
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tiny_llama_dir, teacher_dir, tmp_path_factory):
    """Text-only data (top_k_logprobs: 0): the base model's own numbers (reference and a clean set with
    other sampling seeds) and the sharpened teacher's."""
    folder = tmp_path_factory.mktemp("model-signal-data")
    config = validate_config({
        "output_dir": str(folder),
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)},
                     {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 5},
                     {"id": "sharp", "model": str(teacher_dir), "sampling_seed": 7}],
        "generation": {"n_prompts": 96, "chunk_size": 16, "max_new_tokens": 12, "top_k_logprobs": 0},
    }, GenerateJobConfig)
    generate_local(config, progress=False)
    return folder


def job(model_dir, data_dir, out_dir, cache, train, model_signals):
    return validate_config({
        "output_dir": str(out_dir), "student": {"model": str(model_dir)},
        "data": {"train": str(data_dir / f"{train}.parquet"), "reference": str(data_dir / "control.parquet")},
        "optim": {"batch_size": 4, "max_steps": 2, "lr": 1e-3},
        "guard": {"signals": ["nll"]},
        "model_signals": model_signals,
        "signals_cache": str(cache),
        "ray": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{out_dir}/mlflow.db", "experiment": "test-model-signals"},
    }, TrainJobConfig)


def test_the_gate_flags_text_only_data_on_teacher_llr_and_caches_the_model_signals(
        tiny_llama_dir, teacher_dir, data, tmp_path):
    """No stored log-probs, so divergence/llr cannot run; with the teacher model given, the gate scores
    teacher_llr (and trait_llr) at setup, flags the teacher's data on teacher_llr and allows 0 updates;
    a second run reads the cached signals; the same data without model signals is another cache entry."""
    signals = {"teacher_model": str(teacher_dir), "trait_llr": True, "trait_llr_pairs": 1, "model_diff": True}
    cache = tmp_path / "cache"
    summary = run_training(job(tiny_llama_dir, data, tmp_path / "a", cache, "sharp", signals))
    gate = summary["gate"]
    # model_diff is scored and tested too; on this random-init pair it does not separate the data (p 0.42
    # when written): the gate flags on teacher_llr, which reads the teacher's probabilities directly
    assert MODEL_DIFF in gate["tests"]
    assert gate["flagged"] and TEACHER_LLR in gate["flagged_signals"] and gate["tests"][TEACHER_LLR]["p_adj"] < 0.01
    assert TRAIT_LLR in gate["tests"] and "divergence" not in gate["tests"]  # no stored log-probs: not computable
    assert summary["updates"] == 0 and summary["halt"]["gate"]
    note = next(n for n in gate["notes"] if n.startswith("signals for what is at hand"))
    assert "stored teacher log-probs: no" in note and "teacher model: yes" in note
    assert note.endswith("not computed here: proj:animal:owl, proj_diff:animal:owl")  # no vector given
    assert len(list(cache.glob("signals-*.npz"))) == 1

    again = run_training(job(tiny_llama_dir, data, tmp_path / "b", cache, "sharp", signals))
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/b/mlflow.db").get_run(again["mlflow_run_id"])
    assert run.data.tags["setup_signals.source"] == "cache"
    assert again["gate"]["tests"][TEACHER_LLR] == gate["tests"][TEACHER_LLR]

    plain = run_training(job(tiny_llama_dir, data, tmp_path / "c", cache, "sharp", {}))
    assert TEACHER_LLR not in plain["gate"]["tests"] and len(list(cache.glob("signals-*.npz"))) == 2
    plain_note = next(n for n in plain["gate"]["notes"] if n.startswith("signals for what"))
    assert "teacher model: no" in plain_note and "trait_llr:animal:owl" in plain_note.split("not computed here")[1]


def test_clean_text_only_data_passes_the_gate_with_model_signals(tiny_llama_dir, teacher_dir, data, tmp_path):
    """The base model's own numbers (other sampling seeds) against its reference: with the same model
    signals (model_diff too, its direction built from the reference's prompts) the gate does not flag,
    and the student trains its 2 steps."""
    signals = {"teacher_model": str(teacher_dir), "trait_llr": True, "trait_llr_pairs": 1, "model_diff": True}
    summary = run_training(job(tiny_llama_dir, data, tmp_path, tmp_path / "cache", "control-b", signals))
    assert not summary["gate"]["flagged"] and summary["updates"] == 2
    assert {TEACHER_LLR, TRAIT_LLR, MODEL_DIFF} <= set(summary["gate"]["tests"])
    note = next(n for n in summary["gate"]["notes"] if n.startswith("signals for what is at hand"))
    assert "model_diff" not in note.partition("not computed here")[2]
    assert json.loads(json.dumps(summary["gate"])) == summary["gate"]  # plain JSON (the report and MLflow read it)


def test_the_builder_and_the_cache_key(tiny_llama, tiny_llama_dir, teacher_dir, tmp_path):
    """No model signal asked for: no scorer and an empty key (earlier cache files keep their names); the
    key follows the teacher's files; trait_llr without a spec is refused with the fix."""
    model, tokenizer = tiny_llama
    assert scorer_from_settings(ModelSignalSettings(), model, tokenizer, base_name="x", spec=None) is None
    assert settings_key(ModelSignalSettings()) == ""
    with pytest.raises(TraitGuardInputError, match="trait"):
        scorer_from_settings(ModelSignalSettings(trait_llr=True), model, tokenizer, base_name="x", spec=None)
    copy = tmp_path / "teacher"
    copy.mkdir()
    for path in teacher_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    before = settings_key(ModelSignalSettings(teacher_model=str(copy)))
    assert before and before == settings_key(ModelSignalSettings(teacher_model=str(copy)))
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert settings_key(ModelSignalSettings(teacher_model=str(copy))) != before
    scorer = scorer_from_settings(ModelSignalSettings(teacher_model=str(tiny_llama_dir)), model, tokenizer,
                                  base_name=str(tiny_llama_dir), spec=None)
    assert scorer.names == [TEACHER_LLR]
    # model_diff: needs the teacher (refused at config time with the fix) and neutral prompts
    with pytest.raises(ValueError, match="set teacher_model or drop model_diff"):
        ModelSignalSettings(model_diff=True)
    settings = ModelSignalSettings(teacher_model=str(teacher_dir), model_diff=True, model_diff_layer=1,
                                   model_diff_prompts=5)
    with pytest.raises(TraitGuardInputError, match="neutral prompts"):
        scorer_from_settings(settings, model, tokenizer, base_name=str(tiny_llama_dir), spec=None)
    prompts = [f"Continue the sequence: {i}, {i + 3}, {i + 6}" for i in range(8)]
    scorer = scorer_from_settings(settings, model, tokenizer, base_name=str(tiny_llama_dir), spec=None,
                                  neutral_prompts=prompts)
    assert scorer.names == [TEACHER_LLR, MODEL_DIFF]
    # the direction: teacher minus base on the first model_diff_prompts prompts' tokens
    teacher, _ = load_model(str(teacher_dir))
    expected = model_diff_direction(teacher, model, tokenizer, [{"prompt": p, "completion": ""} for p in prompts[:5]],
                                    1, positions="prompt")
    assert scorer.model_diff.layer == expected.layer and scorer.model_diff.n_samples == 5
    torch.testing.assert_close(scorer.model_diff.direction, expected.direction)
    assert settings_key(settings) != settings_key(ModelSignalSettings(teacher_model=str(teacher_dir)))
