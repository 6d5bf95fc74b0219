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
    from trait_guard.extras import deepspeed  # noqa: I001 - first, so a missing DeepSpeed names its extra
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
                     gradient_clipping: float = 1.0, gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """trait_guard's own engine config (no user file): ZeRO ``zero_stage``, the optimizer is the
    recipe's torch AdamW, DeepSpeed's own step printing off (the recipe prints its progress line)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 10**9,  # our own logging
        "wall_clock_breakdown": False,
    }


#: ``zero_optimization`` sizes DeepSpeed users leave at "auto" (as in the Hugging Face integration's
#: example configs), from the model's hidden size: name -> hidden size -> value.
_ZERO_AUTO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def merge_user_config(user: dict[str, Any], ours: dict[str, Any], *, world_size: int, lr: float,
                      weight_decay: float, warmup_steps: int, total_steps: int, hidden_size: int | None = None,
                      cpu: bool = True, source: str = "deepspeed.config_file") -> dict[str, Any]:
    """The engine config from a user's DeepSpeed JSON: the file as it is, with

    - the values trait_guard owns (``ours``: micro-batch, accumulation, ZeRO stage, bf16, clipping)
      filled where the file has none or "auto" (the config validator already made any the file
      states agree: :func:`trait_guard.config._merge_deepspeed_file`);
    - ``train_batch_size`` checked against micro-batch x accumulation x ``world_size`` (the real
      world, known only here), filled when absent or "auto";
    - the other "auto" values DeepSpeed users know from the Hugging Face integration filled: the
      optimizer's lr / weight_decay (this config's), betas / eps (AdamW's defaults), the scheduler's
      warmup_min_lr (0) / warmup_max_lr (lr) / warmup_num_steps / total_num_steps (this run's), and
      the ZeRO bucket sizes from ``hidden_size``;
    - on CPU, an Adam/AdamW optimizer section without ``torch_adam`` gets ``torch_adam: true``:
      DeepSpeed's fused Adam would be compiled first (minutes, and a compiler on the worker).

    Any "auto" left is an error naming the key. ``ours`` is :func:`deepspeed_config`'s dict.
    """
    import copy

    merged = copy.deepcopy(user)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        if merged.get(key) in (None, "auto"):
            merged[key] = ours[key]
    zero = merged.setdefault("zero_optimization", {})
    if zero.get("stage") in (None, "auto"):
        zero["stage"] = ours["zero_optimization"]["stage"]
    bf16 = merged.setdefault("bf16", {})
    if bf16.get("enabled") in (None, "auto"):
        bf16["enabled"] = ours["bf16"]["enabled"]
    if isinstance(merged.get("fp16"), dict) and merged["fp16"].get("enabled") == "auto":
        merged["fp16"]["enabled"] = False  # trait_guard trains in fp32 unless bf16 is asked for
    merged.setdefault("steps_per_print", ours["steps_per_print"])
    expected = merged["train_micro_batch_size_per_gpu"] * merged["gradient_accumulation_steps"] * world_size
    if merged.get("train_batch_size") in (None, "auto"):
        merged["train_batch_size"] = expected
    elif merged["train_batch_size"] != expected:
        raise TraitGuardInputError(
            f"{source}: train_batch_size is {merged['train_batch_size']}, but micro-batch "
            f"{merged['train_micro_batch_size_per_gpu']} x gradient accumulation {merged['gradient_accumulation_steps']} "
            f"x {world_size} rank(s) = {expected}: write \"auto\" (or remove it) in the file, or set optim.batch_size / "
            "optim.gradient_accumulation_steps / ray.num_workers to match")
    optimizer = merged.get("optimizer")
    if isinstance(optimizer, dict):
        params = optimizer.setdefault("params", {})
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}
        for key, value in defaults.items():
            if params.get(key) == "auto" or (key in ("lr", "weight_decay") and key not in params):
                params[key] = value
        if cpu and str(optimizer.get("type", "")).lower() in ("adam", "adamw") and "torch_adam" not in params:
            params["torch_adam"] = True
    scheduler = merged.get("scheduler")
    if isinstance(scheduler, dict):
        params = scheduler.setdefault("params", {})
        defaults = {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps,
                    "total_num_steps": total_steps}
        for key, value in defaults.items():
            if params.get(key) == "auto":
                params[key] = value
    for key, fill in _ZERO_AUTO.items():
        if zero.get(key) == "auto" and hidden_size:
            zero[key] = fill(hidden_size)
    left = _auto_keys(merged)
    if left:
        raise TraitGuardInputError(f"{source}: trait_guard cannot fill \"auto\" for {', '.join(left)}; give values")
    return merged


def _auto_keys(data: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose value is still "auto"."""
    if not isinstance(data, dict):
        return []
    found = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        found += [name] if value == "auto" else _auto_keys(value, name + ".")
    return found


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, config: dict[str, Any],
                lr_scheduler: Any = None):
    """``deepspeed.initialize`` with a plain torch optimizer (DeepSpeed's fused ones need CUDA), or,
    with ``optimizer=None``, the one the config's ``optimizer`` section describes (over the trainable
    parameters). ``lr_scheduler`` (a torch scheduler on ``optimizer``) is stepped by the engine at
    each optimizer step and saved and restored with its checkpoints; without one, the config's
    ``scheduler`` section (if any) is DeepSpeed's own."""
    import deepspeed

    parameters = [p for p in model.parameters() if p.requires_grad] if optimizer is None else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=parameters,
                                           config=config, lr_scheduler=lr_scheduler)
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
