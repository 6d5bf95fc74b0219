"""trait_guard.tracking against a real MLflow store (local SQLite in a temp folder), read back with
MlflowClient: params, metrics with steps, tags, artifacts, run status, plots; plus the pure helpers it
uses (trait_guard.redact, trait_guard.plots)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from trait_guard.detect import Verdict
from trait_guard.guard import Action, Decision
from trait_guard.plots import plot_drift, plot_trait_rates
from trait_guard.redact import flatten_params, is_secret_key
from trait_guard.tracking import (
    ACTION_CODES,
    DECISIONS_ARTIFACT,
    HTTP_RETRY_LIMITS,
    PARENT_RUN_TAG,
    MlflowTracker,
    NullTracker,
    Tracker,
    TrackingConfig,
    decision_history,
    default_tracking_uri,
    forward_context,
    make_tracker,
    outcome_metrics,
    run_url_for,
    summarize_guard,
    ui_command,
)
from trait_guard.tracking import _RetryLimitedClient as RetryLimitedClient

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating its schema is the slow part)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def env_store(store, monkeypatch) -> Path:
    """The default configuration: no MLFLOW_TRACKING_URI, TRAIT_GUARD_MLFLOW_DIR at the module store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TRAIT_GUARD_MLFLOW_DIR", str(store))
    return store


@pytest.fixture(scope="module")
def uri(store) -> str:
    return f"sqlite:///{store.as_posix()}/mlflow.db"


def decision(step: int, action: Action, reason: str, cusum: float, z: float | None = 0.1,
             threshold: float = 5.0) -> Decision:
    verdicts = [Verdict("proj:owl", cusum > threshold, cusum, threshold, None, {"z": z})]
    return Decision(step, action, reason, torch.ones(4), None, verdicts,
                    {"batch_z": {"proj:owl": float("nan") if z is None else z, "nll": 0.0},
                     "cusum": {"proj:owl": cusum, "nll": 0.5},
                     "thresholds": {"proj:owl": threshold, "nll": 6.0}})


def guard_run() -> list[Decision]:
    """PASS x3 (same reason), an alarm turning to REWEIGHT, REWEIGHT in force, a drift HALT."""
    decisions = [decision(s, Action.PASS, "no alarm", c) for s, c in ((1, 0.0), (2, 1.5), (3, 3.2))]
    decisions.append(decision(4, Action.REWEIGHT, "data alarm on proj:owl", 5.6))
    decisions.append(decision(5, Action.REWEIGHT, "mitigation reweight in force since step 4", 7.0, z=None))
    decisions.append(Decision(5, Action.HALT, "student drift owl=1.50", torch.zeros(0), None,
                              [Verdict("drift:owl", True, 1.5, 1.0, None, {"shift": 1.5})],
                              {"drift": {"owl": 1.5}}))
    return decisions


def artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def read_artifact(client: mlflow.MlflowClient, run_id: str, path: str, tmp_path: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_bytes()


# ----------------------------------------------------------------------------- defaults


def test_default_tracking_uri_local_sqlite_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TRAIT_GUARD_MLFLOW_DIR", str(tmp_path / "store"))
    assert default_tracking_uri() == f"sqlite:///{(tmp_path / 'store').resolve().as_posix()}/mlflow.db"
    assert (tmp_path / "store").is_dir()

    monkeypatch.delenv("TRAIT_GUARD_MLFLOW_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve().as_posix()}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns").is_dir()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri() == "http://tracking.example:5000"


def test_ui_command_and_run_url(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TRAIT_GUARD_MLFLOW_DIR", str(tmp_path))
    default = default_tracking_uri()
    assert ui_command() == [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", default,
                            "--host", "127.0.0.1", "--port", "5000"]
    assert ui_command(port=8080, host="0.0.0.0")[-4:] == ["--host", "0.0.0.0", "--port", "8080"]

    assert run_url_for("http://mlflow.local:5000/", "3", "abc") == "http://mlflow.local:5000/#/experiments/3/runs/abc"
    hint = run_url_for(default, "3", "abc")
    assert f"mlflow ui --backend-store-uri {default}" in hint and "#/experiments/3/runs/abc" in hint


def test_http_retry_limits_hold_inside_a_trackers_calls_only(monkeypatch):
    """MLflow's short retries for a tracker hold while its client calls run, not for the process; a
    value the user set wins."""
    for key in HTTP_RETRY_LIMITS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    seen = {}

    class Client:
        name = "fake"

        def get_run(self, run_id):
            seen.update({key: os.environ.get(key) for key in HTTP_RETRY_LIMITS})
            return run_id

    client = RetryLimitedClient(Client())
    assert client.get_run("abc") == "abc" and client.name == "fake"
    assert seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "7"}
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_tracker_on_a_dead_server_gives_up_fast_and_leaves_the_environment(monkeypatch, tmp_path):
    for key in HTTP_RETRY_LIMITS:
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(mlflow.exceptions.MlflowException, match="Max retries"):
        MlflowTracker(experiment="tg-dead", tracking_uri=f"http://127.0.0.1:{port}", spool_dir=tmp_path)
    assert time.monotonic() - started < 60  # MLflow's own default retries take minutes
    assert not any(key in os.environ for key in HTTP_RETRY_LIMITS)


# ----------------------------------------------------------------------------- pure helpers


def test_flatten_params_and_redaction():
    params = {"training": {"lr": 1e-4, "steps": 10, "signals": ["proj:*", "nll"], "extra": {}},
              "hf_token": "hf_abc", "db": {"Password": "pw", "host": "x"}, "awsSecretAccessKey": "s",
              "api_key": "k", "credentials": {"path": "/etc/creds"}, "generation": {"max_new_tokens": 40},
              "judge": {"keywords": ["owl"]}, "tokenizer": {"pad_token_id": 0}, "num_key_value_heads": 2,
              "note": "x" * 7000, "action": Action.HALT, "none": None}
    flat = flatten_params(params)
    assert flat["training.lr"] == "0.0001" and flat["training.steps"] == "10"
    assert flat["training.signals"] == '["proj:*", "nll"]' and flat["training.extra"] == "{}"
    for secret in ("hf_token", "db.Password", "awsSecretAccessKey", "api_key", "credentials.path"):
        assert flat[secret] == "***", secret
    assert flat["db.host"] == "x" and flat["generation.max_new_tokens"] == "40"
    assert flat["judge.keywords"] == '["owl"]' and flat["tokenizer.pad_token_id"] == "0"
    assert flat["num_key_value_heads"] == "2"
    assert len(flat["note"]) == 6000 and flat["note"].endswith("...")
    assert flat["action"] == "halt" and flat["none"] == "None"
    assert flatten_params(TrackingConfig(run_name="r"))["run_name"] == "r"
    assert is_secret_key("MLFLOW_TRACKING_TOKEN") and is_secret_key("client.secret")
    assert not is_secret_key("tokens") and not is_secret_key("monkey") and not is_secret_key("keyword")


def test_plots_are_figures():
    history = decision_history(guard_run())
    assert [h["action"] for h in history] == ["pass"] * 3 + ["reweight", "reweight", "halt"]
    assert history[3]["statistic"]["proj:owl"] == 5.6 and history[3]["thresholds"]["nll"] == 6.0
    figure = plot_drift(history, {"proj:owl": 5.0}, halt_step=4)
    assert len(figure.axes) == 2  # nll and proj:owl
    ax = figure.axes[1]
    assert ax.get_ylabel() == "proj:owl"
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3, 4, 5]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [5.0, 5.0]
    assert any(list(line.get_xdata()) == [4, 4] for line in ax.lines)  # the halt line
    assert len(plot_drift([], {}, None).axes) == 1

    rates = plot_trait_rates({"rate": 0.1, "ci_low": 0.05, "ci_high": 0.2}, {"rate": 0.4, "ci_low": 0.3, "ci_high": 0.5})
    assert [p.get_height() for p in rates.axes[0].patches] == [0.1, 0.4]
    several = plot_trait_rates({"owl": {"rate": 0.1}, "cat": {"rate": 0.2}},
                               {"owl": {"rate": 0.5}, "cat": {"rate": 0.2}})
    assert len(several.axes[0].patches) == 4


# ----------------------------------------------------------------------------- a real run


