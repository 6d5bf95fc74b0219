"""A real ``mlflow server`` on loopback, for the tests that need an HTTP tracking server (a server
that goes away and comes back, the MLflow UI in a browser, a cluster's PostgreSQL/S3 store)."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

MLFLOW_VERSION = importlib.metadata.version("mlflow")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all held open while the next is chosen (consecutive
    :func:`free_port` calls can return the same port, and two Ray components then collide)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class MlflowServer:
    """``mlflow server`` in a child process on 127.0.0.1 with a SQLite store and served artifacts.

    ``with MlflowServer(folder) as server: ... server.uri`` (``http://127.0.0.1:<port>``). The
    server's output goes to ``folder/server.log``. ``stop()`` and ``start()`` may be called again
    (same port and store), to test a tracking server that goes away and comes back.
    """

    def __init__(self, folder: str | Path, port: int | None = None, backend_store_uri: str | None = None,
                 artifacts_destination: str | None = None, startup_timeout: float = 90.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port_is_ours = port is None  # a port we chose may be re-chosen before the first start
        self.port = port or free_port()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{(self.folder / 'mlflow.db').resolve()}"
        self.artifacts_destination = artifacts_destination or str((self.folder / "artifacts").resolve())
        self.startup_timeout = startup_timeout
        self.process: Any = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", self.backend_store_uri,
                "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
                # MLflow >= 3.5 answers 403 to Host headers it was not told about
                "--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}"]

    def start(self, attempts: int = 3) -> MlflowServer:
        """Start the server and wait until *it* answers (not merely something on its port).

        A port from :func:`free_port` is free when chosen, not when the server binds it: another
        process (a Ray node's metrics exporter, in one CI run) can take it in between, answer 200 to
        ``/health`` and leave our server to exit on ``address in use``. So readiness means our child
        is alive and ``/version`` returns this MLflow's version. If the child exits on a port we
        chose, at the first start, a fresh port is tried (``attempts`` in all); a restart keeps its
        port, since clients already hold the URI.
        """
        may_move = self.port_is_ours and self.process is None
        for attempt in range(1, attempts + 1):
            if self._start_once():
                return self
            if not may_move or attempt == attempts:
                break
            self.port = free_port()
        raise RuntimeError(f"mlflow server exited with {self.process.returncode} on {self.uri}; "
                           f"see {self.folder}/server.log")

    def _start_once(self) -> bool:
        """True once our child answers as MLflow; False if it exited; TimeoutError if neither."""
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self.answers_as_mlflow():
                return True
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server on {self.uri} not healthy after {self.startup_timeout} s; "
                           f"see {self.folder}/server.log")

    def answers_as_mlflow(self) -> bool:
        """Whether the process on our port is an MLflow server of the version installed here."""
        try:
            with urllib.request.urlopen(f"{self.uri}/version", timeout=2) as response:
                return response.status == 200 and response.read().decode().strip() == MLFLOW_VERSION
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
