"""Bad input is refused with an error that names the fix, before anything is lost: one case per row
of the table in docs/reliability.md. Most cases go through the real `trait-guard train` command
(in-process `cli.main`), whose exit status for bad input is 2.

Markers are per test: those that need the tiny model, generated data and a persona vector (the
``workspace`` fixture, ~8 s to build once) or that train are marked ``slow``; the rest (unreadable
config files, the guard's non-finite checks, YAML and family fuzzing) run in the fast suite."""

import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trait_guard.cli import main
from trait_guard.config import ConfigError, GenerateJobConfig, GuardConfig, TrainJobConfig, validate_config
from trait_guard.families import get_family
from trait_guard.generation import generate_local
from trait_guard.guard import TraitGuard
from trait_guard.persona import PersonaVector, extract
from trait_guard.traits import load_trait


@pytest.fixture(scope="module")
def workspace(tiny_llama_dir, tmp_path_factory):
    """Generated data (with its manifest) and a persona vector for the tiny student."""
    root = tmp_path_factory.mktemp("bad-input")
    generate_local(validate_config({
        "output_dir": str(root / "data"),
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)},
                     {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 3}],
        "generation": {"n_prompts": 32, "chunk_size": 16, "max_new_tokens": 8}}, GenerateJobConfig), progress=False)
    from trait_guard.models import load_model

    model, tokenizer = load_model(str(tiny_llama_dir))
    result = extract(model, tokenizer, load_trait("animal:owl"), n_instructions=1, n_questions=4, max_new_tokens=4)
    result.vectors["last_prompt"].save(root / "owl.safetensors")
    return root


def _good(tiny_llama_dir, root, out):
    return {"output_dir": str(out), "student": {"model": str(tiny_llama_dir)}, "vectors": [str(root / "owl.safetensors")],
            "data": {"train": str(root / "data" / "control-b.parquet"),
                     "reference": str(root / "data" / "control.parquet")},
            "optim": {"batch_size": 4, "max_steps": 2}, "deepspeed": {"enabled": False}, "ray": {"enabled": False},
            "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db"}}


def _train(config_path, capsys):
    code = main(["train", "--config", str(config_path), "--local"])
    return code, capsys.readouterr().err


