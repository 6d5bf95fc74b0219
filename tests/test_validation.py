"""Signals against measured transfer (trait_guard.validation): known answers on a synthetic grid folder
laid out as benchmarks/redteam.py writes it, and the benchmark script on it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trait_guard.validation import auroc, dataset_records, markdown_table, signal_validation

SHIFTS = [0.0, 0.3, 0.6, 0.9, 1.2, 1.5]  # the owl-adapter datasets' panel shift, by replicate


def control_shift(seed):
    return 0.02 * seed - 0.1  # small drifts of the control students, below every owl dataset's


def _run(out, name, teacher, mode, seed, shift, gate=None):
    folder = out / "runs" / name
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"name": name, "teacher": teacher, "distill": "logits",
                                                    "mode": mode, "seed": seed, "panel_shift": shift,
                                                    "updates": 0 if gate and gate["flagged"] else 12}))
    if mode != "unguarded":
        (folder / "summary.json").write_text(json.dumps({"gate": gate}))


def _gate(tracking, noise, flagged):
    """A gate record: 'tracking' and 'noise' with finite effect sizes, and 'constant' (a signal constant on
    the reference, as divergence is: infinite effect size) whose p falls as the tracking signal grows."""
    return {"flagged": flagged, "tests": {"tracking": {"effect_size": tracking, "p": 0.0005, "p_adj": 0.001 if flagged else 0.5,
                                                      "flagged": flagged},
                                         "noise": {"effect_size": noise, "p": 0.3, "p_adj": 0.9, "flagged": False},
                                         "constant": {"effect_size": math.inf, "p": 10.0 ** -tracking, "p_adj": 0.5,
                                                      "flagged": False}}}


@pytest.fixture
def grid(tmp_path):
    """Six replicates: the owl adapter's datasets transfer 0 to 1.5 nats; a 'tracking' signal grows with
    the shift (flagged above 0.5 nats), a 'noise' signal does not; controls shift -0.1 to 0, never flagged.
    Replicate 5 has no guarded run yet (no gate record)."""
    (tmp_path / "config.json").write_text(json.dumps({"teachers": [
        {"id": "owl-adapter", "install": "adapter"}, {"id": "control", "install": "none"}]}))
    for seed, shift in enumerate(SHIFTS):
        _run(tmp_path, f"owl-adapter-logits-unguarded-s{seed}", "owl-adapter", "unguarded", seed, shift)
        _run(tmp_path, f"control-logits-unguarded-s{seed}", "control", "unguarded", seed, control_shift(seed))
        if seed < 5:
            _run(tmp_path, f"owl-adapter-logits-halt-s{seed}", "owl-adapter", "halt", seed, 0.0,
                 _gate(2.0 * shift + 0.5, [0.3, -0.2, 0.5, 0.1, -0.4][seed], shift > 0.5))
            _run(tmp_path, f"control-logits-halt-s{seed}", "control", "halt", seed, 0.0,
                 _gate(0.05 * seed, [0.2, 0.6, -0.3, 0.0, 0.4][seed], False))
    return tmp_path


def test_records_pair_each_dataset_with_its_transfer_and_its_gate(grid):
    records = {(r["teacher"], r["replicate"]): r for r in dataset_records(grid)}
    assert len(records) == 12
    owl = records[("owl-adapter", 3)]
    assert owl["panel_shift"] == 0.9 and owl["excess"] == pytest.approx(0.9 - control_shift(3))
    assert owl["signals"]["tracking"] == {"effect_size": 2.3, "p": 0.0005, "p_adj": 0.001, "flagged": True}
    assert owl["gate_flagged"]
    assert records[("control", 3)]["excess"] is None and records[("control", 3)]["control"]
    assert records[("owl-adapter", 5)]["signals"] == {} and records[("owl-adapter", 5)]["gate_flagged"] is None


def test_a_tracking_signal_validates_and_a_noise_signal_does_not(grid):
    rows = {r["signal"]: r for r in signal_validation(dataset_records(grid), threshold=0.5, n_boot=500)}
    tracking, noise, constant = rows["tracking"], rows["noise"], rows["constant"]
    # its effect size is infinite: the datasets are ordered by -log10 p instead, which tracks the shift here
    assert constant["value"] == "log10p" and tracking["value"] == "effect_size"
    assert constant["datasets"] == 10 and constant["spearman"] == pytest.approx(1.0)
    assert tracking["datasets"] == noise["datasets"] == 10  # replicate 5 has no gate record
    # the tracking signal is an increasing function of the shift over all ten datasets: rho 1
    assert tracking["spearman"] == pytest.approx(1.0) and tracking["auroc"] == 1.0
    assert tracking["spearman_ci"][0] <= tracking["spearman"] <= tracking["spearman_ci"][1]
    assert abs(noise["spearman"]) < 0.6 and noise["auroc"] < 0.9
    assert tracking["flagged_transferring"]["k"] == tracking["flagged_transferring"]["n"] == 3  # 0.6, 0.9, 1.2
    benign = tracking["flagged_benign"]
    assert benign["k"] == 0 and benign["n"] == 5 and benign["ci"][0] == 0.0 and benign["ci"][1] == pytest.approx(0.522, abs=1e-3)
    table = markdown_table(list(rows.values()), 0.5)
    assert "| tracking (effect_size) | 10 |" in table and "3/3" in table


def test_auroc_counts_ties_half():
    import numpy as np

    # pairs (1, 0) > , (1, 2) < , (2, 0) > , (2, 2) tie: (1 + 0 + 1 + 0.5) / 4
    assert auroc(np.array([1.0, 2.0]), np.array([0.0, 2.0])) == 0.625
    assert math.isnan(auroc(np.array([]), np.array([1.0])))
    assert auroc(np.array([3.0, np.nan]), np.array([1.0, 2.0])) == 1.0  # NaN left out


def test_the_benchmark_script_writes_its_results(grid):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "signal_vs_transfer.py"
    done = subprocess.run([sys.executable, str(script), str(grid), "--out", str(grid / "v.json")],
                          capture_output=True, text=True, check=True)
    saved = json.loads((grid / "v.json").read_text())
    assert len(saved["datasets"]) == 12 and {r["signal"] for r in saved["signals"]} == {"tracking", "noise", "constant"}
    assert "owl-adapter s3: panel shift +0.900, excess +0.940, gate FLAGGED" in done.stdout
    empty = subprocess.run([sys.executable, str(script), str(grid / "nothing")], capture_output=True, text=True)
    assert empty.returncode == 1 and "no finished unguarded logits run" in empty.stderr
