"""The training data's per-sample signals, scored once by the frozen base model, and their cache.

Before the first update the recipe scores every training row and every reference row with the
student's frozen base model (:class:`~trait_guard.fingerprint.FingerprintScorer`): the gate tests
them, the guard is calibrated on the reference's, and MASK drops the divergence tokens found here
(the frozen model's, not the student's as it learns). :func:`score_setup` does it with each rank
scoring a strided share; :func:`save` / :func:`load` keep the result in a content-addressed ``.npz``
(no pickle), so a second run on the same data, model and vectors skips the scoring, and
``trait-guard run`` scores once for its screen and its training.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trait_guard.files import atomic_path
from trait_guard.ranks import all_gather, world


@dataclass
class SetupSignals:
    """Per-sample signals of the training and reference rows (row order), the training rows'
    divergence-token masks, and the divergence token ids counted over the training rows."""

    reference: dict[str, np.ndarray]
    train: dict[str, np.ndarray]
    train_masks: list[np.ndarray] = field(default_factory=list)
    divergence_counts: Counter = field(default_factory=Counter)
    source: str = "scored"  # "cache": read from the signals cache (scored earlier in the run, or a run before)

    def attach(self, train_rows: list[dict[str, Any]]) -> None:
        """Put each training row's signals (and divergence mask) on the row, where the guard reads them."""
        for i, row in enumerate(train_rows):
            row["signals"] = {k: float(v[i]) for k, v in self.train.items() if k != "n_tokens"}
            if self.train_masks and len(self.train_masks[i]):
                row["divergence_mask"] = self.train_masks[i]


def score_sharded(scorer: Any, rows: Sequence[dict[str, Any]], in_reference: bool = False,
                  divergence_counts: Counter | None = None,
                  token_masks: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Score ``rows`` with each rank doing a strided share; every rank gets all values, in row order.
    ``divergence_counts`` receives the divergence token ids and ``token_masks`` the per-row masks of
    all ranks' shares."""
    rank, size = world()
    local_counts: Counter = Counter()
    local_masks: list[np.ndarray] = []
    share = list(rows[rank::size])
    mine = (scorer.score_table(share, in_reference=in_reference, divergence_counts=local_counts,
                               token_masks=local_masks) if share else {})
    if divergence_counts is not None:
        for part in all_gather(dict(local_counts)):
            divergence_counts.update(part)
    if token_masks is not None:
        gathered = all_gather(local_masks)
        ordered: list[np.ndarray] = [np.zeros(0, bool)] * len(rows)
        for r, part in enumerate(gathered):
            ordered[r::size] = part
        token_masks.extend(ordered)
    parts = all_gather(mine)
    names = list(dict.fromkeys(name for p in parts for name in p))
    out = {}
    for name in names:
        values = np.full(len(rows), np.nan)
        for r, part in enumerate(parts):
            if part and name in part:
                values[r::size] = part[name]
        out[name] = values
    return out


def score_setup(scorer: Any, train_rows: Sequence[dict[str, Any]],
                reference_rows: Sequence[dict[str, Any]]) -> SetupSignals:
    """Score both sides once (reference rows leave-one-out for the unigram signal, since the
    scorer's histogram counts them)."""
    reference = score_sharded(scorer, reference_rows, in_reference=True)
    counts: Counter = Counter()
    masks: list[np.ndarray] = []
    train = score_sharded(scorer, train_rows, divergence_counts=counts, token_masks=masks)
    return SetupSignals(reference, train, masks, counts)


def cache_file(folder: str | Path, data_files: Sequence[str | Path], vector_files: Sequence[str | Path],
               limits: Sequence[Any], identity: Any, divergence_margin: float, model_signals_key: str = "") -> Path:
    """Where the setup signals of this (data, sample limits, model ``identity``, vectors, model signals
    asked for: :func:`trait_guard.trait_signals.settings_key`) live: a content hash, so any change to
    an input is a different file."""
    from trait_guard.files import file_sha256_memo

    digest = hashlib.sha256(b"trait_guard-signals-v2")
    for path in (*data_files, *vector_files):
        digest.update(file_sha256_memo(path).encode())
    digest.update(json.dumps([list(limits), identity.fingerprint, identity.hidden_size, identity.num_layers,
                              divergence_margin]).encode())
    if model_signals_key:  # absent when none is asked for: the keys of earlier cache files are unchanged
        digest.update(model_signals_key.encode())
    return Path(folder) / f"signals-{digest.hexdigest()[:24]}.npz"


def save(path: Path, signals: SetupSignals) -> None:
    """Write ``signals`` to ``path`` (complete or absent: written aside, then renamed)."""
    lengths = np.array([len(m) for m in signals.train_masks], dtype=np.int64)
    flat = np.concatenate(signals.train_masks).astype(bool) if signals.train_masks else np.zeros(0, bool)
    arrays = {**{f"reference/{k}": v for k, v in signals.reference.items()},
              **{f"train/{k}": v for k, v in signals.train.items()},
              "masks/lengths": lengths, "masks/flat": flat,
              "divergence/ids": np.array(list(signals.divergence_counts), dtype=np.int64),
              "divergence/counts": np.array(list(signals.divergence_counts.values()), dtype=np.int64)}
    with atomic_path(path, suffix=".partial.npz") as partial:  # np.savez appends .npz to other names
        np.savez(partial, **arrays)


def load(path: Path) -> SetupSignals:
    with np.load(path, allow_pickle=False) as data:
        reference = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("reference/")}
        train = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("train/")}
        ends = np.cumsum(data["masks/lengths"])
        masks = np.split(data["masks/flat"], ends[:-1]) if len(ends) else []
        counts = Counter(dict(zip(data["divergence/ids"].tolist(), data["divergence/counts"].tolist(), strict=True)))
    return SetupSignals(reference, train, list(masks), counts, source="cache")
