"""Anytime-valid e-process: false-alarm bound, exact rank uniformity, delay vs theory, power,
checkpoint/resume, bad input, and the look-ahead gate. All Monte Carlo is seeded and takes seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from trait_guard.detect import Detector
from trait_guard.sequential import (
    DEFAULT_LAMBDAS,
    EProcessDetector,
    LookaheadGate,
    evidence_ceiling,
    expected_detection_delay,
    min_reference_size,
    sequential_ranks,
)

ALPHA = 0.05  # large enough that 2,000 streams resolve the false-alarm rate


def first_alarms(det: EProcessDetector, draw, n_streams: int, length: int, refit=None) -> np.ndarray:
    """Samples to the first alarm (alarm included) of ``n_streams`` fresh streams; inf if none."""
    out = np.full(n_streams, np.inf)
    for i in range(n_streams):
        if refit is not None:
            det.fit(refit())
        det.reset()
        idx = det.run(draw(length))
        if idx is not None:
            out[i] = idx + 1
    return out


# ----------------------------------------------------------------------------- validity


def test_false_alarm_rate_on_skewed_clean_streams_is_at_most_alpha():
    """2,000 runs, each a fresh lognormal reference (500) and a fresh lognormal stream (500): no
    Gaussian anywhere. Ville's bound is over reference and stream together, so both are redrawn."""
    rng = np.random.default_rng(20240613)
    det = EProcessDetector(alpha=ALPHA)
    n = 2000
    delays = first_alarms(det, lambda k: rng.lognormal(0.0, 1.0, k), n, 500,
                          refit=lambda: rng.lognormal(0.0, 1.0, 500))
    alarms = int(np.isfinite(delays).sum())
    rate = alarms / n
    ci = scipy.stats.binomtest(alarms, n).proportion_ci(0.95, method="exact")
    msg = f"false-alarm rate {rate:.4f} ({alarms}/{n}), 95% Clopper-Pearson CI [{ci.low:.4f}, {ci.high:.4f}]"
    assert ci.low <= ALPHA and rate <= ALPHA + 0.005, msg
    # the bound is used, not wasted: a detector that never alarms would pass the line above
    assert rate >= ALPHA / 5, msg


def test_ranks_are_exactly_uniform_and_independent_with_ties_and_a_tiny_reference():
    """Poisson scores (many ties) against a 10-value reference: the smoothed conformal ranks are
    i.i.d. U(0, 1) anyway. A naive mid-rank against the reference alone is not (negative control)."""
    rng = np.random.default_rng(11)
    n_streams, length, m = 3000, 20, 10
    u = np.empty((n_streams, length))
    naive = np.empty((n_streams, length))
    for i in range(n_streams):
        ref, stream = rng.poisson(3.0, m).astype(float), rng.poisson(3.0, length).astype(float)
        u[i] = sequential_ranks(ref, stream, seed=rng)
        less = (ref[None, :] < stream[:, None]).sum(1)
        naive[i] = (less + 0.5 * (ref[None, :] == stream[:, None]).sum(1)) / m
    ks = scipy.stats.kstest(u.ravel(), "uniform")
    assert ks.pvalue > 1e-3, f"ranks not uniform: KS D={ks.statistic:.4f}, p={ks.pvalue:.2g}"
    se = math.sqrt(1 / 12 / n_streams)
    worst = float(np.abs(u.mean(0) - 0.5).max())
    assert worst < 4 * se, f"per-step mean of u off by {worst:.4f} (se {se:.4f})"
    lag1 = float(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1])
    assert abs(lag1) < 4 / math.sqrt(u[:, 1:].size), f"lag-1 correlation {lag1:.4f}"
    naive_ks = scipy.stats.kstest(naive.ravel(), "uniform")
    assert naive_ks.pvalue < 1e-6, f"negative control passed: KS p={naive_ks.pvalue:.2g}"


# ----------------------------------------------------------------------------- delay and power


