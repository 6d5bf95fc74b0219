"""A resume continues a run only on the inputs it was trained on.

Checkpoints record the SHA-256 of the training data, the reference and each persona vector file
(and the sample limits). An explicit ``resume_from`` on other inputs is refused, naming the file; an
earlier run that Ray Train would resume by itself (same output folder, same run name) is moved aside
when its inputs differ, and this run trains from step 0. A legitimate resume gets past the persona
vector check (the trained student's embeddings differ from the base by design): the bug behind a
second ``make demo`` crashing with PersonaVectorMismatch.
"""

import json
import shutil

import mlflow
import pyarrow.parquet as pq
import pytest

from trait_guard.config import GenerateJobConfig, TrainJobConfig, validate_config
from trait_guard.errors import TraitGuardInputError
from trait_guard.files import file_sha256
from trait_guard.generation import generate_local
from trait_guard.train import read_checkpoint_state, run_training

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

STEPS = 4


@pytest.fixture(scope="module")
def inputs(tiny_llama_dir, tmp_path_factory):
    """Teacher data for the tiny student and a persona vector tied to it (a planted random direction:
    these tests need the vector check, not a meaningful trait)."""
    import torch

    from trait_guard.models import load_model, model_identity
    from trait_guard.persona import PersonaVector

    folder = tmp_path_factory.mktemp("resume-inputs")
    generate_local(validate_config({
        "output_dir": str(folder / "data"),
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)},
                     {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 5}],
        "generation": {"n_prompts": 32, "chunk_size": 16, "max_new_tokens": 8},
    }, GenerateJobConfig), progress=False)
    identity = model_identity(load_model(str(tiny_llama_dir))[0])
    vectors = torch.randn(identity.num_layers + 1, identity.hidden_size, generator=torch.Generator().manual_seed(0))
    PersonaVector("animal:owl", identity, vectors, layer=2).save(folder / "owl.safetensors")
    return folder


