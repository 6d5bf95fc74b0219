"""Experiment tracking: params, metrics, guard decisions, plots and artifacts, logged to MLflow.

What. One small interface, :class:`Tracker`, for everything a trait_guard job records: its config
(params, flattened and with secrets redacted by :mod:`trait_guard.redact`), metrics per step, every
guard :class:`Decision` (metrics plus a JSON-lines log of the interesting ones), tags (the guard's
final verdict, :func:`summarize_guard`), figures (drawn by :mod:`trait_guard.plots`) and files.
:class:`MlflowTracker` writes to MLflow, through :class:`trait_guard.spool.SpooledClient` (writes
queue on disk while the tracking server is down); :class:`NullTracker` takes the same calls and does
nothing (ranks other than 0, tests).

Why. People review runs in the MLflow UI, so the guard's evidence must be there: when it alarmed,
on which signal, how close each CUSUM came to its threshold. Training may run on Ray Train V2, which
does not accept Tune's MLflow callback, and on several ranks, so we log ourselves, from rank 0 only,
through :class:`mlflow.MlflowClient` (never the fluent ``mlflow.start_run`` API, whose process-global
"active run" would let several runs or threads write into each other). Metrics are buffered and sent
with ``log_batch``.

Defaults are embedded: with no configuration the store is a local SQLite file (no server) at
``./mlruns/mlflow.db`` (the folder is ``$TRAIT_GUARD_MLFLOW_DIR`` when set), artifacts beside it in
``./mlruns/artifacts``. ``MLFLOW_TRACKING_URI`` or an explicit ``tracking_uri`` selects any other
store (a tracking server, Databricks, another database). :func:`make_tracker` follows the caller's
MLflow context where the config leaves it open: an active ``mlflow.start_run()`` run (or
``MLFLOW_RUN_ID``) is written into through the client and left for its owner to end, and
``MLFLOW_EXPERIMENT_NAME`` replaces the default experiment name. A tracker made in another process
(Ray Train workers, red-team cells) cannot see that context: :func:`forward_context` writes it into
the tracking config the other process receives, and that process's run becomes a child of the
caller's run (MLflow's ``mlflow.parentRunId`` tag, :data:`PARENT_RUN_TAG`), as the red-team grid's
cells are children of the grid's parent run.

At the end of training: numeric outcome metrics (:func:`outcome_metrics`), the data files as MLflow
dataset inputs with their SHA-256 (:meth:`Tracker.log_datasets`) and the shipped student under the
run's ``student/`` artifacts with its guard record as tags (:meth:`Tracker.log_student`).

Usage::

    from trait_guard.tracking import make_tracker, summarize_guard

    with make_tracker(rank, experiment="trait_guard", run_name="owl-student") as tracker:
        tracker.log_params(job_config.model_dump())          # nested -> "training.lr", ...
        for step, batch in enumerate(loader):
            decision = guard.observe(signals, step=step)
            tracker.log_decision(decision)                    # guard/action_code, guard/cusum/<signal>, ...
            tracker.log_metrics({"train/loss": loss}, step=step)
            if decision.halt:
                break
        summarize_guard(tracker, alarms=guard.alarms)        # tags guard.verdict, drift plot
    print(tracker.run_url)                                    # where to look in the UI

    # later: browse the local store
    #   trait-guard ui        (or: mlflow ui --backend-store-uri sqlite:////abs/mlruns/mlflow.db)

Leaving the ``with`` block finishes the run (FINISHED, FAILED on an exception, KILLED on Ctrl-C).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from trait_guard.config import TrackingConfig
from trait_guard.files import to_jsonable
from trait_guard.plots import plot_drift
from trait_guard.redact import clean_key, clean_tags, flatten_params
from trait_guard.spool import SpooledClient

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from trait_guard.guard import Decision

__all__ = [
    "ACTION_CODES",
    "DECISIONS_ARTIFACT",
    "DEFAULT_EXPERIMENT",
    "PARENT_RUN_TAG",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingConfig",
    "decision_history",
    "default_artifact_location",
    "default_tracking_uri",
    "forward_context",
    "make_tracker",
    "mlflow_context",
    "outcome_metrics",
    "run_ui",
    "run_url_for",
    "student_tags",
    "summarize_guard",
    "tracking_dir",
    "ui_command",
]

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "trait_guard"
DECISIONS_ARTIFACT = "guard/decisions.jsonl"
DRIFT_PLOT_ARTIFACT = "guard/drift.png"
ALARMS_ARTIFACT = "guard/alarms.json"
ENV_DIR = "TRAIT_GUARD_MLFLOW_DIR"
ENV_URI = "MLFLOW_TRACKING_URI"
DB_NAME = "mlflow.db"
STUDENT_ARTIFACT = "student"
#: MLflow's dataset digest field holds at most 36 characters: that much of the file's SHA-256 (the
#: whole hash is in the dataset's profile and in ``trait_guard_export.json``)
DATASET_DIGEST_CHARS = 36
#: ``log_datasets`` roles -> MLflow's ``mlflow.data.context`` input tag
DATASET_CONTEXTS = {"train": "training", "reference": "reference"}
ARTIFACTS_DIR = "artifacts"
#: MLflow's link from a child run to its parent (what ``mlflow.start_run(nested=True)`` sets). A tracking
#: config whose ``tags`` hold it makes a child run, in whichever process the tracker is created (see
#: :func:`forward_context`).
PARENT_RUN_TAG = "mlflow.parentRunId"

#: ``guard/action_code`` values: larger is more severe.
ACTION_CODES: dict[str, int] = {"pass": 0, "mask": 1, "reweight": 2, "steer": 3, "halt": 4}

Status = Literal["FINISHED", "FAILED", "KILLED"]
_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's batch limits (mlflow.utils.validation); key and value limits are in trait_guard.redact.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


# ----------------------------------------------------------------------------- configuration


def tracking_dir() -> Path:
    """The local store's folder, ``$TRAIT_GUARD_MLFLOW_DIR`` or ``./mlruns`` (absolute; created)."""
    folder = Path(os.environ.get(ENV_DIR) or "mlruns").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<abs folder>/mlflow.db`` (see :func:`tracking_dir`)."""
    uri = os.environ.get(ENV_URI, "").strip()
    if uri:
        return uri
    return f"sqlite:///{(tracking_dir() / DB_NAME).as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), or None (not sqlite, or in memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, a ``file://`` URI beside the database (``<folder>/artifacts``); else None
    (the store's own default, e.g. the tracking server's artifact root)."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    folder = db.parent / ARTIFACTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def run_url_for(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see a run: ``<server>/#/experiments/<exp>/runs/<run>`` for an http(s) tracking URI,
    else a hint (``mlflow ui --backend-store-uri <uri>``, then the local URL) with both ids."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{path}"
    return (f"mlflow ui --backend-store-uri {tracking_uri}  then open http://127.0.0.1:5000/{path} "
            f"(experiment {experiment_id}, run {run_id})")


# ----------------------------------------------------------------------------- HTTP retries

#: MLflow retries an unreachable HTTP tracking server for minutes per call by default; a tracker's
#: calls give up after one retry instead, and its spool takes over. Values set in the environment win.
HTTP_RETRY_LIMITS: dict[str, str] = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_limits_lock = threading.Lock()
_limits_users = 0
_limits_applied: dict[str, str] = {}


@contextmanager
def _http_retry_limits() -> Iterator[None]:
    """Apply :data:`HTTP_RETRY_LIMITS` (where the environment does not set them) for the duration of
    the block only.

    MLflow reads these settings from the environment on every request and has no per-client option,
    so they cannot be passed to a client; they are set around a tracker's calls instead of for the
    whole process, and other MLflow clients keep MLflow's own retries outside those calls. Nested and
    concurrent blocks share one setting, removed when the last block ends.
    """
    global _limits_users, _limits_applied
    with _limits_lock:
        if _limits_users == 0:
            _limits_applied = {k: v for k, v in HTTP_RETRY_LIMITS.items() if k not in os.environ}
            os.environ.update(_limits_applied)
        _limits_users += 1
    try:
        yield
    finally:
        with _limits_lock:
            _limits_users -= 1
            if _limits_users == 0:
                for key, value in _limits_applied.items():
                    if os.environ.get(key) == value:  # unless someone set it meanwhile
                        del os.environ[key]
                _limits_applied = {}


class _RetryLimitedClient:
    """An ``mlflow.MlflowClient`` whose every method runs under :func:`_http_retry_limits`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _http_retry_limits():
                return attribute(*args, **kwargs)

        return call

    def __repr__(self) -> str:
        return f"_RetryLimitedClient({self._client!r})"


