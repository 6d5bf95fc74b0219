"""Faults injected for real during guarded training: the tracking server goes away and comes back,
the process gets SIGTERM, a Ray Train worker is SIGKILLed. (A teacher actor killed mid-generation:
tests/test_generation.py.)"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow_server import MlflowServer

from trait_guard.config import GenerateJobConfig, TrainJobConfig, validate_config
from trait_guard.generation import generate_local
from trait_guard.train import read_checkpoint_state, run_training

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


@pytest.fixture(scope="module")
def data(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-data")
    generate_local(validate_config({
        "output_dir": str(folder),
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)},
                     {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 5}],
        "generation": {"n_prompts": 64, "chunk_size": 16, "max_new_tokens": 10, "top_k_logprobs": 4},
    }, GenerateJobConfig), progress=False)
    return folder


def _config(model_dir, data_dir, out_dir, **overrides):
    config = {
        "output_dir": str(out_dir), "student": {"model": str(model_dir)},
        "data": {"train": str(data_dir / "control-b.parquet"), "reference": str(data_dir / "control.parquet")},
        "optim": {"batch_size": 4, "epochs": 20, "lr": 1e-3},
        # clean data and a guard calibrated for a false alarm per 10^6 batches: these runs are about faults
        "guard": {"alpha": 1e-6, "signals": ["nll", "unigram"]},
        "ray": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{out_dir}/mlflow.db", "experiment": "faults"},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def _wait_for_step(path: Path, step: int, timeout: float = 600.0, process=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the training process exited ({process.returncode}) before step {step}:\n"
                                 + process.stdout.read()[-4000:])
        try:
            progress = json.loads(path.read_text())
            if progress["step"] >= step:
                return progress
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not reach step {step} in {timeout} s")


def test_tracking_server_down_mid_run_loses_nothing(tiny_llama_dir, data, tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    out = tmp_path / "run"
    config = validate_config(_config(tiny_llama_dir, data, out, optim={"max_steps": 40},
                                     tracking={"tracking_uri": server.uri}), TrainJobConfig)
    seen: dict[str, int] = {}

    def outage():  # stop the server a few steps in, start it again (same port and store) ~15 s later
        seen["stopped_at"] = _wait_for_step(out / "progress" / "rank_0.json", 3)["step"]
        server.stop()
        time.sleep(2.0)
        seen["still_training_at"] = json.loads((out / "progress" / "rank_0.json").read_text())["step"]
        server.start()

    watcher = threading.Thread(target=outage)
    watcher.start()
    try:
        summary = run_training(config)
        watcher.join()
        assert seen["still_training_at"] > seen["stopped_at"]  # training went on while the server was down
        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert "delivered in order" in run.data.tags["tracking.delivered_late"]
        losses = client.get_metric_history(run.info.run_id, "train/loss")
        assert summary["steps"] == 40, summary["steps"]
        assert sorted(m.step for m in losses) == list(range(1, 41)), (seen, sorted(m.step for m in losses))  # every step once
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        assert "report/report.html" in artifacts
        spool = out / "mlflow_spool" / run.info.run_id
        assert not (spool / "operations.jsonl").read_text().splitlines()  # drained
    finally:
        server.stop()


def test_sigterm_writes_a_checkpoint_and_partial_report_then_resume_finishes(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "run"
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(_config(tiny_llama_dir, data, out, optim={"max_steps": 300})))
    # a clean environment: earlier tests in this process may have set Ray / torch.distributed variables
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MASTER_", "MLFLOW_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen([sys.executable, "-m", "trait_guard.cli", "train", "--config", str(config_path),
                                "--local"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_step(out / "progress" / "rank_0.json", 3, process=process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "INTERRUPTED" in output and "--resume" in output
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert 3 <= stopped < 300 and summary["interrupted"]["signal"] == signal.SIGTERM
    state = read_checkpoint_state(out / "checkpoints" / f"step_{stopped:06d}")
    assert state["step"] == stopped and [h["step"] for h in state["history"]] == list(range(1, stopped + 1))
    report = (out / "report" / "report.html").read_text()
    assert "INTERRUPTED" in report
    run = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db").get_run(summary["mlflow_run_id"])
    assert run.info.status == "KILLED" and "signal 15" in run.data.tags["run.interrupted"]

    resumed = run_training(validate_config(_config(tiny_llama_dir, data, out, optim={"max_steps": stopped + 4},
                                                   resume_from=str(out / "checkpoints" / f"step_{stopped:06d}")),
                                           TrainJobConfig))
    assert resumed["steps"] == stopped + 4 and [h["step"] for h in resumed["history"]] == list(range(1, stopped + 5))
    assert resumed["mlflow_run_id"] == summary["mlflow_run_id"]  # the same MLflow run continues


@pytest.mark.ray
def test_killed_ray_train_worker_restarts_from_the_last_checkpoint(tiny_llama_dir, data, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "run"
    total = 14
    config = validate_config(_config(tiny_llama_dir, data, out, optim={"max_steps": total},
                                     checkpoint={"every_n_steps": 3}, ray={"enabled": True, "num_workers": 2,
                                                                           "max_failures": 1}), TrainJobConfig)
    killed: dict[str, int] = {}

    def kill_rank_1():
        progress = _wait_for_step(out / "progress" / "rank_1.json", 7)
        killed.update(step=progress["step"], pid=progress["pid"])
        os.kill(progress["pid"], signal.SIGKILL)

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    watcher = threading.Thread(target=kill_rank_1)
    watcher.start()
    try:
        summary = run_training(config)
    finally:
        watcher.join(timeout=300)
        ray.shutdown()
    assert killed["step"] >= 7
    # the run finished all steps; the history (from the checkpoint, then the restarted workers) has each once
    assert summary["steps"] == total and [h["step"] for h in summary["history"]] == list(range(1, total + 1))
    ranks = [json.loads((out / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert all(r["steps"] == total and r["guard_step"] == total for r in ranks)
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1  # the restarted workers continued the same MLflow run
    resumed_from = int(runs[0].data.tags["resumed_from_step"])
    # a checkpoint Ray Train had registered before the kill (one every 3 steps)
    assert resumed_from % 3 == 0 and 0 < resumed_from <= killed["step"]
    assert json.loads((out / "progress" / "rank_1.json").read_text())["pid"] != killed["pid"]
