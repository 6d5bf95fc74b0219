"""Detection signals against measured transfer, across the red-team's datasets (issue 15).

A signal is worth watching if datasets that move a student's trait more also score higher on it.
The red-team grid (:mod:`trait_guard.redteam`) gives both per dataset, that is per (teacher,
replicate): each replicate generates its own data, so the datasets are independent units.

* **The signal's value** is read from the gate record of a guarded run on that dataset
  (``runs/<name>/summary.json``: the dataset screen on all training rows against the reference,
  with each signal's effect size, standardized on the reference and signed so that "suspicious" is
  positive, and its Holm-adjusted p). Unguarded runs have no gate; any guarded run of the same
  teacher, distillation and replicate trains on the same rows against the same reference.
* **The transfer** is the unguarded run's panel log-odds shift (the student's target log-odds against
  the animal panel on held-out questions, after minus before), and its excess over the control
  teacher's unguarded run of the same replicate (the same number of updates).

:func:`dataset_records` gathers the pairs, :func:`signal_validation` computes per signal the Spearman
correlation with the transfer (with a bootstrap interval over datasets), the AUROC for "transfers
more than ``threshold`` nats" and the flag rates among transferring and benign datasets.
``benchmarks/signal_vs_transfer.py`` runs it on a grid's output folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def dataset_records(out_dir: str | Path, distill: str = "logits") -> list[dict[str, Any]]:
    """One record per (teacher, replicate) with an unguarded run: the transfer it caused
    (``panel_shift``; ``excess`` over the same replicate's control teacher, None for a control or
    without one) and the gate's per-signal effect sizes and flags from a guarded run on the same data
    (``signals`` empty when no guarded run exists yet)."""
    out = Path(out_dir)
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    results = [r for r in results if r.get("distill") == distill]
    unguarded = {(r["teacher"], r["seed"]): r for r in results if r["mode"] == "unguarded"}
    gates: dict[tuple[str, int], dict[str, Any]] = {}
    for r in results:
        if r["mode"] == "unguarded" or (r["teacher"], r["seed"]) in gates:
            continue
        summary_path = out / "runs" / r["name"] / "summary.json"
        gate = json.loads(summary_path.read_text()).get("gate") if summary_path.is_file() else None
        if gate:
            gates[(r["teacher"], r["seed"])] = gate
    controls = _control_teachers(out)
    records = []
    for (teacher, seed), run in sorted(unguarded.items()):
        control = next((unguarded[(c, seed)] for c in controls if c != teacher and (c, seed) in unguarded), None)
        shift = _finite(run.get("panel_shift"))
        excess = (shift - _finite(control.get("panel_shift"))
                  if control is not None and teacher not in controls and shift is not None
                  and _finite(control.get("panel_shift")) is not None else None)
        gate = gates.get((teacher, seed)) or {}
        records.append({
            "teacher": teacher, "replicate": seed, "control": teacher in controls,
            "updates": run.get("updates"), "panel_shift": shift, "excess": excess,
            "signals": {name: {"effect_size": _finite(t.get("effect_size")), "p": _finite(t.get("p")),
                               "p_adj": _finite(t.get("p_adj")), "flagged": bool(t.get("flagged"))}
                        for name, t in (gate.get("tests") or {}).items()},
            "gate_flagged": bool(gate.get("flagged")) if gate else None,
        })
    return records


def merge_dataset_records(current: Sequence[dict[str, Any]],
                          recorded: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``current`` (:func:`dataset_records` of a grid folder) completed by ``recorded`` (the ``datasets``
    of an earlier ``signal_vs_transfer`` JSON): a (teacher, replicate) missing from ``current``, or there
    without the gate's signals (its run folders restored from a results JSON, which keeps no
    summary.json), is taken from ``recorded``. A current record with signals always wins. Sorted by
    (teacher, replicate)."""
    merged = {(r["teacher"], r["replicate"]): r for r in recorded}
    for r in current:
        key = (r["teacher"], r["replicate"])
        if r.get("signals") or key not in merged:
            merged[key] = r
    return [merged[key] for key in sorted(merged)]


def _control_teachers(out: Path) -> list[str]:
    """The grid's control teachers (``install: none``), from the config it recorded."""
    config_path = out / "config.json"
    if not config_path.is_file():
        return ["control"]
    teachers = json.loads(config_path.read_text()).get("teachers", [])
    return [t["id"] for t in teachers if t.get("install", "none") == "none"]


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


