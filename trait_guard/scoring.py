"""Scoring teacher data with the student's frozen base model as a Ray Data stage, off the driver.

The training and reference rows (each row's position and the columns the scorer reads) become one
Ray Data dataset; ``map_batches`` runs it on ``scoring.num_actors`` :class:`RowScorer` actors, each
holding one copy of the base model where ``scoring`` places it (a GPU actor on a cluster). The
driver gathers the per-row signals and divergence masks by position into a
:class:`~trait_guard.setup_signals.SetupSignals`: the values :func:`trait_guard.setup_signals.score_setup`
computes in one process (tests/test_scoring.py checks they agree), written to the signals cache
where the screen, the gate and the training run read them, so each row is scored once per run.

A killed scoring actor is restarted by Ray and its pending batches re-run; the driver keeps one
result per row position and refuses a result that misses one.

Usage::

    scored = score_on_ray(settings, "smollm2-135m-instruct", ["owl.safetensors"], train_rows, reference_rows,
                          vocab_size=len(tokenizer))
    scored.signals  # SetupSignals, as setup_signals.score_setup gives them
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trait_guard.config import ScoringSettings
from trait_guard.setup_signals import SetupSignals

SCORER_COLUMNS = ("prompt", "completion", "completion_ids", "topk_ids", "topk_logprobs", "token_logprobs")
SIGNAL_PREFIX = "signal:"
SIDES = ("reference", "train")


@dataclass
class ScoredRows:
    """The scoring stage's result: the rows' signals and the Ray nodes its actors ran on."""

    signals: SetupSignals
    node_ids: list[str]


class RowScorer:
    """A Ray Data actor holding the student's frozen base model: scores a batch of rows (both sides,
    the reference rows leave-one-out for the unigram signal, as in-process scoring does)."""

    def __init__(self, model: str, placement: dict[str, str], vector_files: Sequence[str],
                 reference_histogram: np.ndarray, batch_size: int):
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
        self.scorer = FingerprintScorer(base, tokenizer, vectors, unigram_reference=histogram, batch_size=batch_size)
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        out: dict[str, list[Any]] = {"position": [], "side": [], "divergence_mask": []}
        parts: list[tuple[int, dict[str, np.ndarray]]] = []
        for side in SIDES:
            share = [r for r in rows if r["side"] == side]
            if share:
                masks: list[np.ndarray] = []
                parts.append((len(share), self.scorer.score_table(share, in_reference=side == "reference",
                                                                  token_masks=masks)))
                out["position"] += [r["position"] for r in share]
                out["side"] += [side] * len(share)
                out["divergence_mask"] += [m.astype(bool).tolist() for m in masks]
        for name in sorted({name for _, part in parts for name in part}):
            # a signal only one side's rows have (stored teacher log-probs) is NaN on the other's
            out[SIGNAL_PREFIX + name] = [float(v) for n, part in parts
                                         for v in part.get(name, np.full(n, np.nan))]
        out["node_id"] = [self.node_id] * len(out["position"])
        return pa.table(out)


def score_on_ray(settings: ScoringSettings, model: str, vector_files: Sequence[str],
                 train_rows: Sequence[dict[str, Any]], reference_rows: Sequence[dict[str, Any]],
                 *, vocab_size: int, reference_signals: dict[str, np.ndarray] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> ScoredRows:
    """Score ``train_rows`` and ``reference_rows`` with ``model`` (the student's base) on a pool of
    Ray Data actors (Ray must be initialized); ``vocab_size``: the tokenizer's, for the reference
    unigram histogram. ``reference_signals``: the reference's, scored already for another training
    set (only the training rows are scored then). ``on_batch(rows_in_batch)`` runs after each
    gathered batch (tests kill an actor from it)."""
    from trait_guard.fingerprint import TokenHistogram
    from trait_guard.generation import configure_ray_data

    configure_ray_data()
    histogram = TokenHistogram(vocab_size).update(r["completion_ids"] for r in reference_rows)
    stream = _rows_dataset(train_rows, [] if reference_signals is not None else reference_rows,
                           settings.batch_size).map_batches(
        RowScorer, batch_size=settings.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"model": model, "placement": {"device": settings.device, "dtype": settings.dtype},
                               "vector_files": [str(v) for v in vector_files],
                               "reference_histogram": histogram.counts, "batch_size": settings.batch_size},
        compute=_actor_pool(settings.num_actors), num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor)
    results: dict[str, dict[int, dict[str, Any]]] = {side: {} for side in SIDES}
    nodes: set[str] = set()
    for table in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
        nodes.update(table.column("node_id").unique().to_pylist())
        for record in table.to_pylist():
            results[record["side"]][record["position"]] = record  # a re-run batch gives the same values
        if on_batch is not None:
            on_batch(table.num_rows)
    signals = _assemble(results, train_rows, [] if reference_signals is not None else reference_rows)
    if reference_signals is not None:
        signals.reference = dict(reference_signals)
    return ScoredRows(signals, sorted(nodes))


def _actor_pool(size: int) -> Any:
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2)  # balance: one running, one queued


def _rows_dataset(train_rows: Sequence[dict[str, Any]], reference_rows: Sequence[dict[str, Any]],
                  batch_size: int) -> Any:
    """Both sides' rows as one Ray Data dataset: each row's side and position, and what the scorer reads."""
    import ray

    items = [{"side": side, "position": i, **{c: row.get(c) for c in SCORER_COLUMNS}}
             for side, rows in (("reference", reference_rows), ("train", train_rows)) for i, row in enumerate(rows)]
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))


def _assemble(results: dict[str, dict[int, dict[str, Any]]], train_rows: Sequence[dict[str, Any]],
              reference_rows: Sequence[dict[str, Any]]) -> SetupSignals:
    """The gathered records, in row order, as SetupSignals (divergence counts: the ids under the masks)."""
    signals: dict[str, dict[str, np.ndarray]] = {}
    for side, rows in (("train", train_rows), ("reference", reference_rows)):
        missing = sorted(set(range(len(rows))) - set(results[side]))
        if missing:
            raise RuntimeError(f"the scoring stage returned no result for {len(missing)} {side} rows "
                               f"(positions {missing[:5]}...): rerun; no signals were saved")
        records = [results[side][i] for i in range(len(rows))]
        names = sorted({k for r in records for k in r if k.startswith(SIGNAL_PREFIX)})
        signals[side] = {name[len(SIGNAL_PREFIX):]: np.array([r.get(name, np.nan) for r in records], dtype=np.float64)
                         for name in names}
    masks = [np.asarray(results["train"][i]["divergence_mask"], dtype=bool) for i in range(len(train_rows))]
    counts: Counter = Counter()
    for row, mask in zip(train_rows, masks, strict=True):
        if len(mask):
            counts.update(np.asarray(row["completion_ids"], dtype=np.int64)[mask].tolist())
    return SetupSignals(signals["reference"], signals["train"], masks, counts)
