"""The whole pipeline on a tiny model: every stage runs and the summary is consistent."""

import json

import mlflow
import pytest

from trait_guard.config import RunJobConfig, validate_config
from trait_guard.pipeline import format_summary, run_pipeline
from trait_guard.tracking import PARENT_RUN_TAG

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]


def test_run_pipeline_on_a_tiny_model(tiny_llama_dir, tmp_path, monkeypatch):
    """Run inside the user's own MLflow run: the trainings, on Ray Train workers (other processes, which
    see no active run), are logged as children of it, in its experiment. The driver loads no model."""
    ray = pytest.importorskip("ray")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = mlflow.MlflowClient(uri)
    study_experiment = client.create_experiment("my-study")
    from trait_guard import models

    def no_model_in_the_driver(*args, **kwargs):
        raise AssertionError("the pipeline's driver loaded a model: extraction, generation, scoring and training "
                             "belong in Ray tasks, actors and workers")

    monkeypatch.setattr(models, "load_model", no_model_in_the_driver)  # this process only, not the Ray workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        config = validate_config({
            "output_dir": str(tmp_path),
            "extract": {"n_instructions": 1, "n_questions": 4, "max_new_tokens": 6},
            "teachers": [{"id": "owl", "model": str(tiny_llama_dir), "trait": "animal:owl", "install": "system_prompt"},
                         {"id": "control", "model": str(tiny_llama_dir)},
                         {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 7}],
            "also_train_on": ["control-b"],
            "generation": {"n_prompts": 48, "chunk_size": 16, "max_new_tokens": 10, "top_k_logprobs": 4},
            "student": {"model": str(tiny_llama_dir)},
            "optim": {"batch_size": 4, "max_steps": 4},
            "probe": {"every_n_steps": 2, "n_prompts": 4},
            "ray": {"num_workers": 2},
            "tracking": {"tracking_uri": uri},
        }, RunJobConfig)
        with mlflow.start_run(experiment_id=study_experiment) as study:
            summary = run_pipeline(config, progress=False)
    finally:
        ray.shutdown()
    assert (tmp_path / "vectors" / "animal.safetensors").is_file()
    assert summary["generation"]["owl"]["rows"] == summary["generation"]["control-b"]["rows"] == 48
    assert [t["teacher"] for t in summary["trainings"]] == ["owl", "control-b"]
    assert client.get_run(study.info.run_id).info.status == "FINISHED"
    for record in summary["trainings"]:
        screen, training = record["screen"], record["training"]
        run = client.get_run(training["mlflow_run_id"])
        assert run.info.run_id != study.info.run_id and run.data.tags[PARENT_RUN_TAG] == study.info.run_id
        assert run.info.experiment_id == study_experiment and run.info.status == "FINISHED"
        assert screen["kinship"] == "kin"
        # the pipeline obeys its screen: the training run's gate reached the same verdict on the same signals,
        # and a flagged set (on_data_alarm: halt) trained not one step
        assert training["gate"]["flagged"] == screen["flagged"]
        assert {n: t["p_adj"] for n, t in training["gate"]["tests"].items()} == pytest.approx(
            {n: s["p_adj"] for n, s in screen["signals"].items()})
        if screen["flagged"]:
            assert training["halted"] and training["halt"]["gate"] and training["updates"] == 0
        else:
            assert training["updates"] >= 1 and training["verdict"] in ("passed", "halted", "mitigated")
        artifacts = {a.path for a in client.list_artifacts(training["mlflow_run_id"], "reports")}
        assert f"reports/screen_{record['teacher']}.json" in artifacts and "reports/animal.safetensors" in artifacts
    # scored once: the scoring stage scored each row once (the reference with the first training set), the
    # screen and the training runs read those signals (one cache file per training set)
    assert len(list((tmp_path / "signals_cache").glob("signals-*.npz"))) == 2
    scored = [t["scoring"] for t in summary["trainings"]]
    assert [s["source"] for s in scored] == ["scoring stage"] * 2
    assert [s["rows_scored"] for s in scored] == [scored[0]["train_rows"] + scored[0]["reference_rows"],
                                                  scored[1]["train_rows"]]
    assert [t["training"]["setup_signals"] for t in summary["trainings"]] == ["cache", "cache"]
    assert json.loads((tmp_path / "run_summary.json").read_text())["trait"] == "animal:owl"
    text = format_summary(summary)
    assert "student on 'owl'" in text and "student on 'control-b'" in text
    assert all(t["training"]["mlflow_run_id"] in text for t in summary["trainings"])
