"""Checkpoints of guarded training: DeepSpeed's engine files plus ``trait_guard_state.json``.

The JSON file (plain data, no pickle) holds what DeepSpeed does not know: the step, the guard's
detector state and mode, the decision history, the MLflow run to continue, and the recipe a resume
must match, including what the run was trained on (:func:`input_digests`: the SHA-256 of the data and
persona vector files, the sample limits). A folder is a trait_guard checkpoint exactly when it has
that file. Resume comes from Ray Train's latest registered checkpoint (after a worker failure, or an
earlier run of the same name in the same output folder) or an explicit ``resume_from`` folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
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
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TraitGuardInputError(
            f"{path} is not valid JSON ({error}): the checkpoint's state was cut off or edited by hand; resume "
            "from an earlier step's folder under <output_dir>/checkpoints/, or start the run afresh") from None
    if not isinstance(state, dict):
        raise TraitGuardInputError(f"{path} holds a {type(state).__name__}, not the state object a run writes; "
                                   "resume from an earlier step's folder under <output_dir>/checkpoints/")
    return state


def in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not inside a Ray Train worker"
        return False


def resume_directory(resume_from: str | None) -> Path | None:
    """Ray Train's latest checkpoint (after a worker failure, or an earlier run of the same name in the
    same output folder: :func:`trait_guard.train.set_aside_stale_run` moves one trained on other
    inputs out of its way first), else ``resume_from``, else None."""
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
    must match (the gradient accumulation: the guard counts micro-batches; the inputs trained on:
    :func:`input_digests`) and the schedule's state for reading (the learning-rate scheduler itself
    is saved and restored by DeepSpeed with the engine, when it was handed to the engine:
    :func:`trait_guard.integrations.deepspeed.make_engine`).
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


def input_digests(files: Mapping[str, str | Path], limits: Mapping[str, Any]) -> dict[str, Any]:
    """What a run trains on, for its checkpoints: each input file's path and SHA-256 (``files``: its
    name in the config, e.g. ``data.train`` or ``vectors[0]``, to its path) and the sample limits.
    A resume compares them (:func:`input_differences`): the guard's state and the data position of
    a checkpoint only mean something for the rows and vectors it was trained with."""
    from trait_guard.files import file_sha256_memo

    return {"files": {name: {"path": str(path), "sha256": file_sha256_memo(path)} for name, path in files.items()},
            "limits": dict(limits)}


def input_differences(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str] | None:
    """How the inputs recorded with a checkpoint (:func:`input_digests`) differ from this run's: one
    line per differing input, naming the file and both hashes' first 12 hex digits; empty when they
    agree (the same bytes under another path agree). None when the checkpoint records no inputs: it
    was written before trait_guard recorded them, so nothing can be told."""
    if not saved:
        return None
    old_files, new_files = saved.get("files", {}), current.get("files", {})
    lines = []
    for name in dict.fromkeys([*new_files, *old_files]):
        old, new = old_files.get(name), new_files.get(name)
        if old is None:
            lines.append(f"{name}: {new['path']} (sha256 {new['sha256'][:12]}) is not in the checkpoint's inputs")
        elif new is None:
            lines.append(f"{name}: the checkpoint was trained with {old['path']} (sha256 {old['sha256'][:12]}), "
                         "this run has none")
        elif old["sha256"] != new["sha256"]:
            moved = f" (the checkpoint's was {old['path']})" if old["path"] != new["path"] else ""
            lines.append(f"{name} {new['path']}{moved}: sha256 {old['sha256'][:12]} in the checkpoint, "
                         f"{new['sha256'][:12]} now")
    old_limits, new_limits = saved.get("limits", {}), current.get("limits", {})
    for key in dict.fromkeys([*new_limits, *old_limits]):
        if old_limits.get(key) != new_limits.get(key):
            lines.append(f"data.{key}: {old_limits.get(key)} in the checkpoint, {new_limits.get(key)} now")
    return lines


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest trait_guard checkpoint directly under ``folder`` (the one whose state file was
    written last: Ray Train's run folder holds its registered checkpoints in report order), or None."""
    states = list(Path(folder).glob(f"*/{CHECKPOINT_STATE}"))
    return max(states, key=lambda p: p.stat().st_mtime_ns).parent if states else None


def set_aside(paths: Iterable[str | Path]) -> dict[str, str]:
    """Rename each existing path to ``<name>.stale-<UTC time>`` beside it (nothing is deleted: the
    earlier run's files stay there to inspect or resume by hand). Returns ``{old path: new path}``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = {}
    for path in map(Path, paths):
        if not path.exists():
            continue
        target, n = path.with_name(f"{path.name}.stale-{stamp}"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.stale-{stamp}-{n}")
        moved[str(path)] = str(path.rename(target))
    return moved