# ----------------------------------------------------------------------------- decision records


def _decision_record(decision: Decision | Mapping[str, Any]) -> dict[str, Any]:
    """A decision as a JSON-safe dict: Decision.to_dict() (step, action, reason, flagged, evidence)."""
    record = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision)
    record = to_jsonable(record)
    action = record.get("action", "pass")
    record["action"] = str(action).lower()
    return record


def decision_history(decisions: Iterable[Decision | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Items for :func:`trait_guard.plots.plot_drift`: ``{"step", "statistic", "detector", "thresholds",
    "action"}`` per decision
    (from Decision objects, their ``to_dict()`` or items already in this form)."""
    history = []
    for d in decisions:
        record = _decision_record(d)
        evidence = record.get("evidence") or {}
        history.append({
            "step": record.get("step"),
            "statistic": dict(record.get("statistic") or record.get("cusum") or evidence.get("cusum")
                              or evidence.get("eprocess") or {}),
            "detector": record.get("detector") or ("eprocess" if "eprocess" in evidence else "cusum"),
            "thresholds": dict(record.get("thresholds") or evidence.get("thresholds") or {}),
            "action": record.get("action", "pass"),
            "reason": record.get("reason"),
        })
    return history


# ----------------------------------------------------------------------------- trackers


class Tracker(ABC):
    """What a trait_guard job logs. Implementations: :class:`MlflowTracker`, :class:`NullTracker`.

    A context manager: leaving the block calls :meth:`finish` (FINISHED; FAILED on an exception;
    KILLED on KeyboardInterrupt).
    """

    enabled: bool = False

    @property
    @abstractmethod
    def run_id(self) -> str | None:
        """The MLflow run id (None when nothing is logged)."""

    @property
    @abstractmethod
    def run_url(self) -> str | None:
        """Where to see the run: a UI URL, or for a local store the ``mlflow ui`` command plus ids."""

    @property
    @abstractmethod
    def decisions(self) -> list[dict[str, Any]]:
        """Every decision passed to :meth:`log_decision`, as JSON-safe dicts."""

    @abstractmethod
    def log_params(self, params: Mapping[str, Any] | BaseModel) -> None:
        """Nested dicts flattened with dots, values stringified/truncated, secrets redacted."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Numbers at ``step`` (buffered); NaN/inf are skipped and counted."""

    @abstractmethod
    def log_decision(self, decision: Decision) -> None:
        """The guard's decision: metrics ``guard/action_code``, ``guard/cusum/<signal>``,
        ``guard/batch_z/<signal>`` (``guard/drift/<trait>`` for probes); kept in :attr:`decisions`
        and, when not PASS or when the reason changed, in ``guard/decisions.jsonl``."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A local file or folder, under ``artifact_path`` in the run's artifacts."""

    @abstractmethod
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """JSON (or YAML, by the file's extension)."""

    @abstractmethod
    def log_text(self, text: str, artifact_file: str) -> None: ...

    @abstractmethod
    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """A matplotlib figure, as PNG unless ``artifact_file`` names another format."""

    @abstractmethod
    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows of a table as an MLflow table JSON (``{"columns": [...], "data": [[...]]}``)."""

    def log_outcome_metrics(self, summary: Mapping[str, Any]) -> dict[str, float]:
        """The run's outcome as numbers (:func:`outcome_metrics`: ``guard/updates``, ``eval/trait_rate_after``,
        ...), logged at the summary's last step: unlike tags, they sort and chart in the runs table."""
        metrics = outcome_metrics(summary)
        self.log_metrics(metrics, step=summary.get("steps") or 0)
        return metrics

    @abstractmethod
    def log_datasets(self, datasets: Mapping[str, Mapping[str, Any]]) -> None:
        """The run's data files as MLflow dataset inputs (see :meth:`MlflowTracker.log_datasets`);
        ``datasets`` maps a role (``train``, ``reference``) to ``{"path", "name", "sha256", "verified"}``."""

    def log_student(self, folder: str | os.PathLike | None, record: Mapping[str, Any]) -> dict[str, str]:
        """The exported student (:mod:`trait_guard.export`) under the run's ``student/`` artifacts, with
        its record as tags (:func:`student_tags`); ``folder`` None (a run that does not ship) logs the
        tags only: ``student.shipped=false`` and ``student.reason``. Returns the tags."""
        tags = student_tags(record)
        if not self.enabled:
            return tags
        if folder is not None:
            self.log_artifact(folder, STUDENT_ARTIFACT)
        self.set_tags(tags)
        return tags

    @abstractmethod
    def flush(self) -> None:
        """Send buffered metrics and (re)write ``guard/decisions.jsonl``."""

    @abstractmethod
    def finish(self, status: Status = "FINISHED") -> None:
        """Flush and end the run; later calls do nothing."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class NullTracker(Tracker):
    """Takes every call and does nothing: ranks other than 0, disabled tracking, tests."""

    enabled = False

    @property
    def run_id(self) -> None:
        return None

    @property
    def run_url(self) -> None:
        return None

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return []

    def log_params(self, params: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_decision(self, decision: Any) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log_table(self, rows: Any, artifact_file: str) -> None:
        pass

    def log_datasets(self, datasets: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: Status = "FINISHED") -> None:
        pass

    def __repr__(self) -> str:
        return "NullTracker()"


class MlflowTracker(Tracker):
    """One MLflow run, written through its own :class:`mlflow.MlflowClient` (thread-safe calls).

    Args:
        experiment: experiment name; created when missing (on a SQLite store with its artifacts in
            ``<db folder>/artifacts``), restored when deleted.
        run_name: the run's name in the UI (MLflow picks one when None).
        tracking_uri: any MLflow tracking URI; None: :func:`default_tracking_uri`.
        tags: run tags (added to MLflow's context tags: user, source, git commit).
        flush_every: metrics buffered before a ``log_batch``.
        flush_interval: seconds after which a ``log_metrics`` call sends the buffer anyway.
        spool_dir: where writes wait while an HTTP tracking server is unreachable (default
            ``$TRAIT_GUARD_SPOOL_DIR`` or ``./.trait_guard_spool``, one folder per run).
        spool_wait: seconds :meth:`finish` keeps retrying a spool before leaving it on disk.
        run_id: continue this existing run (a resumed training job) instead of creating one.
        attach: ``run_id`` is someone else's run (an active ``mlflow.start_run()``, ``MLFLOW_RUN_ID``,
            see :func:`make_tracker`): log into it and leave its status to its owner (never ended
            here; the tag ``trait_guard.status`` says how trait_guard's part ended).

    When the tracking server goes away mid-run, writes queue in the spool (training goes on) and are
    sent in order once it answers again; the run is then tagged ``tracking.delivered_late``. Writes
    still queued when the run finishes stay on disk: ``trait-guard sync-mlflow <spool folder>``.
    """

    enabled = True

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                 tracking_uri: str | None = None, tags: Mapping[str, Any] | None = None,
                 flush_every: int = MAX_METRICS_PER_BATCH, flush_interval: float = 10.0,
                 spool_dir: str | os.PathLike | None = None, spool_wait: float = 60.0,
                 run_id: str | None = None, attach: bool = False):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment_name = experiment
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.tracking_uri.startswith(("http://", "https://")):
            # MLflow retries a dead server for minutes per call by default; the spool takes over instead
            self.client = _RetryLimitedClient(self.client)
        self.experiment_id = self._experiment_id(experiment)
        self.flush_every = max(1, int(flush_every))
        self.flush_interval = float(flush_interval)
        self._lock = threading.RLock()
        self._metrics: list[Any] = []
        self._last_flush = time.monotonic()
        self._params: dict[str, str] = {}  # as logged (a continued run starts with its existing params)
        self._decisions: list[dict[str, Any]] = []
        self._decision_log: list[dict[str, Any]] = []
        self._last_reason: str | None = None
        self._decisions_dirty = False
        self.skipped_metrics = 0  # NaN/inf (or non-numeric) values not logged
        self.skipped_by_key: dict[str, int] = {}
        self.status: str = "RUNNING"
        run = self._existing_run(run_id) if run_id else None
        self.attached = bool(attach and run is not None)
        if run is not None:
            if not self.attached:
                self.client.update_run(run_id, status="RUNNING")
            self.experiment_id = run.info.experiment_id
        else:
            if run_id:
                tags = {**(tags or {}), "trait_guard.continues_run": run_id}
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=self._run_tags(tags))
        self._run_id = run.info.run_id
        self.run_name = run.info.run_name
        self.parent_run_id: str | None = run.data.tags.get(PARENT_RUN_TAG)
        if run_id and run.info.run_id == run_id:
            self._params.update(run.data.params)
        root = Path(spool_dir or os.environ.get("TRAIT_GUARD_SPOOL_DIR", ".trait_guard_spool"))
        self.writes = SpooledClient(self.client, self._run_id, self.tracking_uri, root / self._run_id)
        self.spool_wait = float(spool_wait)
        atexit.register(self._at_exit)

    # -- setup ---------------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=default_artifact_location(self.tracking_uri))
            except MlflowException:  # created meanwhile by another process
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _existing_run(self, run_id: str) -> Any:
        """The run to continue, or None when this store does not have it (e.g. a checkpoint copied
        from another store): then a new run is created and tagged with the old id."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as err:
            logger.warning("run %s not found in %s (%s); starting a new run", run_id, self.tracking_uri, err.error_code)
            return None

    @staticmethod
    def _run_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
        user = clean_tags(tags or {})
        try:  # user, source file, git commit: what the fluent API would add
            from mlflow.tracking.context.registry import resolve_tags

            resolved = {str(k): str(v) for k, v in resolve_tags(user).items()}
        except Exception:  # noqa: BLE001 - context tags are a courtesy
            resolved = dict(user)
        try:
            from importlib.metadata import version

            resolved.setdefault("trait_guard.version", version("trait-guard"))
        except Exception:  # noqa: BLE001
            pass
        return resolved

    # -- identity ------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def run_url(self) -> str:
        return run_url_for(self.tracking_uri, self.experiment_id, self._run_id)

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return self._decisions

    def __repr__(self) -> str:
        return f"MlflowTracker(run_id={self._run_id!r}, experiment={self.experiment_name!r}, uri={self.tracking_uri!r})"

    def _active(self, what: str) -> bool:
        if self.status == "RUNNING":
            return True
        logger.warning("tracker run %s already %s: %s ignored", self._run_id, self.status, what)
        return False

    # -- logging -------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any] | BaseModel) -> None:
        if not self._active("log_params"):
            return
        flat = {clean_key(k): v for k, v in flatten_params(params).items()}
        with self._lock:
            new = {}
            for key, value in flat.items():
                old = self._params.get(key)
                if old is not None and old != value:
                    logger.warning("param %r already logged as %r; MLflow params are immutable, %r not logged",
                                   key, old, value)
                elif old is None:
                    new[key] = value
            items = [[k, v] for k, v in new.items()]
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self._write({"op": "log_batch", "params": items[i:i + MAX_PARAMS_PER_BATCH]})
            self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self._active("log_metrics"):
            return
        timestamp = int(time.time() * 1000)
        step = 0 if step is None else int(step)
        with self._lock:
            for key, value in metrics.items():
                key = clean_key(key)
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    number = math.nan
                if not math.isfinite(number):
                    self.skipped_metrics += 1
                    if key not in self.skipped_by_key:
                        logger.warning("metric %r = %r at step %d is not a finite number: not logged "
                                       "(counted in tag trait_guard.skipped_metrics)", key, value, step)
                    self.skipped_by_key[key] = self.skipped_by_key.get(key, 0) + 1
                    continue
                self._metrics.append([key, number, timestamp, step])
            if (len(self._metrics) >= self.flush_every
                    or time.monotonic() - self._last_flush >= self.flush_interval):
                self._flush_metrics()

    def log_decision(self, decision: Decision | Mapping[str, Any]) -> None:
        if not self._active("log_decision"):
            return
        record = _decision_record(decision)
        evidence = record.get("evidence") or {}
        metrics: dict[str, Any] = {"guard/action_code": ACTION_CODES.get(record["action"], -1)}
        for group in ("cusum", "eprocess", "batch_z", "drift"):
            for signal, value in (evidence.get(group) or {}).items():
                metrics[f"guard/{group}/{signal}"] = math.nan if value is None else value
        step = record.get("step")
        self.log_metrics(metrics, step=step)
        with self._lock:
            self._decisions.append(record)
            reason = record.get("reason")
            if record["action"] != "pass" or reason != self._last_reason or len(self._decisions) == 1:
                self._decision_log.append({**record, "time": round(time.time(), 3)})
                self._decisions_dirty = True
            self._last_reason = reason

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._active("set_tags"):
            return
        items = [[k, v] for k, v in clean_tags(tags).items()]
        with self._lock:
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self._write({"op": "log_batch", "tags": items[i:i + MAX_PARAMS_PER_BATCH]})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self._active("log_artifact"):
            return
        self._write({"op": "log_artifact", "local_path": str(Path(path)), "artifact_path": artifact_path})

    def _log_file(self, artifact_file: str, write) -> None:
        """Write ``artifact_file``'s content with ``write(local_path)`` and upload it to its folder."""
        artifact_file = artifact_file.strip("/")
        folder, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory(prefix="trait_guard_artifact_") as tmp:
            local = Path(tmp) / name
            write(local)
            self._write({"op": "log_artifact", "local_path": str(local), "artifact_path": folder or None})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if not self._active("log_dict"):
            return
        text = json.dumps(to_jsonable(obj), indent=2)
        self._log_file(artifact_file, lambda local: local.write_text(text, encoding="utf-8"))

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self._active("log_text"):
            return
        self._log_file(artifact_file, lambda local: local.write_text(text, encoding="utf-8"))

    def log_figure(self, figure: Figure, artifact_file: str, dpi: int = 110) -> None:
        if not self._active("log_figure"):
            return
        if not os.path.splitext(artifact_file)[1]:
            artifact_file += ".png"
        self._log_file(artifact_file, lambda local: figure.savefig(local, dpi=dpi, bbox_inches="tight"))

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Also accepts a column dict ``{"col": [values]}``. Through ``MlflowClient.log_table``
        (pandas; the UI's table view, appends to an existing file), else ``log_dict`` in its format."""
        if not self._active("log_table"):
            return
        if isinstance(rows, Mapping):
            columns = list(rows)
            n = max((len(v) for v in rows.values()), default=0)
            rows = [{c: (rows[c][i] if i < len(rows[c]) else None) for c in columns} for i in range(n)]
        rows = [to_jsonable(dict(r)) for r in rows]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        try:
            import pandas as pd
        except ImportError:
            pd = None
        if pd is not None and rows and artifact_file.endswith((".json", ".parquet")) and not len(self.writes):
            try:
                self.client.log_table(self._run_id, pd.DataFrame(rows, columns=columns), artifact_file)
                return
            except Exception:  # noqa: BLE001 - an outage falls back to a spooled file below
                if not self.writes.unreachable():
                    raise
        self.log_dict({"columns": columns, "data": [[r.get(c) for c in columns] for r in rows]}, artifact_file)

    def log_datasets(self, datasets: Mapping[str, Mapping[str, Any]]) -> None:
        """Each data file as an MLflow dataset input (the run's Datasets column and lineage): a
        ``MetaDataset`` named by the file's stem, its digest the file's SHA-256 (the first
        :data:`DATASET_DIGEST_CHARS` characters, MLflow's limit), its source the path, its profile the
        whole hash and the provenance claim; input tag ``mlflow.data.context`` = ``training`` /
        ``reference``. Inputs bypass the spool (it queues metrics, tags and files only): while the
        server is unreachable they are skipped with a warning, the digests stay in the tags."""
        if not self._active("log_datasets") or not datasets:
            return
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for role, info in datasets.items():
            meta = MetaDataset(LocalArtifactDatasetSource(str(info["path"])), name=str(info["name"]),
                               digest=str(info["sha256"])[:DATASET_DIGEST_CHARS]).to_dict()
            profile = json.dumps({"sha256": info["sha256"], "provenance_verified": bool(info["verified"])})
            entity = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"],
                             source=meta["source"], profile=profile)
            context = DATASET_CONTEXTS.get(role, role)
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
        self.set_tags({f"data.{role}.sha256": info["sha256"] for role, info in datasets.items()})
        try:
            with self._lock:
                self.client.log_inputs(self._run_id, datasets=inputs)
        except Exception:  # noqa: BLE001 - an outage must not fail the run; anything else is a bug
            if not self.writes.unreachable():
                raise
            logger.warning("tracking server %s unreachable: dataset inputs of run %s not logged (the digests are "
                           "in its data.*.sha256 tags)", self.tracking_uri, self._run_id)

    # -- flushing and finishing ------------------------------------------------------------------
    def _flush_metrics(self) -> None:
        with self._lock:
            pending, self._metrics = self._metrics, []
            self._last_flush = time.monotonic()
            for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
                self._write({"op": "log_batch", "metrics": pending[i:i + MAX_METRICS_PER_BATCH]})

    def _flush_decisions(self) -> None:
        with self._lock:
            if not self._decisions_dirty:
                return
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._decision_log)
            self._log_file(DECISIONS_ARTIFACT, lambda local: local.write_text(lines, encoding="utf-8"))
            self._decisions_dirty = False

    def flush(self) -> None:
        if self.status != "RUNNING":
            return
        self._flush_metrics()
        self._flush_decisions()

    def finish(self, status: Status = "FINISHED") -> None:
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        with self._lock:
            if self.status != "RUNNING":
                return
            try:
                self.flush()
                if self.skipped_metrics:
                    self.set_tags({"trait_guard.skipped_metrics": self.skipped_metrics})
                late = self.writes.drain(self.spool_wait)
                if late:
                    self.set_tags(late)
            finally:
                if self.attached:  # the run's owner ends it
                    self._write({"op": "log_batch", "tags": [["trait_guard.status", status]]})
                else:
                    self._write({"op": "set_terminated", "status": status})
                self.status = status
                atexit.unregister(self._at_exit)
                self.writes.close()

    # -- writes, through the spool ---------------------------------------------------------------
    def _write(self, operation: dict[str, Any]) -> None:
        """Send one write (queued on disk while the tracking server is unreachable, order kept)."""
        with self._lock:
            self.writes.send(operation)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.status == "RUNNING":
            try:
                self.set_tags({"trait_guard.error": f"{exc_type.__name__}: {exc}"})
            except Exception:  # noqa: BLE001 - the original exception matters more
                logger.exception("could not tag run %s with its error", self._run_id)
        super().__exit__(exc_type, exc, tb)

    def _at_exit(self) -> None:  # the process ends with the run still open: end it like mlflow does
        try:
            self.finish("FINISHED")
        except Exception:  # noqa: BLE001
            pass


def make_tracker(rank: int = 0, config: TrackingConfig | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> Tracker:
    """An :class:`MlflowTracker` on rank 0, a :class:`NullTracker` on every other rank (and when the
    config says ``enabled: false``). ``kwargs`` (experiment, run_name, tracking_uri, tags, ...)
    override the config's fields.

    What the config and ``kwargs`` leave unset comes from the user's MLflow context, as MLflow's own
    integrations do (:func:`mlflow_context`): an active ``mlflow.start_run()`` run in this process, or
    ``MLFLOW_RUN_ID``, is logged into (and left for its owner to end) when no ``tracking_uri`` is
    configured; ``MLFLOW_EXPERIMENT_NAME`` replaces the default experiment name (``trait_guard``);
    ``mlflow.set_tracking_uri()`` / ``MLFLOW_TRACKING_URI`` choose the store.

    A config whose tags hold :data:`PARENT_RUN_TAG` (set by :func:`forward_context`) makes a new child
    of that run instead; this is how a process that cannot see the caller's MLflow context (a Ray
    Train worker, a red-team cell) still lands under the caller's run."""
    if config is not None and not isinstance(config, TrackingConfig):
        config = TrackingConfig.model_validate(config)
    if int(rank) != 0 or (config is not None and not config.enabled):
        return NullTracker()
    options: dict[str, Any] = {}
    experiment_given = "experiment" in kwargs
    if config is not None:
        options = config.model_dump(exclude={"enabled"})
        if kwargs.get("tags"):
            options["tags"] = {**options["tags"], **kwargs.pop("tags")}
    options.update(kwargs)
    context = mlflow_context()
    child = PARENT_RUN_TAG in (options.get("tags") or {})  # a child run by request: never the caller's run itself
    if options.get("tracking_uri") is None:  # the store and the run of the caller's MLflow context
        options["tracking_uri"] = context.get("tracking_uri")
        if not options.get("run_id") and "run_id" in context and not child:  # log into it, never end it
            options.update(run_id=context["run_id"], attach=True)
    # a config that went through model_dump/validate (as training's does) cannot tell a default from a
    # choice: the default experiment name yields to MLFLOW_EXPERIMENT_NAME
    if ("experiment" in context and not experiment_given
            and options.get("experiment", DEFAULT_EXPERIMENT) == DEFAULT_EXPERIMENT):
        options["experiment"] = context["experiment"]
    return MlflowTracker(**options)


def mlflow_context() -> dict[str, str]:
    """The user's MLflow context, as far as it is set: ``tracking_uri`` (an active run's store, or
    ``mlflow.set_tracking_uri()``, or ``MLFLOW_TRACKING_URI``), ``experiment``
    (``MLFLOW_EXPERIMENT_NAME``) and ``run_id`` (the active run in this process, else ``MLFLOW_RUN_ID``)."""
    from trait_guard.extras import mlflow  # noqa: I001 - first, so a missing MLflow names its extra
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    context: dict[str, str] = {}
    active = mlflow.active_run()
    if active is not None or is_tracking_uri_set():
        context["tracking_uri"] = mlflow.get_tracking_uri()
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    if experiment:
        context["experiment"] = experiment
    run_id = active.info.run_id if active is not None else os.environ.get("MLFLOW_RUN_ID", "").strip()
    if run_id:
        context["run_id"] = run_id
    return context


def forward_context(config: TrackingConfig | Mapping[str, Any] | None = None, *,
                    parent_run_id: str | None = None) -> TrackingConfig:
    """``config`` with the caller's MLflow context written into it, for a tracker that another process
    will create: Ray Train workers, the red-team grid's cells.

    Why: that process cannot see the context. An active ``mlflow.start_run()`` run and
    ``mlflow.set_tracking_uri()`` live in this process's memory, and environment variables
    (``MLFLOW_RUN_ID``, ...) do not reach Ray workers on other nodes; the config does (Ray Train's
    ``train_loop_config``). So everything is resolved here, into fields the config already has:

    - ``tracking_uri``: the config's; else the context's store (the active run's,
      ``mlflow.set_tracking_uri()``, ``MLFLOW_TRACKING_URI``); else :func:`default_tracking_uri`, made
      absolute here (the caller's ``./mlruns``, not a worker's working folder).
    - the parent: ``parent_run_id`` when given (the red-team grid's parent run); else the caller's run
      (the active one, else ``MLFLOW_RUN_ID``) when it lives in that store. It goes into ``tags`` as
      :data:`PARENT_RUN_TAG`, MLflow's own parent link, so the tracker created from this config is a
      new *child* of the caller's run (as ``mlflow.start_run(nested=True)`` would make), not that run
      itself: a training run logs its whole config as (immutable) params, its own status, datasets and
      student, and two trainings under one user run (``trait-guard run``'s ``also_train_on``, a
      notebook loop) would overwrite each other in a single run. A parent already in the tags stays.
    - ``experiment``: the parent's experiment (MLflow shows children nested under their parent in the
      parent's experiment only); with no parent, ``MLFLOW_EXPERIMENT_NAME`` replaces the default name.

    A disabled config is returned unchanged. Calling this again on its result changes nothing.
    """
    if config is None:
        config = TrackingConfig()
    elif not isinstance(config, TrackingConfig):
        config = TrackingConfig.model_validate(config)
    if not config.enabled:
        return config
    context = mlflow_context()
    uri = _absolute_uri(config.tracking_uri or context.get("tracking_uri") or default_tracking_uri())
    tags = dict(config.tags)
    parent = parent_run_id or tags.get(PARENT_RUN_TAG)
    if parent is None and "run_id" in context and (
            config.tracking_uri is None or uri == _absolute_uri(context.get("tracking_uri") or uri)):
        parent = context["run_id"]
    experiment = config.experiment
    if parent is not None:
        parent_experiment = _run_experiment_name(uri, parent)
        if parent_experiment is None:
            logger.warning("run %s is not in the tracking store %s: trait_guard's run will not be nested under it",
                           parent, uri)
            tags.pop(PARENT_RUN_TAG, None)
            parent = None
        else:
            tags[PARENT_RUN_TAG] = parent
            experiment = parent_experiment
    if parent is None and "experiment" in context and experiment == DEFAULT_EXPERIMENT:
        experiment = context["experiment"]
    return config.model_copy(update={"tracking_uri": uri, "tags": tags, "experiment": experiment})


def _absolute_uri(uri: str) -> str:
    """A ``sqlite:///`` URI with a relative path made absolute (another process may run in another
    folder); any other URI unchanged."""
    path = _sqlite_path(uri)
    if path is None:
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{path.as_posix()}" + (f"?{query}" if query else "")


def _run_experiment_name(tracking_uri: str, run_id: str) -> str | None:
    """The name of the experiment that holds ``run_id`` in ``tracking_uri``'s store; None when the
    store has no such run (any other error, e.g. an unreachable server, is raised)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        client = _RetryLimitedClient(client)
    try:
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


# ----------------------------------------------------------------------------- guard summary


def summarize_guard(tracker: Tracker, decisions: Iterable[Decision | Mapping[str, Any]] | None = None,
                    alarms: Sequence[Mapping[str, Any]] | None = None, verdict: str | None = None) -> dict[str, str]:
    """Tag the run with the guard's outcome and log its drift plot (``guard/drift.png``) and alarms.

    Tags: ``guard.verdict`` = ``halted`` (some decision was HALT), ``mitigated`` (an alarm, no halt)
    or ``passed`` (``verdict``, when given, is used instead: the training summary's, which also knows
    ``unmonitored`` and ``unguarded``); ``guard.halt_step`` / ``guard.halt_reason`` (``none`` when not halted);
    ``guard.alarms`` (count) and ``guard.first_alarm_step``. ``decisions`` default to the ones the
    tracker saw; ``alarms`` are :attr:`TraitGuard.alarms`. Returns the tags.
    """
    records = [_decision_record(d) for d in (tracker.decisions if decisions is None else decisions)]
    alarms = list(alarms or [])
    halt = next((r for r in records if r.get("action") == "halt"), None)
    if verdict is None:
        if halt is not None:
            verdict = "halted"
        elif alarms or any(r.get("action") in ("reweight", "steer") for r in records):
            verdict = "mitigated"
        else:
            verdict = "passed"
    first_alarm = alarms[0]["step"] if alarms else None
    tags = {
        "guard.verdict": verdict,
        "guard.halt_step": "none" if halt is None else str(halt.get("step")),
        "guard.halt_reason": "none" if halt is None else str(halt.get("reason")),
        "guard.alarms": str(len(alarms)),
        "guard.first_alarm_step": "none" if first_alarm is None else str(first_alarm),
    }
    if not tracker.enabled:
        return tags
    tracker.set_tags(tags)
    if alarms:
        tracker.log_dict({"alarms": alarms}, ALARMS_ARTIFACT)
    marker = halt.get("step") if halt is not None else first_alarm
    tracker.log_figure(plot_drift(decision_history(records), halt_step=marker), DRIFT_PLOT_ARTIFACT)
    return tags


def outcome_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """A training summary's outcome as numeric metrics: ``guard/halt_step`` (halted runs only),
    ``guard/updates``, ``guard/weights_step``, ``guard/alarms``, ``eval/trait_rate_before`` and
    ``eval/trait_rate_after`` (when evaluated), ``eval/logodds_shift`` (the target's log-probability
    after minus before, when both evaluations exist)."""
    metrics: dict[str, float] = {}
    halt = summary.get("halt")
    if summary.get("halted") and halt is not None and halt.get("step") is not None:
        metrics["guard/halt_step"] = float(halt["step"])
    for key, name in (("updates", "guard/updates"), ("weights_step", "guard/weights_step")):
        if summary.get(key) is not None:
            metrics[name] = float(summary[key])
    metrics["guard/alarms"] = float(len(summary.get("alarms") or []))
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for evaluation, name in ((before, "eval/trait_rate_before"), (after, "eval/trait_rate_after")):
        if evaluation.get("rate") is not None:
            metrics[name] = float(evaluation["rate"])
    if before.get("target_logprob") is not None and after.get("target_logprob") is not None:
        metrics["eval/logodds_shift"] = float(after["target_logprob"]) - float(before["target_logprob"])
    return metrics


def student_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """Tags of an export record (:func:`trait_guard.export.export_record`): ``student.shipped``, then
    ``student.reason`` (not shipped) or ``student.kind`` / ``student.artifact`` / ``student.screen``
    and ``student.data.<role>.sha256`` (shipped), and ``student.signed`` with the signer and its key's
    fingerprint (a signed export, :func:`trait_guard.signing.sign_student`), so a registry step can check
    what the model is vouched by."""
    if not record.get("shipped"):
        return {"student.shipped": "false", "student.reason": str(record.get("reason"))}
    screen = record.get("screen")
    tags = {"student.shipped": "true", "student.kind": str(record.get("kind")),
            "student.artifact": STUDENT_ARTIFACT, "student.verdict": str(record.get("verdict")),
            "student.weights_step": str(record.get("weights_step")),
            "student.screen": "off" if screen is None else ("FLAGGED" if screen.get("flagged") else "clean")}
    for role, data in (record.get("data") or {}).items():
        tags[f"student.data.{role}.sha256"] = str(data.get("sha256"))
        tags[f"student.data.{role}.verified"] = str(bool(data.get("verified"))).lower()
    signature = record.get("signature") or {}
    tags["student.signed"] = str(bool(signature.get("signed"))).lower()
    if signature.get("signed"):  # named signer/fingerprint: tags with "key" in their name are redacted
        tags["student.signer"] = str(signature.get("signer") or "?")
        tags["student.signer_fingerprint"] = str(signature.get("key_fingerprint"))
    return tags


# ----------------------------------------------------------------------------- UI


def ui_command(port: int = 5000, host: str = "127.0.0.1", backend_store_uri: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for the default store (run with this interpreter)."""
    uri = backend_store_uri or default_tracking_uri()
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", str(host), "--port", str(int(port))]


def run_ui(port: int = 5000, host: str = "127.0.0.1", backend_store_uri: str | None = None) -> None:
    """Replace this process with ``mlflow ui`` on the default store (``trait-guard ui``)."""
    command = ui_command(port=port, host=host, backend_store_uri=backend_store_uri)
    print(f"MLflow UI on http://{host}:{port} ({command[5]})", flush=True)
    os.execv(command[0], command)
