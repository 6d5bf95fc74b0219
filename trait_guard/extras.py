"""Optional dependencies, imported on first use with an error that names the extra to install.

What. ``from trait_guard.extras import ray`` imports ``ray`` when it is installed, and otherwise raises
:class:`trait_guard.errors.MissingExtra` ("... pip install 'trait-guard[ray]'"); likewise ``deepspeed``,
``mlflow``, ``matplotlib``, ``trl`` and ``gguf`` (:data:`trait_guard.errors.EXTRA_FOR_MODULE`).

Why. ``pip install trait-guard`` installs only what the guard and its HF / plain-torch integrations
need; Ray, DeepSpeed and MLflow are extras (pyproject.toml). Modules that use them import them inside
the functions that need them, and the first such import on a path goes through here, so that a missing
extra says how to install it instead of ``No module named 'ray'``. One line, in place of ``import ray``.

Usage::

    def run_on_ray(...):
        from trait_guard.extras import ray   # MissingExtra naming trait-guard[ray] when absent
        ray.init()
"""

from __future__ import annotations

from typing import Any

from trait_guard.errors import EXTRA_FOR_MODULE, require_extra


def training_extras(settings: Any, *, generation: bool = False) -> list[str]:
    """The optional modules a training job with these settings (:class:`trait_guard.config.TrainingSettings`)
    needs, for :func:`trait_guard.errors.check_extras` before anything starts. ``generation``: the job also
    generates teacher data on Ray (``trait-guard run``)."""
    needed = ["matplotlib"]  # the run report's figures (written with or without tracking)
    if settings.deepspeed.enabled:
        needed.append("deepspeed")
    if settings.ray.enabled or generation:
        needed.append("ray")
    if settings.tracking.enabled:
        needed.append("mlflow")
    return needed


def __getattr__(name: str) -> Any:
    if name in EXTRA_FOR_MODULE:
        return require_extra(name)
    raise AttributeError(f"module 'trait_guard.extras' has no attribute {name!r}")
