"""Who am I among the training processes, and how ranks share small Python objects.

Everything here degrades to a world of one when ``torch.distributed`` is not initialized, so the
same recipe code runs in-process, on Ray Train workers and under DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a list of one outside a process group)."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def gather_signals(signals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sample signals of every rank's rows, concatenated in rank order (the guard's input)."""
    parts = all_gather({k: np.asarray(v) for k, v in signals.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def all_ranks_true(flag: bool) -> bool:
    """``flag`` and-ed over all ranks (so every rank takes the same branch)."""
    return all(all_gather(flag))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
