"""DeepSpeed helpers for the guarded recipe: start the process group, build the engine, save and load
checkpoints safely.

DeepSpeed runs on CPU with the gloo backend here and on GPUs with NCCL on a cluster; nothing in this
module depends on which. The guard's own state (detector statistics, mode, decision history, the
MLflow run) does not travel inside DeepSpeed's files: :mod:`trait_guard.checkpoint` writes it beside
them as plain JSON (``trait_guard_state.json``), so resuming never unpickles guard state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from trait_guard.errors import InputFileNotFound, TraitGuardInputError


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed for DeepSpeed if nobody did (single process: a world of one)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(micro_batch_size: int, zero_stage: int = 2, bf16: bool = False,
                     gradient_clipping: float = 1.0) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 10**9,  # our own logging
        "wall_clock_breakdown": False,
    }


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """``deepspeed.initialize`` with a plain torch optimizer (DeepSpeed's fused ones need CUDA)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def save_checkpoint(engine: Any, directory: str | Path, tag: str, client_state: dict[str, Any]) -> Path:
    """The engine's state (model and optimizer) under ``directory/tag``, plus ``client_state``: a small
    plain dict kept in DeepSpeed's files (the recipe stores only ``{"step": step}``; the guard's state
    goes to ``trait_guard_state.json`` beside them, see :func:`trait_guard.checkpoint.save_checkpoint`)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    return directory


def _checkpoint_globals() -> list[Any]:
    """The DeepSpeed classes a ZeRO checkpoint holds besides tensors and plain containers: plain data
    objects (no code runs when they are restored), allowed by name for ``weights_only`` loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location: Any = None) -> Any:
    # DeepSpeed's own engine calls torch.load(weights_only=False): a checkpoint could then run code.
    # Here any object outside tensors, plain containers and the classes above is refused.
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(engine: Any, directory: str | Path) -> dict[str, Any]:
    """Restore the engine from the latest tag in ``directory``; returns the saved ``client_state``
    (the recipe reads its own state from ``trait_guard_state.json`` instead: :mod:`trait_guard.checkpoint`).

    Every file is read with ``torch.load(weights_only=True)`` (no arbitrary unpickling): a tampered
    checkpoint fails with ``pickle.UnpicklingError`` instead of executing what it carries.
    """
    directory = Path(directory)
    if not (directory / "latest").is_file():
        raise InputFileNotFound(f"{directory} holds no DeepSpeed checkpoint (no 'latest' file); "
                                "pass the folder a previous run wrote under checkpoints/")
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load
    checkpoint_engine.load = _weights_only_load
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            _, client_state = engine.load_checkpoint(str(directory))
    finally:
        checkpoint_engine.load = original
    if client_state is None:
        raise TraitGuardInputError(f"DeepSpeed could not load the checkpoint in {directory}")
    return client_state
