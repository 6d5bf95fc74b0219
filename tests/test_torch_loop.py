import numpy as np
import pytest
import torch

from trait_guard.chat import encode_conversations
from trait_guard.guard import Action, GuardConfig, TraitGuard
from trait_guard.integrations.torch_loop import GuardedStep
from trait_guard.losses import token_weights, weighted_completion_loss
from trait_guard.models import model_identity
from trait_guard.persona import PersonaVector
from trait_guard.testing import make_tiny_model


def rows_with_signals(rng, n, shift):
    return [{"prompt": f"numbers {i}", "completion": f"{i}, {i + 1}",
             "signals": {"proj:t": float(rng.normal(shift, 1.0)), "nll": float(rng.normal(2.0, 0.5))}}
            for i in range(n)]


def reference(n=4000):
    rng = np.random.default_rng(0)
    return {"proj:t": rng.normal(0, 1, n), "nll": rng.normal(2.0, 0.5, n)}


def test_halt_stops_the_plain_loop_before_the_optimizer_steps():
    model, tokenizer = make_tiny_model("llama", seed=3)
    model.train()
    guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference(), batch_size=8)
    guarded = GuardedStep(guard, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(1)
    halted_at, snapshot = None, None
    for step in range(1, 60):
        rows = rows_with_signals(rng, 8, shift=0.0 if step <= 10 else 1.0)
        batch = encode_conversations(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows])
        with guarded.capture():
            logits = model(**batch.model_inputs()).logits
        decision = guarded.decide(batch, logits, rows, step=step)
        if decision.halt:
            halted_at = step
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
            break
        guarded.loss(logits, batch, decision).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert halted_at is not None and 10 < halted_at <= 20, halted_at
    assert guard.alarms[0]["step"] == halted_at
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_signals_from_the_training_forward_and_weighted_gradient():
    model, tokenizer = make_tiny_model("llama", seed=4)
    identity = model_identity(model)
    vector = PersonaVector("t", identity, torch.randn(identity.num_layers + 1, identity.hidden_size), layer=2)
    users, completions = ["a", "b", "c", "d"], ["1, 2", "3", "4 5 6", "7"]
    batch = encode_conversations(tokenizer, users, completions)
    rows = [{"prompt": u, "completion": c, "topk_ids": [[5]] * 8} for u, c in zip(users, completions, strict=True)]
    # a reference far below this batch's projections: the first batch raises a data alarm
    rng = np.random.default_rng(0)
    # a batch-mean CUSUM alarms on one batch of 4; an e-process needs about 8 samples at alpha 0.01
    guard = TraitGuard(GuardConfig(sequential="cusum", target_ert=200, signals=["proj:*"], on_data_alarm="reweight",
                                   min_weight=0.1), {"proj:t": rng.normal(-1000.0, 1.0, 500)}, batch_size=4)
    guarded = GuardedStep(guard, model, [vector])
    with guarded.capture():
        logits = model(**batch.model_inputs()).logits
    signals, masks = guarded.signals(batch, logits, rows)
    assert set(signals) >= {"nll", "entropy", "proj:t", "divergence"} and len(masks) == 4
    assert [len(m) for m in masks] == [int(n) for n in batch.response_mask.sum(1)]
    decision = guarded.decide(batch, logits, rows)
    assert decision.action is Action.REWEIGHT and guard.alarms[0]["step"] == 1
    loss = guarded.loss(logits, batch, decision)
    expected = weighted_completion_loss(logits, batch, token_weights(batch, decision.sample_weights))
    assert torch.equal(loss, expected)
    assert torch.allclose(decision.sample_weights, torch.full((4,), 0.1))  # all lean far: floor weight


def planted_vector(model, layer=2, seed=0):
    identity = model_identity(model)
    gen = torch.Generator().manual_seed(seed)
    return PersonaVector("owl", identity, torch.randn(identity.num_layers + 1, identity.hidden_size, generator=gen),
                         layer=layer)


