"""A local spool for MLflow writes that could not reach the tracking server.

What. :class:`Spool` keeps, in order, on disk, the write operations (metric/param/tag batches,
artifact uploads, the final status) that failed because the tracking server was unreachable, and
replays them when it answers again. Files to upload are copied into the spool first, so nothing
depends on temporary files. :class:`SpooledClient` is what a tracker writes through: it sends each
operation, queues it (and every later one, to keep the order) while the server is down, retries the
queue, and at the end says how much was delivered late. :func:`replay` delivers a spool left behind
by a finished process (``trait-guard sync-mlflow <folder>``).

Why. A training run must not stop, or lose its record, because the MLflow server restarted. The
tracker (:class:`trait_guard.tracking.MlflowTracker`) sends through a :class:`SpooledClient`: while
the server is down, operations queue here (training goes on); once it is back, they are sent in
their original order, and the run is tagged with how much was delivered late.

Usage (what the tracker does)::

    writes = SpooledClient(mlflow_client, run_id, tracking_uri, spool_root / run_id)
    writes.send({"op": "log_batch", "metrics": [[key, value, timestamp_ms, step]]})
    ...
    tags = writes.drain(timeout=60.0)     # retry what is queued; {"tracking.delivered_late": ...} or {}
    writes.send({"op": "set_terminated", "status": "FINISHED"})
    writes.close()                        # logs where undelivered writes wait, if any
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trait_guard.errors import InputFileNotFound, TraitGuardInputError
from trait_guard.files import atomic_write_text

logger = logging.getLogger(__name__)

OPERATIONS = "operations.jsonl"
RUN_FILE = "run.json"
REPLAY_INTERVAL = 5.0  # seconds between attempts to deliver the queue while writes go on


def server_reachable(tracking_uri: str, timeout: float = 3.0) -> bool:
    """Whether an HTTP tracking server answers its health check (other stores: always True)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


class Spool:
    """Pending operations of one run, in ``directory/operations.jsonl`` (one JSON object per line)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / OPERATIONS
        self.pending: list[dict[str, Any]] = []
        if self.path.is_file():
            self.pending = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
        self.delivered = 0
        self.spooled = 0
        self.offline_since: float | None = None
        self.offline_seconds = 0.0

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, operation: dict[str, Any]) -> None:
        """Queue ``operation``; an artifact's file is copied into the spool first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if operation["op"] == "log_artifact":
            source = Path(operation["local_path"])
            target = self.directory / "files" / f"{self.spooled:06d}" / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
            operation = {**operation, "local_path": str(target)}
        if self.offline_since is None:
            self.offline_since = time.monotonic()
        self.pending.append(operation)
        self.spooled += 1
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(operation) + "\n")

    def replay(self, execute: Callable[[dict[str, Any]], None]) -> bool:
        """Send pending operations in order until one fails; returns True when none is left."""
        while self.pending:
            execute(self.pending[0])
            self.pending.pop(0)
            self.delivered += 1
            self._rewrite()
        if self.offline_since is not None:
            self.offline_seconds += time.monotonic() - self.offline_since
            self.offline_since = None
        shutil.rmtree(self.directory / "files", ignore_errors=True)
        return True

    def _rewrite(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(op) + "\n" for op in self.pending))


