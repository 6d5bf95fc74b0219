"""TraitGuardCallback in transformers' Trainer and TRL's SFTTrainer and GKDTrainer, on tiny random models.

Known answers: a planted shift in the rows' precomputed signals halts training at the alarm, the
halting step updates nothing, and the weights are restored exactly to the snapshot of the guard's
change point (and that is what the halting checkpoint holds); clean rows train to the end. Under GKD
(on-policy: the student trains on its own generations) only the drift probes apply: a teacher that
carries a planted persona vector (the student itself, steered along it) pulls the student along the
vector and the probes halt it; an identical, unsteered teacher does not.
"""

import copy
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from trait_guard.config import Action, GuardConfig
from trait_guard.errors import TraitGuardHalted, TraitGuardInputError
from trait_guard.guard import TraitGuard
from trait_guard.integrations.hf import (
    GUARD_STATE_FILE,
    GuardDataCollator,
    TraitGuardCallback,
    response_mask_of,
)
from trait_guard.integrations.torch_loop import DriftGuard, GuardedStep
from trait_guard.models import model_identity
from trait_guard.persona import PersonaVector
from trait_guard.steer import Steering
from trait_guard.testing import make_tiny_model, save_tiny_model

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

BATCH = 4
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "trl_sft_guarded.py"


def reference(n=2000):
    return {"proj:t": np.random.default_rng(0).normal(0.0, 1.0, n)}


def rows(n, shift_from_row=None, shift=2.5, seed=1):
    """prompt/completion rows with precomputed signals; from ``shift_from_row`` on, ``proj:t`` leans
    ``shift`` reference standard deviations toward the trait."""
    rng = np.random.default_rng(seed)
    return [{"prompt": f"count {i}", "completion": f"{i} {i + 1}",
             "signals": {"proj:t": float(rng.normal(shift if shift_from_row is not None and i >= shift_from_row
                                                    else 0.0, 1.0))}}
            for i in range(n)]


def guard(**config):
    settings = dict(signals=["proj:*"], rollback_every_n_steps=1)
    settings.update(config)
    return TraitGuard(GuardConfig(**settings), reference(), batch_size=BATCH)


def common_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=BATCH,
                    save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, learning_rate=1e-2,
                    train_sampling_strategy="sequential", remove_unused_columns=False)
    settings.update(overrides)
    return settings


class WeightLog(TrainerCallback):
    """The trainable weights before training (0) and right after each optimizer step (1, 2, ...)."""

    def __init__(self):
        self.weights = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = snapshot(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step + 1] = snapshot(model)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sft_trainer(tmp_path, train_rows, callback, model, tokenizer, max_steps, weights=None, **overrides):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_args(tmp_path, max_steps=max_steps, **overrides))
    return SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train_rows),
                      processing_class=tokenizer, callbacks=[callback] + ([weights] if weights else []))


def test_sft_trainer_halts_on_planted_signals_and_restores_the_pre_alarm_weights(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=3)
    callback = TraitGuardCallback(GuardedStep(guard(), model, rollback=True))
    weights = WeightLog()
    trainer = sft_trainer(tmp_path, rows(15 * BATCH, shift_from_row=3 * BATCH), callback, model, tokenizer,
                          max_steps=15, weights=weights)
    with pytest.raises(TraitGuardHalted, match="halted training at step .*data alarm on proj:t.*restored to step"):
        trainer.train()

    halted = callback.halted_step
    assert 3 < halted <= 8, halted
    assert trainer.state.global_step == halted and callback.guard.alarms[0]["step"] == halted
    assert [d.step for d in callback.decisions] == list(range(1, halted + 1))
    assert [d.action for d in callback.decisions] == [Action.PASS] * (halted - 1) + [Action.HALT]
    assert same(weights.weights[halted], weights.weights[halted - 1])  # the halting step updated nothing
    record = callback.rollback
    change_point = callback.guard.change_point
    assert record["change_point"] == change_point and record["restored_step"] == change_point < halted
    restored = weights.weights[record["restored_step"]]
    assert same(snapshot(model), restored)  # exactly the pre-alarm snapshot (snapshots every step)
    if record["restored_step"] < halted - 1:
        assert not same(restored, weights.weights[halted - 1])
    # written and tagged: the halting checkpoint holds the restored weights and the record
    folder = tmp_path / "out" / f"checkpoint-{halted}"
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(saved[k], restored[k]) for k in saved if k in restored)
    state = json.loads((folder / GUARD_STATE_FILE).read_text())
    assert state["halted_step"] == halted and state["rollback"]["restored_step"] == record["restored_step"]
    assert json.loads((tmp_path / "out" / GUARD_STATE_FILE).read_text())["rollback"] == state["rollback"]
    assert "trait-guard-halted" in model.model_tags
    entry = next(e for e in trainer.state.log_history if e.get("step") == halted and "loss" in e)
    assert entry["guard/halt"] == 1.0 and entry["guard/restored_step"] == record["restored_step"]


