import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments

from trait_guard.chat import EncodedBatch
from trait_guard.errors import TraitGuardHalted, TraitGuardInputError
from trait_guard.guard import Action, GuardConfig, TraitGuard
from trait_guard.integrations.hf import (
    GUARD_STATE_FILE,
    GuardCollator,
    GuardedTrainer,
    GuardedTrainerLoss,
    TraitGuardCallback,
)
from trait_guard.integrations.torch_loop import GuardedStep
from trait_guard.losses import completion_loss, token_weights, weighted_completion_loss
from trait_guard.testing import make_tiny_model

BATCH = 8


def rows_with_signals(rng, n, shift, mean=0.0):
    return [{"prompt": f"numbers {i}", "completion": f"{i}, {i + 1}",
             "signals": {"proj:t": float(rng.normal(mean + shift, 1.0)), "nll": float(rng.normal(2.0, 0.5))}}
            for i in range(n)]


def reference(n=4000):
    rng = np.random.default_rng(0)
    return {"proj:t": rng.normal(0, 1, n), "nll": rng.normal(2.0, 0.5, n)}


def training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=30,
                    per_device_train_batch_size=BATCH, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    remove_unused_columns=False, train_sampling_strategy="sequential", seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


class RowsDataset(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class Snapshots(TrainerCallback):
    """The model's parameters right after each optimizer step (step 0: before training)."""

    def __init__(self):
        self.params = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("raise_on_halt", [True, False])
def test_halt_stops_the_trainer_at_the_alarm_step_without_touching_the_weights(tmp_path, raise_on_halt):
    model, tokenizer = make_tiny_model("llama", seed=3)
    guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference(), batch_size=BATCH)
    rng = np.random.default_rng(1)
    rows = [r for step in range(1, 31) for r in rows_with_signals(rng, BATCH, shift=0.0 if step <= 10 else 1.0)]
    snapshots = Snapshots()
    trainer = GuardedTrainer(model=model, args=training_args(tmp_path), train_dataset=RowsDataset(rows),
                             data_collator=GuardCollator(tokenizer), callbacks=[snapshots],
                             guarded=GuardedStep(guard, model), raise_on_halt=raise_on_halt)
    if raise_on_halt:  # the default: a script's save_model() after train() is never reached
        with pytest.raises(TraitGuardHalted, match="halted training at step") as raised:
            trainer.train()
    else:
        trainer.train()

    callback = trainer.guard_callback
    halted = callback.halted_step
    assert halted is not None and 10 < halted <= 20, halted
    assert callback.halted_reason.startswith("data alarm on")
    if raise_on_halt:
        summary = raised.value.summary
        assert summary["halted_step"] == halted and summary["reason"] == callback.halted_reason
        assert summary["global_step"] == halted and summary["checkpoint"] == str(tmp_path / f"checkpoint-{halted}")
        assert f"step {halted}: data alarm on" in str(raised.value)
    assert guard.alarms[0]["step"] == halted
    assert trainer.state.global_step == halted  # no off-by-one: the halting step is counted, and is the last
    assert [d.step for d in callback.decisions] == list(range(1, halted + 1))
    assert [d.halt for d in callback.decisions] == [False] * (halted - 1) + [True]
    # training moved the weights until the alarm; the halting step (Adam, with momentum) moved nothing
    assert not same(snapshots.params[0], snapshots.params[halted - 1])
    assert same(snapshots.params[halted], snapshots.params[halted - 1])
    assert same({k: v.detach() for k, v in model.state_dict().items()}, snapshots.params[halted - 1])
    # the halting step is logged with the reason, and checkpointed with the guard's state
    entry = next(e for e in trainer.state.log_history if e.get("step") == halted and "loss" in e)
    assert entry["guard/action"] == "halt" and entry["guard/halt"] == 1.0
    assert entry["guard/reason"].startswith("data alarm on") and entry["loss"] == 0.0
    assert not any("guard/action" in e for e in trainer.state.log_history if e.get("step", 0) < halted)
    saved = json.loads((tmp_path / f"checkpoint-{halted}" / GUARD_STATE_FILE).read_text())
    assert saved["halted_step"] == halted and saved["guard"]["mode"] == "halt"
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == [f"checkpoint-{halted}"]