def execute(client: Any, run_id: str, operation: dict[str, Any]) -> None:
    """Perform one spooled operation with an ``mlflow.MlflowClient``."""
    from mlflow.entities import Metric, Param, RunTag

    op = operation["op"]
    if op == "log_batch":
        client.log_batch(run_id, metrics=[Metric(*m) for m in operation.get("metrics", [])],
                         params=[Param(*p) for p in operation.get("params", [])],
                         tags=[RunTag(*t) for t in operation.get("tags", [])])
    elif op == "log_artifact":
        path = Path(operation["local_path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=operation.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), artifact_path=operation.get("artifact_path"))
    elif op == "set_terminated":
        client.set_terminated(run_id, status=operation["status"])
    else:
        raise ValueError(f"unknown spooled operation {op!r}")


class SpooledClient:
    """The writes of one MLflow run, sent with ``client`` or, while its HTTP tracking server is
    unreachable, queued in a :class:`Spool` at ``directory`` and delivered in order once it answers.

    Not thread-safe on its own: the tracker calls it under its lock.
    """

    def __init__(self, client: Any, run_id: str, tracking_uri: str, directory: str | Path):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.spool = Spool(directory)
        self._last_replay = 0.0

    def __len__(self) -> int:
        """Writes waiting in the spool."""
        return len(self.spool)

    @property
    def directory(self) -> Path:
        return self.spool.directory

    def unreachable(self) -> bool:
        """Whether the tracking server does not answer now: a write that just failed is then queued
        rather than raised (a bad request to a live server raises; a non-HTTP store never counts as
        unreachable)."""
        return not server_reachable(self.tracking_uri)

    def send(self, operation: dict[str, Any]) -> None:
        """Send one write, or queue it while the server is unreachable (order is kept: once anything
        is queued, later writes queue behind it)."""
        if len(self.spool):
            self.spool.add(operation)
            self.replay()
            return
        try:
            execute(self.client, self.run_id, operation)
        except Exception as err:
            if not self.unreachable():
                raise
            logger.warning("tracking server %s unreachable (%s); queueing writes in %s, training goes on",
                           self.tracking_uri, type(err).__name__, self.directory)
            atomic_write_text(self.directory / RUN_FILE,
                              json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id}) + "\n")
            self.spool.add(operation)

    def replay(self, force: bool = False) -> None:
        """Try to deliver the queue (at most every ``REPLAY_INTERVAL`` seconds unless ``force``)."""
        if not len(self.spool) or (not force and time.monotonic() - self._last_replay < REPLAY_INTERVAL):
            return
        self._last_replay = time.monotonic()
        if not server_reachable(self.tracking_uri):
            return
        try:
            self.spool.replay(lambda operation: execute(self.client, self.run_id, operation))
            logger.warning("tracking server %s is back: %d queued write(s) delivered", self.tracking_uri,
                           self.spool.delivered)
        except Exception:
            if not self.unreachable():
                raise

    def drain(self, timeout: float) -> dict[str, Any]:
        """Retry the queue for up to ``timeout`` seconds; returns the run tags that say how much was
        queued and for how long (``tracking.delivered_late``, ``tracking.offline_seconds``), or ``{}``
        when nothing was ever queued."""
        deadline = time.monotonic() + timeout
        while len(self.spool) and time.monotonic() < deadline:
            time.sleep(1.0)
            self.replay(force=True)
        if not self.spool.spooled:
            return {}
        return {"tracking.delivered_late": f"{self.spool.spooled} write(s) queued while the tracking server "
                                           "was unreachable, delivered in order when it came back",
                "tracking.offline_seconds": round(self.spool.offline_seconds, 1)}

    def close(self) -> None:
        """At the end of the run: name the folder where undelivered writes wait, if any."""
        if len(self.spool):
            logger.error("the tracking server %s is still unreachable: %d write(s) of run %s wait in %s; "
                         "deliver them with `trait-guard sync-mlflow %s`", self.tracking_uri,
                         len(self.spool), self.run_id, self.directory, self.directory)


def replay(directory: str | Path) -> int:
    """Deliver a spool left by a process that ended while its tracking server was down; returns the
    number of operations sent. ``directory`` holds ``operations.jsonl`` and ``run.json``."""
    from mlflow import MlflowClient

    directory = Path(directory)
    meta_path = directory / RUN_FILE
    if not meta_path.is_file():
        raise InputFileNotFound(f"{directory} is not a trait_guard MLflow spool (no run.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not server_reachable(meta["tracking_uri"]):
        raise TraitGuardInputError(f"the tracking server {meta['tracking_uri']} is still unreachable; start it and retry")
    spool = Spool(directory)
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    count = len(spool)
    spool.replay(lambda operation: execute(client, meta["run_id"], operation))
    return count