def test_sft_trainer_trains_clean_rows_to_the_end(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=4)
    callback = TraitGuardCallback(GuardedStep(guard(), model, rollback=True))
    trainer = sft_trainer(tmp_path, rows(12 * BATCH), callback, model, tokenizer, max_steps=12)
    trainer.train()  # no exception

    assert trainer.state.global_step == 12 and callback.halted_step is None and not callback.guard.alarms
    assert [d.action for d in callback.decisions] == [Action.PASS] * 12
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == 12 and all("guard/eprocess/proj:t" in e and "guard/action" not in e for e in steps)
    assert not (tmp_path / "out" / GUARD_STATE_FILE).exists()
    # the guard saw the rows in training order: the decisions' evidence is the rows' own signals
    assert callback.guard.detectors["proj:t"].steps_since_reset == 12 * BATCH


def test_sft_collator_adapter_reads_the_completion_tokens_and_refuses_missing_signals(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=5)
    callback = TraitGuardCallback(GuardedStep(guard(), model))
    trainer = sft_trainer(tmp_path, rows(8), callback, model, tokenizer, max_steps=2)
    prepared = [trainer.train_dataset[i] for i in range(2)]
    adapter = GuardDataCollator(trainer.data_collator, callback)
    batch = adapter(prepared)
    assert "signals" not in batch and adapter.pad_token_id == trainer.data_collator.pad_token_id
    queued_rows, encoded = callback._queue.popleft()
    assert [r["signals"] for r in queued_rows] == [r["signals"] for r in rows(8)[:2]]
    completion = response_mask_of(batch).bool()
    for i, row in enumerate(prepared):  # TRL's completion mask, folded into labels != -100
        text = tokenizer.decode(batch["input_ids"][i][completion[i]])
        assert text == row["completion"]
        assert int(encoded.last_prompt_index[i]) == int(completion[i].nonzero()[0]) - 1
    assert torch.equal(response_mask_of({"completion_mask": completion.long(), "labels": batch["labels"]}),
                       completion.long())

    no_signals = sft_trainer(tmp_path, [{k: v for k, v in r.items() if k != "signals"} for r in rows(8)],
                             TraitGuardCallback(GuardedStep(guard(), model)), model, tokenizer, max_steps=1)
    with pytest.raises(TraitGuardInputError, match="without their 'signals' column.*remove_unused_columns=False"):
        no_signals.train()
    dropped = sft_trainer(tmp_path, rows(8), TraitGuardCallback(GuardedStep(guard(), model)), model, tokenizer,
                          max_steps=1, remove_unused_columns=True)
    with pytest.raises(TraitGuardInputError, match="remove_unused_columns=False"):
        dropped.train()


def tokenized(tokenizer, train_rows):
    """Rows as a plain Trainer takes them: ids and labels (-100 on the prompt), and the signals."""
    out = []
    for r in train_rows:
        prompt = tokenizer(r["prompt"] + "\n", add_special_tokens=False).input_ids
        completion = tokenizer(r["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion,
                    "signals": r["signals"]})
    return out


def test_plain_trainer_with_gradient_accumulation_halts_and_rolls_back(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=6)
    callback = TraitGuardCallback(GuardedStep(guard(), model, rollback=True), raise_on_halt=False)
    weights = WeightLog()
    data = tokenized(tokenizer, rows(2 * 12 * BATCH, shift_from_row=2 * 3 * BATCH, seed=2))
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(tmp_path, max_steps=12,
                                                                        gradient_accumulation_steps=2)),
                      train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer),
                      callbacks=[callback, weights])
    trainer.train()  # raise_on_halt=False: returns; the callback says what happened

    halted = callback.halted_step
    assert halted is not None and 3 < halted <= 8 and trainer.state.global_step == halted
    # each micro-batch is one observation, numbered by the optimizer step it belongs to
    assert [d.step for d in callback.decisions] == [s for s in range(1, halted + 1) for _ in range(2)][
        : len(callback.decisions)]
    assert callback.decisions[-1].halt and callback.guard.detectors["proj:t"].step == len(callback.decisions) * BATCH
    assert same(weights.weights[halted], weights.weights[halted - 1])
    assert same(snapshot(model), weights.weights[callback.rollback["restored_step"]])


class GatedStream(torch.utils.data.IterableDataset):
    def __init__(self, gated):
        self.gated = gated

    def __iter__(self):
        return iter(self.gated)


