"""Teacher data generation on Ray actors (or in-process), with exactly one row per prompt id.

Prompts are cut into chunks. On Ray, the chunk indices are a Ray Data dataset and ``map_batches``
runs them on a pool of stateful :class:`TeacherBatches` actors (each holding one loaded model), at
most ``max_in_flight_per_actor`` chunks pending per actor (Ray Data's backpressure); the driver
streams the finished rows into a Parquet file while a progress bar advances.

Faults: Ray Data starts its actors restartable with retried tasks, so when an actor process dies Ray
restarts it (reloading the model) and Ray Data re-runs its pending chunks. Because a chunk's seed
depends only on its index, a re-run yields the same rows, and the driver writes each prompt id once
(and refuses a file that misses one).

Resuming: each finished teacher file gets a record beside it, ``<teacher>.parquet.done.json``, with
what its rows depend on (the teacher's and the generation's settings, the prompt family's options,
the adapter's bytes) and the file's SHA-256. With ``resume=True`` a teacher whose record matches the
job and whose file is unchanged is not generated again, so a long job stopped part-way (a pool of
ten teachers, hours on CPU) restarts at the first teacher it had not finished.

Usage::

    report = generate_datasets(load_config("ray_jobs/configs/teacher_data_cpu.yaml", GenerateJobConfig))
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
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


def teacher_file(out_dir: Path, teacher_id: str) -> Path:
    """Where a teacher's rows are written: ``<out_dir>/<teacher>.parquet``."""
    return out_dir / f"{teacher_id}.parquet"


def _write_teacher(
    teacher: TeacherConfig, chunks: Sequence[Sequence[Prompt]], results: Iterator[list[dict[str, Any]]],
    out_dir: Path, progress: bool,
) -> TeacherReport:
    """Drain ``results`` (row lists, any order) into ``<out_dir>/<teacher>.parquet``, one row per prompt id."""
    started = time.perf_counter()
    seen: set[str] = set()
    reasons: Counter[str] = Counter()
    expected = sum(len(c) for c in chunks)
    path = teacher_file(out_dir, teacher.id)
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


DONE_SUFFIX = ".done.json"


def done_record_path(out_dir: Path, teacher_id: str) -> Path:
    """Where a finished teacher's resume record lives: beside its Parquet file."""
    path = teacher_file(out_dir, teacher_id)
    return path.with_name(path.name + DONE_SUFFIX)


def _depends_on(config: GenerateJobConfig, teacher: TeacherConfig) -> dict[str, Any]:
    """Everything a teacher's rows depend on besides the code: its settings, the generation's, the
    prompt family's options (the code family bans every teacher's trait words) and its adapter's files."""
    from trait_guard.files import file_sha256
    from trait_guard.teacher import family_options

    adapter = None
    if teacher.adapter and Path(teacher.adapter).is_dir():
        adapter = {p.name: file_sha256(p) for p in sorted(Path(teacher.adapter).iterdir()) if p.is_file()}
    return {"teacher": teacher.model_dump(mode="json"), "generation": config.generation.model_dump(mode="json"),
            "family_options": family_options(config.generation, config.teachers), "adapter_files": adapter}


def _mark_done(out_dir: Path, config: GenerateJobConfig, teacher: TeacherConfig, report: TeacherReport) -> None:
    from trait_guard.files import atomic_write_text, file_sha256

    record = {"depends_on": _depends_on(config, teacher), "sha256": file_sha256(report.path), "report": asdict(report)}
    atomic_write_text(done_record_path(out_dir, teacher.id), json.dumps(record, indent=2, sort_keys=True) + "\n")


def finished_teacher(out_dir: Path, config: GenerateJobConfig, teacher: TeacherConfig) -> TeacherReport | None:
    """The report of a teacher this job already generated in ``out_dir`` (its record matches the job
    and its file is the one recorded), or None when it must be generated (again)."""
    from trait_guard.files import file_sha256

    record_path, path = done_record_path(out_dir, teacher.id), teacher_file(out_dir, teacher.id)
    if not (record_path.is_file() and path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # an unreadable record proves nothing: generate again
    expected = json.loads(json.dumps(_depends_on(config, teacher)))  # the record's JSON form
    if (not isinstance(record, dict) or record.get("depends_on") != expected
            or record.get("sha256") != file_sha256(path)):
        return None
    try:
        return TeacherReport(**{**record["report"], "path": str(path)})
    except (KeyError, TypeError):  # a record of another version's report
        return None


def _reuse(out_dir: Path, config: GenerateJobConfig, teacher: TeacherConfig, resume: bool) -> TeacherReport | None:
    """With ``resume``: the finished teacher's report (and a line saying it is reused), else None."""
    done = finished_teacher(out_dir, config, teacher) if resume else None
    if done is not None:
        print(f"teacher {teacher.id}: {done.path} is finished for these settings (resume): not generated again",
              file=sys.stderr)
    return done


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
                   signing_key: str | None = None, resume: bool = False) -> GenerationReport:
    """The same datasets from one in-process loop (no Ray): the baseline, and a debugging aid.
    ``signing_key`` and ``resume``: as for :func:`generate_datasets`."""
    from trait_guard.signing import load_signing_key

    key = load_signing_key(signing_key)  # a bad key fails now, not after hours of generation
    chunks = make_chunks(config)
    family = family_for(config.generation, config.teachers)
    out_dir = Path(config.output_dir)
    report = GenerationReport(str(out_dir), "local", sum(len(c) for c in chunks))
    for teacher_cfg in config.teachers:
        if (done := _reuse(out_dir, config, teacher_cfg, resume)) is not None:
            report.teachers.append(done)
            continue
        teacher = Teacher(teacher_cfg, config.generation, family)
        results = (teacher.generate(chunk, index) for index, chunk in enumerate(chunks))
        report.teachers.append(_write_teacher(teacher_cfg, chunks, results, out_dir, progress))
        _mark_done(out_dir, config, teacher_cfg, report.teachers[-1])
    return _finish(report, config, key)