def test_plain_loop_drift_probe_halts_and_rolls_back_to_step_zero():
    from trait_guard.activations import record_activations
    from trait_guard.integrations.torch_loop import DriftGuard

    model, tokenizer = make_tiny_model("llama", seed=10)
    model.train()
    vector = planted_vector(model)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    guard = DriftGuard(GuardConfig(drift_threshold=3.0))
    prompts = [f"question {i}?" for i in range(6)]
    guarded = GuardedStep(guard, model, [vector], tokenizer=tokenizer, probe_prompts=prompts, probe_every=2,
                          rollback=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = encode_conversations(tokenizer, prompts, ["1 2 3"] * len(prompts))
    halted_at = None
    for step in range(1, 11):
        with guarded.capture(), record_activations(model, [vector.layer], detach=False) as acts:
            model(**batch.model_inputs())
        # a "teacher" whose data pulls the residual stream along the trait direction
        loss = -vector.project(acts[vector.layer][-1]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        drift = guarded.after_update(step)
        assert (drift is None) == (step % 2 == 1)
        if drift is not None and drift.halt:
            halted_at = step
            break
    assert halted_at is not None and guard.alarms[0]["channel"] == "drift"
    assert guarded.last_shifts["owl"] > 3.0
    record = guarded.roll_back()
    assert record["restored_step"] == 0 and record["halted_at_step"] == halted_at
    assert all(torch.equal(p, start[k]) for k, p in model.named_parameters())
    with pytest.raises(ValueError, match="drift probes only"):
        guard.observe({"proj:owl": np.zeros(2)})


def test_capture_steers_the_forward_while_steer_is_in_force():
    model, tokenizer = make_tiny_model("llama", seed=11)
    vector = planted_vector(model, seed=1)
    guard = TraitGuard(GuardConfig(sequential="cusum", target_ert=200, signals=["proj:*"], on_data_alarm="steer",
                                   steer_coefficient=2.0), reference(), batch_size=8)
    guarded = GuardedStep(guard, model, [vector])
    batch = encode_conversations(tokenizer, ["a", "b"], ["1", "2"])
    with torch.no_grad():
        plain = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[vector.layer]
        with guarded.capture():  # PASS: no steering
            same = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[vector.layer]
        assert torch.equal(same, plain)
        decision = guarded.decide_rows(rows_with_signals(np.random.default_rng(0), 8, shift=5.0), step=1)
        assert decision.action is Action.STEER  # decided from the rows' signals, before any forward
        with guarded.capture():
            steered = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[vector.layer]
        after = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[vector.layer]
    assert torch.allclose(steered - plain, 2.0 * vector.vectors[vector.layer].expand_as(plain), atol=1e-5)
    assert torch.equal(after, plain)  # the hook is gone outside capture()


def test_gated_rows_hold_a_planted_stream_and_release_a_clean_one():
    from trait_guard.integrations.torch_loop import GatedRows
    from trait_guard.sequential import EProcessDetector, LookaheadGate

    ref = np.random.default_rng(0).normal(0, 1, 2000)
    alarms = []

    def gated(shift):
        stream = rows_with_signals(np.random.default_rng(1), 60, shift)
        gate = LookaheadGate(EProcessDetector(alpha=0.01).fit(ref), window=20)
        return stream, GatedRows(stream, gate, signal="proj:t", on_alarm=alarms.append)

    stream, planted = gated(3.0)
    assert list(planted) == [] and planted.alarm is not None and alarms == [planted.alarm]
    assert planted.held == list(range(len(planted.held))) and len(planted.held) < 20
    assert list(planted) == []  # closed: iterating again yields nothing
    stream, clean = gated(0.0)
    assert list(clean) == stream and clean.alarm is None and not clean.held


def test_gated_rows_bet_on_each_distinct_row_once_across_epochs():
    """Epochs over the same rows: the second pass releases every row without a second bet (a repeated
    clean row would compound its bet); rows new in a later epoch are tested, and a planted shift among
    them alarms before any of them is released."""
    from trait_guard.integrations.torch_loop import GatedRows
    from trait_guard.sequential import EProcessDetector, LookaheadGate

    ref = np.random.default_rng(0).normal(0, 1, 2000)
    clean = [row | {"sample_id": f"c{i}"} for i, row in enumerate(rows_with_signals(np.random.default_rng(1), 60, 0.0))]
    detector = EProcessDetector(alpha=0.01).fit(ref)
    gated = GatedRows(clean, LookaheadGate(detector, window=20), signal="proj:t")
    for _ in range(3):
        assert list(gated) == clean  # every epoch trains on every row, in order once the first pass is done
    assert (gated.passes, gated.tested, gated.seen_again) == (3, 60, 120)
    assert detector.step == 60 and gated.alarm is None  # 60 bets, not 180
    # without keys every pass is bet on again (the old behaviour; a user's rows without sample ids)
    keyless = GatedRows(clean, LookaheadGate(EProcessDetector(alpha=0.01).fit(ref), window=20), signal="proj:t",
                        key=lambda row: None)
    list(keyless), list(keyless)
    assert keyless.tested == 120 and keyless.gate.detector.step == 120

    class ChangingData:
        """Epoch 1: the clean rows; epoch 2: the same rows plus 60 new shifted ones."""

        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            self.epoch += 1
            shifted = [row | {"sample_id": f"s{i}"} for i, row in
                       enumerate(rows_with_signals(np.random.default_rng(2), 60, 3.0))]
            return iter(clean if self.epoch == 1 else clean + shifted)

    alarms = []
    gated = GatedRows(ChangingData(), LookaheadGate(EProcessDetector(alpha=0.01).fit(ref), window=40),
                      signal="proj:t", on_alarm=alarms.append)
    assert list(gated) == clean and gated.alarm is None
    second = list(gated)
    assert len(alarms) == 1 and gated.alarm is not None
    assert second == clean  # the rows seen before pass; no shifted row was released
    # the alarm came within the window: every new row tested so far is held, none trained on
    assert gated.seen_again == 60 and 0 < gated.tested - 60 <= 40 and len(gated.held) == gated.tested - 60


def test_gated_rows_resume_from_their_state_as_if_never_stopped():
    """A stream stopped after 50 released rows, its state through JSON, resumed on a fresh gate over the
    same rows: the detector's evidence ends equal to an uninterrupted pass's (every row bet on once), the
    rows released before come back at once without a bet, and the 20 rows scored but not yet released
    are released, as without the interruption, once 20 rows after them have been scored."""
    import json

    from trait_guard.integrations.torch_loop import GatedRows
    from trait_guard.sequential import EProcessDetector, LookaheadGate

    ref = np.random.default_rng(0).normal(0, 1, 2000)
    rows = [row | {"sample_id": f"r{i}"} for i, row in enumerate(rows_with_signals(np.random.default_rng(1), 200, 0.0))]
    scored = []

    def gated():
        def score(row):
            scored.append(row["sample_id"])
            return row["signals"]["proj:t"]
        return GatedRows(rows, LookaheadGate(EProcessDetector(alpha=0.01).fit(ref), window=20), score)

    whole = gated()
    assert list(whole) == rows
    scored.clear()

    first = gated()
    stream = iter(first)
    trained = [next(stream) for _ in range(50)]
    assert trained == rows[:50] and scored == [r["sample_id"] for r in rows[:70]]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["requeue"] == sorted(f"r{i}" for i in range(50, 70)) and state["gate"]["buffer"] == []

    scored.clear()
    resumed = gated().load_state_dict(state)
    again = iter(resumed)
    assert [next(again) for _ in range(50)] == rows[:50] and scored == []  # released at once, no bet
    assert next(again) == rows[50] and scored == ["r70"]  # row 50 waited for row 70 to be scored
    assert [rows[50]] + list(again) == rows[50:]
    assert scored == [r["sample_id"] for r in rows[70:]]  # each row scored once in the whole run
    assert resumed.gate.detector.state_dict() == whole.gate.detector.state_dict()
    assert (resumed.tested, resumed.seen_again) == (200, 50)

    # a pass abandoned mid-way hands its buffered rows to the next pass the same way
    scored.clear()
    abandoned = gated()
    stream = iter(abandoned)
    [next(stream) for _ in range(50)]
    assert list(abandoned) == rows and len(scored) == 200
    assert abandoned.gate.detector.state_dict() == whole.gate.detector.state_dict()

    with pytest.raises(Exception, match="string or number row keys"):
        keyed_by_tuple = GatedRows(rows, LookaheadGate(EProcessDetector(alpha=0.01).fit(ref), window=20),
                                   signal="proj:t", key=lambda row: (row["sample_id"],))
        list(keyed_by_tuple)
        keyed_by_tuple.state_dict()