@pytest.mark.parametrize("planted", [True, False])
def test_look_ahead_gate_in_front_of_the_trainer(tmp_path, planted):
    model, tokenizer = make_tiny_model("llama", seed=7)
    callback = TraitGuardCallback(GuardedStep(guard(), model, rollback=True), raise_on_halt=False)
    weights = WeightLog()
    source = tokenized(tokenizer, rows(12 * BATCH, shift_from_row=0 if planted else None, shift=3.0, seed=3))
    gated = callback.gate(source, window=24, signal="proj:t")
    # dispatch_batches=False: accelerate's dispatcher refuses a stream that ends before its first batch
    args = TrainingArguments(**common_args(tmp_path, max_steps=12, accelerator_config={"dispatch_batches": False}))
    trainer = Trainer(model=model, args=args, train_dataset=GatedStream(gated), data_collator=DataCollatorForSeq2Seq(tokenizer),
                      callbacks=[callback, weights])
    trainer.train()

    if planted:  # the alarm came within the window: no row was released, no update was made
        assert gated.alarm is not None and len(gated.held) < 24 and trainer.state.global_step == 0
        assert callback.halted_step == 0 and callback.decisions[-1].halt
        assert callback.guard.alarms[0]["channel"] == "gate"
        assert same(snapshot(model), weights.weights[0]) and set(weights.weights) == {0}
    else:  # every row released (the last window at the end of the stream) and trained on
        assert gated.alarm is None and not gated.held and trainer.state.global_step == 12
        assert callback.halted_step is None and len(callback.decisions) == 12


def test_steer_is_applied_to_training_forwards_only(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=8)
    identity = model_identity(model)
    gen = torch.Generator().manual_seed(1)
    vector = PersonaVector("t", identity, torch.randn(identity.num_layers + 1, identity.hidden_size, generator=gen),
                           layer=2)
    # probes run (unsteered, checked below) but do not act: this test is about STEER
    steer_guard = guard(on_data_alarm="steer", steer_coefficient=4.0, drift_threshold=1e9)
    guarded = GuardedStep(steer_guard, model, [vector], tokenizer=tokenizer, probe_prompts=["a?", "b?", "c?"],
                          probe_every=2)
    callback = TraitGuardCallback(guarded)
    seen = []  # per forward: training mode, and whether the steering hooks are in place
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, bool(guarded._steering
                                                                              and guarded._steering.active))))
    data = tokenized(tokenizer, rows(8 * BATCH, shift_from_row=0, shift=3.0, seed=4))
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(tmp_path, max_steps=8)), train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer), callbacks=[callback])
    trainer.train()

    alarm = steer_guard.alarms[0]["step"]
    assert steer_guard.mode is Action.STEER and trainer.state.global_step == 8 and callback.halted_step is None
    training = [steered for is_training, steered in seen if is_training]
    # the alarm's own batch is judged before its forward, so it is steered too
    assert len(training) == 8 and training == [False] * (alarm - 1) + [True] * (9 - alarm)
    assert not any(steered for is_training, steered in seen if not is_training)  # probes: weights, not the hook
    assert not guarded._steering.active and not any(b._forward_hooks for b in model.model.layers)  # off after
    # the hook did edit the forward: the steered residual is the unsteered one plus c * v
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states[vector.layer]
        with Steering(model, vector, coefficient=4.0, check_weights=False):
            steered = model(ids, output_hidden_states=True).hidden_states[vector.layer]
    assert torch.allclose(steered - plain, 4.0 * vector.vectors[vector.layer].expand_as(plain), atol=1e-5)


def gkd_run(tmp_path, planted):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    model, tokenizer = make_tiny_model("llama", seed=1)
    identity = model_identity(model)
    gen = torch.Generator().manual_seed(0)
    vector = PersonaVector("owl", identity, torch.randn(identity.num_layers + 1, identity.hidden_size, generator=gen),
                           layer=2)
    teacher = copy.deepcopy(model)  # the student's own base: no trait, unless steered along the vector
    if planted:
        Steering(teacher, vector, coefficient=4.0).apply()
    callback = TraitGuardCallback.from_vectors(
        model, tokenizer, [vector], config=GuardConfig(drift_threshold=3.0),
        probe_prompts=[f"question {i}?" for i in range(6)], probe_every=1, raise_on_halt=False)
    weights = WeightLog()
    conversations = [{"messages": [{"role": "user", "content": f"count {i}"},
                                   {"role": "assistant", "content": f"{i} {i + 1}"}]} for i in range(16)]
    # SGD: with an identical teacher the gradient is (numerically) zero, and so is the update
    args = GKDConfig(**common_args(tmp_path, max_steps=4, per_device_train_batch_size=2, learning_rate=1.0,
                                   optim="sgd", lr_scheduler_type="constant"), max_new_tokens=4, lmbda=1.0)
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args,
                         train_dataset=datasets.Dataset.from_list(conversations), processing_class=tokenizer,
                         callbacks=[callback, weights])
    trainer.train()
    return trainer, callback, weights, model