def test_full_run_read_back(env_store, tmp_path):
    (tmp_path / "report.txt").write_text("screen report\n")
    with MlflowTracker(experiment="tg-test", run_name="owl-student", tags={"team": "guard", "my_token": "t"},
                       flush_every=4) as tracker:
        assert isinstance(tracker, Tracker) and tracker.enabled
        tracker.log_params({"training": {"lr": 0.001, "batch_size": 8}, "hub": {"token": "hf_secret"},
                            "guard": {"signals": ["proj:*"]}})
        tracker.log_params({"training": {"lr": 0.001}})  # same value again: fine
        tracker.log_params({"training": {"lr": 0.5}})  # changed: warned, not logged (params are immutable)
        for step, loss in enumerate([2.0, 1.5, float("nan"), 1.0]):
            tracker.log_metrics({"train/loss": loss, "train/grad_norm": float("inf") if step == 1 else 0.5}, step=step)
        for d in guard_run():
            tracker.log_decision(d)
        tracker.log_text("hello", "notes/hello.txt")
        tracker.log_dict({"n": 3, "z": float("nan")}, "screen/report.json")
        tracker.log_table([{"signal": "proj:owl", "p": 0.01}, {"signal": "nll", "p": 0.4}], "screen/table.json")
        tracker.log_artifact(tmp_path / "report.txt", "screen")
        tracker.log_figure(plot_trait_rates({"rate": 0.1}, {"rate": 0.3}), "eval/trait_rates")
        tags = summarize_guard(tracker, alarms=[{"step": 4, "channel": "data", "signals": ["proj:owl"]},
                                                {"step": 5, "channel": "drift", "signals": ["owl"]}])
        run_id, experiment_id = tracker.run_id, tracker.experiment_id
        assert tracker.skipped_metrics == 3  # NaN loss, inf grad norm, NaN batch_z at step 5
        assert "mlflow ui --backend-store-uri sqlite:///" in tracker.run_url and run_id in tracker.run_url
    assert tags["guard.verdict"] == "halted"

    client = mlflow.MlflowClient(default_tracking_uri())
    experiment = client.get_experiment(experiment_id)
    assert experiment.name == "tg-test"
    assert experiment.artifact_location == (env_store.resolve() / "artifacts").as_uri()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "owl-student"
    assert run.info.artifact_uri.startswith((env_store.resolve() / "artifacts").as_uri())

    params = run.data.params
    assert params == {"training.lr": "0.001", "training.batch_size": "8", "hub.token": "***",
                      "guard.signals": '["proj:*"]'}

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    assert history("train/loss") == [(0, 2.0), (1, 1.5), (3, 1.0)]
    assert history("train/grad_norm") == [(0, 0.5), (2, 0.5), (3, 0.5)]
    assert history("guard/action_code") == [(1, 0), (2, 0), (3, 0), (4, ACTION_CODES["reweight"]),
                                            (5, ACTION_CODES["reweight"]), (5, ACTION_CODES["halt"])]
    assert history("guard/cusum/proj:owl") == [(1, 0.0), (2, 1.5), (3, 3.2), (4, 5.6), (5, 7.0)]
    assert history("guard/batch_z/proj:owl") == [(1, 0.1), (2, 0.1), (3, 0.1), (4, 0.1)]
    assert history("guard/drift/owl") == [(5, 1.5)]

    tags = run.data.tags
    assert tags["team"] == "guard" and tags["my_token"] == "***"
    assert tags["guard.verdict"] == "halted" and tags["guard.halt_step"] == "5"
    assert tags["guard.halt_reason"] == "student drift owl=1.50"
    assert tags["guard.alarms"] == "2" and tags["guard.first_alarm_step"] == "4"
    assert tags["trait_guard.skipped_metrics"] == "3"
    assert tags["mlflow.runName"] == "owl-student"

    assert artifact_paths(client, run_id) >= {DECISIONS_ARTIFACT, "guard/drift.png", "guard/alarms.json",
                                              "notes/hello.txt", "screen/report.json", "screen/table.json",
                                              "screen/report.txt", "eval/trait_rates.png"}
    lines = read_artifact(client, run_id, DECISIONS_ARTIFACT, tmp_path / "d").decode().splitlines()
    records = [json.loads(line) for line in lines]
    # the first decision, then every non-PASS one; the repeated "no alarm" PASS decisions are not kept
    assert [(r["step"], r["action"], r["reason"]) for r in records] == [
        (1, "pass", "no alarm"), (4, "reweight", "data alarm on proj:owl"),
        (5, "reweight", "mitigation reweight in force since step 4"), (5, "halt", "student drift owl=1.50")]
    assert records[2]["evidence"]["batch_z"]["proj:owl"] is None  # NaN -> null: valid JSON
    assert records[1]["evidence"]["cusum"]["proj:owl"] == 5.6 and records[1]["flagged"] == ["proj:owl"]
    for png in ("guard/drift.png", "eval/trait_rates.png"):
        assert read_artifact(client, run_id, png, tmp_path / "p").startswith(PNG_MAGIC)
    assert json.loads(read_artifact(client, run_id, "screen/report.json", tmp_path / "r")) == {"n": 3, "z": None}
    table = json.loads(read_artifact(client, run_id, "screen/table.json", tmp_path / "t"))
    assert table["columns"] == ["signal", "p"] and table["data"] == [["proj:owl", 0.01], ["nll", 0.4]]
    assert read_artifact(client, run_id, "notes/hello.txt", tmp_path / "h") == b"hello"
    assert read_artifact(client, run_id, "screen/report.txt", tmp_path / "s") == b"screen report\n"


