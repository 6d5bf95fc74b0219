"""The student ships (trait_guard.export): which runs ship, the HF folder and its record, and, on real
runs of the tiny model, the MLflow run that a reviewer or a registry step finds by its verdict."""

from __future__ import annotations

import json

import mlflow
import pytest
import test_train
import torch

from trait_guard.export import (
    EXPORT_RECORD,
    SHIPPABLE_VERDICTS,
    data_digests,
    export_student,
    not_shipped_reason,
)
from trait_guard.files import file_sha256

# the teacher data of tests/test_train.py (its clean and shifted sets on the tiny model)
teacher_data = test_train.data


def summary_for(verdict: str) -> dict:
    return {"verdict": verdict, "student": "tiny", "trait": "owl", "weights_step": 3, "updates": 3,
            "gate": {"flagged": False, "alpha": 0.01, "flagged_signals": [], "tests": {}}, "alarms": [],
            "code_version": {"source_sha256": "c0de"}, "mlflow_run_id": "run-1"}


def test_which_runs_ship():
    for verdict in SHIPPABLE_VERDICTS:
        assert not_shipped_reason(verdict) is None
    assert "never ships" in not_shipped_reason("halted") and "--resume" in not_shipped_reason("interrupted")
    assert "zero_to_fp32" in not_shipped_reason("passed", engine=object(), zero_stage=3)
    assert not_shipped_reason("passed", engine=None, zero_stage=3) is None  # no engine: the model is whole
    assert "student.export" in not_shipped_reason("passed", enabled=False)


def test_data_digests_use_the_provenance_and_compute_the_unverified(tmp_path):
    train, reference = tmp_path / "owl.parquet", tmp_path / "control.parquet"
    train.write_bytes(b"train rows")
    reference.write_bytes(b"reference rows")
    digests = data_digests({"train": train, "reference": reference}, {"sha256": {"reference": "f" * 64}})
    assert digests["train"] == {"path": str(train.resolve()), "name": "owl", "sha256": file_sha256(train),
                                "verified": False}
    assert digests["reference"]["sha256"] == "f" * 64 and digests["reference"]["verified"]


def test_full_model_and_lora_adapter_export(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trait_guard.adapters import default_target_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    digests = {"train": {"path": "x", "name": "x", "sha256": "a" * 64, "verified": True}}
    folder, record = export_student(model, tokenizer, tmp_path / "full", summary_for("passed"), digests)
    assert folder == tmp_path / "full" / "student" and record["shipped"] and record["kind"] == "full"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()
    saved = json.loads((folder / EXPORT_RECORD).read_text())
    assert saved["verdict"] == "passed" and saved["data"]["train"]["sha256"] == "a" * 64
    assert saved["screen"] == {"flagged": False, "alpha": 0.01, "flagged_signals": []}
    assert saved["code_version"] == {"source_sha256": "c0de"} and saved["mlflow_run_id"] == "run-1"

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=default_target_modules(model),
                                            task_type="CAUSAL_LM"))
    folder, record = export_student(lora, tokenizer, tmp_path / "lora", summary_for("mitigated"), digests)
    assert record["kind"] == "lora" and (folder / "adapter_config.json").is_file()
    assert not (folder / "model.safetensors").exists()  # the adapter alone
    # a halted run in the same folder: the earlier export goes, nothing new is written
    folder, record = export_student(lora, tokenizer, tmp_path / "lora", summary_for("halted"), digests)
    assert folder is None and not record["shipped"] and not (tmp_path / "lora" / "student").exists()


# ----------------------------------------------------------------------------- real runs


def export_job(model_dir, data_dir, out_dir, train, **overrides):
    # no DeepSpeed, no Ray (the export is rank 0's, after the loop); nll and unigram declared powered so
    # that a clean run can end "passed"
    return test_train.job(model_dir, data_dir, out_dir, train=train, deepspeed={"enabled": False},
               guard={"powered_signals": ["nll", "unigram"]}, **overrides)


