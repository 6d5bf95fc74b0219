"""Calibrated detectors: known answers for false-alarm rates, delays, p-values and corrections."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import scipy.stats

from trait_guard.detect import (
    CUSUMDetector,
    Detector,
    PermutationTest,
    Verdict,
    combine_pvalues,
    split_ert,
)

REF_N = 20_000  # large reference: its own sampling error moves the ERT by only ~7% at ERT 200


def normal(rng, n):
    return rng.normal(size=n)


def exponential(rng, n):
    return rng.exponential(size=n)


def run_lengths(det, sampler, rng, n_streams, block=1000):
    """Run length (batches until the first false alarm, alarm included) of clean streams."""
    lengths = []
    for _ in range(n_streams):
        det.reset()
        consumed = 0
        while (idx := det.run(sampler(rng, block))) is None:
            consumed += block
        lengths.append(consumed + idx + 1)
    return np.array(lengths)


@pytest.fixture(scope="module")
def gaussian_cusum():
    rng = np.random.default_rng(0)
    return CUSUMDetector().fit(rng.normal(size=REF_N)).calibrate(target_ert=200, seed=0)


# ----------------------------------------------------------------------------- CUSUM


def test_cusum_gaussian_streams_alarm_at_the_target_rate(gaussian_cusum):
    det = gaussian_cusum
    # Siegmund's approximation for Gaussian scores, k = 0.5, ERT 200 gives h = 3.50
    assert det.h == pytest.approx(3.5, abs=0.15)
    assert det.calibration["estimated_ert"] == pytest.approx(200, rel=0.1)
    assert det.calibration["simulated_alarms"] > 500
    lengths = run_lengths(det, normal, np.random.default_rng(1), n_streams=400)
    assert lengths.mean() == pytest.approx(200, rel=0.3)  # se of the mean ~ 200 / sqrt(400) = 5%


def test_cusum_bootstrap_calibrates_a_skewed_signal_where_gaussian_h_does_not(gaussian_cusum):
    rng = np.random.default_rng(2)
    det = CUSUMDetector().fit(rng.exponential(size=REF_N)).calibrate(target_ert=200, seed=0)
    assert det.h > gaussian_cusum.h + 1  # the right tail needs a higher threshold
    lengths = run_lengths(det, exponential, np.random.default_rng(3), n_streams=300)
    assert lengths.mean() == pytest.approx(200, rel=0.3)
    # the Gaussian threshold on the same skewed stream alarms far too often
    naive = CUSUMDetector(h=gaussian_cusum.h).fit(det._ref)
    naive_lengths = run_lengths(naive, exponential, np.random.default_rng(4), n_streams=200)
    assert naive_lengths.mean() < 0.7 * 200


def test_cusum_two_sided_ert():
    rng = np.random.default_rng(5)
    det = CUSUMDetector(two_sided=True).fit(rng.normal(size=REF_N)).calibrate(target_ert=200, seed=0)
    # each side carries half the alarms: ERT 400 per side is h = 4.17 (Siegmund)
    assert det.h == pytest.approx(4.17, abs=0.2)
    lengths = run_lengths(det, normal, np.random.default_rng(6), n_streams=300)
    assert lengths.mean() == pytest.approx(200, rel=0.3)
    drop = det.predict(np.concatenate([np.zeros(10), np.full(20, -1.5)]))
    assert drop.flagged and drop.evidence["direction"] == "down"


def test_cusum_detects_a_one_sd_shift_with_the_expected_delay(gaussian_cusum):
    det = gaussian_cusum
    shift, start, n_streams = 1.0, 50, 300
    # the upper statistic drifts up by shift - k = 0.5 per batch after the change, so it needs about
    # h / (shift - k) batches to cross h, +1 for the overshoot: 8.0 for h = 3.5 (Siegmund: 7.4)
    expected = det.h / (shift - det.k) + 1
    rng = np.random.default_rng(7)
    early, delays = 0, []
    for _ in range(n_streams):
        scores = rng.normal(size=start + 100)
        scores[start:] += shift * det.sd
        idx = det.predict(scores).evidence["alarm_index"]
        assert idx is not None
        if idx < start:
            early += 1
        else:
            delays.append(idx - start + 1)  # batches of shifted data seen when the alarm fires
    # before the shift: P(run length <= 50) = 1 - exp(-50 / 200) = 0.22 for ERT 200
    assert early / n_streams < 0.35
    assert 0.6 * expected < np.mean(delays) < 1.25 * expected
    assert max(delays) < 40


def test_cusum_calibrates_ert_10000_quickly_to_a_higher_threshold(gaussian_cusum):
    det = CUSUMDetector().fit(gaussian_cusum._ref).calibrate(target_ert=10_000, seed=0)
    assert math.isfinite(det.h) and det.h > gaussian_cusum.h
    assert det.h == pytest.approx(7.36, abs=0.3)  # Siegmund: ERT 10,000 at h = 7.36
    assert det.calibration["estimated_ert"] == pytest.approx(10_000, rel=0.1)
    # calibration is deterministic for a seed
    again = CUSUMDetector().fit(gaussian_cusum._ref).calibrate(target_ert=10_000, seed=0)
    assert again.h == det.h


def test_cusum_streaming_matches_predict_and_run_stops_at_the_alarm():
    det = CUSUMDetector(h=2.0).fit([-1.0, 1.0])  # mean 0, sd sqrt(2)
    scores = [0.0, 2.0, 2.0, 2.0, 2.0, 0.0]
    verdict = det.predict(scores)
    z = [s / math.sqrt(2) for s in scores]
    stat, path = 0.0, []
    for zi in z:
        stat = max(0.0, stat + zi - 0.5)
        path.append(stat)
    first = next(i for i, s in enumerate(path) if s > 2.0)
    assert verdict.flagged and verdict.evidence["alarm_index"] == first
    assert verdict.score == pytest.approx(max(path)) and verdict.threshold == 2.0
    assert det.step == 0 and det.statistic == 0.0  # predict left the stream alone
    streamed = [det.update(s) for s in scores]
    assert [v.evidence["statistic"] for v in streamed] == pytest.approx(path)
    assert [v.flagged for v in streamed] == [s > 2.0 for s in path]
    assert streamed[-1].evidence["alarm_step"] == first + 1
    assert streamed[-1].evidence["step"] == streamed[-1].evidence["steps_since_reset"] == len(scores)
    det.reset()
    assert det.statistic == 0.0 and det.alarm_step is None and det.step == len(scores)
    assert det.run(scores) == first
    assert det.steps_since_reset == first + 1  # stopped at the alarm
    det.reset()
    assert det.run([0.0, -1.0, 0.5]) is None
    assert det.score(scores) == pytest.approx(max(path))


def test_cusum_state_round_trip_mid_stream_continues_exactly(gaussian_cusum):
    rng = np.random.default_rng(8)
    scores = rng.normal(size=400) + np.r_[np.zeros(300), np.full(100, 0.7)]
    original = CUSUMDetector.from_state_dict(gaussian_cusum.state_dict())
    original.reset()
    for s in scores[:150]:
        original.update(s)
    state = json.loads(json.dumps(original.state_dict()))
    restored = Detector.from_state_dict(state)
    into_existing = CUSUMDetector(k=1.0, two_sided=True).load_state_dict(state)
    assert isinstance(restored, CUSUMDetector) and restored.h == original.h
    assert into_existing.k == 0.5 and not into_existing.two_sided
    for s in scores[150:]:
        a, b, c = original.update(s), restored.update(s), into_existing.update(s)
        assert a.to_dict() == b.to_dict() == c.to_dict()
    assert original.alarm_step is not None and restored.alarm_step == original.alarm_step
    assert restored.calibration == original.calibration
    # a restored detector can be recalibrated: the reference travels with the state
    assert restored.calibrate(target_ert=200, seed=0).h == gaussian_cusum.h


def test_refit_drops_a_bootstrap_threshold_but_keeps_a_given_one():
    rng = np.random.default_rng(9)
    det = CUSUMDetector().fit(rng.normal(size=500)).calibrate(target_ert=50)
    det.fit(rng.normal(size=500))
    with pytest.raises(RuntimeError, match=r"before calibrate\(\)"):
        det.predict([0.0])
    given = CUSUMDetector(h=3.0).fit(rng.normal(size=500))
    given.fit(rng.normal(size=500))
    assert given.h == 3.0 and given.predict([0.0]).flagged is False


# ----------------------------------------------------------------------------- honest calibration


def gaussian_arl(kappa, h, nodes=48):
    """Exact ARL of the upper CUSUM ``S_t = max(0, S_{t-1} + X_t - kappa)``, X ~ N(0, 1), alarm at
    ``S > h``, from 0: the renewal integral equation solved by Nystrom quadrature (Brook and Evans),
    independent of the simulation under test."""
    y, w = np.polynomial.legendre.leggauss(nodes)
    y, w = 0.5 * h * (y + 1.0), 0.5 * h * w
    s = np.concatenate([[0.0], y])
    kernel = np.empty((nodes + 1, nodes + 1))
    kernel[:, 0] = scipy.stats.norm.cdf(kappa - s)  # back to the atom at 0
    kernel[:, 1:] = w[None, :] * scipy.stats.norm.pdf(y[None, :] + kappa - s[:, None])
    return float(np.linalg.solve(np.eye(nodes + 1) - kernel, np.ones(nodes + 1))[0])


def test_gaussian_arl_oracle_matches_the_published_table():
    # one-sided CUSUM, k = 0.5: ARL0 336 at h = 4 and 930 at h = 5 (Montgomery's table; 168 and 465 two-sided)
    assert gaussian_arl(0.5, 4.0) == pytest.approx(336, rel=0.005)
    assert gaussian_arl(0.5, 5.0) == pytest.approx(930, rel=0.005)


def realized_arls(n_references, n=50, target=200, seed=123):
    """For fresh N(0, 1) references of ``n`` samples: the nominal h (reference taken as exact) and the
    honest h (bootstrap over reference draws), each with its exact ARL on fresh clean N(0, 1) data.
    Standardized by the reference's (m, s), the CUSUM on clean data is the CUSUM of X with allowance
    ``m + k s`` and threshold ``h s``."""
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n_references):
        x = rng.normal(size=n)
        m, s = x.mean(), x.std(ddof=1)
        nominal = CUSUMDetector().fit(x).calibrate(target_ert=target, n_streams=300, seed=j).h
        honest = CUSUMDetector().fit(x).calibrate(target_ert=target, n_streams=100, seed=j, reference_draws=300,
                                                  max_delay_factor=100.0).h
        rows.append((gaussian_arl(m + 0.5 * s, nominal * s), gaussian_arl(m + 0.5 * s, honest * s)))
    return np.array(rows)


def _contrast(arls, target=200):
    below = (arls < target).sum(axis=0)
    n = arls.shape[0]
    ci = [scipy.stats.binomtest(int(k), n).proportion_ci(method="exact") for k in below]
    pooled_rate = (1.0 / arls).mean(axis=0) * target  # false alarms per batch, in units of 1 / target
    return below, ci, pooled_rate


def test_honest_threshold_keeps_the_realized_ert_of_small_references_and_the_nominal_does_not():
    """30 fresh references of 50 samples (fast version; 300 in the slow test below)."""
    arls = realized_arls(30)
    (below_nominal, below_honest), (ci_nominal, ci_honest), pooled = _contrast(arls)
    # honest: P(realized ERT < target) <= 10% by design; nominal: about half the references
    assert ci_honest.low <= 0.10 and below_honest / 30 <= 0.2
    assert ci_nominal.low > 0.10
    assert pooled[1] <= 1.0 < pooled[0]  # averaged over references: below the target rate only when honest


@pytest.mark.slow
def test_honest_threshold_over_300_fresh_references():
    """Measured (seed 123): nominal 161/300 references below ERT 200 (53.7%, exact 95% CI [47.8%, 59.4%]),
    pooled false-alarm rate 1.62 / target; honest 28/300 (9.3%, [6.3%, 13.2%]), pooled 0.34 / target."""
    arls = realized_arls(300)
    (below_nominal, below_honest), (ci_nominal, ci_honest), pooled = _contrast(arls)
    assert ci_honest.low <= 0.10 <= ci_nominal.low
    assert below_honest / 300 <= 0.13 and below_nominal / 300 >= 0.4
    assert pooled[1] < 1.0 < pooled[0]


def test_honest_calibration_reports_its_uncertainty_and_the_reference_it_needs():
    rng = np.random.default_rng(7)
    small = rng.normal(size=60)
    det = CUSUMDetector().fit(small).calibrate(target_ert=500, n_streams=100, reference_draws=400)
    boot = det.calibration["reference_bootstrap"]
    assert det.calibration["method"] == "reference-bootstrap" and det.h == boot["h"]
    assert boot["h"] > boot["nominal_h"]  # honesty costs threshold
    q = boot["needed_h_quantiles"]
    assert q["p10"] < q["median"] < q["p90"] <= boot["h"] + 1e-9
    assert boot["realized_ert"]["below_target"] <= 0.11 and boot["realized_ert"]["p10"] >= 500 * 0.95
    assert boot["realized_ert_nominal_h"]["below_target"] > 0.3  # the nominal h misses in ~half the draws
    assert boot["mean_offset_sd"] == pytest.approx(1 / math.sqrt(60), rel=0.2)  # sqrt(b / n), b = 1
    assert boot["delay_factor"] > 1.25 and boot["needed_reference_n"] > 60
    # a reference of the size named: the check passes
    big = rng.normal(size=boot["needed_reference_n"])
    again = CUSUMDetector().fit(big).calibrate(target_ert=500, n_streams=100, reference_draws=400)
    assert again.calibration["reference_bootstrap"]["delay_factor"] <= 1.25
    assert again.calibration["reference_bootstrap"]["needed_reference_n"] is None
    json.dumps(det.state_dict())  # the calibration record is JSON-safe
    with pytest.raises(ValueError, match="reference_draws must be 0"):
        CUSUMDetector().fit(small).calibrate(target_ert=500, reference_draws=10)
    with pytest.raises(ValueError, match="needs k > 0"):
        CUSUMDetector(k=0).fit(small).calibrate(target_ert=500, reference_draws=100)


def test_honest_two_sided_threshold_covers_both_sides():
    rng = np.random.default_rng(8)
    x = rng.normal(size=200)
    one = CUSUMDetector().fit(x).calibrate(target_ert=300, n_streams=100, reference_draws=200)
    two = CUSUMDetector(two_sided=True).fit(x).calibrate(target_ert=300, n_streams=100, reference_draws=200)
    # two sides share the alarm budget: a higher threshold, and for a reference with its mean off
    # either way (the lower side fires when the reference mean was too high)
    assert two.h > one.h
    assert two.calibration["reference_bootstrap"]["realized_ert"]["below_target"] <= 0.11
    assert len(two.calibration["reference_bootstrap"]["allowance_grid"]) == 2


# ----------------------------------------------------------------------------- permutation test


def brute_force_p(x, ref, alternative):
    pooled = np.concatenate([x, ref])
    n = len(x)
    observed = np.mean(x) - np.mean(ref)
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), bool)
        mask[list(chosen)] = True
        diff = pooled[mask].mean() - pooled[~mask].mean()
        if alternative == "greater":
            hits += diff >= observed - 1e-12
        else:
            hits += abs(diff) >= abs(observed) - 1e-12
        total += 1
    return hits / total


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_permutation_exact_p_matches_brute_force(alternative):
    x = np.array([1.2, 0.4, 2.5, 1.9])
    ref = np.array([0.1, -0.3, 1.0, 0.6, 0.8])  # C(9, 4) = 126 splits <= 2000: exact
    test = PermutationTest(alternative=alternative).fit(ref)
    verdict = test.predict(x)
    assert verdict.evidence["method"] == "exact" and verdict.evidence["permutations"] == 126
    assert verdict.p_value == pytest.approx(brute_force_p(x, ref, alternative), abs=1e-12)
    # ties count: equal values on both sides
    tied = PermutationTest(alternative=alternative).fit([1.0, 2.0, 2.0])
    assert tied.predict([2.0, 1.0]).p_value == pytest.approx(
        brute_force_p(np.array([2.0, 1.0]), np.array([1.0, 2.0, 2.0]), alternative))


def test_permutation_monte_carlo_approximates_the_exact_p():
    rng = np.random.default_rng(10)
    x, ref = rng.normal(0.6, 1, size=6), rng.normal(size=8)  # C(14, 6) = 3003 splits
    exact = PermutationTest(exact=True).fit(ref).predict(x)
    mc = PermutationTest(n_permutations=20_000, exact=False).fit(ref).predict(x)
    assert mc.evidence["method"] == "monte-carlo" and exact.evidence["permutations"] == 3003
    assert mc.p_value == pytest.approx(exact.p_value, abs=0.012)
    # (count + 1) / (n + 1): never 0, 1 / (n + 1) when no permutation reaches the observed value
    far = PermutationTest(n_permutations=999).fit(ref).predict(x + 100)
    assert far.p_value == pytest.approx(1 / 1000) and far.evidence["count"] == 0


def test_permutation_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(11)
    p_values = []
    for _ in range(200):
        test = PermutationTest(n_permutations=500, seed=int(rng.integers(1 << 30))).fit(rng.normal(size=20))
        p_values.append(test.predict(rng.normal(size=15)).p_value)
    p_values = np.array(p_values)
    assert 0.02 <= (p_values < 0.05).mean() <= 0.09
    assert 0.4 <= (p_values < 0.5).mean() <= 0.6


def test_permutation_detects_a_half_sd_shift():
    rng = np.random.default_rng(12)
    test = PermutationTest().fit(rng.normal(size=200))
    verdict = test.predict(rng.normal(0.5, 1, size=200))
    assert verdict.flagged and verdict.p_value < 0.01
    assert verdict.p_value == pytest.approx(1 / 2001)
    assert verdict.evidence["effect_size"] == pytest.approx(0.5, abs=0.2)
    assert verdict.evidence["n"] == verdict.evidence["reference_n"] == 200
    assert verdict.score > verdict.threshold == pytest.approx(2.0)
    lower = test.predict(rng.normal(-0.5, 1, size=200))
    assert not lower.flagged  # 'greater' ignores a drop
    assert PermutationTest(alternative="two-sided").fit(test._ref).predict(rng.normal(-0.5, 1, 200)).flagged
    assert PermutationTest().fit(test._ref).state_dict()["config"]["alternative"] == "greater"


# ----------------------------------------------------------------------------- several signals


P = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20}


def test_holm_and_bonferroni_match_hand_computed_values():
    holm = combine_pvalues(P)  # sorted a .01, c .03, b .04, d .20; multipliers 4, 3, 2, 1
    assert holm.adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.20})  # b: max(.08, .09)
    assert list(holm.adjusted) == list(P)
    assert holm.p_value == pytest.approx(0.04)
    assert holm.rejected(0.05) == ["a"]
    bonf = combine_pvalues(P, method="bonferroni")
    assert bonf.adjusted == pytest.approx({"a": 0.04, "b": 0.16, "c": 0.12, "d": 0.80})
    assert combine_pvalues({"x": 0.5, "y": 0.9}, "bonferroni").adjusted == {"x": 1.0, "y": 1.0}
    # Benjamini-Hochberg (false discovery rate) is a different, weaker guarantee
    bh = scipy.stats.false_discovery_control([P[k] for k in "abcd"])
    assert not np.allclose(bh, [holm.adjusted[k] for k in "abcd"])
    p, adjusted = combine_pvalues({"only": 0.02})
    assert p == 0.02 and adjusted == {"only": 0.02}


def test_fisher_matches_scipy():
    fisher = combine_pvalues(P, method="fisher")
    expected = scipy.stats.combine_pvalues(list(P.values()), method="fisher").pvalue
    assert fisher.p_value == pytest.approx(expected, rel=1e-12)
    assert fisher.adjusted == {} and fisher.rejected(0.05) == []
    assert combine_pvalues({"a": 0.0, "b": 0.5}, "fisher").p_value == 0.0


def test_permutation_tests_combined_with_holm_flag_only_the_shifted_signal():
    """Several signals at a family-wise level, the way screen() does it: one PermutationTest per signal,
    their p-values combined with Holm's correction."""
    rng = np.random.default_rng(14)
    names = ["projection", "entropy", "length"]
    tests = {n: PermutationTest(seed=i) for i, n in enumerate(names)}
    for n in names:
        tests[n].fit(rng.normal(size=300))

    def family(data):
        return combine_pvalues({n: tests[n].predict(data[n]).p_value for n in names})

    assert family({n: rng.normal(size=300) for n in names}).rejected(0.01) == []
    data = {n: rng.normal(size=300) for n in names}
    data["projection"] += 0.5
    shifted = family(data)
    assert shifted.rejected(0.01) == ["projection"]
    assert shifted.p_value == pytest.approx(3 / 2001)  # Holm: 3 * the smallest p


