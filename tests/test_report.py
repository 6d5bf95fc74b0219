"""Run and benchmark reports: self-contained HTML with the guard's evidence, PNGs beside it."""

import base64
import re
from collections import Counter

import numpy as np
import pytest

from trait_guard.fingerprint import divergence_token_table
from trait_guard.report import benchmark_report, html_table, provenance_summary, run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(halted=True):
    rate = {"pooled_rate": 0.1, "pooled_ci_low": 0.05, "pooled_ci_high": 0.2, "target_logprob": -4.0,
            "n_questions": 10, "samples_per_question": 5}
    return {"run_name": "owl-student", "student": "tiny", "trait": "animal:owl", "distill": "logits",
            "guard_enabled": True, "steps": 7, "total_steps": 20, "halted": halted,
            "halt": {"step": 7, "reason": "CUSUM alarm on divergence"} if halted else None,
            "alarms": [{"step": 7, "signal": "divergence"}] if halted else [],
            "verdict": "halted" if halted else "passed", "eval_before": rate, "eval_after": {**rate, "pooled_rate": 0.3},
            "train_samples": 64, "reference_samples": 64, "world_size": 2}


def _history():
    return [{"step": s, "cusum": {"divergence": 0.3 * s, "nll": 0.1}, "thresholds": {"divergence": 2.0, "nll": 5.0},
             "action": "halt" if s == 7 else "pass", "reason": "CUSUM alarm" if s == 7 else "ok"} for s in range(1, 8)]


def _embedded_pngs(html):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_run_report_shows_the_evidence(tmp_path):
    rows = [{"teacher_id": "owl", "base_model": "tiny", "base_fingerprint": "abc123", "trait_install": "system_prompt",
             "kept": True, "family": "numbers", "temperature": 1.0, "constrained": True, "topk_ids": [[1]]}] * 3
    report = run_report(_summary(), _history(), provenance=provenance_summary(rows),
                        entangled_tokens=[{"token": "087", "token_id": 5, "count": 9, "reference_count": 1,
                                           "log_ratio": 2.1}],
                        divergence_tokens=divergence_token_table(Counter({5: 3, 7: 1})),
                        flagged_samples=[{"sample_id": "s1", "teacher_id": "owl", "lean_z": 3.2,
                                          "completion": "<script>alert(1)</script>"}])
    html = report.html
    assert html.startswith("<!DOCTYPE html>") and "HALTED" in html and "halted at step 7 of 20" in html
    assert "CUSUM alarm on divergence" in html and "087" in html
    assert "<script>" not in html and "&lt;script&gt;" in html  # sample text is escaped
    assert "system_prompt" in html and "abc123" in html  # provenance
    pngs = _embedded_pngs(html)
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) for p in pngs)  # drift + trait rates, nothing fetched
    assert "http" not in html.split("<body>")[1]  # self-contained
    path = report.write(tmp_path / "r")
    assert path.read_text() == html
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.html", "drift.png", "trait_rates.png"}
    assert (tmp_path / "r" / "drift.png").read_bytes().startswith(PNG_MAGIC)
    # logged to a real MLflow run (SQLite store): the HTML and both PNGs come back as the run's artifacts
    from mlflow import MlflowClient

    from trait_guard.tracking import MlflowTracker

    uri = f"sqlite:///{(tmp_path / 'store').as_posix()}/mlflow.db"
    (tmp_path / "store").mkdir()
    with MlflowTracker(experiment="report-test", run_name="owl-student", tracking_uri=uri) as tracker:
        report.log_to(tracker)
        run_id = tracker.run_id
    client = MlflowClient(uri)
    logged = {a.path: a.file_size for a in client.list_artifacts(run_id, "report")}
    assert set(logged) == {"report/report.html", "report/drift.png", "report/trait_rates.png"}
    assert open(client.download_artifacts(run_id, "report/report.html", str(tmp_path)), encoding="utf-8").read() == html


def test_run_report_without_eval_or_alarms():
    summary = {**_summary(halted=False), "eval_before": None, "eval_after": None}
    report = run_report(summary, _history()[:3])
    assert "PASSED" in report.html and "no alarm" in report.html and "behavioral evaluation off" in report.html
    assert list(report.figures) == ["drift.png"]


def test_divergence_token_table_shares():
    table = divergence_token_table(Counter({5: 3, 7: 1, 9: 0}), top=2)
    assert [r["token_id"] for r in table] == [5, 7]
    assert table[0]["share"] == pytest.approx(0.75) and table[0]["token"] is None


def test_html_table_formats_cells():
    html = html_table([{"a": 1, "b": 0.123456, "c": float("nan"), "d": None, "e": True}])
    assert '<td class="num">1</td>' in html and "0.1235" in html and html.count("n/a") == 2 and "yes" in html
    assert "none" in html_table([])


def test_benchmark_report_from_aggregated_results():
    cell = {"teacher": "owl", "distill": "logits", "mode": "unguarded",
            "logprob_shift": {"mean": 0.8, "ci_low": 0.2, "ci_high": 1.4}, "rate_shift": {"mean": 0.0, "ci_low": 0.0,
                                                                                          "ci_high": 0.0}}
    results = {"profile": "unit", "cells": [cell, {**cell, "mode": "halt",
                                                    "logprob_shift": {"mean": 0.1, "ci_low": np.nan, "ci_high": np.nan}}],
               "table": [{"teacher": "owl", "mode": "unguarded", "d log p(target)": "+0.80 [+0.20, +1.40]"}],
               "goals": {"no_false_halts": {"target": "0", "met": True}}, "runs": [], "baselines": []}
    report = benchmark_report(results)
    assert "+0.80 [+0.20, +1.40]" in report.html and "no_false_halts" in report.html
    assert set(report.figures) == {"logprob_shift.png", "rate_shift.png"}
    assert len(_embedded_pngs(report.html)) == 2
