"""Scoring teacher data with the student's frozen base model as a Ray Data stage, off the driver.

The stage reads the training and reference Parquet files itself (``ray.data.read_parquet``, only the
columns the scorer needs) and ``map_batches`` runs them on ``scoring.num_actors`` :class:`RowScorer`
actors, each holding one copy of the base model where ``scoring`` places it (a GPU actor on a
cluster). Which rows are used, and in what order, is given by their sample ids (a
:class:`ScoringInput` per side: the checked reader's kept rows, the first ``limit`` of them); each
actor keeps those and tags every result with the row's position. The driver gathers only the small
results (the signals, the divergence masks and the divergence token ids) by position into a
:class:`~trait_guard.setup_signals.SetupSignals`: the values :func:`trait_guard.setup_signals.score_setup`
computes in one process (tests/test_scoring.py checks they agree), written to the signals cache
where the screen, the gate and the training run read them, so each row is scored once per run and
the driver never holds the rows (its memory does not grow with them; benchmarks/scoring_throughput.py).

The files must be readable where the actors run (one machine, or shared storage on a cluster: the
Ray Train workers read them the same way). A killed scoring actor is restarted by Ray and its pending
batches re-run; the driver keeps one result per row position and refuses a result that misses one.

Usage::

    train = ScoringInput("data/owl.parquet", train_summary.sample_ids)
    reference = ScoringInput("data/control.parquet", reference_summary.sample_ids)
    scored = score_on_ray(settings, "smollm2-135m-instruct", ["owl.safetensors"], train, reference,
                          reference_histogram=reference_summary.histogram.counts)
    scored.signals  # SetupSignals, as setup_signals.score_setup gives them
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trait_guard.config import ModelSignalSettings, ScoringSettings
from trait_guard.setup_signals import SetupSignals

SCORER_COLUMNS = ("prompt", "completion", "completion_ids", "topk_ids", "topk_logprobs", "token_logprobs")
SIGNAL_PREFIX = "signal:"
SIDES = ("reference", "train")
# chunks of work per scoring actor: enough to balance the pool and re-run little after a crash
CHUNKS_PER_ACTOR = 16


@dataclass
class ScoringInput:
    """One side of the scoring stage: its Parquet file and the sample ids of the rows to score, in
    the order their signals are wanted (rows of the file not listed are skipped)."""

    path: str | Path
    sample_ids: Sequence[str] | Any  # a list, or a pyarrow string array


@dataclass
class ScoredRows:
    """The scoring stage's result: the rows' signals and the Ray nodes its actors ran on."""

    signals: SetupSignals
    node_ids: list[str]


class RowScorer:
    """A Ray Data actor holding the student's frozen base model: reads each chunk's rows from its
    Parquet file, keeps the used ones and scores them (the reference rows leave-one-out for the
    unigram signal, as in-process scoring does); returns their positions, signals, divergence masks
    and divergence token ids."""

    def __init__(self, model: str, placement: dict[str, str], vector_files: Sequence[str],
                 reference_histogram: np.ndarray, batch_size: int, sample_ids: dict[str, Any],
                 model_signals: dict[str, Any] | None = None, trait: str | None = None,
                 neutral_prompts: Sequence[str] | None = None):
        import ray
        import torch

        from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
        from trait_guard.models import load_model
        from trait_guard.persona import PersonaVector

        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
        torch.set_num_threads(max(1, cpus))  # the cores Ray gave this actor, not every core of the node
        base, tokenizer = load_model(model, device=placement["device"], dtype=placement["dtype"])
        histogram = TokenHistogram(len(reference_histogram))
        histogram.counts = np.asarray(reference_histogram, dtype=np.float64)
        vectors = [PersonaVector.load(path) for path in vector_files]
        extra = _model_signal_scorer(model_signals, base, tokenizer, model, trait, placement, batch_size,
                                     neutral_prompts)
        self.scorer = FingerprintScorer(base, tokenizer, vectors, unigram_reference=histogram, batch_size=batch_size,
                                        extra=[extra] if extra is not None else [])
        self.node_id = ray.get_runtime_context().get_node_id()
        self.sample_ids = sample_ids  # side -> the used rows' ids (a pyarrow array), position = index
        self._group: tuple[tuple[str, int], Any] | None = None  # the row group read last

    def _rows(self, path: str, group: int) -> Any:
        """The scorer's columns of one row group (kept while consecutive chunks read it)."""
        import pyarrow.parquet as pq

        if self._group is None or self._group[0] != (path, group):
            handle = pq.ParquetFile(path)
            columns = ["sample_id", *(c for c in SCORER_COLUMNS if c in handle.schema_arrow.names)]
            self._group = ((path, group), handle.read_row_group(group, columns=columns))
        return self._group[1]

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        out: dict[str, list[Any]] = {"position": [], "side": [], "divergence_mask": [], "divergence_ids": []}
        parts: list[tuple[int, dict[str, np.ndarray]]] = []
        for chunk in batch.to_pylist():
            side = chunk["side"]
            rows = self._rows(chunk["path"], chunk["row_group"]).slice(chunk["start"], chunk["stop"] - chunk["start"])
            positions = pc.index_in(rows.column("sample_id"), value_set=self.sample_ids[side])
            used = pc.is_valid(positions)
            share = rows.filter(used).to_pylist()  # rows of the file outside the used ones are skipped
            if not share:
                continue
            masks: list[np.ndarray] = []
            parts.append((len(share), self.scorer.score_table(share, in_reference=side == "reference",
                                                              token_masks=masks)))
            out["position"] += positions.filter(used).to_pylist()
            out["side"] += [side] * len(share)
            out["divergence_mask"] += [m.astype(bool).tolist() for m in masks]
            out["divergence_ids"] += [np.asarray(r["completion_ids"], dtype=np.int64)[m.astype(bool)].tolist()
                                      if len(m) else [] for r, m in zip(share, masks, strict=True)]
        columns = {"position": pa.array(out["position"], pa.int64()), "side": pa.array(out["side"], pa.string()),
                   "divergence_mask": pa.array(out["divergence_mask"], pa.list_(pa.bool_())),
                   "divergence_ids": pa.array(out["divergence_ids"], pa.list_(pa.int64()))}
        for name in sorted({name for _, part in parts for name in part}):
            # a signal only one side's rows have (stored teacher log-probs) is null on the other's
            columns[SIGNAL_PREFIX + name] = pa.array([None if v is None else float(v) for n, part in parts
                                                      for v in (part[name] if name in part else [None] * n)],
                                                     pa.float64())
        columns["node_id"] = pa.array([self.node_id] * len(out["position"]), pa.string())
        return pa.table(columns)


