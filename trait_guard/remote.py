"""Run a model-loading step of a job in a Ray task with the resources it needs, never in the driver.

A RayJob's driver runs on the head pod, which has no GPU and little memory; persona-vector
extraction, adapter training and the base model's evaluation each load a model, so each runs as one
``ray.remote`` task asking for ``cpus`` and ``gpus`` (a job's ``scoring`` settings). Inside the task
torch uses exactly the CPUs Ray assigned, and ``device: auto`` resolves to the task's own GPU.

Usage::

    vector_path = run_in_task(extract_and_save, config_dict, path, cpus=1, gpus=1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Result = TypeVar("Result")


def _call_with_assigned_threads(function: Callable[..., Result], args: tuple, kwargs: dict[str, Any]) -> Result:
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)))
    return function(*args, **kwargs)


def run_in_task(function: Callable[..., Result], *args: Any, cpus: float, gpus: float = 0.0,
                address: str | None = None, **kwargs: Any) -> Result:
    """``function(*args, **kwargs)`` in one Ray task of ``cpus`` CPUs and ``gpus`` GPUs, its result
    returned (its exception raised here). ``function`` must be importable (a module-level function).
    Starts a local Ray (or connects to ``address``) when Ray is not initialized. A task whose worker
    dies is retried once."""
    from trait_guard.extras import ray  # a missing Ray names its extra

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    task = ray.remote(_call_with_assigned_threads).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    return ray.get(task.remote(function, args, kwargs))
