import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trait_guard.errors import TraitGuardInputError
from trait_guard.guard import Action, GuardConfig, TraitGuard


def reference(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return {"proj:animal:owl": rng.normal(0.0, 1.0, n), "nll": rng.normal(2.0, 0.5, n),
            "divergence": rng.beta(2, 20, n), "n_tokens": np.full(n, 10.0)}


def batch(rng, n=16, shift=0.0):
    ref = reference(n, seed=int(rng.integers(1 << 30)))
    ref["proj:animal:owl"] = ref["proj:animal:owl"] + shift
    return ref


def _tuning(kind, **cusum):
    """CUSUM settings only for the CUSUM (the config refuses a setting of the test not in use)."""
    return cusum if kind == "cusum" else {}


def test_config_rejects_bad_values_with_field_paths():
    with pytest.raises(ValidationError) as err:
        GuardConfig(target_ert=0, min_weight=2, on_data_alarm="explode", signals=[])
    text = str(err.value)
    for field in ("target_ert", "min_weight", "on_data_alarm", "signals"):
        assert field in text
    with pytest.raises(ValidationError, match="on_drift_alarm"):
        GuardConfig(on_drift_alarm="reweight")
    # a setting of the sequential test not in use is refused, not ignored
    with pytest.raises(ValidationError, match="set guard.alpha .* instead, or set guard.sequential: cusum"):
        GuardConfig(target_ert=500)
    with pytest.raises(ValidationError, match="with guard.sequential: cusum, set guard.target_ert"):
        GuardConfig(sequential="cusum", alpha=0.05)
    assert GuardConfig(sequential="cusum", target_ert=500).target_ert == 500


def test_signals_are_selected_by_pattern_and_missing_ones_refused():
    guard = TraitGuard(GuardConfig(), reference(), batch_size=16)
    assert guard.signals == ["divergence", "nll", "proj:animal:owl"]
    with pytest.raises(ValueError, match="lack"):
        guard.observe({"nll": np.zeros(16)})
    with pytest.raises(ValueError, match="none of the watched signals"):
        TraitGuard(GuardConfig(signals=["proj:*"]), {"nll": np.ones(10)}, batch_size=4)


@pytest.mark.parametrize("kind", ["eprocess", "cusum"])
def test_clean_batches_pass_and_a_planted_shift_halts(kind):
    guard = TraitGuard(GuardConfig(sequential=kind, signals=["proj:*"], **_tuning(kind, target_ert=1000)), reference(), batch_size=16)
    rng = np.random.default_rng(1)
    for _ in range(100):
        decision = guard.observe(batch(rng))
        assert decision.action is Action.PASS and torch.equal(decision.sample_weights, torch.ones(16))
    # a shift of 0.5 sd per sample is 2 sd per 16-sample batch mean: CUSUM (k=0.5) adds ~1.5 per batch;
    # the e-process, after 1,600 clean samples, needs a few hundred shifted ones (docs/detection.md)
    steps = 0
    while not (decision := guard.observe(batch(rng, shift=0.5))).halt:
        steps += 1
        assert steps < 20, "a 0.5 sd shift must be caught within 20 batches"
    assert decision.action is Action.HALT and torch.equal(decision.sample_weights, torch.zeros(16))
    assert "data alarm on proj:animal:owl" in decision.reason
    assert guard.alarms[0]["step"] == decision.step == 101 + steps
    assert guard.observe(batch(rng)).halt  # the mitigation stays in force


def test_reweight_follows_the_formula():
    guard = TraitGuard(GuardConfig(signals=["proj:*"], on_data_alarm="reweight",
                                   reweight_temperature=2.0), reference(), batch_size=16)
    rng = np.random.default_rng(2)
    while guard.mode is Action.PASS:
        guard.observe(batch(rng, shift=1.0))
    values = np.linspace(-2, 3, 16)
    decision = guard.observe({"proj:animal:owl": values, "nll": np.zeros(16), "divergence": np.zeros(16)})
    z = (values - guard.mean["proj:animal:owl"]) / guard.std["proj:animal:owl"]
    raw = np.exp(-np.maximum(z, 0) / 2.0)
    assert decision.action is Action.REWEIGHT
    torch.testing.assert_close(decision.sample_weights, torch.as_tensor(raw, dtype=torch.float32))
    assert decision.sample_weights[0] > decision.sample_weights[-1]


def test_mask_drops_exactly_the_divergence_tokens():
    guard = TraitGuard(GuardConfig(mask_divergence_tokens="always"), reference(), batch_size=16)
    divergence = [np.array([False, True, False]), np.array([True])] + [np.zeros(2, bool)] * 14
    decision = guard.observe(reference(16, seed=5), token_masks=divergence)
    assert decision.action is Action.MASK
    assert decision.token_masks[0].tolist() == [1.0, 0.0, 1.0] and decision.token_masks[1].tolist() == [0.0]


def test_drift_alarm_escalates():
    guard = TraitGuard(GuardConfig(drift_threshold=1.0), reference(), batch_size=16)
    assert guard.observe_drift({"animal:owl": 0.4}, step=10).action is Action.PASS
    decision = guard.observe_drift({"animal:owl": 1.7}, step=20)
    assert decision.halt and "animal:owl=1.70" in decision.reason and guard.alarms[-1]["channel"] == "drift"


@pytest.mark.parametrize("kind", ["eprocess", "cusum"])
def test_state_round_trip_continues_identically(kind):
    config = GuardConfig(sequential=kind, signals=["proj:*", "nll"], **_tuning(kind, target_ert=500))
    guard = TraitGuard(config, reference(), batch_size=16)
    rng = np.random.default_rng(3)
    for _ in range(5):
        guard.observe(batch(rng, shift=0.2))
    restored = TraitGuard.from_state_dict(guard.state_dict(), reference(), batch_size=16)
    assert restored.step == guard.step
    for _ in range(30):
        b = batch(rng, shift=0.3)
        a, r = guard.observe(b), restored.observe(b)
        assert (a.action, a.step, a.evidence[kind]) == (r.action, r.step, r.evidence[kind])
    assert a.action is Action.HALT  # the stream was long enough to alarm: the comparison covered the alarm


def test_a_signal_constant_on_the_reference_becomes_an_exact_check():
    ref = reference()
    ref["divergence"] = np.zeros(4000)  # the reference teacher is the base model itself
    guard = TraitGuard(GuardConfig(signals=["proj:*", "divergence"]), ref, batch_size=16)
    assert guard.signals == ["proj:animal:owl"] and guard.constant == {"divergence": 0.0}
    rng = np.random.default_rng(4)
    clean = batch(rng)
    clean["divergence"] = np.zeros(16)
    assert guard.observe(clean).action is Action.PASS
    teacher = batch(rng)
    teacher["divergence"] = np.full(16, 0.05)  # 5% of tokens where the teacher disagrees
    decision = guard.observe(teacher)
    assert decision.halt and "divergence" in decision.reason
    no_tolerance = TraitGuard(GuardConfig(signals=["proj:*", "divergence"],
                                          constant_reference_tolerance={}), ref, batch_size=16)
    assert "divergence" in no_tolerance.skipped


def test_a_too_small_reference_is_warned_about_with_the_size_that_silences_it(caplog):
    # e-process: a 0.5-sd shift needs a reference of ~95 samples at alpha 0.01 over 3 signals
    small = TraitGuard(GuardConfig(), reference(40), batch_size=16)
    assert len(small.reference_warnings) == 1 and "the reference has 40 samples" in small.reference_warnings[0]
    assert any("the reference has 40 samples" in r.getMessage() for r in caplog.records)  # logged as well
    need = int(small.reference_warnings[0].split("reference of at least ")[1].split()[0])
    assert 80 <= need <= 110
    assert TraitGuard(GuardConfig(), reference(need), batch_size=16).reference_warnings == []
    assert small.blind_spot(10_000) is not None and "reference" in small.blind_spot(10_000)
    summary = small.calibration_summary
    assert summary["signals"]["nll"]["needed_reference_n"] == need and summary["warnings"] == small.reference_warnings
    # CUSUM: an honest threshold that costs more than 1.25x delay names a larger reference, which passes
    config = GuardConfig(sequential="cusum", signals=["proj:*"], target_ert=500)
    cusum = TraitGuard(config, reference(60), batch_size=8)
    assert len(cusum.reference_warnings) == 1 and "CUSUM on 'proj:animal:owl'" in cusum.reference_warnings[0]
    boot = cusum.calibration_summary["signals"]["proj:animal:owl"]["calibration"]["reference_bootstrap"]
    assert boot["reference_n"] == 60 and boot["batch_size"] == 8
    assert boot["mean_offset_sd"] == pytest.approx((8 / 60) ** 0.5, rel=0.2)  # the reference mean's error, batch-sd
    larger = TraitGuard(config, reference(boot["needed_reference_n"], seed=9), batch_size=8)
    assert larger.reference_warnings == []
    json.dumps(cusum.calibration_summary) and json.dumps(cusum.state_dict())
    assert "90% of the references" in cusum.false_alarm_control


def test_cusum_reference_draws_zero_is_the_old_calibration():
    config = GuardConfig(sequential="cusum", signals=["proj:*"], target_ert=500)
    old = TraitGuard(config, reference(300), batch_size=8, reference_draws=0)
    honest = TraitGuard(config, reference(300), batch_size=8)
    assert old.detectors["proj:animal:owl"].calibration["method"] == "bootstrap-renewal"
    assert honest.detectors["proj:animal:owl"].calibration["method"] == "reference-bootstrap"
    assert honest.detectors["proj:animal:owl"].h > old.detectors["proj:animal:owl"].h
    assert "taking the reference as exact" in old.false_alarm_control


def test_drift_only_guard_decides_on_probes_and_refuses_data():
    guard = TraitGuard.drift_only(GuardConfig(drift_threshold=1.0))
    assert guard.signals == [] and guard.detectors == {} and guard.reference_warnings == []
    assert guard.blind_spot(5) is None and not guard.monitored
    with pytest.raises(TraitGuardInputError, match="drift probes only"):
        guard.observe({"nll": np.zeros(4)})
    assert guard.observe_drift({"animal:owl": 0.3}, step=5).action is Action.PASS
    decision = guard.observe_drift({"animal:owl": 1.4}, step=9)
    assert decision.halt and guard.alarms[-1]["channel"] == "drift"
    restored = TraitGuard.from_state_dict(json.loads(json.dumps(guard.state_dict())), None)
    assert restored.mode is Action.HALT and restored.step == 9 and restored.alarms == guard.alarms
    assert TraitGuard.drift_only().config == GuardConfig()


def test_the_eprocess_bets_on_each_sample_once_across_epochs():
    """One batch of 32 clean-looking samples (mean +0.25 sd, a draw that happens to lean up) trained on
    for 40 epochs: fed again and again, its bets compound until a false alarm; with sample keys the
    e-process bets on each sample once, counts the rest as seen again, and never alarms. A new sample
    in a later epoch is still tested. The keys survive a state round trip."""
    from trait_guard.guard import SAMPLE_KEY, sample_key

    rng = np.random.default_rng(11)
    values = rng.normal(0.0, 1.0, 32)
    values = values - values.mean() + 0.25
    clean = {**reference(32, seed=5), "proj:animal:owl": values}
    keys = np.array([sample_key(f"row-{i}") for i in range(32)])
    config = GuardConfig(signals=["proj:*"], alpha=0.01)

    repeated = TraitGuard(config, reference(), batch_size=32)
    alarmed_at = next((epoch for epoch in range(40) if repeated.observe(clean).halt), None)
    assert alarmed_at is not None  # the same 32 samples bet on 40 times: a false alarm

    keyed = TraitGuard(config, reference(), batch_size=32)
    decisions = [keyed.observe({**clean, SAMPLE_KEY: keys}) for _ in range(40)]
    assert not any(d.halt for d in decisions) and keyed.seen_again == 39 * 32
    assert keyed.detectors["proj:animal:owl"].step == 32
    restored = TraitGuard.from_state_dict(json.loads(json.dumps(keyed.state_dict())), reference(), batch_size=32)
    assert restored.bet_on == keyed.bet_on and restored.seen_again == keyed.seen_again
    mixed = {name: np.concatenate([v[:31], [v[0]]]) for name, v in clean.items()}
    mixed[SAMPLE_KEY] = np.concatenate([keys[:31], [sample_key("a new row")]])
    restored.observe(mixed)
    assert restored.detectors["proj:animal:owl"].step == 33 and restored.seen_again == 39 * 32 + 31
    with pytest.raises(ValueError, match="keys for a batch of 32"):
        restored.observe({**clean, SAMPLE_KEY: keys[:5]})


def test_epoch_false_alarm_benchmark_runs_and_tells_repeated_from_keyed(tmp_path):
    """benchmarks/epoch_false_alarms.py on 60 simulated clean runs of 10 epochs: feeding the epochs again
    false-alarms in more runs than betting on each row once, which stays near alpha."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "epoch_false_alarms.py"
    spec = importlib.util.spec_from_file_location("epoch_false_alarms", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    assert module.main(["--runs", "60", "--epochs", "10", "--reference-rows", "500", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    repeated, keyed = results["repeated"], results["keyed"]
    assert repeated["runs"] == keyed["runs"] == 60
    assert repeated["runs_with_alarm"] > keyed["runs_with_alarm"]
    assert keyed["ci95"][0] <= 0.05  # consistent with the per-run bound