def _write(tmp_path, config, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    return path


def _set(config, dotted, value):
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


def _parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# (id, change to a good config, expected message fragment)
CONFIG_CASES = [
    ("unknown-key", ("optim.lrr", 0.1), "optim.lrr: Extra inputs are not permitted"),
    ("wrong-type", ("optim.lr", "fast"), "optim.lr: Input should be a valid number"),
    ("zero-threshold", ("guard.target_ert", 0), "guard.target_ert: Input should be greater than 1"),
    ("negative-threshold", ("guard.drift_threshold", -1.0), "guard.drift_threshold: Input should be greater than 0"),
    ("bad-action", ("guard.on_data_alarm", "explode"), "guard.on_data_alarm: Input should be"),
    ("missing-model", ("student.model", "no/such-model-anywhere"), "Could not load the student model"),
    ("unknown-trait", ("trait", "telepathy"), "unknown trait 'telepathy'; shipped traits"),
    ("batch-too-big", ("optim.batch_size", 10_000), "do not fill one global batch"),
    ("missing-data", ("data.train", "nowhere/owl.parquet"), "does not exist; generate it"),
    ("resume-from-nothing", ("resume_from", "nowhere/step_000004"), "not a trait_guard checkpoint"),
    ("unreachable-tracking", ("tracking.tracking_uri", "http://127.0.0.1:9"), "does not answer"),
    ("too-long-completions", ("data.max_completion_tokens", 2), "longer than 2 tokens"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, change, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(case, change, message, tiny_llama_dir, workspace, tmp_path, capsys):
    config = _set(_good(tiny_llama_dir, workspace, tmp_path / "out"), *change)
    code, err = _train(_write(tmp_path, config), capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before training started


@pytest.mark.parametrize("case, text, message", [
    ("malformed-yaml", "optim: {lr: [1, 2\n", "is not valid YAML"),
    ("top-level-list", "- 1\n- 2\n", "must hold a mapping of settings"),
    ("non-utf8", b"optim:\n  lr: \xff\xfe\n", "is not valid YAML"),
    ("missing-file", None, "does not exist"),
])
def test_unreadable_configs(case, text, message, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    code, err = _train(path, capsys)
    assert code == 2 and message in err, err


@pytest.mark.slow
def test_vectors_for_another_model(tiny_llama_dir, workspace, tmp_path, capsys):
    from trait_guard.models import load_model
    from trait_guard.testing import save_tiny_model

    other = save_tiny_model(tmp_path / "wider", "llama", seed=0, hidden_size=48)
    model, tokenizer = load_model(str(other))
    vector = extract(model, tokenizer, load_trait("animal:owl"), n_instructions=1, n_questions=4,
                     max_new_tokens=4).vectors["last_prompt"]
    config = _good(tiny_llama_dir, workspace, tmp_path / "out")
    config["vectors"] = [str(vector.save(tmp_path / "wider.safetensors"))]
    code, err = _train(_write(tmp_path, config), capsys)
    assert code == 2 and "extract vectors for it with `trait-guard extract --model" in err, err


@pytest.mark.slow
def test_corrupted_and_nan_vectors(tiny_llama_dir, workspace, tmp_path, capsys):
    config = _good(tiny_llama_dir, workspace, tmp_path / "out")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    config["vectors"] = [str(garbage)]
    code, err = _train(_write(tmp_path, config), capsys)
    assert code == 2 and "is not a trait_guard persona vector file" in err, err

    vector = PersonaVector.load(workspace / "owl.safetensors")
    vector.vectors = vector.vectors.clone()
    vector.vectors[vector.layer, 0] = math.nan
    with pytest.raises(ValueError, match="contains NaN or inf values; re-extract it"):
        PersonaVector(vector.trait, vector.model, vector.vectors, vector.layer, vector.method)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty", "no-provenance-columns", "not-parquet", "no-manifest", "tampered"])
def test_bad_data_files(case, tiny_llama_dir, workspace, tmp_path, capsys):
    from trait_guard.dataset import SCHEMA

    folder = tmp_path / "data"
    shutil.copytree(workspace / "data", folder)
    target = folder / "control-b.parquet"
    rows = pq.read_table(target).to_pylist()
    allow = False
    if case == "empty":
        _parquet(target, [], SCHEMA)
        allow, message = True, "has no kept rows to train on"
    elif case == "no-provenance-columns":
        _parquet(target, [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        allow, message = True, "lacks required column(s)"
    elif case == "not-parquet":
        target.write_text("prompt,completion\n1 2 3,4 5 6\n")
        allow, message = True, "is not a readable Parquet file"
    elif case == "no-manifest":
        (folder / "manifest.json").unlink()
        message = "has no provenance manifest"
    else:
        rows[0]["completion"] = "9, 9, 9"
        _parquet(target, rows, SCHEMA)
        message = "changed after generation"
    config = _good(tiny_llama_dir, workspace, tmp_path / "out")
    config["data"] = {"train": str(target), "reference": str(folder / "control.parquet"), "allow_unverified": allow}
    code, err = _train(_write(tmp_path, config), capsys)
    assert code == 2 and message in err, err


def test_non_finite_signals_halt_the_guard():
    rng = np.random.default_rng(0)
    reference = {"nll": rng.normal(2.0, 0.5, 200), "proj:owl": rng.normal(0.0, 1.0, 200)}
    for batch in ({"nll": np.array([1.0, np.inf]), "proj:owl": np.zeros(2)},
                  {"nll": np.array([np.nan, np.nan]), "proj:owl": np.array([np.nan, np.nan])}):
        guard = TraitGuard(GuardConfig(on_data_alarm="mask"), reference, batch_size=2)
        decision = guard.observe(batch)
        assert decision.halt and "non-finite" in decision.reason
        assert float(decision.sample_weights.sum()) == 0.0
    guard = TraitGuard(GuardConfig(), reference, batch_size=2)
    assert not guard.observe({"nll": np.array([2.0, np.nan]), "proj:owl": np.zeros(2)}).halt  # one empty sample


def test_reference_without_finite_values_names_the_cause():
    with pytest.raises(ValueError, match="produced NaN/inf"):
        TraitGuard(GuardConfig(signals=["nll"]), {"nll": np.full(50, np.nan)}, batch_size=4)


@pytest.mark.slow
def test_nan_model_weights_halt_training_before_the_update(tiny_llama_dir, workspace, tmp_path):
    """A student whose forward pass gives NaN (a broken checkpoint): the first loss is NaN, the run
    halts at step 1 without applying it, and says why."""
    from transformers import AutoModelForCausalLM

    from trait_guard.train import run_training

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan  # the embeddings (and so the fingerprint) stay intact
    model.save_pretrained(broken)
    config = _good(broken, workspace, tmp_path / "out")
    config.update(vectors=[], guard={"signals": ["unigram"]})  # guard signals that do not need the forward
    summary = run_training(validate_config(config, TrainJobConfig))
    assert summary["halted"] and summary["steps"] == 1 and "NaN/inf" in summary["halt"]["reason"]


def test_duplicate_teacher_ids_in_a_generation_config():
    with pytest.raises(ConfigError, match="teacher ids must be unique"):
        validate_config({"teachers": [{"id": "a"}, {"id": "a"}]}, GenerateJobConfig)


# ----------------------------------------------------------------------------- fuzzing (no crashes)

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=20))
_values = st.recursive(_scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), children, max_size=4)),
                       max_leaves=12)
_keys = st.sampled_from(["optim", "guard", "data", "student", "probe", "tracking", "ray", "trait", "vectors",
                         "output_dir", "distill", "lr", "batch_size", "target_ert", "train", "unknown"])


@pytest.mark.slow  # ~3.3 s: 300 fuzzed configs through pydantic
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=6))
def test_fuzzed_configs_fail_only_with_config_errors(data):
    try:
        validate_config(data, TrainJobConfig)
    except ConfigError as err:
        assert str(err).startswith("config:")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_yaml_text_fails_only_with_config_errors(tmp_path_factory, text):
    from trait_guard.config import load_config

    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        load_config(path, TrainJobConfig)
    except ConfigError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["numbers", "code"]))
def test_fuzzed_completions_get_a_verdict_and_a_reason(text, family_name):
    family = get_family(family_name)
    verdict = family.check(text)
    assert isinstance(verdict.kept, bool) and (verdict.kept or verdict.reason)