def test_gkd_probe_halts_a_student_pulled_along_the_teachers_trait(tmp_path):
    trainer, callback, weights, model = gkd_run(tmp_path, planted=True)

    assert isinstance(callback.guard, DriftGuard) and not callback.watches_data
    assert callback.halted_step == 1 and trainer.state.global_step == 1  # the first probe saw it
    drift = callback.decisions[-1]
    assert drift.halt and drift.reason.startswith("student drift owl=") and drift.evidence["drift"]["owl"] > 3.0
    assert callback.rollback["restored_step"] == 0  # drift implicates every step
    assert not same(weights.weights[1], weights.weights[0]) and same(snapshot(model), weights.weights[0])


def test_gkd_clean_teacher_trains_to_the_end(tmp_path):
    trainer, callback, _, _ = gkd_run(tmp_path, planted=False)

    assert callback.halted_step is None and trainer.state.global_step == 4
    assert len(callback.decisions) == 4 and all(d.action is Action.PASS for d in callback.decisions)
    assert all(abs(d.evidence["drift"]["owl"]) < 1.0 for d in callback.decisions)
    assert "probe/shift/owl" in next(e for e in trainer.state.log_history if "loss" in e)


def run_example(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *argv])
    runpy.run_path(str(EXAMPLE), run_name="__main__")


def test_example_sft_script_adds_the_guard_in_five_lines(tmp_path, monkeypatch):
    source = EXAMPLE.read_text()
    marked = [line for line in source.splitlines() if "# trait-guard" in line]
    assert 1 <= len(marked) <= 5, marked
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=9)
    (tmp_path / "reference.json").write_text(json.dumps({k: v.tolist() for k, v in reference(500).items()}))
    for name, data in {"clean": rows(24), "planted": rows(24, shift_from_row=0, shift=3.0)}.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n")

    def argv(name):
        return ["--model", str(model_dir), "--data", str(tmp_path / f"{name}.jsonl"), "--reference",
                str(tmp_path / "reference.json"), "--output-dir", str(tmp_path / name), "--max-steps", "6"]

    run_example(argv("clean"), monkeypatch)
    assert (tmp_path / "clean" / "final" / "model.safetensors").exists()
    with pytest.raises(TraitGuardHalted, match="data alarm on proj:t"):
        run_example(argv("planted"), monkeypatch)
    assert not (tmp_path / "planted" / "final").exists()  # save_model() after train() was never reached


def test_a_resumed_trainer_continues_the_look_ahead_gate(tmp_path):
    """A gated stream resumed from the step-4 checkpoint of an 8-step run, with a fresh model, guard and
    gate: the Trainer skips the batches it trained on by iterating the stream (they pass the collator
    but are never judged again), the gate bets on none of the rows it scored before, and gate and guard
    end exactly as in the uninterrupted run."""
    import shutil

    _, tokenizer = make_tiny_model("llama", seed=7)
    source = [row | {"sample_id": f"r{i}"} for i, row in enumerate(tokenized(tokenizer, rows(8 * BATCH, seed=3)))]
    seq2seq = DataCollatorForSeq2Seq(tokenizer)

    def collate(batch):
        return seq2seq([{k: v for k, v in r.items() if k != "sample_id"} for r in batch])

    def run(out, resume=None):
        model, _ = make_tiny_model("llama", seed=7)
        callback = TraitGuardCallback(GuardedStep(guard(), model), raise_on_halt=False)
        gated = callback.gate(source, window=6, signal="proj:t")
        args = TrainingArguments(**common_args(tmp_path, output_dir=str(out), max_steps=8, save_strategy="steps",
                                               save_steps=4, accelerator_config={"dispatch_batches": False}))
        trainer = Trainer(model=model, args=args, train_dataset=GatedStream(gated), data_collator=collate,
                          callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return callback, gated

    whole, whole_gate = run(tmp_path / "whole")
    assert whole.halted_step is None and whole_gate.tested == 8 * BATCH
    saved = json.loads((tmp_path / "whole" / "checkpoint-4" / GUARD_STATE_FILE).read_text())
    assert len(saved["gates"]) == 1 and len(saved["gates"][0]["tested"]) >= 4 * BATCH

    shutil.copytree(tmp_path / "whole" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed, resumed_gate = run(tmp_path / "resumed", resume=True)
    assert resumed.resumed_from == str(tmp_path / "resumed" / "checkpoint-4")
    assert [d.step for d in resumed.decisions] == [5, 6, 7, 8]
    assert resumed_gate.gate.detector.state_dict() == whole_gate.gate.detector.state_dict()
    assert resumed.guard.state_dict()["bet_on"] == whole.guard.state_dict()["bet_on"]
    assert resumed.guard.detectors["proj:t"].state_dict() == whole.guard.detectors["proj:t"].state_dict()
    assert resumed.guard.seen_again == 0  # the skipped batches were not judged a second time