def test_failed_on_exception_and_flush_before_finish(uri):
    client = mlflow.MlflowClient(uri)
    with pytest.raises(RuntimeError, match="boom"):
        with MlflowTracker(experiment="tg-test", tracking_uri=uri) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
            tracker.log_decision(decision(1, Action.PASS, "no alarm", 0.2))
            tracker.flush()  # visible before the run ends
            assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [1.0]
            assert DECISIONS_ARTIFACT in artifact_paths(client, tracker.run_id)
            assert client.get_run(tracker.run_id).info.status == "RUNNING"
            raise RuntimeError("boom")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["trait_guard.error"] == "RuntimeError: boom"
    tracker.log_metrics({"loss": 2.0}, step=1)  # after the end: ignored, no error
    tracker.finish()  # idempotent
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_runs_do_not_interfere_and_passed_verdict(uri):
    a = make_tracker(rank=0, experiment="tg-a", tracking_uri=uri, flush_every=1000)
    b = make_tracker(rank=0, config={"experiment": "tg-b", "tags": {"x": "1"}}, tracking_uri=uri)
    assert isinstance(a, MlflowTracker) and isinstance(b, MlflowTracker) and a.run_id != b.run_id
    for step in range(3):
        a.log_metrics({"m": step}, step=step)
        b.log_metrics({"m": 10 + step}, step=step)
    a.log_decision(decision(1, Action.PASS, "no alarm", 0.1))
    assert summarize_guard(a, alarms=[])["guard.verdict"] == "passed"
    b.finish("KILLED")
    a.finish()
    client = mlflow.MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(a.run_id, "m")] == [0, 1, 2]
    assert [m.value for m in client.get_metric_history(b.run_id, "m")] == [10, 11, 12]
    assert client.get_run(a.run_id).data.tags["guard.verdict"] == "passed"
    assert client.get_run(b.run_id).info.status == "KILLED" and client.get_run(b.run_id).data.tags["x"] == "1"
    assert client.get_experiment(client.get_run(b.run_id).info.experiment_id).name == "tg-b"
    with pytest.raises(ValueError, match="status"):
        a.finish("DONE")


def test_null_tracker_does_nothing(uri):
    client = mlflow.MlflowClient(uri)
    for tracker in (make_tracker(rank=1, experiment="tg-null", tracking_uri=uri),
                    make_tracker(rank=0, config=TrackingConfig(enabled=False, experiment="tg-null",
                                                               tracking_uri=uri)),
                    NullTracker()):
        assert isinstance(tracker, NullTracker) and not tracker.enabled
        with tracker as t:
            t.log_params({"a": {"b": 1}})
            t.log_metrics({"loss": 1.0}, step=0)
            t.log_decision(decision(1, Action.HALT, "x", 9.0))
            t.set_tags({"k": "v"})
            t.log_artifact("missing-file")
            t.log_dict({}, "x.json")
            t.log_text("", "x.txt")
            t.log_figure(None, "x.png")
            t.log_table([], "x.json")
            t.flush()
        assert t.run_id is None and t.run_url is None and t.decisions == []
        assert summarize_guard(t, alarms=[{"step": 1}])["guard.verdict"] == "mitigated"
    assert client.get_experiment_by_name("tg-null") is None


# ----------------------------------------------------------------------------- outcomes, datasets, the student


