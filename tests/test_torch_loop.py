import numpy as np
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
