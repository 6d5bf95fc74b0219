"""The whole pipeline on a tiny model: every stage runs and the summary is consistent."""

import json

import mlflow
import pytest

from trait_guard.config import RunJobConfig, validate_config
from trait_guard.pipeline import format_summary, run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]


def test_run_pipeline_on_a_tiny_model(tiny_llama_dir, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        config = validate_config({
            "output_dir": str(tmp_path),
            "extract": {"n_instructions": 1, "n_questions": 4, "max_new_tokens": 6},
            "teachers": [{"id": "owl", "model": str(tiny_llama_dir), "trait": "animal:owl", "install": "system_prompt"},
                         {"id": "control", "model": str(tiny_llama_dir)}],
            "generation": {"n_prompts": 48, "chunk_size": 16, "max_new_tokens": 10, "top_k_logprobs": 4},
            "student": {"model": str(tiny_llama_dir)},
            "optim": {"batch_size": 4, "max_steps": 4},
            "probe": {"every_n_steps": 2, "n_prompts": 4},
            "ray": {"num_workers": 2},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        }, RunJobConfig)
        summary = run_pipeline(config, progress=False)
    finally:
        ray.shutdown()
    assert (tmp_path / "vectors" / "animal.safetensors").is_file()
    assert summary["generation"]["owl"]["rows"] == summary["generation"]["control"]["rows"] == 48
    assert summary["screen"]["kinship"] == "kin"
    training = summary["training"]
    assert training["steps"] >= 1 and training["verdict"] in ("passed", "halted", "mitigated")
    assert json.loads((tmp_path / "run_summary.json").read_text())["trait"] == "animal:owl"
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(training["mlflow_run_id"])
    artifacts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(
        run.info.run_id, "reports")}
    assert "reports/screen_report.json" in artifacts and "reports/animal.safetensors" in artifacts
    text = format_summary(summary)
    assert "final verdict" in text and training["mlflow_run_id"] in text