class TeacherBatches:
    """A Ray Data actor holding one teacher model: turns a batch of chunk indices into rows (an Arrow
    table in the teacher-data schema, plus the node it ran on)."""

    def __init__(self, teacher: dict[str, Any], generation: dict[str, Any], all_teachers: list[dict[str, Any]]):
        import ray
        import torch

        # Let torch use exactly the cores Ray gave this actor, not every core of the node.
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
        torch.set_num_threads(max(1, cpus))
        teacher_cfg = TeacherConfig.model_validate(teacher)
        generation_cfg = GenerationConfig.model_validate(generation)
        self.chunks = make_chunks(GenerateJobConfig(teachers=[TeacherConfig.model_validate(t) for t in all_teachers],
                                                    generation=generation_cfg))
        family = family_for(generation_cfg, [TeacherConfig.model_validate(t) for t in all_teachers])
        self.teacher = Teacher(teacher_cfg, generation_cfg, family)
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pyarrow as pa

        from trait_guard.dataset import SCHEMA

        rows = [row for index in batch["chunk_index"].tolist()
                for row in self.teacher.generate(self.chunks[index], index)]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)  # one schema for every block, whatever it holds
        return table.append_column(NODE_COLUMN, pa.array([self.node_id] * len(rows), pa.string()))


NODE_COLUMN = "_node_id"  # where a row was generated: reported, not written


def generate_datasets(
    config: GenerateJobConfig,
    *,
    progress: bool = True,
    on_chunk_done: Callable[[str, int], None] | None = None,
    signing_key: str | None = None,
    resume: bool = False,
) -> GenerationReport:
    """Generate one Parquet file per teacher with Ray Data: the chunk indices are a dataset, and
    ``map_batches`` runs them on a pool of ``ray.num_actors`` :class:`TeacherBatches` actors (Ray
    Data's backpressure, actor restarts and task retries); the driver streams the rows into Parquet.

    Starts a local Ray (or connects to ``config.ray.address``) unless Ray is already initialized.
    ``on_chunk_done(teacher_id, rows_written)`` is called after each finished chunk (tests use it
    to kill an actor mid-run). ``signing_key``: an Ed25519 private key (path or PEM text; default
    ``$TRAIT_GUARD_SIGNING_KEY``) that signs the finished folder (docs/provenance.md); without one
    the folder is written unsigned and says so. ``resume``: keep the teachers already finished in
    ``output_dir`` for these settings (:func:`finished_teacher`) and generate only the others.
    """
    from trait_guard.extras import ray  # a missing Ray names its extra
    from trait_guard.signing import load_signing_key

    key = load_signing_key(signing_key)  # a bad key fails now, not after hours of generation
    if not ray.is_initialized():
        ray.init(address=config.ray.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    configure_ray_data()
    chunks = make_chunks(config)
    out_dir = Path(config.output_dir)
    report = GenerationReport(str(out_dir), "ray", sum(len(c) for c in chunks))
    for teacher_cfg in config.teachers:
        if (done := _reuse(out_dir, config, teacher_cfg, resume)) is not None:
            report.teachers.append(done)
            continue
        node_ids: set[str] = set()
        rows = _stream_rows(_teacher_stream(config, teacher_cfg, len(chunks)), node_ids,
                            lambda n, t=teacher_cfg.id: on_chunk_done(t, n) if on_chunk_done else None)
        teacher_report = _write_teacher(teacher_cfg, chunks, rows, out_dir, progress)
        teacher_report.node_ids = sorted(node_ids)
        report.teachers.append(teacher_report)
        _mark_done(out_dir, config, teacher_cfg, teacher_report)
    return _finish(report, config, key)


def _stream_rows(stream: Any, node_ids: set[str], after_chunk: Callable[[int], None]) -> Iterator[list[dict[str, Any]]]:
    """The stream's rows, one list per chunk, as they finish (``node_ids`` collects where they ran)."""
    for table in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
        node_ids.update(table.column(NODE_COLUMN).unique().to_pylist())
        rows = table.drop_columns([NODE_COLUMN]).to_pylist()
        yield rows
        after_chunk(len(rows))


def _teacher_stream(config: GenerateJobConfig, teacher: TeacherConfig, n_chunks: int) -> Any:
    """The Ray Data stream of one teacher's rows: one block per chunk, generated by an actor pool."""
    import ray

    rc = config.ray
    chunk_indices = ray.data.from_items([{"chunk_index": i} for i in range(n_chunks)], override_num_blocks=n_chunks)
    return chunk_indices.map_batches(
        TeacherBatches, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"teacher": teacher.model_dump(), "generation": config.generation.model_dump(),
                               "all_teachers": [t.model_dump() for t in config.teachers]},
        compute=ray.data.ActorPoolStrategy(size=rc.num_actors, max_tasks_in_flight_per_actor=rc.max_in_flight_per_actor),
        num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_actor)


ACTOR_START_TIMEOUT_S = 900  # loading a 7B model on a fresh node; longer means the cluster lacks the resources


def configure_ray_data() -> None:
    """How our Ray Data stages run: every actor of a pool is up before any work is handed out (work is
    spread over all of them, and a cluster that cannot hold the pool fails after
    ``ACTOR_START_TIMEOUT_S`` with Ray Data's "Timed out while starting actors" instead of running on
    fewer actors than asked); our own progress bars and summaries stand in for Ray Data's (which would
    interleave with them); its errors still show."""
    import logging

    import ray

    context = ray.data.DataContext.get_current()
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