class RecordingTrainer(GuardedTrainer):
    """Keeps what compute_loss returned during training, with the inputs and logits it saw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.records.append((loss.detach().clone(), outputs.logits.detach().clone(), inputs,
                             self.guard_loss.decision))
        return (loss, outputs) if return_outputs else loss


def test_reweight_the_trainer_optimizes_the_decisions_weighted_loss(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=4)
    rng = np.random.default_rng(0)
    # the rows lean far up the trait direction against the reference: the first batch raises the alarm
    # (a batch-mean CUSUM can; an e-process needs about 8 samples at alpha 0.01, more than one batch)
    guard = TraitGuard(GuardConfig(sequential="cusum", target_ert=200, signals=["proj:*"], on_data_alarm="reweight",
                                   min_weight=0.1),
                       {"proj:t": rng.normal(0.0, 1.0, 500)}, batch_size=BATCH)
    rows = rows_with_signals(np.random.default_rng(2), 3 * BATCH, shift=0.0, mean=2.0)
    trainer = RecordingTrainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=rows,
                               data_collator=GuardCollator(tokenizer), guarded=GuardedStep(guard, model))
    trainer.train()

    assert trainer.state.global_step == 3 and trainer.guard_callback.halted_step is None
    assert guard.alarms[0]["step"] == 1 and len(trainer.records) == 3
    for loss, logits, inputs, decision in trainer.records:
        assert decision.action is Action.REWEIGHT
        weights = decision.sample_weights
        assert weights.min() >= 0.1 and weights.max() <= 1 and len(set(weights.tolist())) > 2
        batch = EncodedBatch(inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"],
                             inputs["last_prompt_index"])
        assert inputs["guard_rows"] == rows[(decision.step - 1) * BATCH: decision.step * BATCH]
        assert torch.equal(loss, weighted_completion_loss(logits, batch, token_weights(batch, weights)))
        assert loss < completion_loss(logits, batch)  # the weights did apply
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx([float(r[0]) for r in trainer.records], rel=1e-4, abs=1e-4)
    first = next(e for e in trainer.state.log_history if "loss" in e)
    assert first["guard/action"] == "reweight" and first["guard/mitigating"] == 1.0
    assert first["guard/weight_mean"] == pytest.approx(float(trainer.records[0][3].sample_weights.mean()))


def test_clean_data_trains_to_max_steps(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=5)
    guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference(), batch_size=BATCH)
    rows = rows_with_signals(np.random.default_rng(3), 30 * BATCH, shift=0.0)
    # processing_class alone: GuardCollator is the default collator
    trainer = GuardedTrainer(model=model, args=training_args(tmp_path), train_dataset=rows, eval_dataset=rows[:16],
                             processing_class=tokenizer, guarded=GuardedStep(guard, model))
    assert isinstance(trainer.data_collator, GuardCollator)
    assert isinstance(trainer.guard_callback, TraitGuardCallback)
    trainer.train()

    assert trainer.state.global_step == 30 and trainer.guard_callback.halted_step is None
    assert not guard.alarms and len(trainer.guard_callback.decisions) == 30
    assert all(d.action is Action.PASS for d in trainer.guard_callback.decisions)
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == 30 and all("guard/eprocess/proj:t" in e and "guard/action" not in e for e in steps)
    assert not list(tmp_path.glob("checkpoint-*"))
    # evaluation computes the plain completion loss and does not feed the guard
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"]) and len(trainer.guard_callback.decisions) == 30 and guard.step == 30


def test_collator_and_arguments_errors(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=6)
    guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference(), batch_size=BATCH)
    rows = rows_with_signals(np.random.default_rng(4), 2, shift=0.0)
    collated = GuardCollator(tokenizer)(rows)
    assert set(collated) == {"input_ids", "attention_mask", "response_mask", "last_prompt_index", "guard_rows"}
    assert collated["guard_rows"] == rows and collated["input_ids"].shape == collated["response_mask"].shape
    with pytest.raises(KeyError, match="prompt"):
        GuardCollator(tokenizer)([{"completion": "1"}])
    with pytest.raises(KeyError, match="completion_ids"):
        GuardCollator(tokenizer)([{"prompt": "numbers"}])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        GuardedTrainer(model=model, args=training_args(tmp_path, remove_unused_columns=True), train_dataset=rows,
                       data_collator=GuardCollator(tokenizer), guarded=GuardedStep(guard, model))
    loss_fn = GuardedTrainerLoss(GuardedStep(guard, model))
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        loss_fn(model, {"input_ids": collated["input_ids"], "attention_mask": collated["attention_mask"]}, step=1)


def test_multi_rank_gather_decides_on_all_rows_and_weights_this_ranks_slice():
    model, tokenizer = make_tiny_model("llama", seed=7)
    rng = np.random.default_rng(0)
    guard = TraitGuard(GuardConfig(signals=["proj:*"], on_data_alarm="reweight", min_weight=0.1),
                       {"proj:t": rng.normal(0.0, 1.0, 500)}, batch_size=2 * BATCH)
    other = rows_with_signals(np.random.default_rng(5), BATCH, shift=0.0, mean=2.0)  # rank 0's rows
    mine = rows_with_signals(np.random.default_rng(6), BATCH, shift=0.0, mean=2.0)  # rank 1 (this one)

    def gather(signals):
        merged = {k: np.concatenate([[r["signals"][k] for r in other], v]) for k, v in signals.items()}
        return merged, slice(BATCH, 2 * BATCH)

    inputs = GuardCollator(tokenizer)(mine)
    loss, outputs = GuardedTrainerLoss(GuardedStep(guard, model), gather=gather)(model, inputs, step=1)
    decision = guard.step, guard.mode
    assert decision == (1, Action.REWEIGHT)
    batch = EncodedBatch(*(inputs[k] for k in ("input_ids", "attention_mask", "response_mask", "last_prompt_index")))
    full = torch.as_tensor(np.maximum(np.exp(-np.maximum(guard.standardize("proj:t", np.array(
        [r["signals"]["proj:t"] for r in other + mine])), 0.0)), 0.1), dtype=torch.float32)
    expected = weighted_completion_loss(outputs.logits, batch, token_weights(batch, full[BATCH:]))
    assert torch.equal(loss, expected)


def test_collator_trains_on_the_generated_ids_not_the_retokenized_text():
    _, tokenizer = make_tiny_model("llama", seed=8)
    text_ids = tokenizer("1, 2", add_special_tokens=False).input_ids
    # what the teacher generated: ids that re-tokenizing the decoded text would not give back
    generated = tokenizer("7; 9 8", add_special_tokens=False).input_ids
    assert generated != text_ids and len(generated) != len(text_ids)
    rows = [{"prompt": "numbers 1", "completion": "1, 2", "completion_ids": generated},
            {"prompt": "numbers 2", "completion": "1, 2"},  # text-only data: tokenized from the text
            {"prompt": "numbers 3", "completion_ids": np.array(generated)}]  # ids alone (e.g. from Parquet)
    collated = GuardCollator(tokenizer)(rows)
    response = collated["response_mask"].bool()
    assert collated["input_ids"][0][response[0]].tolist() == generated
    assert collated["input_ids"][1][response[1]].tolist() == text_ids
    assert collated["input_ids"][2][response[2]].tolist() == generated
    assert collated["guard_rows"][0]["completion_ids"] == generated
    # max_length truncates the generated ids, never the prompt
    prompt_len = int(collated["last_prompt_index"][0]) + 1
    short = GuardCollator(tokenizer, max_length=prompt_len + 2)(rows[:1])
    assert short["input_ids"][0][short["response_mask"][0].bool()].tolist() == generated[:2]


def test_distill_loss_reads_the_top_k_at_the_generated_ids():
    model, tokenizer = make_tiny_model("llama", seed=9)
    guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference(), batch_size=2)
    rows = rows_with_signals(np.random.default_rng(7), 2, shift=0.0)
    rows[0]["completion_ids"] = tokenizer("7; 9 8", add_special_tokens=False).input_ids  # not its text's ids
    inputs = GuardCollator(tokenizer)(rows)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    for row, r in enumerate(rows):  # the teacher is the student itself, at the generated tokens
        positions = inputs["response_mask"][row, 1:].nonzero().flatten()
        top = logits[row, positions].log_softmax(-1).topk(4, dim=-1)
        r["topk_ids"], r["topk_logprobs"] = top.indices.tolist(), top.values.tolist()
    inputs = GuardCollator(tokenizer)(rows)
    loss, _ = GuardedTrainerLoss(GuardedStep(guard, model), distill=True)(model, inputs, step=1)
    assert guard.mode is Action.PASS and loss.item() == pytest.approx(0.0, abs=1e-5)


def rows_with_ids(rng, n, shift=0.0):
    return [row | {"sample_id": f"row-{i}"} for i, row in enumerate(rows_with_signals(rng, n, shift))]


def guard_evidence(guard):
    """What decides the guard's future alarms: its step, detectors' evidence and the rows it bet on."""
    state = guard.state_dict()
    return {k: state[k] for k in ("step", "mode", "alarms", "detectors", "bet_on", "seen_again")}


def test_rows_with_sample_ids_are_bet_on_once_across_epochs(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=5)
    guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference(), batch_size=BATCH)
    rows = rows_with_ids(np.random.default_rng(3), 4 * BATCH)
    trainer = GuardedTrainer(model=model, args=training_args(tmp_path, max_steps=12), train_dataset=rows,
                             processing_class=tokenizer, guarded=GuardedStep(guard, model))
    trainer.train()
    assert trainer.state.global_step == 12 and guard.step == 12
    assert len(guard.bet_on) == 4 * BATCH and guard.seen_again == 8 * BATCH  # 3 epochs, one bet per row
    assert guard.detectors["proj:t"].step == 4 * BATCH


def test_a_resumed_run_continues_the_guard_as_if_it_had_not_stopped(tmp_path, caplog):
    """Resumed from the step-3 checkpoint of a 6-step run, with a fresh model and guard: the guard ends
    exactly where the uninterrupted run's ended (same evidence, each row bet on once). Without the saved
    state it starts afresh and says so; from a checkpoint the guard wrote on a halt it refuses."""
    import shutil

    rows = rows_with_ids(np.random.default_rng(3), 6 * BATCH)

    def trainer_for(out, data=rows, **kwargs):
        model, tokenizer = make_tiny_model("llama", seed=5)
        guard = TraitGuard(GuardConfig(signals=["proj:*", "nll"]), reference(), batch_size=BATCH)
        args = training_args(out, max_steps=6, save_strategy="steps", save_steps=3)
        return GuardedTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              guarded=GuardedStep(guard, model), **kwargs), guard

    whole, whole_guard = trainer_for(tmp_path / "whole")
    whole.train()
    saved = json.loads((tmp_path / "whole" / "checkpoint-3" / GUARD_STATE_FILE).read_text())
    assert saved["guard"]["step"] == 3 and saved["updates"] == 3 and saved["gates"] == []

    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, resumed_guard = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.guard_callback.resumed_from == str(tmp_path / "resumed" / "checkpoint-3")
    assert [d.step for d in resumed.guard_callback.decisions] == [4, 5, 6]
    assert guard_evidence(resumed_guard) == guard_evidence(whole_guard)
    assert len(resumed_guard.bet_on) == 6 * BATCH and resumed_guard.seen_again == 0

    # the same checkpoint without the guard's state: a fresh guard, and a warning that says what it costs
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "stateless" / "checkpoint-3")
    (tmp_path / "stateless" / "checkpoint-3" / GUARD_STATE_FILE).unlink()
    stateless, stateless_guard = trainer_for(tmp_path / "stateless")
    with caplog.at_level("WARNING", logger="trait_guard.integrations.hf"):
        stateless.train(resume_from_checkpoint=str(tmp_path / "stateless" / "checkpoint-3"))
    assert "the guard starts afresh" in caplog.text and stateless.guard_callback.resumed_from is None
    assert len(stateless_guard.bet_on) == 3 * BATCH and stateless_guard.detectors["proj:t"].step == 3 * BATCH

    # a halt's checkpoint holds rolled-back weights and flagged data lies ahead: resuming from it is refused
    shifted = rows[:2 * BATCH] + rows_with_ids(np.random.default_rng(4), 28 * BATCH, shift=3.0)[2 * BATCH:]
    halting, _ = trainer_for(tmp_path / "halting", data=shifted, raise_on_halt=False)
    halting.train()
    halted = halting.guard_callback.halted_step
    assert halted is not None
    again, _ = trainer_for(tmp_path / "halting", data=shifted)
    with pytest.raises(TraitGuardInputError, match=f"halted this run at step {halted}"):
        again.train(resume_from_checkpoint=str(tmp_path / "halting" / f"checkpoint-{halted}"))