#: the transfer a signal is set against: the student's panel shift, or its excess over the control
#: teacher's student of the same replicate (same updates; None for the controls themselves)
TRANSFER_MEASURES = ("panel_shift", "excess")


def signal_validation(records: Sequence[dict[str, Any]], *, threshold: float = 0.5, n_boot: int = 2000,
                      seed: int = 0, transfer: str = "panel_shift") -> list[dict[str, Any]]:
    """Per signal, over the datasets that have both its value and a transfer (``transfer``: the record's
    ``panel_shift`` or its ``excess``); the value is the gate's effect size, or ``-log10 p`` of its test
    for a signal whose effect size is infinite on some dataset (constant on the reference; the row's
    ``value`` says which): Spearman's rho with its 95% percentile bootstrap interval (datasets
    resampled) and its permutation p-values (:func:`spearman_permutation_p`), the AUROC of the
    effect size for "transfer > ``threshold``" with its bootstrap interval, the flag rate among
    datasets that transferred more than ``threshold`` and among benign ones (no trait teacher:
    controls, and any with ``excess`` not above 0), each with an exact Clopper-Pearson interval."""
    if transfer not in TRANSFER_MEASURES:
        raise ValueError(f"transfer must be one of {TRANSFER_MEASURES}, got {transfer!r}")
    names = sorted({name for r in records for name in r["signals"]})
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        measured = [r for r in records if r[transfer] is not None and name in r["signals"]]
        # a signal constant on the reference (divergence: 0 on the base model's own data) has an
        # infinite effect size; its evidence, -log10 p of the gate's test, still orders the datasets
        value = "effect_size" if all(r["signals"][name]["effect_size"] is not None for r in measured) else "log10p"
        usable = [r for r in measured if _value(r["signals"][name], value) is not None]
        rows.append({**_signal_row(name, usable, value, transfer, threshold, n_boot, rng), "value": value})
    return rows


def _value(test: dict[str, Any], kind: str) -> float | None:
    """A dataset's value of one signal: its effect size, or ``-log10 p`` (``kind`` ``log10p``)."""
    if kind == "effect_size":
        return test["effect_size"]
    return -math.log10(max(test["p"], 1e-300)) if test.get("p") is not None else None


def _signal_row(name: str, usable: Sequence[dict[str, Any]], value: str, transfer: str, threshold: float,
                n_boot: int, rng: np.random.Generator) -> dict[str, Any]:
    """One signal's row of :func:`signal_validation` over the datasets ``usable`` (values: ``value``)."""
    from scipy.stats import spearmanr

    x = np.array([_value(r["signals"][name], value) for r in usable])
    y = np.array([r[transfer] for r in usable])
    row: dict[str, Any] = {"signal": name, "datasets": len(usable), "transfer": transfer}
    if len(usable) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        row["spearman"] = float(spearmanr(x, y).statistic)
        row["spearman_ci"] = _bootstrap(lambda i: spearmanr(x[i], y[i]).statistic, len(usable), n_boot, rng)
        row["spearman_p"] = spearman_permutation_p(x, y, seed=int(rng.integers(2**31)))
    positive = y > threshold  # "transferred": more than threshold nats of the chosen measure
    if positive.any() and (~positive).any():
        row["auroc"] = auroc(x[positive], x[~positive])
        row["auroc_ci"] = _bootstrap(lambda i: auroc(x[i][positive[i]], x[i][~positive[i]]), len(usable),
                                     n_boot, rng)
    flagged = np.array([r["signals"][name]["flagged"] for r in usable], dtype=bool)
    benign = np.array([r["control"] or (r["excess"] is not None and r["excess"] <= 0) for r in usable], dtype=bool)
    row["flagged_transferring"] = _rate(int(flagged[positive].sum()), int(positive.sum()))
    row["flagged_benign"] = _rate(int(flagged[benign].sum()), int(benign.sum()))
    return row


#: the most orders :func:`spearman_permutation_p` enumerates before it samples instead (8! = 40,320)
EXACT_PERMUTATION_LIMIT = 40_320


