"""Shared fixtures: tiny random-init models (no downloads) and their saved checkpoints."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never download (no network at run time): a model name that is no local folder fails at once
# instead of after the hub client's retries (~45 s each).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_signing_key_env(monkeypatch):
    """The tests decide what signing and trusted keys exist; the engineer's environment does not."""
    from trait_guard.signing import SIGNING_KEY_ENV, TRUSTED_KEYS_ENV

    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``) every test that starts a Ray
    cluster runs on the same worker, one after another: two local clusters started at once would
    compete for the same two cores and Ray's default session folder."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_configure(config):
    # The test models are tiny: one thread beats two (thread hand-off costs more than the matmuls),
    # and Ray actors started by tests take the other core.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama():
    from trait_guard.testing import make_tiny_model

    return make_tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from trait_guard.testing import make_tiny_model

    return make_tiny_model("gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from trait_guard.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for one test module (tests marked ``ray`` share one xdist worker)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
