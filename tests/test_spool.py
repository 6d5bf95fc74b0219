"""trait_guard.spool.SpooledClient against a real ``mlflow server`` (tests/mlflow_server.py) that is
stopped and started again: while it is down, writes queue on disk in order (artifact files copied
in), later writes queue behind them, and all are delivered in order once it answers again; a bad
request to a live server still raises. The client is an ``mlflow.MlflowClient`` with the short HTTP
retries a tracker gives it (trait_guard.tracking), as in training."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow_server import MlflowServer

from trait_guard import spool
from trait_guard.spool import OPERATIONS, RUN_FILE, SpooledClient
from trait_guard.tracking import _RetryLimitedClient as RetryLimitedClient


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real tracking server for the module (a start costs ~5-20 s); a test that stops it starts it again."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def new_run(uri: str) -> tuple[object, str]:
    client = RetryLimitedClient(mlflow.MlflowClient(uri))
    return client, client.create_run("0").info.run_id


def metric(key):
    """A metric write that also sets the tag ``last_write``: the server keeps the last value a tag was
    set to, so its final value says which write arrived last."""
    return {"op": "log_batch", "metrics": [[key, 1.0, int(time.time() * 1000), 0]], "tags": [["last_write", key]]}


def delivered(client, run_id) -> dict[str, int]:
    """How many values of each metric the server holds."""
    return {key: len(client.get_metric_history(run_id, key)) for key in "abc"}


@pytest.mark.slow
def test_outage_queues_in_order_and_drain_delivers(server, tmp_path, monkeypatch):
    # Only drain() retries the queue here: a send may also retry it, every REPLAY_INTERVAL seconds, and a
    # restart can take longer than that, which would deliver the queue before the checks below.
    monkeypatch.setattr(spool, "REPLAY_INTERVAL", 3600.0)
    client, run_id = new_run(server.uri)
    writes = SpooledClient(client, run_id, server.uri, tmp_path / "spool" / run_id)

    writes.send(metric("a"))  # server up: sent at once, nothing on disk
    assert delivered(client, run_id) == {"a": 1, "b": 0, "c": 0} and len(writes) == 0
    assert not writes.directory.exists()

    server.stop()
    try:
        assert writes.unreachable()
        writes.send(metric("b"))
        artifact = tmp_path / "note.txt"
        artifact.write_text("hello", encoding="utf-8")
        writes.send({"op": "log_artifact", "local_path": str(artifact), "artifact_path": "notes"})
        artifact.unlink()  # the spool holds its own copy
        assert len(writes) == 2
        assert json.loads((writes.directory / RUN_FILE).read_text()) == {"tracking_uri": server.uri,
                                                                         "run_id": run_id}
        queued = [json.loads(line) for line in (writes.directory / OPERATIONS).read_text().splitlines()]
        assert [op["op"] for op in queued] == ["log_batch", "log_artifact"]
        assert queued[0]["metrics"][0][0] == "b" and (writes.directory / "files").is_dir()
    finally:
        server.start()  # same port and store

    assert not writes.unreachable()
    writes.send(metric("c"))  # queued behind the others (order kept), not sent ahead of them
    assert len(writes) == 3 and delivered(client, run_id) == {"a": 1, "b": 0, "c": 0}
    assert client.get_run(run_id).data.tags["last_write"] == "a"
    tags = writes.drain(timeout=30.0)
    assert len(writes) == 0 and (writes.directory / OPERATIONS).read_text() == ""
    assert not (writes.directory / "files").exists()  # the copies go once delivered
    assert delivered(client, run_id) == {"a": 1, "b": 1, "c": 1}
    assert client.get_run(run_id).data.tags["last_write"] == "c"  # c arrived after a and b
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="notes/note.txt",
                                                dst_path=str(tmp_path / "download"), tracking_uri=server.uri)
    assert open(local, encoding="utf-8").read() == "hello"
    assert tags["tracking.delivered_late"].startswith("3 write(s) queued")
    assert isinstance(tags["tracking.offline_seconds"], float) and tags["tracking.offline_seconds"] > 0

    writes.send({"op": "set_terminated", "status": "FINISHED"})
    writes.close()
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_no_outage_no_tags_and_bad_requests_raise(server, tmp_path):
    client, run_id = new_run(server.uri)
    writes = SpooledClient(client, run_id, server.uri, tmp_path / "run2")
    writes.send(metric("a"))
    writes.send({"op": "log_batch", "params": [["lr", "0.1"]]})
    # bad requests the live server refuses: a param changed, a run that does not exist
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        writes.send({"op": "log_batch", "params": [["lr", "0.2"]]})
    missing = SpooledClient(client, "0" * 32, server.uri, tmp_path / "missing")
    with pytest.raises(MlflowException, match="not found"):
        missing.send(metric("a"))
    assert len(writes) == 0 and writes.drain(timeout=0.0) == {}
    assert len(missing) == 0 and not missing.directory.exists() and not writes.directory.exists()
    assert not writes.unreachable()
    assert delivered(client, run_id) == {"a": 1, "b": 0, "c": 0}
    assert client.get_run(run_id).data.params == {"lr": "0.1"}


def test_a_local_store_is_never_unreachable(tmp_path):
    """A non-HTTP store (a SQLite file) has no server to lose: writes go straight through and a bad
    request raises; nothing is ever spooled."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run("0").info.run_id
    writes = SpooledClient(client, run_id, uri, tmp_path / "spool")
    writes.send(metric("a"))
    with pytest.raises(MlflowException):
        SpooledClient(client, "0" * 32, uri, tmp_path / "missing").send(metric("a"))
    assert not writes.unreachable() and len(writes) == 0 and writes.drain(timeout=0.0) == {}
    assert not (tmp_path / "spool").exists() and not (tmp_path / "missing").exists()
    assert len(client.get_metric_history(run_id, "a")) == 1