def tagged_runs(client: mlflow.MlflowClient, experiment: str, verdict: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`guard.verdict` = '{verdict}'")


@pytest.mark.slow
def test_a_clean_run_ships_its_student_and_mlflow_finds_it(tiny_llama_dir, teacher_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from trait_guard.cli import main
    from trait_guard.signing import create_keypair
    from trait_guard.train import run_training, weights_digest

    key, public = create_keypair(tmp_path / "keys", name="trainer")  # the trainer signs what it ships
    summary = run_training(export_job(tiny_llama_dir, teacher_data, tmp_path, "control-b", optim={"max_steps": 4},
                                      probe={"eval_samples": 1, "eval_questions": 2},
                                      student={"signing_key": str(key)}))
    assert summary["verdict"] == "passed" and summary["updates"] == 4
    # the signed attestation: verified against the trainer's public key and the data it was trained on
    assert main(["verify", summary["student_export"], "--trusted-keys", str(public), "--trained-on", str(teacher_data),
                 "--require-verdict", "passed"]) == 0
    code = summary["code_version"]
    assert f"4 update(s), weights of step 4, code {code['git_commit'] or code['source_sha256'][:16]}\n" in (
        capsys.readouterr().out)  # the commit, not the whole record with its library versions
    assert summary["student_export"] == str(tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(summary["student_export"])
    # the exported weights are the trained ones (the rank's record of its weights), not the base model's
    rank = json.loads((tmp_path / "ranks" / "rank_0.json").read_text())
    assert weights_digest(student) == rank["weights_sha256"]
    assert weights_digest(student) != weights_digest(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    record = json.loads((tmp_path / "student" / EXPORT_RECORD).read_text())
    assert record["verdict"] == "passed" and record["mlflow_run_id"] == summary["mlflow_run_id"]
    assert record["data"]["train"]["sha256"] == file_sha256(teacher_data / "control-b.parquet")
    assert record["data"]["train"]["verified"] and record["data"]["reference"]["name"] == "control"
    assert record["screen"] is None  # the gate is off in these jobs

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = tagged_runs(client, "test-train", "passed")
    assert run.info.run_id == summary["mlflow_run_id"]
    metrics = run.data.metrics
    assert metrics["guard/updates"] == 4 and metrics["guard/weights_step"] == 4 and "guard/halt_step" not in metrics
    assert {"eval/trait_rate_before", "eval/trait_rate_after", "eval/logodds_shift"} <= set(metrics)
    assert metrics["eval/logodds_shift"] == pytest.approx(
        summary["eval_after"]["target_logprob"] - summary["eval_before"]["target_logprob"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"control-b", "control"}
    assert inputs["control-b"].dataset.digest == record["data"]["train"]["sha256"][:36]
    assert {t.key: t.value for t in inputs["control"].tags}["mlflow.data.context"] == "reference"
    tags = run.data.tags
    assert tags["student.shipped"] == "true" and tags["student.kind"] == "full"
    assert tags["student.data.train.sha256"] == record["data"]["train"]["sha256"]
    assert tags["student.signed"] == "true" and tags["student.signer"] == "trainer"
    assert tags["student.signer_fingerprint"].startswith("SHA256:")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "student")}
    assert {"student/config.json", "student/model.safetensors", f"student/{EXPORT_RECORD}"} <= artifacts
    # what a deploy step does: download the run's student and load it
    local = client.download_artifacts(run.info.run_id, "student", str(tmp_path / "download"))
    assert weights_digest(AutoModelForCausalLM.from_pretrained(local)) == rank["weights_sha256"]


@pytest.mark.slow
def test_a_halted_run_ships_nothing(tiny_llama_dir, teacher_data, tmp_path):
    from trait_guard.train import run_training

    stale = tmp_path / "student"  # an earlier run's export in the same folder must not pass for this one's
    stale.mkdir(parents=True)
    (stale / EXPORT_RECORD).write_text("{}")
    summary = run_training(export_job(tiny_llama_dir, teacher_data, tmp_path, "shifted"))
    assert summary["verdict"] == "halted" and summary["student_export"] is None
    assert not stale.exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = tagged_runs(client, "test-train", "halted")
    assert run.data.tags["student.shipped"] == "false" and "never ships" in run.data.tags["student.reason"]
    assert run.data.metrics["guard/halt_step"] == summary["halt"]["step"]
    assert not client.list_artifacts(run.info.run_id, "student")
    assert len(run.inputs.dataset_inputs) == 2  # the data is recorded either way


@pytest.mark.slow
def test_training_nests_under_the_callers_active_run(tiny_llama_dir, teacher_data, tmp_path, monkeypatch):
    """Tracking left unset: the training is a child run of the user's active MLflow run, in its
    experiment (docs/tracking.md: a training's params and status are its own), and the user's run
    stays theirs to end."""
    from trait_guard.tracking import PARENT_RUN_TAG
    from trait_guard.train import run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = export_job(tiny_llama_dir, teacher_data, tmp_path, "control-b", optim={"max_steps": 2},
                        tracking={"tracking_uri": None, "experiment": "trait_guard"})
    client = mlflow.MlflowClient(uri)
    with mlflow.start_run() as active:
        summary = run_training(config)
        child = client.get_run(summary["mlflow_run_id"])
        assert child.info.run_id != active.info.run_id and child.data.tags[PARENT_RUN_TAG] == active.info.run_id
        assert child.info.experiment_id == active.info.experiment_id and child.info.status == "FINISHED"
        assert child.data.tags["guard.verdict"] == "passed" and child.data.metrics["guard/updates"] == 2
        assert client.get_run(active.info.run_id).info.status == "RUNNING"
