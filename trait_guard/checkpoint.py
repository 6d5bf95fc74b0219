"""Checkpoints of guarded training: DeepSpeed's engine files plus ``trait_guard_state.json``.

The JSON file (plain data, no pickle) holds what DeepSpeed does not know: the step, the guard's
detector state and mode, the decision history, and the MLflow run to continue. A folder is a
trait_guard checkpoint exactly when it has that file. Resume comes from Ray Train's latest registered
checkpoint (after a worker failure) or an explicit ``resume_from`` folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trait_guard.errors import TraitGuardInputError
from trait_guard.ranks import barrier, world

CHECKPOINT_STATE = "trait_guard_state.json"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The trait_guard state saved with a checkpoint (see :func:`save_checkpoint`)."""
    path = Path(directory) / CHECKPOINT_STATE
    if not path.is_file():
        raise TraitGuardInputError(
            f"{directory} has no {CHECKPOINT_STATE}: not a trait_guard checkpoint; pass a folder written by a "
            "previous run under <output_dir>/checkpoints/step_NNNNNN")
    return json.loads(path.read_text(encoding="utf-8"))


def in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not inside a Ray Train worker"
        return False


def resume_directory(resume_from: str | None) -> Path | None:
    """Ray Train's latest checkpoint after a worker failure, else ``resume_from``, else None."""
    if in_ray_train():
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return Path(checkpoint.path)
    return Path(resume_from) if resume_from else None


def save_checkpoint(engine: Any, out_dir: Path, step: int, guard: Any, history: list[dict[str, Any]], tracker: Any,
                    metrics: dict[str, float], in_ray: bool, weights_step: int | None = None,
                    recipe: dict[str, Any] | None = None) -> Path:
    """DeepSpeed's engine checkpoint plus ``trait_guard_state.json``; registered with Ray Train when
    running there (so a restarted worker group resumes from it). Returns the folder.

    ``weights_step`` is the step whose weights the folder holds when it differs from ``step`` (a
    halted run rolled back to before the batches its alarm implicates). ``recipe`` holds what a resume
    must match (the gradient accumulation: the guard counts micro-batches) and the schedule's state
    for reading (the learning-rate scheduler itself is saved and restored by DeepSpeed with the
    engine, when it was handed to the engine: :func:`trait_guard.integrations.deepspeed.make_engine`).
    Steps are optimizer steps; the guard's state counts its observations (micro-batches)."""
    from trait_guard.files import atomic_write_text
    from trait_guard.integrations import deepspeed as ds

    directory = checkpoint_dir(out_dir, step)
    ds.save_checkpoint(engine, directory, tag=f"step_{step}", client_state={"step": step})
    if world()[0] == 0:
        state = {"step": step, "weights_step": step if weights_step is None else weights_step,
                 "guard": guard.state_dict(), "history": history, "mlflow_run_id": getattr(tracker, "run_id", None),
                 **({"recipe": recipe} if recipe else {})}
        atomic_write_text(directory / CHECKPOINT_STATE, json.dumps(state, default=float) + "\n")
    barrier()
    if in_ray:
        import ray.train

        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    return directory
