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
    assert benign["k"] == 0 and benign["n"] == 5 and benign["ci"][0] == 0.0 and benign["ci"][1] == pytest.approx(1 - 0.025 ** (1 / 5))  # exact 0/5
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


def test_spearman_permutation_p_has_known_exact_values_and_its_sampled_form_agrees(monkeypatch):
    import numpy as np

    import trait_guard.validation as validation
    from trait_guard.validation import spearman_permutation_p

    # 3 datasets in the same order: 1 of the 3! orders has rho 1 (and 1 has rho -1)
    p = spearman_permutation_p(np.array([0.1, 0.5, 0.9]), np.array([2.0, 3.0, 7.0]))
    assert p["exact"] and p["orders"] == 6
    assert p["greater"] == pytest.approx(1 / 6) and p["two-sided"] == pytest.approx(2 / 6) and p["less"] == 1.0
    # 7 datasets in reverse order: the one most extreme order of 5,040 on the negative side
    reverse = spearman_permutation_p(np.arange(7.0), -np.arange(7.0) ** 2)
    assert reverse["less"] == pytest.approx(1 / 5040) and reverse["greater"] == 1.0
    # ties keep average ranks: y's two tied values make orders that swap them count as the same
    tied = spearman_permutation_p(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0]))
    assert tied["greater"] == pytest.approx(2 / 6)
    # 8 datasets: the sampled test (forced) agrees with the exact one within its Monte Carlo error
    rng = np.random.default_rng(3)
    x = rng.normal(size=8)
    y = x + rng.normal(size=8)
    exact = spearman_permutation_p(x, y)
    assert exact["exact"] and exact["orders"] == 40320 and 0.001 < exact["two-sided"] < 0.5
    monkeypatch.setattr(validation, "EXACT_PERMUTATION_LIMIT", 1)
    sampled = spearman_permutation_p(x, y, n_resamples=20_000, seed=1)
    assert not sampled["exact"] and sampled["orders"] == 20_000
    for side in ("two-sided", "less", "greater"):
        tolerance = 4 * math.sqrt(exact[side] * (1 - exact[side]) / 20_000) + 1e-4
        assert sampled[side] == pytest.approx(exact[side], abs=tolerance)


def test_held_out_replicates_against_the_excess(grid):
    rows = {r["signal"]: r for r in signal_validation(
        [r for r in dataset_records(grid) if r["teacher"] == "owl-adapter" and r["replicate"] in (1, 2, 3, 4)],
        n_boot=200, transfer="excess")}
    tracking = rows["tracking"]
    # replicates 1-4: the tracking signal orders the excesses exactly; 1 of 4! orders is as extreme
    assert tracking["datasets"] == 4 and tracking["transfer"] == "excess" and tracking["spearman"] == pytest.approx(1.0)
    assert tracking["spearman_p"]["greater"] == pytest.approx(1 / 24) and tracking["spearman_p"]["exact"]
    assert "Spearman rho with excess" in markdown_table(list(rows.values()), 0.5)
    with pytest.raises(ValueError, match="transfer must be one of"):
        signal_validation(dataset_records(grid), transfer="shift")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "signal_vs_transfer.py"
    done = subprocess.run([sys.executable, str(script), str(grid), "--teacher", "owl-adapter", "--transfer", "excess",
                           "--replicates", "1", "2", "3", "4", "--out", str(grid / "h.json")],
                          capture_output=True, text=True, check=True)
    saved = json.loads((grid / "h.json").read_text())
    assert [r["replicate"] for r in saved["datasets"]] == [1, 2, 3, 4] and saved["transfer"] == "excess"
    assert saved["replicates"] == [1, 2, 3, 4] and "owl-adapter s0" not in done.stdout
    assert str(grid) not in saved["command"] and saved["grid"] == f"<outside>/{grid.name}"  # no machine paths


