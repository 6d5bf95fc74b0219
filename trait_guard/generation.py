"""Teacher data generation on Ray actors (or in-process), with exactly one row per prompt id.

Prompts are cut into chunks; a pool of stateful :class:`TeacherActor` s (each holding one loaded
model) takes chunks, at most ``max_in_flight_per_actor`` pending per actor (backpressure), and the
driver streams finished rows into a Parquet file while a progress bar advances.

Faults: actors are created with ``max_restarts`` and ``max_task_retries``, so when an actor process
dies Ray restarts it (reloading the model) and re-runs its pending chunks; if an actor is beyond
restarting, the driver replaces it and requeues the chunk. Because a chunk's seed depends only on its
index, a re-run yields the same rows, and the driver writes each prompt id once.

Usage::

    report = generate_datasets(load_config("ray_jobs/configs/teacher_data_cpu.yaml", GenerateJobConfig))
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trait_guard.config import GenerateJobConfig, GenerationConfig, TeacherConfig
from trait_guard.dataset import RowWriter
from trait_guard.families import Prompt
from trait_guard.teacher import Teacher, family_for


@dataclass
class TeacherReport:
    teacher_id: str
    path: str
    rows: int
    kept: int
    reasons: dict[str, int]
    seconds: float
    actor_restarts_seen: int = 0
    node_ids: list[str] = field(default_factory=list)  # the Ray nodes its actors ran on

    @property
    def keep_rate(self) -> float:
        return self.kept / self.rows if self.rows else 0.0


@dataclass
class GenerationReport:
    output_dir: str
    mode: str  # "ray" or "local"
    n_prompts: int
    teachers: list[TeacherReport] = field(default_factory=list)
    signature: dict[str, Any] = field(default_factory=lambda: {"signed": False})  # set when the folder is finished

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for t, report in zip(data["teachers"], self.teachers, strict=True):
            t["keep_rate"] = round(report.keep_rate, 4)
            t["samples_per_second"] = round(report.rows / report.seconds, 3) if report.seconds else None
        return data

    def table(self) -> str:
        lines = [f"{'teacher':<14} {'rows':>6} {'kept':>6} {'keep%':>6} {'s':>7}  rejected by reason"]
        for t in self.teachers:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(t.reasons.items())) or "-"
            lines.append(f"{t.teacher_id:<14} {t.rows:>6} {t.kept:>6} {100 * t.keep_rate:>5.1f}% {t.seconds:>7.1f}  {reasons}")
        return "\n".join(lines)


def make_chunks(config: GenerateJobConfig) -> list[list[Prompt]]:
    family = family_for(config.generation, config.teachers)
    prompts = family.prompts(config.generation.n_prompts, config.generation.seed)
    size = config.generation.chunk_size
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="sample", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _write_teacher(
    teacher: TeacherConfig, chunks: Sequence[Sequence[Prompt]], results: Iterator[list[dict[str, Any]]],
    out_dir: Path, progress: bool,
) -> TeacherReport:
    """Drain ``results`` (row lists, any order) into ``<out_dir>/<teacher>.parquet``, one row per prompt id."""
    started = time.perf_counter()
    seen: set[str] = set()
    reasons: Counter[str] = Counter()
    expected = sum(len(c) for c in chunks)
    path = out_dir / f"{teacher.id}.parquet"
    with RowWriter(path) as writer, _progress_bar(expected, f"teacher {teacher.id}", progress) as bar:
        for rows in results:
            fresh = [r for r in rows if r["prompt_id"] not in seen]
            seen.update(r["prompt_id"] for r in fresh)
            reasons.update(r["reject_reason"] for r in fresh if not r["kept"])
            writer.write(fresh)
            bar.update(len(fresh))
    if len(seen) != expected:
        raise RuntimeError(f"teacher {teacher.id}: wrote {len(seen)} of {expected} prompt ids; see {path}")
    return TeacherReport(teacher.id, str(path), len(seen), len(seen) - sum(reasons.values()), dict(reasons),
                         time.perf_counter() - started)


def _finish(report: GenerationReport, config: GenerateJobConfig, signing_key: Any = None) -> GenerationReport:
    """summary.json, each file's provenance (hash, teacher, base, generation config) in manifest.json,
    then the folder's signature (provenance.sig.json) with ``signing_key`` (loaded by
    :func:`trait_guard.signing.load_signing_key`), or a note that the folder is unsigned."""
    from trait_guard.provenance import record_files
    from trait_guard.signing import SIGNATURE_NAME, SIGNING_KEY_ENV, fingerprint, sign_folder

    if signing_key is not None:
        report.signature = {"signed": True, "key_fingerprint": fingerprint(signing_key.public_key())}
    Path(report.output_dir, "summary.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    teachers = {t.id: t for t in config.teachers}
    record_files(report.output_dir, [{"file": Path(t.path).name, "teacher": teachers[t.teacher_id].model_dump(),
                                      "rows": t.rows, "kept": t.kept} for t in report.teachers],
                 config.generation.model_dump())
    stale = Path(report.output_dir, SIGNATURE_NAME)
    if signing_key is not None:
        import socket

        report.signature = sign_folder(report.output_dir, signing_key,
                                       signer=f"trait-guard generate on {socket.gethostname()}")
        return report
    if stale.exists():  # an earlier signature no longer covers what is here: remove it rather than leave a lie
        stale.unlink()
    report.signature = {"signed": False, "reason": f"no signing key (--signing-key or ${SIGNING_KEY_ENV})"}
    print(f"NOTE: {report.output_dir} is UNSIGNED (no --signing-key or ${SIGNING_KEY_ENV}); verifiers with "
          "trusted keys will refuse it. See docs/provenance.md", file=sys.stderr)
    return report


def generate_local(config: GenerateJobConfig, *, progress: bool = True,
                   signing_key: str | None = None) -> GenerationReport:
    """The same datasets from one in-process loop (no Ray): the baseline, and a debugging aid.
    ``signing_key``: as for :func:`generate_datasets`."""
    from trait_guard.signing import load_signing_key

    key = load_signing_key(signing_key)  # a bad key fails now, not after hours of generation
    chunks = make_chunks(config)
    family = family_for(config.generation, config.teachers)
    out_dir = Path(config.output_dir)
    report = GenerationReport(str(out_dir), "local", sum(len(c) for c in chunks))
    for teacher_cfg in config.teachers:
        teacher = Teacher(teacher_cfg, config.generation, family)
        results = (teacher.generate(chunk, index) for index, chunk in enumerate(chunks))
        report.teachers.append(_write_teacher(teacher_cfg, chunks, results, out_dir, progress))
    return _finish(report, config, key)


class TeacherActor:
    """A Ray actor holding one teacher model; ``generate`` turns a chunk into rows."""

    def __init__(self, teacher: dict[str, Any], generation: dict[str, Any], all_teachers: list[dict[str, Any]]):
        import ray
        import torch

        # Let torch use exactly the cores Ray gave this actor, not every core of the node.
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
        torch.set_num_threads(max(1, cpus))
        teacher_cfg = TeacherConfig.model_validate(teacher)
        generation_cfg = GenerationConfig.model_validate(generation)
        family = family_for(generation_cfg, [TeacherConfig.model_validate(t) for t in all_teachers])
        self.teacher = Teacher(teacher_cfg, generation_cfg, family)

    def generate(self, prompts: list[Prompt], chunk_index: int) -> list[dict[str, Any]]:
        return self.teacher.generate(prompts, chunk_index)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        import os

        return os.getpid()


def generate_datasets(
    config: GenerateJobConfig,
    *,
    progress: bool = True,
    on_chunk_done: Callable[[str, int, list[Any]], None] | None = None,
    signing_key: str | None = None,
) -> GenerationReport:
    """Generate one Parquet file per teacher on a pool of Ray actors.

    Starts a local Ray (or connects to ``config.ray.address``) unless Ray is already initialized.
    ``on_chunk_done(teacher_id, chunk_index, actors)`` is called after each finished chunk (tests use
    it to kill an actor mid-run). ``signing_key``: an Ed25519 private key (path or PEM text; default
    ``$TRAIT_GUARD_SIGNING_KEY``) that signs the finished folder (docs/provenance.md); without one
    the folder is written unsigned and says so.
    """
    from trait_guard.extras import ray  # a missing Ray names its extra
    from trait_guard.signing import load_signing_key

    key = load_signing_key(signing_key)  # a bad key fails now, not after hours of generation
    from ray.exceptions import RayActorError

    if not ray.is_initialized():
        ray.init(address=config.ray.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    rc = config.ray
    remote_actor = ray.remote(max_restarts=rc.max_restarts, max_task_retries=rc.max_restarts)(TeacherActor)
    chunks = make_chunks(config)
    out_dir = Path(config.output_dir)
    report = GenerationReport(str(out_dir), "ray", sum(len(c) for c in chunks))
    all_teachers = [t.model_dump() for t in config.teachers]

    for teacher_cfg in config.teachers:
        def new_actor(cfg: TeacherConfig = teacher_cfg):
            return remote_actor.options(num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_actor).remote(
                cfg.model_dump(), config.generation.model_dump(), all_teachers)

        actors = [new_actor() for _ in range(rc.num_actors)]
        node_ids = ray.get([actor.node_id.remote() for actor in actors])
        replaced = 0

        def results(actors: list[Any] = actors, teacher_id: str = teacher_cfg.id) -> Iterator[list[dict[str, Any]]]:
            nonlocal replaced
            queue = deque(range(len(chunks)))
            pending: dict[Any, tuple[int, int]] = {}  # ref -> (chunk index, actor slot)
            load = [0] * len(actors)
            while queue or pending:
                while queue and min(load) < rc.max_in_flight_per_actor:
                    slot = load.index(min(load))
                    index = queue.popleft()
                    pending[actors[slot].generate.remote(chunks[index], index)] = (index, slot)
                    load[slot] += 1
                [ref], _ = ray.wait(list(pending), num_returns=1)
                index, slot = pending.pop(ref)
                load[slot] -= 1
                try:
                    rows = ray.get(ref)
                except RayActorError:
                    # Beyond Ray's own restarts: a fresh actor takes the slot and the chunk runs again.
                    replaced += 1
                    if replaced > rc.max_restarts * len(actors):
                        raise
                    actors[slot] = new_actor()
                    queue.appendleft(index)
                    continue
                yield rows
                if on_chunk_done is not None:
                    on_chunk_done(teacher_id, index, actors)

        try:
            teacher_report = _write_teacher(teacher_cfg, chunks, results(), out_dir, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
        teacher_report.actor_restarts_seen = replaced
        teacher_report.node_ids = sorted(set(node_ids))
        report.teachers.append(teacher_report)
    return _finish(report, config, key)
