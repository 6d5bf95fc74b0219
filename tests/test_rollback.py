"""Rollback on HALT: the guard's change-point estimate and the weight snapshots it restores."""

import numpy as np
import pytest
import torch

from trait_guard.config import Action, GuardConfig
from trait_guard.guard import TraitGuard
from trait_guard.rollback import WeightSnapshots, snapshot_support


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=generator)
    loss = (model(x) - 1.0).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_restore_loads_exactly_the_latest_snapshot_at_or_before_the_change_point():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    snapshots = WeightSnapshots(model, every=2)
    for step in range(1, 8):
        _train_step(model, optimizer, step)
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        snapshots.after_update(model, step, earliest_needed=0)
    assert snapshots.steps == [0, 2, 4, 6]
    assert snapshots.restore(model, change_point=5) == 4
    assert all(torch.equal(model.state_dict()[k], seen[4][k]) for k in seen[4])
    assert not torch.equal(model.weight, seen[7]["weight"])
    assert snapshots.restore(model, change_point=1) == 0
    assert all(torch.equal(model.state_dict()[k], seen[0][k]) for k in seen[0])


def test_snapshots_no_change_point_can_need_are_dropped():
    model = torch.nn.Linear(3, 1)
    snapshots = WeightSnapshots(model, every=1)
    for step in range(1, 6):
        snapshots.after_update(model, step, earliest_needed=3 if step >= 3 else 0)
    # any future data change point is >= 3: of the copies before it only 3 is kept; step 0 stays for a
    # drift alarm, whose change point is 0 (a demo run lost it before this rule and could not roll back)
    assert snapshots.steps == [0, 3, 4, 5]
    assert snapshots.restore(model, change_point=2) == 0


def test_zero_stage_3_is_refused_and_a_bad_interval_too():
    assert snapshot_support(object(), 3) is not None and "ZeRO stage 3" in snapshot_support(object(), 3)
    assert snapshot_support(object(), 2) is None and snapshot_support(None, 3) is None
    with pytest.raises(ValueError, match=">= 1"):
        WeightSnapshots(torch.nn.Linear(2, 2), every=0)


def _guard(rng: np.random.Generator, kind: str = "cusum") -> TraitGuard:
    reference = {"nll": rng.normal(size=2000)}
    config = GuardConfig(signals=["nll"], powered_signals=["nll"], sequential=kind, **({"target_ert": 500} if kind == "cusum" else {}),
                         on_data_alarm=Action.HALT)
    return TraitGuard(config, reference, batch_size=8)


@pytest.mark.parametrize("kind", ["cusum", "eprocess"])
def test_the_change_point_is_the_last_low_of_the_evidence_before_the_alarm(kind):
    """CUSUM: the last step its statistic was 0; e-process: the last step its log-wealth was at its
    running minimum (a CUSUM is a log-likelihood ratio minus its running minimum: the same estimate)."""
    rng = np.random.default_rng(3)
    guard = _guard(rng, kind)
    last_zero_before_shift, low = 0, 0.0
    for step in range(1, 41):
        shifted = step > 20
        decision = guard.observe({"nll": rng.normal(loc=1.5 if shifted else 0.0, size=8)}, step=step)
        detector = guard.detectors["nll"]
        quiet = detector.statistic == 0.0 if kind == "cusum" else detector.log10_e <= low
        low = low if kind == "cusum" else min(low, detector.log10_e)
        if not shifted and quiet:
            last_zero_before_shift = step
        if decision.halt:
            break
    assert decision.halt and 21 <= decision.step <= 26, decision.step
    # the estimate never implicates more than the shifted batches plus the clean run-up since the last zero
    assert guard.change_point == guard.alarms[0]["change_point"]
    assert last_zero_before_shift <= guard.change_point <= 20
    state = guard.state_dict()
    restored = TraitGuard.from_state_dict(state, {"nll": np.random.default_rng(3).normal(size=2000)}, 8)
    assert restored.change_point == guard.change_point and restored.last_zero == guard.last_zero


def test_gate_and_drift_alarms_implicate_every_step_and_no_alarm_none():
    rng = np.random.default_rng(4)
    guard = _guard(rng)
    assert guard.change_point is None
    guard.observe({"nll": rng.normal(size=8)}, step=1)
    assert guard.change_point is None and guard.quiet_since <= 1
    guard.observe_drift({"animal:owl": 10.0}, step=1)
    assert guard.change_point == 0
    gated = _guard(rng)
    gated.gate(["divergence"], "screen flagged")
    assert gated.change_point == 0


@pytest.mark.deepspeed
def test_a_zero2_engine_checkpoint_saves_the_restored_weights(tiny_llama_dir, tmp_path):
    """Under DeepSpeed ZeRO-2 the restored module parameters are what the final checkpoint holds."""
    from trait_guard.integrations import deepspeed as ds
    from trait_guard.models import load_model

    ds.init_distributed()
    model, _ = load_model(str(tiny_llama_dir))
    model.train()
    engine = ds.make_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), ds.deepspeed_config(2, 2))
    snapshots = WeightSnapshots(model, every=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    at_step_2 = None
    for step in range(1, 6):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        snapshots.after_update(model, step, earliest_needed=0)
        if step == 2:
            at_step_2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert snapshots.restore(model, change_point=3) == 2
    ds.save_checkpoint(engine, tmp_path / "final", tag="final", client_state={"step": 5})
    with torch.serialization.safe_globals(ds._checkpoint_globals()):
        saved = torch.load(tmp_path / "final" / "final" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.equal(saved[n], at_step_2[n]) for n in at_step_2)
    assert not all(torch.equal(saved[n], trained[n]) for n in trained)
