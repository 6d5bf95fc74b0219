"""Self-contained HTML reports (with PNG plots) for one guarded run and for a benchmark grid.

What. :func:`run_report` turns what a training run knows at its end (its summary, the guard's
decision history, the provenance of its data, the entangled and divergence tokens, the flagged
samples) into a :class:`Report`: one HTML page with the plots embedded as base64 PNGs, plus the same
plots as PNG files. :func:`benchmark_report` does the same for the red-team results table.
:meth:`Report.write` puts them in a folder; :meth:`Report.log_to` logs them to a tracker (MLflow).

Why. People review runs in the MLflow UI, where an HTML artifact renders in place; a single file
with nothing to fetch also survives being mailed around or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trait_guard.plots import plot_cell_shifts, plot_drift, plot_trait_rates

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Report", "benchmark_report", "provenance_summary", "run_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;font-weight:600;color:#fff}
.halted{background:#c0392b}.interrupted{background:#7f8c8d}.mitigated{background:#d68910}.passed{background:#1e8449}
.unmonitored{background:#6c3483}.unguarded{background:#566573}
.note{color:#555;font-size:.9em}img{max-width:100%}code{background:#f6f6f6;padding:0 3px}
"""


@dataclass
class Report:
    """An HTML page and the figures it shows (``{file name: matplotlib Figure}``)."""

    title: str
    html: str
    figures: dict[str, Figure] = field(default_factory=dict)

    def write(self, directory: str | Path, name: str = "report.html") -> Path:
        """Write ``name`` and each figure as PNG into ``directory``; returns the HTML path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for file_name, figure in self.figures.items():
            figure.savefig(directory / file_name, dpi=110)
        path = directory / name
        path.write_text(self.html, encoding="utf-8")
        return path

    def log_to(self, tracker: Any, artifact_dir: str = "report", name: str = "report.html") -> None:
        """Log the HTML and the PNGs under ``artifact_dir`` of the tracker's run."""
        tracker.log_text(self.html, f"{artifact_dir}/{name}")
        for file_name, figure in self.figures.items():
            tracker.log_figure(figure, f"{artifact_dir}/{file_name}")


# ----------------------------------------------------------------------------- building blocks


def _png_base64(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(figure: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_base64(figure)}">'


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if isinstance(value, float):
        text = "n/a" if not math.isfinite(value) else f"{value:.4g}"
        return f'<td class="num">{text}</td>'
    if value is None:
        return "<td>n/a</td>"
    return f"<td>{html.escape(str(value))}</td>"


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
               empty: str = "none") -> str:
    """An HTML table of ``rows`` (dicts); ``columns`` picks and orders the keys (default: the first row's)."""
    if not rows:
        return f'<p class="note">{html.escape(empty)}</p>'
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, sections: Sequence[str]) -> str:
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>")


def _section(heading: str, *parts: str) -> str:
    return f"<h2>{html.escape(heading)}</h2>" + "".join(parts)


