"""trait_guard.spool.SpooledClient: while the tracking server is down, writes queue on disk in order
(artifact files copied in), later writes queue behind them, and all are delivered in order once it
answers again; a bad request to a live server still raises. A fake client stands in for MLflow."""

from __future__ import annotations

import json

import pytest

from trait_guard import spool
from trait_guard.spool import OPERATIONS, RUN_FILE, SpooledClient

URI = "http://tracking.invalid:5000"


class FakeClient:
    """Records what reaches the "server"; fails every call while ``up`` is False."""

    def __init__(self):
        self.up = True
        self.received: list[tuple] = []

    def _call(self, *record):
        if not self.up:
            raise ConnectionError("server down")
        self.received.append(record)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if any(m.key == "bad" for m in metrics):
            raise ValueError("invalid metric")  # a bad request: the server is up
        self._call("batch", run_id, [m.key for m in metrics], [t.key for t in tags])

    def log_artifact(self, run_id, path, artifact_path=None):
        with open(path, encoding="utf-8") as handle:
            self._call("artifact", run_id, handle.read(), artifact_path)

    def set_terminated(self, run_id, status):
        self._call("terminated", run_id, status)


def metric(key):
    return {"op": "log_batch", "metrics": [[key, 1.0, 0, 0]]}


def test_outage_queues_in_order_and_drain_delivers(tmp_path, monkeypatch):
    client = FakeClient()
    monkeypatch.setattr(spool, "server_reachable", lambda uri, timeout=3.0: client.up)
    writes = SpooledClient(client, "run1", URI, tmp_path / "spool" / "run1")

    writes.send(metric("a"))  # server up: sent at once, nothing on disk
    assert client.received == [("batch", "run1", ["a"], [])] and len(writes) == 0
    assert not writes.directory.exists()

    client.up = False
    writes.send(metric("b"))
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello", encoding="utf-8")
    writes.send({"op": "log_artifact", "local_path": str(artifact), "artifact_path": "notes"})
    artifact.unlink()  # the spool holds its own copy
    assert len(writes) == 2 and len(client.received) == 1
    assert json.loads((writes.directory / RUN_FILE).read_text()) == {"tracking_uri": URI, "run_id": "run1"}
    assert len((writes.directory / OPERATIONS).read_text().splitlines()) == 2

    client.up = True
    writes.send(metric("c"))  # queued behind the others (order kept), not sent ahead of them
    assert len(writes) == 3 and len(client.received) == 1
    tags = writes.drain(timeout=10.0)
    assert len(writes) == 0 and (writes.directory / OPERATIONS).read_text() == ""
    assert client.received == [("batch", "run1", ["a"], []), ("batch", "run1", ["b"], []),
                               ("artifact", "run1", "hello", "notes"), ("batch", "run1", ["c"], [])]
    assert tags["tracking.delivered_late"].startswith("3 write(s) queued")
    assert isinstance(tags["tracking.offline_seconds"], float)

    writes.send({"op": "set_terminated", "status": "FINISHED"})
    writes.close()
    assert client.received[-1] == ("terminated", "run1", "FINISHED")


def test_no_outage_no_tags_and_bad_requests_raise(tmp_path, monkeypatch):
    client = FakeClient()
    monkeypatch.setattr(spool, "server_reachable", lambda uri, timeout=3.0: client.up)
    writes = SpooledClient(client, "run2", URI, tmp_path / "run2")
    writes.send(metric("a"))
    with pytest.raises(ValueError, match="invalid metric"):
        writes.send(metric("bad"))
    assert len(writes) == 0 and writes.drain(timeout=0.0) == {}
    assert not writes.unreachable()