def test_a_restored_grid_takes_its_gate_signals_from_an_earlier_output(grid, tmp_path):
    """Runs restored from a results JSON have no summary.json: their datasets' signals come from an
    earlier signal_vs_transfer output, while the grid's own newer runs keep theirs."""
    from trait_guard.validation import merge_dataset_records

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "signal_vs_transfer.py"
    subprocess.run([sys.executable, str(script), str(grid), "--out", str(tmp_path / "earlier.json")],
                   capture_output=True, text=True, check=True)
    earlier = json.loads((tmp_path / "earlier.json").read_text())["datasets"]
    for summary in grid.glob("runs/*-s[0-2]/summary.json"):  # replicates 0-2 restored: no summaries
        summary.unlink()
    current = dataset_records(grid)
    assert not next(r for r in current if (r["teacher"], r["replicate"]) == ("owl-adapter", 1))["signals"]
    merged = {(r["teacher"], r["replicate"]): r for r in merge_dataset_records(current, earlier)}
    assert len(merged) == 12
    assert merged[("owl-adapter", 1)]["signals"]["tracking"]["effect_size"] == pytest.approx(2.0 * 0.3 + 0.5)
    # a current record with signals wins over the earlier one; a dataset only the earlier output has is kept
    changed = [dict(r, signals={"tracking": {"effect_size": -9.0}}) if r["replicate"] == 3 else r for r in earlier]
    kept = {(r["teacher"], r["replicate"]): r for r in merge_dataset_records(current, changed)}
    assert kept[("owl-adapter", 3)]["signals"]["tracking"]["effect_size"] == pytest.approx(2.0 * 0.9 + 0.5)
    only_earlier = merge_dataset_records([], earlier)
    assert [(r["teacher"], r["replicate"]) for r in only_earlier] == sorted((r["teacher"], r["replicate"]) for r in earlier)
    done = subprocess.run([sys.executable, str(script), str(grid), "--add-datasets", str(tmp_path / "earlier.json"),
                           "--out", str(tmp_path / "merged.json")], capture_output=True, text=True, check=True)
    assert "owl-adapter s1: panel shift +0.300, excess +0.380, gate clean" in done.stdout
    saved = json.loads((tmp_path / "merged.json").read_text())
    assert saved["added_datasets_from"] == ["<outside>/earlier.json"] and len(saved["datasets"]) == 12


def test_a_group_comparison_has_the_exact_mann_whitney_answer(grid):
    """--compare owl-adapter@1,2,3 control: on 'tracking' every owl dataset is above every control
    (U 15/15, p 1 / C(8, 3)); on 'noise' U and p equal a count over all 56 arrangements of the labels;
    'constant' (infinite effect sizes) has no finite values and is left out."""
    import itertools

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "signal_vs_transfer.py"
    done = subprocess.run([sys.executable, str(script), str(grid), "--compare", "owl-adapter@1,2,3", "control",
                           "--replicates", "0", "--out", str(grid / "c.json")], capture_output=True, text=True, check=True)
    tests = {t["signal"]: t for t in json.loads((grid / "c.json").read_text())["compare"]["tests"]}
    assert set(tests) == {"tracking", "noise"}
    assert tests["tracking"]["u"] == 15 and tests["tracking"]["u_max"] == 15
    assert tests["tracking"]["p"] == pytest.approx(1 / math.comb(8, 3))
    high, low = [-0.2, 0.5, 0.1], [0.2, 0.6, -0.3, 0.0, 0.4]  # the fixture's noise values, replicates 1-3 vs 0-4
    assert sorted(tests["noise"]["high"].values()) == sorted(high) and len(tests["noise"]["low"]) == 5
    values = high + low

    def u(chosen):  # pairs (chosen, other) where the chosen dataset is larger (no ties in the fixture)
        return sum(values[i] > values[j] for i in chosen for j in range(8) if j not in chosen)

    counts = [u(chosen) for chosen in itertools.combinations(range(8), 3)]
    observed = u((0, 1, 2))
    assert tests["noise"]["u"] == observed == 7
    assert tests["noise"]["p"] == pytest.approx(sum(c >= observed for c in counts) / len(counts))
    assert "| tracking | 15 / 15 |" in done.stdout  # --replicates limits the table's datasets, not the groups
    bad = subprocess.run([sys.executable, str(script), str(grid), "--compare", "owl-adapter@one", "control"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "TEACHER@R,R" in bad.stderr
    missing = subprocess.run([sys.executable, str(script), str(grid), "--compare", "eagle", "control",
                              "--out", str(grid / "m.json")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no signal has datasets in both groups" in missing.stderr