def test_mean_detection_delay_matches_theory_on_a_half_sd_shift():
    rng = np.random.default_rng(5)
    ref = rng.gamma(2.0, 1.0, 4000)
    shift = 0.5 * ref.std(ddof=1)
    det = EProcessDetector(alpha=0.01).fit(ref)
    theory = expected_detection_delay(ref, rng.gamma(2.0, 1.0, 200_000) + shift, alpha=0.01)
    delays = first_alarms(det, lambda k: rng.gamma(2.0, 1.0, k) + shift, 1000, 1000)
    assert np.isfinite(delays).all(), f"{int(np.isinf(delays).sum())} shifted streams never alarmed"
    mean, se = float(delays.mean()), float(delays.std(ddof=1) / math.sqrt(delays.size))
    msg = (f"measured mean delay {mean:.1f} (se {se:.1f}) vs theory {theory.samples:.1f} "
           f"(oracle single bettor {theory.oracle_samples:.1f}, best lambda {theory.best_lambda})")
    assert abs(mean / theory.samples - 1) <= 0.30, msg
    mixture_cost = math.log(len(DEFAULT_LAMBDAS)) / theory.best_growth
    assert theory.oracle_samples < theory.samples < theory.oracle_samples + mixture_cost + 1, msg
    # the same shift after 300 clean samples: slower (no reset at 0), and the theory follows
    late = expected_detection_delay(ref, rng.gamma(2.0, 1.0, 200_000) + shift, alpha=0.01, clean_prefix=300)
    delays = first_alarms(det, lambda k: np.concatenate([rng.gamma(2.0, 1.0, 300),
                                                         rng.gamma(2.0, 1.0, k) + shift]), 300, 1000) - 300
    mean = float(delays.mean())
    msg = f"after 300 clean samples: measured mean delay {mean:.1f} vs theory {late.samples:.1f}"
    assert late.samples > 1.5 * theory.samples and abs(mean / late.samples - 1) <= 0.30, msg


def test_shift_up_is_detected_and_shift_down_is_not_unless_two_sided():
    rng = np.random.default_rng(8)
    ref = rng.lognormal(0.0, 1.0, 3000)
    sd = ref.std(ddof=1)
    det = EProcessDetector(alpha=ALPHA).fit(ref)
    up = first_alarms(det, lambda k: rng.lognormal(0.0, 1.0, k) + 0.5 * sd, 300, 500)
    assert np.isfinite(up).mean() >= 0.99, f"upward shift detected in {np.isfinite(up).mean():.3f} of streams"
    down = first_alarms(det, lambda k: rng.lognormal(0.0, 1.0, k) - 0.5 * sd, 300, 500)
    false_up = np.isfinite(down).mean()
    assert false_up <= 0.01, f"harmless downward shift alarmed in {false_up:.3f} of streams"
    low = rng.lognormal(0.0, 1.0, 50_000) - 0.5 * sd
    assert expected_detection_delay(ref, low, alpha=ALPHA).samples == math.inf
    both = EProcessDetector(alpha=ALPHA, two_sided=True).fit(ref)
    down2 = first_alarms(both, lambda k: rng.lognormal(0.0, 1.0, k) - 0.5 * sd, 300, 500)
    detected = np.isfinite(down2).mean()
    assert detected >= 0.99, f"two-sided: downward shift detected in {detected:.3f} of streams"
    assert both.state_dict()["config"]["lambdas"] == list(DEFAULT_LAMBDAS)


def test_verdicts_follow_the_contract_and_the_alarm_latches():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=2000)
    det = EProcessDetector(alpha=0.01).fit(ref)
    stream = np.concatenate([rng.normal(1.5, 1.0, 60), rng.normal(-3.0, 1.0, 200)])
    verdicts = [det.update(v) for v in stream]
    for v in verdicts:
        assert v.flagged == (v.score > v.threshold) == (v.p_value < 0.01)
        assert v.p_value == pytest.approx(10 ** -v.score) and v.score >= 0.0
    first = next(i for i, v in enumerate(verdicts) if v.flagged)
    assert det.alarm_step == first + 1 and all(v.flagged for v in verdicts[first:])
    assert verdicts[-1].evidence["log10_e"] < verdicts[-1].threshold  # E fell back; the alarm stays
    assert verdicts[0].threshold == pytest.approx(2.0)
    # whole-sequence judgement from a fresh state: same numbers, stream untouched
    before = det.state_dict()
    fresh = EProcessDetector(alpha=0.01).fit(ref)
    assert fresh.predict(stream).score == pytest.approx(verdicts[-1].score, abs=1e-12)
    assert fresh.predict(stream).evidence["alarm_index"] == first
    assert det.predict(stream).score == fresh.score(stream) and det.state_dict() == before


