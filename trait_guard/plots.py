"""Figures for runs and benchmarks, as matplotlib :class:`~matplotlib.figure.Figure` objects.

What. :func:`plot_drift` (the CUSUM statistic per signal over steps, with its threshold and the
halt/alarm step), :func:`plot_trait_rates` (trait rate before/after with confidence intervals) and
:func:`plot_cell_shifts` (a red-team metric per grid cell). :func:`new_figure` is the blank figure
they all draw on.

Why. The same figures go to MLflow (:func:`trait_guard.tracking.summarize_guard`) and into the HTML
reports (:mod:`trait_guard.report`). Figures are built on the Agg canvas, outside pyplot's global
state, so plotting is safe in threads and on headless workers; matplotlib is imported only when a
figure is made.

Usage::

    from trait_guard.plots import plot_drift
    from trait_guard.tracking import decision_history

    plot_drift(decision_history(tracker.decisions), halt_step=12).savefig("drift.png")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["new_figure", "plot_cell_shifts", "plot_drift", "plot_trait_rates"]


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot's global state (safe in threads and headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_drift(history: Sequence[Mapping[str, Any]], thresholds: Mapping[str, float] | None = None,
               halt_step: int | None = None) -> Figure:
    """Per signal, the sequential test's statistic over steps (the CUSUM, or log10 of the e-process's
    running maximum), its threshold (dashed) and a vertical line at the halt/alarm step. ``history``
    items: ``{"step", "statistic": {signal: value}, "detector": "cusum" | "eprocess", "thresholds":
    {...}, "action"}`` (see :func:`trait_guard.tracking.decision_history`; older items say ``"cusum"``
    instead of ``"statistic"``); ``thresholds`` override the ones in the history."""
    rows = [{**h, "statistic": h.get("statistic") or h.get("cusum")} for h in history
            if h.get("statistic") or h.get("cusum")]
    signals = sorted({s for h in rows for s in h["statistic"]})
    label = "log10 E (e-process)" if any(h.get("detector") == "eprocess" for h in rows) else "CUSUM"
    limits: dict[str, float] = {}
    for h in rows:
        limits.update({k: v for k, v in (h.get("thresholds") or {}).items() if v is not None})
    limits.update(thresholds or {})
    if not signals:
        figure = new_figure(7, 2.5)
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, "no guard history", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return figure
    figure = new_figure(8, 1.2 + 1.7 * len(signals))
    axes = figure.subplots(len(signals), 1, sharex=True, squeeze=False)[:, 0]
    first_action = next((h["step"] for h in rows if str(h.get("action", "pass")).lower() != "pass"), None)
    for ax, signal in zip(axes, signals, strict=True):
        points = [(h["step"], h["statistic"][signal]) for h in rows
                  if h["statistic"].get(signal) is not None and h.get("step") is not None]
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        ax.plot(steps, values, color="tab:blue", lw=1.4, label=label)
        limit = limits.get(signal)
        if limit is not None and math.isfinite(limit):
            ax.axhline(limit, color="tab:red", ls="--", lw=1.2, label=f"threshold {limit:.3g}")
        if halt_step is not None:
            ax.axvline(halt_step, color="black", lw=1.2, label=f"halt/alarm @ {halt_step}")
        elif first_action is not None:
            ax.axvline(first_action, color="tab:orange", lw=1.2, label=f"action @ {first_action}")
        ax.set_ylabel(signal, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    axes[-1].set_xlabel("step")
    figure.suptitle("trait_guard: CUSUM per signal")
    return figure


def _rate_stats(stats: Mapping[str, Any]) -> tuple[float, float, float]:
    rate = float(stats["rate"])
    low = stats.get("ci_low")
    high = stats.get("ci_high")
    low = rate if low is None else float(low)
    high = rate if high is None else float(high)
    return rate, max(rate - low, 0.0), max(high - rate, 0.0)


def plot_trait_rates(before: Mapping[str, Any], after: Mapping[str, Any],
                     title: str = "trait rate before/after training") -> Figure:
    """Bars of the trait rate before and after, with their confidence intervals as error bars.
    Each of ``before``/``after`` is ``{"rate", "ci_low", "ci_high"}``, or ``{trait: such a dict}``
    for several traits (grouped bars)."""
    single = "rate" in before
    groups = {"": (before, after)} if single else {t: (before[t], after[t]) for t in before if t in after}
    figure = new_figure(max(4.0, 1.6 * len(groups) + 2), 3.5)
    ax = figure.add_subplot()
    width = 0.38
    top = 0.0
    for offset, (label, index, color) in zip((-width / 2, width / 2), (("before", 0, "tab:gray"),
                                                                       ("after", 1, "tab:red")), strict=True):
        xs, rates, lows, highs = [], [], [], []
        for i, pair in enumerate(groups.values()):
            rate, low, high = _rate_stats(pair[index])
            xs.append(i + offset)
            rates.append(rate)
            lows.append(low)
            highs.append(high)
        top = max([top] + [r + h for r, h in zip(rates, highs, strict=True)])
        bars = ax.bar(xs, rates, width=width, color=color, label=label, yerr=[lows, highs], capsize=4)
        ax.bar_label(bars, labels=[f"{r:.3g}" for r in rates], padding=2, fontsize=8)
    ax.set_xticks(range(len(groups)), [g or "trait" for g in groups])
    ax.set_ylabel("trait rate")
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return figure


def plot_cell_shifts(cells: Sequence[Mapping[str, Any]], metric: str, label: str) -> Figure:
    """One bar per red-team cell (``trait_guard.redteam`` results): ``cell[metric]``'s mean over seeds
    with its 95% t-interval as error bars; unguarded cells gray."""
    figure = new_figure(max(6.0, 0.45 * len(cells) + 2), 4.2)
    ax = figure.add_subplot()
    xs = range(len(cells))
    means = [c[metric]["mean"] if c.get(metric) else math.nan for c in cells]
    lows = [m - c[metric]["ci_low"] if c.get(metric) else 0.0 for m, c in zip(means, cells, strict=True)]
    highs = [c[metric]["ci_high"] - m if c.get(metric) else 0.0 for m, c in zip(means, cells, strict=True)]
    colors = ["tab:gray" if c["mode"] == "unguarded" else "tab:blue" for c in cells]
    ax.bar(xs, means, color=colors, yerr=[[max(v, 0) for v in lows], [max(v, 0) for v in highs]], capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(xs), [f"{c['teacher']}/{c['distill']}/{c['mode']}" for c in cells], rotation=75,
                  fontsize=7, ha="right")
    ax.set_ylabel(label)
    ax.set_title(f"{label} per cell (mean over seeds, 95% t-CI); gray: unguarded")
    ax.grid(axis="y", alpha=0.3)
    return figure
