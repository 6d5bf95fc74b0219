"""The test helper that starts a real ``mlflow server``: it must not mistake another process on its
port for MLflow (a CI run once took a Ray node's metrics exporter, which answers 200 to any path,
for a healthy tracking server)."""

from __future__ import annotations

import http.server
import threading

import mlflow
import pytest
from mlflow_server import MlflowServer

pytestmark = pytest.mark.slow


class _AnswersEverything(http.server.BaseHTTPRequestHandler):
    """What a Prometheus exporter does: 200 and a text body, whatever the path."""

    def do_GET(self):  # noqa: N802 - the stdlib's name
        body = b"# HELP some_metric not mlflow\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def squatter():
    """An HTTP server on 127.0.0.1 that is not MLflow; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersEverything)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_chosen_port_taken_before_the_first_start_moves(squatter, tmp_path):
    server = MlflowServer(tmp_path / "chosen", startup_timeout=60)
    server.port = squatter  # what a race does: the free port is taken between choosing and binding
    assert not server.answers_as_mlflow()  # the squatter answers 200, but not as MLflow
    with server:  # our child exits on "address in use"; a fresh port is chosen (one server start more, ~20 s)
        assert server.port != squatter
        assert server.answers_as_mlflow()
        experiment_id = mlflow.MlflowClient(server.uri).create_experiment("helper-check")
        assert mlflow.MlflowClient(server.uri).get_experiment(experiment_id).name == "helper-check"
    # a port the caller fixed is never moved: the same squatter makes start() fail, naming the log
    # (not run here: it costs another server start; MlflowServer.start keeps a fixed port by `port_is_ours`)
    assert not MlflowServer(tmp_path / "fixed", port=squatter).port_is_ours
