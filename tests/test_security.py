"""Security: no pickle for artifacts (checkpoints load with weights_only), no code from checkpoints or
configs, secrets kept out of MLflow."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from trait_guard.redact import REDACTED, flatten_params, redact_secrets

PACKAGE = Path(__file__).resolve().parents[1] / "trait_guard"
SOURCES = {p: p.read_text() for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("pattern, why", [
    (r"^\s*import pickle|^\s*from pickle|cloudpickle|dill", "pickle is not used for artifacts"),
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load only with weights_only=True"),
    (r"yaml\.load\(|yaml\.unsafe_load|yaml\.Loader\b", "YAML through yaml.safe_load only"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code stays off by default"),
    (r"allow_pickle\s*=\s*True", "numpy files without pickle"),
    (r"(?<![.\w])(eval|exec)\(", "no eval/exec"),
])
def test_source_has_no_unsafe_loading(pattern, why):
    offenders = [f"{path.name}:{n + 1}" for path, text in SOURCES.items()
                 for n, line in enumerate(text.splitlines()) if re.search(pattern, line.split("#")[0])]
    assert not offenders, f"{why}: {offenders}"


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint would carry
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.deepspeed
def test_tampered_deepspeed_checkpoint_is_refused_not_executed(tmp_path, monkeypatch):
    from trait_guard.integrations import deepspeed as ds
    from trait_guard.testing import make_tiny_model

    monkeypatch.chdir(tmp_path)
    ds.init_distributed()
    model, _ = make_tiny_model("llama", seed=1)  # its own copy: the engine takes over the parameters
    engine = ds.make_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ds.deepspeed_config(2))
    directory = ds.save_checkpoint(engine, tmp_path / "ckpt", tag="t", client_state={"step": 3})
    assert ds.load_checkpoint(engine, directory)["step"] == 3  # a genuine checkpoint loads (weights_only)
    optim = next((directory / "t").glob("*optim_states.pt"))
    optim.write_bytes(pickle.dumps({"optimizer_state_dict": _Payload()}))
    with pytest.raises(pickle.UnpicklingError):
        ds.load_checkpoint(engine, directory)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_secrets_are_redacted_from_params_and_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIK7MDENG")
    flat = flatten_params({"tracking": {"tracking_uri": "http://alice:s3cr3tpass@mlflow:5000", "password": "pw"},
                           "storage": {"endpoint": "s3://bucket?sig=wJalrXUtnFEMIK7MDENG"}, "optim": {"lr": 0.1}})
    assert flat["tracking.password"] == REDACTED
    assert flat["tracking.tracking_uri"] == f"http://alice:{REDACTED}@mlflow:5000"
    assert "wJalrXUtnFEMIK7MDENG" not in flat["storage.endpoint"] and flat["optim.lr"] == "0.1"
    assert redact_secrets("nothing secret here") == "nothing secret here"


def test_redaction_survives_another_thread_removing_environment_variables(monkeypatch):
    """MLflow's telemetry thread deletes its own environment variable while params are logged; reading
    os.environ meanwhile raised KeyError and failed a demo run. Redaction must ride it out and still redact."""
    import os
    import threading

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-very-secret")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            for i in range(50):
                os.environ[f"_TG_CHURN_{i}"] = "x"
            for i in range(50):
                os.environ.pop(f"_TG_CHURN_{i}", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        results = {redact_secrets("key hunter2-very-secret in a param") for _ in range(3000)}
    finally:
        stop.set()
        thread.join()
    assert results == {f"key {REDACTED} in a param"}