def test_split_ert():
    assert split_ert(200, 3) == 600


# ----------------------------------------------------------------------------- errors and contract


def test_predict_before_fit_or_calibrate_says_which_call_is_missing():
    with pytest.raises(RuntimeError, match=r"predict\(\) called before fit\(\)"):
        CUSUMDetector().predict([0.0])
    with pytest.raises(RuntimeError, match=r"before fit\(\)"):
        PermutationTest().predict([0.0])
    det = CUSUMDetector().fit([0.0, 1.0, 2.0])
    for call in (lambda: det.predict([0.0]), lambda: det.update(0.0), lambda: det.run([0.0])):
        with pytest.raises(RuntimeError, match=r"before calibrate\(\): call calibrate\(target_ert="):
            call()
    with pytest.raises(RuntimeError, match=r"calibrate\(\) called before fit\(\)"):
        CUSUMDetector().calibrate(target_ert=100)


@pytest.mark.parametrize("make", [CUSUMDetector, PermutationTest])
def test_bad_references_and_inputs_raise_value_errors_naming_the_problem(make):
    with pytest.raises(ValueError, match="at least 2 values"):
        make().fit([1.0])
    with pytest.raises(ValueError, match="zero variance"):
        make().fit([3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match=r"reference .*1 NaN value\(s\) \(first at index 2\)"):
        make().fit([1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match="infinite"):
        make().fit([1.0, float("inf"), 2.0])
    with pytest.raises(ValueError, match="1-D"):
        make().fit([[1.0, 2.0], [3.0, 4.0]])
    det = make(h=1.0) if make is CUSUMDetector else make()
    det.fit([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        det.predict([0.5, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        det.predict([])


def test_streaming_and_parameter_errors():
    det = CUSUMDetector(h=1.0).fit([0.0, 1.0])
    with pytest.raises(ValueError, match="batch_score contains 1 NaN"):
        det.update(float("nan"))
    with pytest.raises(ValueError, match="single number"):
        det.update([1.0, 2.0])
    with pytest.raises(ValueError, match="batch scores contains 1 NaN"):
        det.run([0.0, float("nan")])
    assert det.step == 0  # validated before anything was consumed
    with pytest.raises(ValueError, match=r"k must be finite and in \[0.0, inf\) \(got -1\)"):
        CUSUMDetector(k=-1)
    with pytest.raises(ValueError, match="larger than every standardized reference score"):
        CUSUMDetector(k=10).fit([0.0, 1.0, 2.0]).calibrate(target_ert=100)
    with pytest.raises(ValueError, match="alternative must be one of"):
        PermutationTest(alternative="less")
    with pytest.raises(ValueError, match=r"p_values\['a'\] must be finite and in \[0.0, 1.0\]"):
        combine_pvalues({"a": float("nan")})
    with pytest.raises(ValueError, match="method must be one of"):
        combine_pvalues(P, method="bh")
    with pytest.raises(ValueError, match="type is 'PermutationTest'"):
        CUSUMDetector().load_state_dict(PermutationTest().state_dict())
    state = CUSUMDetector().state_dict()
    state["extra"] = 1
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        CUSUMDetector().load_state_dict(state)


def test_verdict_to_dict_is_plain_json():
    v = Verdict("d", np.bool_(True), np.float64(2.5), 1.0, np.float32(0.01),
                {"n": np.int64(3), "xs": np.arange(2), "nested": {"t": (1, 2)}})
    d = v.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["evidence"] == {"n": 3, "xs": [0, 1], "nested": {"t": [1, 2]}}
    assert type(d["flagged"]) is bool and type(d["p_value"]) is float