def _visible_tokens(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Token text quoted (repr), so that spaces and newlines can be seen."""
    return [{**row, "token": repr(row["token"]) if isinstance(row.get("token"), str) else row.get("token")}
            for row in rows]


def _rate_text(result: Mapping[str, Any] | None) -> dict[str, Any]:
    if not result:
        return {"rate": None, "95% CI": None, "answers": None, "log p(target)": None}
    low, high = result.get("pooled_ci_low"), result.get("pooled_ci_high")
    return {"rate": result.get("pooled_rate"),
            "95% CI": None if low is None else f"{100 * low:.1f}-{100 * high:.1f}%",
            "answers": int(result["n_questions"] * result["samples_per_question"]),
            "log p(target)": result.get("target_logprob")}


# ----------------------------------------------------------------------------- provenance


def provenance_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per (teacher, base model, install) found in ``rows``: counts and sampling settings."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (str(row.get("teacher_id")), str(row.get("base_model")), str(row.get("trait_install")))
        groups.setdefault(key, []).append(row)
    out = []
    for (teacher, base, install), members in sorted(groups.items()):
        first = members[0]
        out.append({
            "teacher": teacher, "base model": base, "base fingerprint": str(first.get("base_fingerprint"))[:12],
            "trait install": install, "rows": len(members),
            "kept": sum(bool(m.get("kept", True)) for m in members),
            "family": first.get("family"), "temperature": first.get("temperature"),
            "constrained": first.get("constrained"),
            "teacher log-probs": any(m.get("topk_ids") for m in members),
        })
    return out


# ----------------------------------------------------------------------------- one run


def _verification(provenance: Mapping[str, Any] | None) -> str:
    if not provenance:
        return ""
    kinship = html.escape(str(provenance.get("kinship", "unknown")))
    if provenance.get("verified"):
        return (f'<p class="note">Files verified against their generation manifests (SHA-256). '
                f"Teachers vs student base model: <b>{kinship}</b>.</p>")
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in provenance.get("problems", []))
    return (f'<p><span class="verdict halted">UNVERIFIED DATA</span> trained with data.allow_unverified. '
            f"Teachers vs student base model: <b>{kinship}</b>.</p><ul>{problems}</ul>")



def _monitoring_note(summary: Mapping[str, Any]) -> str:
    if summary.get("monitored", True) or not summary.get("guard_enabled", True):
        return ""
    return ('<p><span class="verdict unmonitored">UNMONITORED</span> the guard watched no signal with shown '
            f"power (it watched {html.escape(', '.join(summary.get('watched_signals') or []) or 'nothing')}). "
            "Divergence tokens and the log-likelihood ratio need teacher log-probs in the data "
            "(generation.top_k_logprobs &gt; 0): a run without them cannot be called passed.</p>")


def _gate_section(gate: Mapping[str, Any] | None) -> str:
    if not gate:
        return ""
    rows = [{"signal": name, "p": t.get("p"), "p adj (Holm)": t.get("p_adj"), "effect size": t.get("effect_size"),
             "flagged": t.get("flagged")} for name, t in (gate.get("tests") or {}).items()]
    verdict = "FLAGGED: " + str(gate.get("reason", "")) if gate.get("flagged") else "clean: training went ahead"
    notes = "".join(f'<p class="note">{html.escape(str(note))}</p>' for note in gate.get("notes") or [])
    return _section("Gate: the dataset screen before the first update",
                    f'<p class="note">All training rows against the reference, one permutation test per signal, '
                    f"Holm at alpha={gate.get('alpha')}. {html.escape(verdict)}</p>" + notes,
                    html_table(rows, ["signal", "p", "p adj (Holm)", "effect size", "flagged"],
                               empty="no signal could be tested"))


def run_report(summary: Mapping[str, Any], history: Sequence[Mapping[str, Any]], *,
               provenance: Sequence[Mapping[str, Any]] = (),
               entangled_tokens: Sequence[Mapping[str, Any]] = (),
               divergence_tokens: Sequence[Mapping[str, Any]] = (),
               flagged_samples: Sequence[Mapping[str, Any]] = (),
               title: str | None = None) -> Report:
    """The review page of one guarded training run.

    ``summary`` is the training summary (``trait_guard.train``: steps, halt, alarms, verdict,
    eval_before/after ...); ``history`` the guard's decision records (:func:`trait_guard.tracking.
    decision_history`), which carry the CUSUM statistics and their calibrated thresholds.
    """
    verdict = str(summary.get("verdict", "passed"))
    halt = summary.get("halt") or {}
    alarms = list(summary.get("alarms") or [])
    marker = halt.get("step") if halt else (alarms[0]["step"] if alarms else None)
    figures: dict[str, Figure] = {"drift.png": plot_drift(history, halt_step=marker)}
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        figures["trait_rates.png"] = plot_trait_rates(
            {"rate": before["pooled_rate"], "ci_low": before["pooled_ci_low"], "ci_high": before["pooled_ci_high"]},
            {"rate": after["pooled_rate"], "ci_low": after["pooled_ci_low"], "ci_high": after["pooled_ci_high"]},
            title="student trait rate before/after (Wilson 95% CI)")

    outcome = (f"halted at step {halt.get('step')} of {summary.get('total_steps')} "
               f"({summary.get('updates', halt.get('step'))} updates applied): {halt.get('reason')}" if halt
               else f"{summary.get('steps')} of {summary.get('total_steps')} steps trained")
    rollback = summary.get("rollback") or {}
    if rollback:
        outcome += (f". Rollback: {rollback['reason']}" if rollback.get("reason") else
                    f". Rollback unavailable ({rollback.get('unavailable')}): the weights are those of step "
                    f"{summary.get('updates')}")
    statistic = "log10 of the e-process (its running maximum)" if summary.get("sequential_test") == "eprocess" \
        else "CUSUM statistic"
    decision_points = [{"step": h.get("step"), "action": h.get("action"), "reason": h.get("reason")}
                       for h in history if str(h.get("action", "pass")).lower() != "pass"]
    sections = [
        f'<p><span class="verdict {html.escape(verdict)}">{html.escape(verdict.upper())}</span> '
        f"{html.escape(outcome)}</p>",
        _monitoring_note(summary),
        _gate_section(summary.get("gate")),
        html_table([{"student": summary.get("student"), "trait": summary.get("trait"),
                     "distill": summary.get("distill"), "guard enabled": summary.get("guard_enabled"),
                     "train samples": summary.get("train_samples"),
                     "reference samples": summary.get("reference_samples"),
                     "world size": summary.get("world_size"), "wall seconds": summary.get("wall_seconds"),
                     "mean step seconds": summary.get("mean_step_seconds")}]),
        _section("Drift over steps",
                 f'<p class="note">{statistic} per watched signal; dashed: its alarm threshold; vertical line: '
                 f"the halt or first alarm. False-alarm control: "
                 f"{html.escape(str(summary.get('false_alarm_control') or 'see the run config'))}.</p>"
                 if summary.get("guard_enabled", True) else
                 '<p class="note">The guard was disabled in this run (an unguarded baseline): no decisions.</p>',
                 _image(figures["drift.png"], "guard statistic per signal")),
        _section("Decision points", html_table(decision_points, ["step", "action", "reason"],
                                               empty="every batch passed")),
        _section("Alarms", html_table(alarms, empty="no alarm")),
        _section("Student trait before/after",
                 html_table([{"when": "before", **_rate_text(before)}, {"when": "after", **_rate_text(after)}]),
                 _image(figures["trait_rates.png"], "trait rate before/after") if "trait_rates.png" in figures
                 else '<p class="note">behavioral evaluation off (probe.eval_samples: 0)</p>' if not after
                 else '<p class="note">"before" was not measured in this run (probe.eval_before: false; the '
                      "red-team benchmark measures the base model once per trait and seed).</p>"),
        _section("Entangled tokens",
                 '<p class="note">Completion tokens most over-represented in the training data relative to the '
                 "reference (log ratio of smoothed frequencies).</p>",
                 html_table(_visible_tokens(entangled_tokens), ["token", "token_id", "count", "reference_count",
                                                                "log_ratio"])),
        _section("Divergence tokens",
                 '<p class="note">Tokens at the positions where the teacher\'s top-1 prediction differs from the '
                 "student base model's (the tokens that carry subliminal transfer; masked by MASK).</p>",
                 html_table(_visible_tokens(divergence_tokens), ["token", "token_id", "count", "share"],
                            empty="no teacher log-probs in the data, or no divergence")),
        _section("Samples that lean furthest the suspicious way",
                 html_table(list(flagged_samples)[:15], ["sample_id", "teacher_id", "lean_z", "completion"])),
        _section("Provenance of the training data", _verification(summary.get("provenance")), html_table(provenance)),
    ]
    name = title or f"trait_guard run report: {summary.get('run_name') or summary.get('mlflow_run_id') or ''}"
    return Report(name, _page(name, sections), figures)


# ----------------------------------------------------------------------------- benchmark


def benchmark_report(results: Mapping[str, Any], title: str = "trait_guard red-team benchmark") -> Report:
    """The review page of a red-team grid (``trait_guard.redteam`` results)."""
    cells = list(results.get("cells", []))
    figures = {}
    if cells:
        figures["logprob_shift.png"] = plot_cell_shifts(cells, "logprob_shift", "shift of log p(trait answer)")
        figures["rate_shift.png"] = plot_cell_shifts(cells, "rate_shift", "shift of trait rate")
    goals = results.get("goals", {})
    sections = [
        f'<p class="note">{html.escape(str(results.get("profile", "")))} - '
        f"{len(results.get('runs', []))} training runs, {html.escape(str(results.get('wall_seconds', '?')))} s.</p>",
        _section("Goals", html_table([{"goal": k, **v} for k, v in goals.items()], empty="not computed")),
        _section("Results per cell", html_table(results.get("table", []), empty="no cells")),
    ]
    for name, figure in figures.items():
        sections.append(_section(name.removesuffix(".png").replace("_", " "), _image(figure, name)))
    sections.append(_section("Student before training (per trait and seed)",
                             html_table(results.get("baselines", []), empty="none")))
    sections.append(_section("Runs", html_table(results.get("runs", []), [
        "teacher", "distill", "mode", "seed", "verdict", "halt_step", "first_alarm_step", "steps", "total_steps",
        "logprob_shift", "rate_shift", "final_loss", "mean_step_seconds", "wall_seconds", "mlflow_run_id"])))
    return Report(title, _page(title, sections), figures)