def score_on_ray(settings: ScoringSettings, model: str, vector_files: Sequence[str], train: ScoringInput,
                 reference: ScoringInput, *, reference_histogram: np.ndarray,
                 reference_signals: dict[str, np.ndarray] | None = None,
                 model_signals: ModelSignalSettings | None = None, trait: str | None = None,
                 on_batch: Callable[[int], None] | None = None) -> ScoredRows:
    """Score the ``train`` and ``reference`` rows with ``model`` (the student's base) on a pool of Ray
    Data actors reading the files themselves (Ray must be initialized). ``reference_histogram``: the
    reference rows' unigram counts (``RowSummary.histogram.counts``), over the tokenizer's vocabulary.
    ``reference_signals``: the reference's, scored already for another training set (only the
    training rows are scored then). ``model_signals`` / ``trait``: the training config's signals read
    from models (S2, S3) and its watched trait, scored by each actor with the others (``model_diff``'s
    direction from the reference's first prompts, :func:`reference_prompts`, as in-process scoring).
    ``on_batch(rows_in_batch)`` runs after each gathered batch (tests kill an actor from it)."""
    from trait_guard.generation import configure_ray_data

    configure_ray_data()
    sides = {"train": train} if reference_signals is not None else {"train": train, "reference": reference}
    stream = _chunks_dataset(sides, settings.batch_size, settings.num_actors).map_batches(
        RowScorer, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs={"model": model, "placement": {"device": settings.device, "dtype": settings.dtype},
                               "vector_files": [str(v) for v in vector_files],
                               "reference_histogram": np.asarray(reference_histogram, dtype=np.float64),
                               "batch_size": settings.batch_size,
                               "sample_ids": {side: _id_array(sides[side].sample_ids if side in sides else [])
                                              for side in SIDES},
                               "model_signals": model_signals.model_dump(mode="json") if model_signals else None,
                               "trait": trait,
                               "neutral_prompts": (reference_prompts(reference, model_signals.model_diff_prompts)
                                                   if model_signals is not None and model_signals.model_diff else None)},
        compute=_actor_pool(settings.num_actors), num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor)
    tables, nodes = [], set()
    for table in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
        nodes.update(table.column("node_id").unique().to_pylist())
        tables.append(table.drop_columns(["node_id"]))
        if on_batch is not None:
            on_batch(table.num_rows)
    signals = _assemble(tables, {side: len(given.sample_ids) for side, given in sides.items()})
    if reference_signals is not None:
        signals.reference = dict(reference_signals)
    return ScoredRows(signals, sorted(nodes))


