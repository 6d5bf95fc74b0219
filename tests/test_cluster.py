"""The cluster path, for real on this machine: a two-node Ray cluster (a head and a worker, separate
`ray start` processes) taking a `ray job submit` of the whole pipeline, and an MLflow server backed by
PostgreSQL with S3 artifacts (moto's S3 server on loopback) that a guarded run logs to."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow_server import MlflowServer, free_port, free_ports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # the two-node test is also marked ray; the Postgres one starts no Ray


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def _ray_node(args: list[str], log: Path, env: dict[str, str], avoid: set[int] = frozenset()) -> subprocess.Popen:
    """`ray start ... --block`: the node lives as long as this process (terminating it stops the node).
    Its component ports are distinct from each other and from ``avoid`` (ports chosen but not yet bound)."""
    chosen = [port for port in free_ports(6 + len(avoid)) if port not in avoid][:6]
    ports = [item for flag, port in zip(("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                         "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                                         "--object-manager-port"), chosen, strict=True) for item in (flag, str(port))]
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args, *ports],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.ray
def test_ray_job_submit_on_a_two_node_cluster(tiny_llama_dir, tmp_path):
    gcs_port, dashboard_port = free_ports(2)
    # Ray 2.60 token authentication, as on a real cluster: every node and client uses the same token
    # (generated once into ~/.ray/auth_token when missing)
    # The nodes' `python` is this environment's, as a cluster image's would be.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not a Ray this process may use
    env.update(RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, env=env)
    ray_temp = tempfile.mkdtemp(prefix="tgray", dir="/tmp")  # Unix socket paths must stay under 108 bytes
    head = _ray_node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--num-cpus", "1",
                      "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(dashboard_port), "--temp-dir", ray_temp],
                     tmp_path / "head.log", env, avoid={gcs_port, dashboard_port})
    worker = None
    try:
        import urllib.error
        import urllib.request

        def dashboard_up():
            if head.poll() is not None:
                raise RuntimeError(f"the head node exited: {(tmp_path / 'head.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=2):
                    return True
            except urllib.error.HTTPError:  # it answers (401 without the token: auth is on)
                return True
            except OSError:
                return False

        _wait(dashboard_up, 120, "the head node's dashboard")
        # The worker node shares the head's temp dir, so its agent may unpack the job's working_dir over the
        # one the head's driver runs in, removing the driver's cwd mid-job (seen once: transformers, first
        # imported late, failed on os.getcwd()). A real cluster's nodes have their own disks; run_pipeline
        # resolves its output folder and loads the tokenizer before the first stage.
        worker = _ray_node(["--address", f"127.0.0.1:{gcs_port}", "--node-ip-address", "127.0.0.1",
                            "--num-cpus", "1"], tmp_path / "worker.log", env)

        def two_nodes():
            listing = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address",
                                      f"http://127.0.0.1:{dashboard_port}",
                                      "--format", "json"], capture_output=True, text=True, env=env)
            text = listing.stdout[listing.stdout.find("["):] if "[" in listing.stdout else ""  # skip notices
            try:
                nodes = json.loads(text) if listing.returncode == 0 and text else []
            except json.JSONDecodeError:
                return None
            alive = [n for n in nodes if n.get("state") == "ALIVE"]
            return alive if len(alive) >= 2 else None

        nodes = _wait(two_nodes, 120, "the worker node")
        out = tmp_path / "run"
        model = str(tiny_llama_dir)
        config = {
            "output_dir": str(out),
            "extract": {"n_instructions": 1, "n_questions": 4, "max_new_tokens": 6},
            "teachers": [{"id": "owl", "model": model, "trait": "animal:owl", "install": "system_prompt"},
                         {"id": "control", "model": model}],
            # one CPU each: one actor per node; Ray Data hands out work as soon as the first actor is up, so
            # small chunks, one in flight per actor: the slower node's actor still gets some
            "generation": {"n_prompts": 32, "chunk_size": 4, "max_new_tokens": 8, "top_k_logprobs": 4},
            "generation_ray": {"num_actors": 2, "max_in_flight_per_actor": 1},
            "scoring": {"num_actors": 2, "batch_size": 4},  # the scoring stage on both nodes too
            "student": {"model": model}, "optim": {"batch_size": 4, "max_steps": 3},
            "probe": {"every_n_steps": 2, "n_prompts": 3},
            "deepspeed": {"enabled": True}, "ray": {"num_workers": 2},  # one Ray Train worker per node
            "screen": {"gate": False},  # this test is about placement: train even if the screen flags the owl data
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cluster"},
        }
        config_path = tmp_path / "run.yaml"
        config_path.write_text(yaml.safe_dump(config))
        started = time.monotonic()
        job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
                              "--working-dir", str(ROOT), "--", "python", "-m", "ray_jobs.run_pipeline",
                              "--config", str(config_path)],
                             capture_output=True, text=True, env=env, timeout=900)
        seconds = time.monotonic() - started
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["trainings"][0]["training"]["steps"] >= 1
        teacher_nodes = set(json.loads((out / "teacher_data" / "summary.json").read_text())["teachers"][0]["node_ids"])
        train_nodes = {json.loads((out / "train" / "ranks" / f"rank_{r}.json").read_text())["node_id"] for r in (0, 1)}
        cluster_nodes = {n["node_id"] for n in nodes}
        # work was placed on more than one node: both teacher actors' nodes and both training ranks' nodes
        assert len(teacher_nodes) == 2 and teacher_nodes <= cluster_nodes, (teacher_nodes, cluster_nodes)
        assert len(train_nodes) == 2 and train_nodes <= cluster_nodes
        scoring_nodes = set(summary["trainings"][0]["scoring"]["node_ids"])
        assert len(scoring_nodes) == 2 and scoring_nodes <= cluster_nodes, scoring_nodes
        topology = {"nodes": len(cluster_nodes), "teacher_actor_nodes": len(teacher_nodes),
                    "scoring_actor_nodes": len(scoring_nodes),
                    "train_rank_nodes": len(train_nodes), "job_seconds": round(seconds, 1)}
        (tmp_path / "topology.json").write_text(json.dumps(topology))
        print(f"two-node cluster: {topology}")
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        shutil.rmtree(ray_temp, ignore_errors=True)


# ----------------------------------------------------------------------------- Postgres + S3


def _postgres(port: int):
    """A throwaway PostgreSQL cluster on 127.0.0.1:port (as the postgres user when run as root)."""
    bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path("/usr/lib/postgresql").is_dir() \
        else None
    if bindir is None and shutil.which("initdb") is None:
        pytest.fail("PostgreSQL is needed: apt-get install postgresql (make test does)")
    initdb = str(bindir / "initdb") if bindir else "initdb"
    pg_ctl = str(bindir / "pg_ctl") if bindir else "pg_ctl"
    data = Path(tempfile.mkdtemp(prefix="trait_guard_pg_", dir="/tmp"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, initdb, "-D", str(data / "db"), "-A", "trust", "-U", "mlflow"], check=True,
                   capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "start",
                    "-o", f"-p {port} -h 127.0.0.1 -k {data}"], check=True, capture_output=True)
    subprocess.run([*run_as, str(Path(pg_ctl).with_name("createdb")) if bindir else "createdb", "-h", "127.0.0.1",
                    "-p", str(port), "-U", "mlflow", "mlflow"], check=True, capture_output=True)
    return data, [*run_as, pg_ctl, "-D", str(data / "db"), "-m", "fast", "stop"]


def test_mlflow_server_with_postgres_and_s3_artifacts(tiny_llama_dir, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("psycopg")
    pytest.importorskip("moto")
    import mlflow

    from trait_guard.config import GenerateJobConfig, TrainJobConfig, validate_config
    from trait_guard.generation import generate_local
    from trait_guard.train import run_training

    pg_port, s3_port = free_port(), free_port()
    data_dir, stop_postgres = _postgres(pg_port)
    s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                          stdout=open(tmp_path / "s3.log", "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3_port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "trait-guard-test", "AWS_SECRET_ACCESS_KEY": "trait-guard-test-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    server = None
    try:
        bucket = boto3.client("s3", endpoint_url=endpoint)

        def s3_up():
            try:
                bucket.list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        _wait(s3_up, 60, "moto's S3 server")
        bucket.create_bucket(Bucket="mlflow-artifacts")
        server = MlflowServer(tmp_path / "server", backend_store_uri=f"postgresql://mlflow@127.0.0.1:{pg_port}/mlflow",
                              artifacts_destination="s3://mlflow-artifacts").start()

        model = str(tiny_llama_dir)
        generated = generate_local(validate_config({
            "output_dir": str(tmp_path / "data"),
            "teachers": [{"id": "owl", "model": model, "trait": "animal:owl", "install": "system_prompt"},
                         {"id": "control", "model": model}],
            "generation": {"n_prompts": 24, "chunk_size": 8, "max_new_tokens": 8}}, GenerateJobConfig), progress=False)
        paths = {t.teacher_id: t.path for t in generated.teachers}
        summary = run_training(validate_config({
            "output_dir": str(tmp_path / "train"), "student": {"model": model},
            "data": {"train": paths["owl"], "reference": paths["control"]},
            "optim": {"batch_size": 4, "max_steps": 3}, "deepspeed": {"enabled": False}, "ray": {"enabled": False},
            "tracking": {"tracking_uri": server.uri, "experiment": "postgres-s3"}}, TrainJobConfig))

        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["guard.verdict"] == summary["verdict"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
        assert "report/report.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        local = client.download_artifacts(run.info.run_id, "report/report.html", str(tmp_path / "download"))
        assert "trait_guard run report" in Path(local).read_text()
        # the run is a row in PostgreSQL, the report an object in the S3 bucket
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=pg_port, user="mlflow", dbname="mlflow") as connection:
            row = connection.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
            assert row == ("FINISHED",)
        keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/report/report.html") for k in keys), keys[:10]
    finally:
        if server is not None:
            server.stop()
        s3.terminate()
        s3.wait(timeout=30)
        subprocess.run(stop_postgres, capture_output=True)
        shutil.rmtree(data_dir, ignore_errors=True)