def test_outcome_metrics_are_numbers_from_the_summary():
    halted = {"halted": True, "halt": {"step": 7}, "updates": 6, "weights_step": 4, "alarms": [{"step": 7}],
              "eval_before": {"rate": 0.1, "target_logprob": -3.0}, "eval_after": {"rate": 0.25, "target_logprob": -2.5}}
    assert outcome_metrics(halted) == {"guard/halt_step": 7.0, "guard/updates": 6.0, "guard/weights_step": 4.0,
                                       "guard/alarms": 1.0, "eval/trait_rate_before": 0.1,
                                       "eval/trait_rate_after": 0.25, "eval/logodds_shift": 0.5}
    # no halt step when not halted; no shift without both evaluations
    passed = {"halted": False, "halt": None, "updates": 4, "weights_step": 4, "alarms": [], "eval_before": None,
              "eval_after": {"rate": 0.0, "target_logprob": -4.0}}
    assert outcome_metrics(passed) == {"guard/updates": 4.0, "guard/weights_step": 4.0, "guard/alarms": 0.0,
                                       "eval/trait_rate_after": 0.0}


def test_outcome_metrics_datasets_and_student_read_back(uri, tmp_path):
    train, reference = tmp_path / "owl.parquet", tmp_path / "control.parquet"
    train.write_bytes(b"train")
    reference.write_bytes(b"reference")
    digests = {"train": {"path": str(train), "name": "owl", "sha256": "a" * 64, "verified": True},
               "reference": {"path": str(reference), "name": "control", "sha256": "b" * 64, "verified": False}}
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    record = {"shipped": True, "reason": None, "verdict": "passed", "kind": "full", "weights_step": 4,
              "screen": {"flagged": False}, "data": digests}
    with make_tracker(rank=0, experiment="tg-outcome", tracking_uri=uri) as tracker:
        tracker.log_outcome_metrics({"steps": 4, "updates": 4, "weights_step": 4, "alarms": [],
                                     "eval_before": {"rate": 0.5, "target_logprob": -2.0},
                                     "eval_after": {"rate": 0.25, "target_logprob": -3.0}})
        tracker.log_datasets(digests)
        tags = tracker.log_student(student, record)
    assert tags["student.shipped"] == "true" and tags["student.data.train.sha256"] == "a" * 64
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["eval/logodds_shift"] == -1.0 and run.data.metrics["guard/updates"] == 4
    assert "guard/halt_step" not in run.data.metrics
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"owl", "control"}
    assert inputs["owl"].dataset.digest == "a" * 36 and str(train) in inputs["owl"].dataset.source
    assert {t.key: t.value for t in inputs["owl"].tags}["mlflow.data.context"] == "training"
    assert {t.key: t.value for t in inputs["control"].tags}["mlflow.data.context"] == "reference"
    assert json.loads(inputs["control"].dataset.profile) == {"sha256": "b" * 64, "provenance_verified": False}
    assert run.data.tags["data.reference.sha256"] == "b" * 64 and run.data.tags["student.screen"] == "clean"
    assert "student/config.json" in artifact_paths(client, run.info.run_id)
    # ordered by a metric, which tags cannot do
    found = client.search_runs([run.info.experiment_id], order_by=["metrics.`eval/trait_rate_after` DESC"])
    assert found[0].info.run_id == tracker.run_id
    # a run that does not ship says why, and logs no student
    with make_tracker(rank=0, experiment="tg-outcome", tracking_uri=uri) as halted:
        halted.log_student(None, {"shipped": False, "reason": "the guard halted training: a halted run never ships"})
    tags = client.get_run(halted.run_id).data.tags
    assert tags["student.shipped"] == "false" and "halted" in tags["student.reason"]
    assert not artifact_paths(client, halted.run_id)