# ----------------------------------------------------------------------------- checkpoint / resume


def test_state_dict_round_trip_mid_stream_gives_identical_future_alarms():
    rng = np.random.default_rng(21)
    ref = rng.normal(size=1500)
    head, tail = rng.normal(0.0, 1.0, 150), rng.normal(0.4, 1.0, 800)
    det = EProcessDetector(alpha=0.001, seed=9).fit(ref)
    assert det.run(head) is None
    saved = json.loads(json.dumps(det.state_dict()))  # through real JSON
    rebuilt = Detector.from_state_dict(saved)
    loaded = EProcessDetector(alpha=0.5, lambdas=(0.1,), seed=1).load_state_dict(saved)
    assert isinstance(rebuilt, EProcessDetector) and loaded.alpha == 0.001
    results = [d.run(tail) for d in (det, rebuilt, loaded)]
    assert results[0] is not None and results[0] > 5, results
    assert results == [results[0]] * 3
    assert det.state_dict() == rebuilt.state_dict() == loaded.state_dict()
    # one update() per score gives the same numbers as run()
    stepper = Detector.from_state_dict(saved)
    verdicts = [stepper.update(v) for v in tail[: results[0] + 1]]
    assert [v.flagged for v in verdicts].index(True) == results[0]
    assert stepper.state_dict() == det.state_dict()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_useful_message():
    det = EProcessDetector()
    with pytest.raises(RuntimeError, match=r"predict\(\) called before fit"):
        det.predict([1.0, 2.0])
    with pytest.raises(RuntimeError, match="before fit"):
        det.update(1.0)
    for bad in (0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), "0.05", True):
        with pytest.raises(ValueError, match="alpha"):
            EProcessDetector(alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            EProcessDetector().calibrate(alpha=bad)
    for bad in ((), (0.5, 1.0), (0.0,), "0.5"):
        with pytest.raises(ValueError, match="lambdas"):
            EProcessDetector(lambdas=bad)
    with pytest.raises(ValueError, match="zero variance"):
        det.fit([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        det.fit([1.0])
    with pytest.raises(ValueError, match="index 2"):
        det.fit([1.0, 2.0, float("nan")])
    det.fit(np.arange(10.0))
    with pytest.raises(ValueError, match=r"NaN value\(s\) \(first at index 3\)"):
        det.run([1.0, 2.0, 3.0, float("nan")])
    assert det.steps_since_reset == 0  # validated before any score is consumed
    det.update(4.0)
    with pytest.raises(ValueError, match=r"stream sample 2.*NaN"):
        det.update(float("nan"))
    with pytest.raises(ValueError, match=r"infinite value\(s\) \(first at index 1\)"):
        det.predict([0.0, float("inf")])
    with pytest.raises(ValueError, match="alpha"):
        expected_detection_delay(np.arange(10.0), np.arange(10.0) + 1, alpha=1.0)
    with pytest.raises(ValueError, match="window"):
        LookaheadGate(det, 0)


# ----------------------------------------------------------------------------- look-ahead gate


def test_gate_releases_a_row_only_after_window_later_rows_and_holds_rows_on_alarm():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=3000)
    window = 40
    # clean rows: row i is released exactly when row i + window is pushed, the rest at flush
    gate = LookaheadGate(EProcessDetector(alpha=0.01).fit(ref), window)
    released_at = {}
    for i, v in enumerate(rng.normal(size=200)):
        step = gate.push(i, v)
        assert not step.alarmed and not step.held
        for row in step.released:
            released_at[row] = i
    assert released_at == {row: row + window for row in range(200 - window)}
    assert gate.buffered == list(range(160, 200)) and gate.flush().released == list(range(160, 200))
    # a shift from row 300 on, window 3x its theoretical delay (which a clean prefix lengthens):
    # the alarm comes within the window, so no shifted row is ever released
    theory = expected_detection_delay(ref, rng.normal(2.0, 1.0, 100_000), alpha=0.01, clean_prefix=300)
    assert 30 < theory.samples < 70, theory.samples  # vs ~12 from the start: bettors lost wealth
    window = math.ceil(3 * theory.samples)
    gate = LookaheadGate(EProcessDetector(alpha=0.01).fit(ref), window)
    scores = np.concatenate([rng.normal(size=300), rng.normal(2.0, 1.0, 300)])
    released, held, alarm_row = [], [], None
    for i, v in enumerate(scores):
        step = gate.push(f"row-{i}", v)
        released += step.released
        held += step.held
        if step.alarmed and alarm_row is None:
            alarm_row = i
            assert step.verdict is not None and step.verdict.flagged
            # the rows not yet released: this one and the window of rows before it
            assert step.held == [f"row-{j}" for j in range(i - window, i + 1)]
        if step.alarmed:
            assert step.released == []
    assert alarm_row is not None and 300 <= alarm_row < 300 + window, alarm_row
    assert released == [f"row-{j}" for j in range(alarm_row - window)]
    assert held == gate.held == [f"row-{j}" for j in range(alarm_row - window, 600)]
    assert gate.flush().released == []


def test_gate_state_round_trip_mid_stream():
    rng = np.random.default_rng(6)
    gate = LookaheadGate(EProcessDetector(alpha=0.01).fit(rng.normal(size=500)), 5)
    scores = np.concatenate([rng.normal(size=30), rng.normal(3.0, 1.0, 30)])
    for i, v in enumerate(scores[:20]):
        gate.push(i, v)
    copy = LookaheadGate.from_state_dict(json.loads(json.dumps(gate.state_dict())))
    a = [gate.push(i, v)[:3] for i, v in enumerate(scores[20:], 20)]
    b = [copy.push(i, v)[:3] for i, v in enumerate(scores[20:], 20)]
    assert a == b and any(step[2] for step in a)


def test_min_samples_to_alarm_is_the_first_n_a_top_ranked_run_can_reach():
    from trait_guard.sequential import DEFAULT_LAMBDAS, min_samples_to_alarm

    for alpha in (0.05, 0.01, 0.001):
        n = min_samples_to_alarm(alpha)
        wealth = lambda k: np.mean([(1 + lam) ** k for lam in DEFAULT_LAMBDAS])  # noqa: E731
        assert wealth(n) >= 1 / alpha > wealth(n - 1), (alpha, n)
    # and a real stream of top-ranked scores cannot alarm before it
    reference = np.random.default_rng(0).normal(size=5000)
    detector = EProcessDetector(alpha=0.01).fit(reference)
    first = detector.run(np.full(200, 100.0))
    assert first is not None and first + 1 >= min_samples_to_alarm(0.01)


def test_min_reference_size_is_where_the_eprocess_catches_the_design_shift():
    """A reference caps the evidence (stream samples dilute it in the ranking pool): at the size
    min_reference_size names, a 1-sd shift is caught in most streams however long; at a third of it,
    in far fewer."""
    alpha = 0.01 / 3
    need = min_reference_size(1.0, alpha)
    assert 20 <= need <= 35  # measured 26
    rng = np.random.default_rng(11)
    caught = {}
    for m in (need // 3, need):
        hits = 0
        for i in range(60):
            det = EProcessDetector(alpha=alpha, seed=i).fit(rng.normal(size=m))
            hits += det.score(rng.normal(1.0, 1.0, size=10 * m)) > det.threshold
        caught[m] = hits
    assert caught[need] >= 42  # >= 70% (measured 49/60 at seed 1)
    assert caught[need // 3] <= caught[need] - 15


def test_evidence_ceiling_grows_with_the_reference_and_peaks_near_four_reference_sizes():
    small, large = evidence_ceiling(100, 0.5), evidence_ceiling(400, 0.5)
    assert large.log10_e > 3.5 * small.log10_e  # about linear in m
    assert 2.5 * 100 <= small.at_sample <= 6 * 100 and 2.5 * 400 <= large.at_sample <= 6 * 400
    assert evidence_ceiling(400, 0.5, n_samples=50).log10_e < large.log10_e  # a short stream climbs less
    assert evidence_ceiling(400, 0.0).log10_e == 0.0  # no shift, no evidence
    # the size named reaches 1/alpha; a stream too short for any reference gets None
    need = min_reference_size(0.5, 0.01)
    assert evidence_ceiling(need, 0.5).log10_e >= 2.0 > evidence_ceiling(int(need * 0.9), 0.5).log10_e
    assert min_reference_size(0.5, 0.01, n_samples=15) is None
    # the reference size barely moves the shortest possible alarm (the strict bound is m-free)
    from trait_guard.sequential import min_samples_to_alarm

    assert min_samples_to_alarm(0.01) == 11