def spearman_permutation_p(x: np.ndarray, y: np.ndarray, *, n_resamples: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """P-values of Spearman's rho between ``x`` and ``y`` under the null that their pairing is random:
    ``two-sided`` (|rho| at least as large), ``less`` (alternative rho < 0) and ``greater`` (rho > 0).
    Exact, every order of ``y`` enumerated (``exact`` True), up to 8 datasets; beyond that
    ``n_resamples`` random orders, p = (1 + hits) / (1 + n_resamples). Ties keep their average ranks.
    With few datasets the smallest possible p is large (3 datasets: 1/6 one-sided), which is why the
    number of orders is reported beside it."""
    from itertools import permutations

    from scipy.stats import rankdata

    rx, ry = rankdata(np.asarray(x, float)), rankdata(np.asarray(y, float))
    n = len(rx)
    exact = math.factorial(n) <= EXACT_PERMUTATION_LIMIT
    if exact:
        orders = np.array(list(permutations(ry)), dtype=float)
    else:
        rng = np.random.default_rng(seed)
        orders = np.array([rng.permutation(ry) for _ in range(n_resamples)])

    def rho(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # Pearson on ranks, b one order per row
        a, b = a - a.mean(), b - b.mean(axis=-1, keepdims=True)
        return (b @ a) / np.sqrt((a @ a) * (b * b).sum(axis=-1))

    observed, null = float(rho(rx, ry[None, :])[0]), rho(rx, orders)
    tolerance = 1e-9  # equal orders must count as "as extreme" despite rounding
    hits = {"two-sided": np.abs(null) >= abs(observed) - tolerance,
            "less": null <= observed + tolerance, "greater": null >= observed - tolerance}
    if exact:
        p_values = {k: float(v.mean()) for k, v in hits.items()}
    else:
        p_values = {k: float((1 + v.sum()) / (1 + n_resamples)) for k, v in hits.items()}
    return {"exact": exact, "orders": len(orders), **p_values}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half (the Mann-Whitney U / n1 n0), on the
    finite values; NaN when a class has none."""
    from scipy.stats import rankdata

    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    positive, negative = positive[np.isfinite(positive)], negative[np.isfinite(negative)]
    n1, n0 = len(positive), len(negative)
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(np.concatenate([positive, negative]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc_bootstrap_ci(positive: np.ndarray, negative: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95% percentile bootstrap interval of the per-sample :func:`auroc`, each class resampled with
    replacement (finite values only)."""
    rng = np.random.default_rng(seed)
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    positive, negative = positive[np.isfinite(positive)], negative[np.isfinite(negative)]
    values = [auroc(rng.choice(positive, len(positive)), rng.choice(negative, len(negative))) for _ in range(n_boot)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _bootstrap(statistic: Any, n: int, n_boot: int, rng: np.random.Generator) -> list[float]:
    """The 95% percentile interval of ``statistic(indices)`` over resamples of the n datasets (resamples
    where it is undefined are skipped)."""
    import warnings

    values = []
    for _ in range(n_boot):
        with warnings.catch_warnings():  # a resample of tied values leaves the statistic undefined: skipped
            warnings.simplefilter("ignore")
            value = statistic(rng.integers(0, n, n))
        if value is not None and math.isfinite(value):
            values.append(value)
    if not values:
        return [math.nan, math.nan]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def _rate(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` with its exact 95% Clopper-Pearson interval (None without datasets)."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci": None}
    from trait_guard.evaluate import exact_interval

    return {"k": k, "n": n, "rate": k / n, "ci": list(exact_interval(k, n))}


def markdown_table(rows: Sequence[dict[str, Any]], threshold: float) -> str:
    """The validation table for docs/detection.md (its transfer measure from the rows')."""

    def fmt(value: Any, ci: Any = None) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and all(math.isfinite(c) for c in ci) else "")

    def rate(r: dict[str, Any]) -> str:
        return "-" if not r["n"] else f"{r['k']}/{r['n']} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"

    def p_value(r: dict[str, Any]) -> str:
        p = r.get("spearman_p")
        return "-" if p is None else f"{p['two-sided']:.2g}" + ("" if p["exact"] else " (sampled)")

    measure = {"panel_shift": "shift", "excess": "excess"}[rows[0].get("transfer", "panel_shift")] if rows else "shift"
    lines = [f"| signal (value) | datasets | Spearman rho with {measure} [95% CI] | p (permutation, two-sided) | "
             f"AUROC ({measure} > {threshold}) [95% CI] | flagged, {measure} > {threshold} | flagged, benign |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['signal']} ({r.get('value', 'effect_size')}) | {r['datasets']} | "
                     f"{fmt(r.get('spearman'), r.get('spearman_ci'))} | {p_value(r)} | "
                     f"{fmt(r.get('auroc'), r.get('auroc_ci'))} | {rate(r['flagged_transferring'])} | "
                     f"{rate(r['flagged_benign'])} |")
    return "\n".join(lines)