def test_tracker_follows_the_users_mlflow_context(uri, monkeypatch):
    """MLFLOW_EXPERIMENT_NAME names the experiment unless the config does; an active run (or
    MLFLOW_RUN_ID) is logged into and left for its owner to end."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tg-from-env")
    client = mlflow.MlflowClient(uri)
    with make_tracker(rank=0, config=TrackingConfig()) as tracker:
        assert not tracker.attached
    assert client.get_experiment(client.get_run(tracker.run_id).info.experiment_id).name == "tg-from-env"
    with make_tracker(rank=0, config=TrackingConfig(experiment="tg-explicit")) as tracker:
        pass
    assert client.get_experiment(client.get_run(tracker.run_id).info.experiment_id).name == "tg-explicit"

    with mlflow.start_run() as active:
        with make_tracker(rank=0, config=TrackingConfig()) as tracker:
            assert tracker.attached and tracker.run_id == active.info.run_id
            tracker.log_metrics({"guard/updates": 3})
        run = client.get_run(active.info.run_id)
        assert run.info.status == "RUNNING"  # the owner ends it, not trait_guard
        assert run.data.metrics["guard/updates"] == 3 and run.data.tags["trait_guard.status"] == "FINISHED"
    assert client.get_run(active.info.run_id).info.status == "FINISHED"

    owned = client.create_run(client.get_experiment_by_name("tg-from-env").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", owned.info.run_id)
    with make_tracker(rank=0, config=TrackingConfig()) as tracker:
        assert tracker.attached and tracker.run_id == owned.info.run_id
    # a resumed job's own run id wins over the context, and is ended as before
    other = client.create_run(owned.info.experiment_id)
    with make_tracker(rank=0, config=TrackingConfig(), run_id=other.info.run_id) as tracker:
        assert not tracker.attached and tracker.run_id == other.info.run_id
    assert client.get_run(other.info.run_id).info.status == "FINISHED"


#: what a Ray Train worker does with the config it receives (train_worker -> make_tracker), in a fresh
#: process: no active run, no MLFLOW_* environment, another working folder
WORKER = """
import sys
from trait_guard.tracking import TrackingConfig, make_tracker
config = TrackingConfig.model_validate_json(sys.argv[1])
with make_tracker(0, config, spool_dir=sys.argv[2]) as tracker:
    tracker.log_metrics({"guard/updates": 5}, step=5)
print(tracker.run_id)
"""


def test_a_workers_run_nests_under_the_callers_active_run(uri, monkeypatch, tmp_path, caplog):
    """forward_context carries the caller's MLflow context (store, run, experiment) in the tracking
    config itself, so a tracker made in another process, which sees none of it, becomes a child of the
    caller's run in the caller's experiment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("tg-user-notebook")
    assert forward_context(TrackingConfig()).tags == {}  # no caller's run: nothing to nest under
    with mlflow.start_run(experiment_id=experiment_id) as active:
        forwarded = forward_context(TrackingConfig(run_name="student", tags={"team": "guard"}))
        assert forwarded.tracking_uri == uri and forwarded.experiment == "tg-user-notebook"
        assert forwarded.tags == {"team": "guard", PARENT_RUN_TAG: active.info.run_id}
        assert forward_context(forwarded) == forwarded  # run_training may forward what pipeline forwarded

        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        worker = subprocess.run([sys.executable, "-c", WORKER, forwarded.model_dump_json(), str(tmp_path / "spool")],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stderr[-3000:]
        child = client.get_run(worker.stdout.split()[-1])
        # in this process too, a config that names a parent makes a child, never writes the active run itself
        with make_tracker(0, forwarded, spool_dir=tmp_path / "local-spool") as local:
            assert not local.attached and local.parent_run_id == active.info.run_id
    assert child.info.run_id != active.info.run_id and child.info.run_name == "student"
    assert child.data.tags[PARENT_RUN_TAG] == active.info.run_id and child.data.tags["team"] == "guard"
    assert child.info.experiment_id == experiment_id and child.info.status == "FINISHED"
    assert child.data.metrics["guard/updates"] == 5
    assert "guard/updates" not in client.get_run(active.info.run_id).data.metrics
    children = client.search_runs([experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{active.info.run_id}'")
    assert {r.info.run_id for r in children} == {child.info.run_id, local.run_id}

    # MLFLOW_RUN_ID names the caller's run as well; an explicit parent wins over it
    monkeypatch.setenv("MLFLOW_RUN_ID", active.info.run_id)
    assert forward_context(TrackingConfig()).tags[PARENT_RUN_TAG] == active.info.run_id
    assert forward_context(TrackingConfig(), parent_run_id=child.info.run_id).tags[PARENT_RUN_TAG] == child.info.run_id
    # a config naming another store does not nest under a run it cannot see
    other = f"sqlite:///{tmp_path.as_posix()}/other.db"
    assert PARENT_RUN_TAG not in forward_context(TrackingConfig(tracking_uri=other)).tags
    # a parent the store does not have is dropped, with a warning, rather than left dangling
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    with caplog.at_level("WARNING", logger="trait_guard.tracking"):
        assert PARENT_RUN_TAG not in forward_context(TrackingConfig()).tags
    assert "will not be nested" in caplog.text
    # disabled tracking is left alone
    assert forward_context({"enabled": False}) == TrackingConfig(enabled=False)
