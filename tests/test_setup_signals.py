"""The setup signals (scored once by the frozen base model), their cache, and the small shared helpers."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from trait_guard import setup_signals
from trait_guard.chat import encode_rows
from trait_guard.files import atomic_write_text, to_jsonable
from trait_guard.fingerprint import FingerprintScorer
from trait_guard.version import code_version, same_code


def test_cache_round_trip_keeps_signals_masks_and_counts(tmp_path):
    signals = setup_signals.SetupSignals(
        reference={"nll": np.array([1.0, 2.0]), "proj:animal": np.array([0.5, np.nan])},
        train={"nll": np.array([3.0, 4.0, 5.0])},
        train_masks=[np.array([True, False]), np.zeros(0, bool), np.array([False, False, True])],
        divergence_counts=Counter({4: 2, 11: 1}))
    path = tmp_path / "c" / "signals-x.npz"
    setup_signals.save(path, signals)
    loaded = setup_signals.load(path)
    np.testing.assert_array_equal(loaded.reference["proj:animal"], signals.reference["proj:animal"])
    np.testing.assert_array_equal(loaded.train["nll"], signals.train["nll"])
    assert [m.tolist() for m in loaded.train_masks] == [[True, False], [], [False, False, True]]
    assert loaded.divergence_counts == Counter({4: 2, 11: 1})
    assert [p.name for p in path.parent.iterdir()] == ["signals-x.npz"]  # nothing half-written left beside it


def test_score_setup_attaches_each_rows_signals_and_frozen_masks(tiny_llama):
    """Every row gets its own signals and the divergence mask the frozen model found, in row order:
    the masks MASK applies (measured against the student as it learns, they would fade)."""
    import torch

    model, tokenizer = tiny_llama
    rows = [{"prompt": f"q{i}", "completion": "1, 2", "completion_ids": tokenizer("1, 2", add_special_tokens=False).input_ids}
            for i in range(5)]
    batch = encode_rows(tokenizer, rows)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    for i, row in enumerate(rows):  # a teacher that agrees with the model everywhere but at token 1 of row 3
        positions = batch.response_mask[i].nonzero().flatten()
        top = logits[i, positions - 1].log_softmax(-1).topk(3, dim=-1)
        ids, logprobs = top.indices.tolist(), top.values.tolist()
        if i == 3:
            ids[1] = [ids[1][1], ids[1][0], ids[1][2]]
            logprobs[1] = [-0.1, -3.0, -4.0]
        row.update(topk_ids=ids, topk_logprobs=logprobs)
    signals = setup_signals.score_setup(FingerprintScorer(model, tokenizer, batch_size=2), rows, rows[:3])
    signals.attach(rows)
    assert [r["divergence_mask"].tolist() for r in rows][3] == [False, True, False, False]
    assert all(not r["divergence_mask"].any() for i, r in enumerate(rows) if i != 3)
    assert rows[3]["signals"]["divergence"] == pytest.approx(0.25) and rows[0]["signals"]["divergence"] == 0
    assert len(signals.reference["nll"]) == 3 and sum(signals.divergence_counts.values()) == 1


def test_atomic_write_and_json_safe_values(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "x.json", json.dumps(to_jsonable(
        {"a": np.float32(1.5), "b": [np.nan, math.inf, 2], "c": np.arange(2), 3: (np.int64(4),)})))
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [None, None, 2], "c": [0, 1], "3": [4]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_code_version_identifies_this_source():
    version = code_version()
    assert len(version["source_sha256"]) == 64 and version["package"]
    assert same_code(version) and not same_code({**version, "source_sha256": "0" * 64}) and not same_code(None)