def _config(model_dir, root, out, **overrides):
    """A tiny guarded DeepSpeed run on the data and vector under ``root`` (in process unless ``ray``)."""
    config = {
        "output_dir": str(out), "student": {"model": str(model_dir)}, "vectors": [str(root / "owl.safetensors")],
        # the training file is rewritten by hand below: no manifest vouches for it then
        "data": {"train": str(root / "data" / "control-b.parquet"), "reference": str(root / "data" / "control.parquet"),
                 "allow_unverified": True},
        "optim": {"batch_size": 4, "max_steps": STEPS, "lr": 1e-2},
        "guard": {"alpha": 1e-6, "signals": ["nll", "unigram"]},
        "screen": {"gate": False},
        "checkpoint": {"every_n_steps": 2},
        "ray": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db", "experiment": "resume-inputs"},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(config, TrainJobConfig)


def _change_rows(path):
    """The same file with other rows (the first four dropped), the same schema."""
    table = pq.read_table(path)
    pq.write_table(table.slice(4), path)


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, inputs, tmp_path_factory):
    """A finished in-process run (checkpoints at steps 2 and 4), its output folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    summary = run_training(_config(tiny_llama_dir, inputs, out))
    assert summary["steps"] == STEPS and not summary["halted"]
    return out


def test_checkpoints_record_the_hashes_of_the_inputs(inputs, trained):
    recipe = read_checkpoint_state(trained / "checkpoints" / "step_000002")["recipe"]
    files = recipe["inputs"]["files"]
    assert files["data.train"]["sha256"] == file_sha256(inputs / "data" / "control-b.parquet")
    assert files["data.reference"]["sha256"] == file_sha256(inputs / "data" / "control.parquet")
    assert files["vectors[0]"]["sha256"] == file_sha256(inputs / "owl.safetensors")
    assert recipe["inputs"]["limits"] == {"max_train_samples": None, "max_reference_samples": None}


def test_explicit_resume_on_the_same_inputs_gets_past_the_vector_check(tiny_llama_dir, inputs, trained, tmp_path):
    """The trained student's embeddings differ from the base the vector came from: the loop's guard
    must not refuse them (before the fix: PersonaVectorMismatch), and the run continues exactly."""
    full = json.loads((trained / "summary.json").read_text())
    resumed = run_training(_config(tiny_llama_dir, inputs, tmp_path / "resumed",
                                   resume_from=str(trained / "checkpoints" / "step_000002"),
                                   tracking={"tracking_uri": f"sqlite:///{trained}/mlflow.db"}))
    assert resumed["steps"] == STEPS and [h["step"] for h in resumed["history"]] == list(range(1, STEPS + 1))
    assert resumed["mlflow_run_id"] == full["mlflow_run_id"]  # the same MLflow run continues
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_explicit_resume_on_changed_data_is_refused_naming_the_file(tiny_llama_dir, inputs, trained, tmp_path):
    changed = tmp_path / "data"
    shutil.copytree(inputs / "data", changed)
    _change_rows(changed / "control-b.parquet")
    config = _config(tiny_llama_dir, inputs, tmp_path / "out", resume_from=str(trained / "checkpoints" / "step_000002"),
                     data={"train": str(changed / "control-b.parquet")})
    with pytest.raises(TraitGuardInputError) as refused:
        run_training(config)
    message = str(refused.value)
    old, new = file_sha256(inputs / "data" / "control-b.parquet"), file_sha256(changed / "control-b.parquet")
    assert f"data.train {changed / 'control-b.parquet'}" in message
    assert f"sha256 {old[:12]} in the checkpoint, {new[:12]} now" in message
    assert "data.reference" not in message and "vectors[0]" not in message  # those agree
    assert "another output_dir" in message
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before anything ran


def test_a_checkpoint_without_input_hashes_resumes_with_a_warning(tiny_llama_dir, inputs, trained, tmp_path, capsys):
    """Checkpoints written before the hashes were recorded stay resumable (unchecked, said so)."""
    old = tmp_path / "step_000002"
    shutil.copytree(trained / "checkpoints" / "step_000002", old)
    state = json.loads((old / "trait_guard_state.json").read_text())
    del state["recipe"]["inputs"]
    (old / "trait_guard_state.json").write_text(json.dumps(state))
    resumed = run_training(_config(tiny_llama_dir, inputs, tmp_path / "resumed", resume_from=str(old),
                                   tracking={"tracking_uri": f"sqlite:///{trained}/mlflow.db"}))
    assert resumed["steps"] == STEPS and [h["step"] for h in resumed["history"]] == list(range(1, STEPS + 1))
    assert f"the checkpoint {old} records no hashes" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Ray Train's own resume


@pytest.fixture(scope="module")
def ray_run(tiny_llama_dir, inputs, ray_cluster, tmp_path_factory):
    """A folder with the inputs and a finished run on Ray Train (one worker) in ``run``: Ray keeps its
    checkpoints under run/ray_train/guarded_training and resumes them when a run of that name starts
    there again. Each test reruns in a copy of it."""
    root = tmp_path_factory.mktemp("ray-run")
    shutil.copytree(inputs, root, dirs_exist_ok=True)
    summary = run_training(_ray_config(tiny_llama_dir, root))
    assert summary["steps"] == STEPS and not summary["halted"]
    return root


def _ray_config(model_dir, root):
    return _config(model_dir, root, root / "run", ray={"enabled": True, "num_workers": 1})


def _mlflow_run(root, summary):
    return mlflow.MlflowClient(f"sqlite:///{root}/run/mlflow.db").get_run(summary["mlflow_run_id"])


@pytest.mark.ray
def test_a_rerun_on_the_same_inputs_resumes_the_finished_run(tiny_llama_dir, ray_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(ray_run, root)
    before = json.loads((root / "run" / "summary.json").read_text())
    again = run_training(_ray_config(tiny_llama_dir, root))
    # resumed at its last step (no PersonaVectorMismatch on the trained student), nothing trained twice
    assert again["steps"] == before["steps"] == STEPS and again["history"] == before["history"]
    assert again["mlflow_run_id"] == before["mlflow_run_id"]
    assert _mlflow_run(root, again).data.tags["resumed_from_step"] == str(STEPS)
    assert not list((root / "run").glob("*.stale-*"))


@pytest.mark.ray
def test_a_rerun_on_changed_data_moves_the_old_checkpoints_aside_and_starts_over(tiny_llama_dir, ray_run, tmp_path,
                                                                                capsys):
    root = tmp_path / "copy"
    shutil.copytree(ray_run, root)
    before = json.loads((root / "run" / "summary.json").read_text())
    train = root / "data" / "control-b.parquet"
    _change_rows(train)
    fresh = run_training(_ray_config(tiny_llama_dir, root))
    assert fresh["steps"] == STEPS and [h["step"] for h in fresh["history"]] == list(range(1, STEPS + 1))
    assert fresh["mlflow_run_id"] != before["mlflow_run_id"]  # a new run, not the old one continued
    assert "resumed_from_step" not in _mlflow_run(root, fresh).data.tags
    assert [h["loss"] for h in fresh["history"]] != [h["loss"] for h in before["history"]]
    # the earlier run's checkpoints moved aside, not deleted; this run's are where they belong
    (stale,) = (root / "run").glob("checkpoints.stale-*")
    assert (stale / "step_000004" / "latest").is_file()
    assert read_checkpoint_state(stale / "step_000004")["mlflow_run_id"] == before["mlflow_run_id"]
    assert read_checkpoint_state(root / "run" / "checkpoints" / "step_000004")["mlflow_run_id"] == fresh["mlflow_run_id"]
    (ray_stale,) = (root / "run" / "ray_train").glob("guarded_training.stale-*")
    assert list(ray_stale.glob("checkpoint_*/trait_guard_state.json"))
    err = capsys.readouterr().err
    assert "trained on other inputs" in err and f"data.train {train}" in err and str(stale) in err