def _id_array(sample_ids: Any) -> Any:
    """Sample ids as one Arrow string array (a :class:`~trait_guard.screen.RowSummary` gives one already)."""
    import pyarrow as pa

    return sample_ids if isinstance(sample_ids, pa.Array) else pa.array(list(sample_ids), pa.string())


def reference_prompts(reference: ScoringInput, n: int) -> list[str]:
    """The prompts of the first ``n`` used reference rows, in the scoring order (``model_diff``'s neutral
    text; in-process scoring takes the same rows)."""
    import pyarrow.parquet as pq

    wanted = _id_array(reference.sample_ids)[:n].to_pylist()
    table = pq.read_table(reference.path, columns=["sample_id", "prompt"])
    by_id = dict(zip(table.column("sample_id").to_pylist(), table.column("prompt").to_pylist(), strict=True))
    return [by_id[sample_id] for sample_id in wanted]


def _model_signal_scorer(model_signals: dict[str, Any] | None, base: Any, tokenizer: Any, model: str,
                         trait: str | None, placement: dict[str, str], batch_size: int,
                         neutral_prompts: Sequence[str] | None = None) -> Any:
    """An actor's scorer for the config's ``model_signals`` (None when none is asked for)."""
    from trait_guard.trait_signals import scorer_from_settings
    from trait_guard.traits import load_trait

    settings = ModelSignalSettings.model_validate(model_signals or {})
    if not settings.enabled:
        return None
    spec = load_trait(trait) if settings.trait_llr and trait else None
    return scorer_from_settings(settings, base, tokenizer, base_name=model, spec=spec, batch_size=batch_size,
                                device=next(base.parameters()).device, dtype=placement["dtype"],
                                neutral_prompts=neutral_prompts)


def _actor_pool(size: int) -> Any:
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2)  # balance: one running, one queued


def _chunks_dataset(sides: dict[str, ScoringInput], batch_size: int, actors: int) -> Any:
    """The work as one Ray Data dataset of chunks (side, file, row group, row range), about
    ``CHUNKS_PER_ACTOR`` per actor and never fewer than ``batch_size`` rows nor more than a row group:
    the actors read their rows themselves. A bounded number of chunks keeps the driver's share
    (Ray's record of every block and task) independent of the data's size. Why not
    ``read_parquet``: its file listing needs a CPU of its own, which a scoring pool holding every
    CPU of the cluster never frees (the stage would wait forever)."""
    import pyarrow.parquet as pq
    import ray

    files = {side: pq.ParquetFile(_file_key(given.path)).metadata for side, given in sides.items()}
    total = sum(metadata.num_rows for metadata in files.values())
    size = max(batch_size, -(-total // (CHUNKS_PER_ACTOR * actors)))
    chunks = []
    for side, metadata in files.items():
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            chunks += [{"side": side, "path": _file_key(sides[side].path), "row_group": group, "start": start,
                        "stop": min(start + size, rows)} for start in range(0, rows, size)]
    return ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))


def _file_key(path: str | Path) -> str:
    return str(Path(path).resolve())


def _assemble(tables: list[Any], sizes: dict[str, int]) -> SetupSignals:
    """The gathered results, one per row position (a re-run batch gives the same values), in row
    order, as SetupSignals; refuses a result that misses a row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables(tables, promote_options="default") if tables else None
    signals: dict[str, dict[str, np.ndarray]] = {"reference": {}, "train": {}}
    masks: list[np.ndarray] = []
    counts: Counter = Counter()
    for side, size in sizes.items():
        mine = table.filter(pc.equal(table.column("side"), side)) if table is not None else None
        positions = mine.column("position").to_numpy() if mine is not None else np.zeros(0, np.int64)
        unique, first = np.unique(positions, return_index=True)  # sorted positions, each once
        missing = np.setdiff1d(np.arange(size), unique)
        if len(missing):
            raise RuntimeError(f"the scoring stage returned no result for {len(missing)} {side} rows "
                               f"(positions {missing[:5].tolist()}...): rerun; no signals were saved")
        ordered = mine.take(pa.array(first))
        # a signal this side's rows cannot have (all null: the teacher log-prob columns) is not this side's
        signals[side] = {name[len(SIGNAL_PREFIX):]: ordered.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                         for name in ordered.column_names
                         if name.startswith(SIGNAL_PREFIX) and ordered.column(name).null_count < ordered.num_rows}
        if side == "train":
            masks = [np.asarray(m, dtype=bool) for m in ordered.column("divergence_mask").to_pylist()]
            ids = pc.list_flatten(ordered.column("divergence_ids")).to_numpy()
            values, n = np.unique(ids, return_counts=True)
            counts = Counter(dict(zip(values.tolist(), n.tolist(), strict=True)))
    return SetupSignals(signals["reference"], signals["train"], masks, counts)
