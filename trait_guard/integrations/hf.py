"""The guard in a transformers ``Trainer``: a collator, a trainer that computes the guarded loss, a callback.

::

    from transformers import TrainingArguments
    from trait_guard.integrations.hf import GuardCollator, GuardedTrainer
    from trait_guard.integrations.torch_loop import GuardedStep

    guarded = GuardedStep(guard, model, vectors)          # guard: a calibrated TraitGuard
    args = TrainingArguments(output_dir="out", per_device_train_batch_size=8, max_steps=1000,
                             remove_unused_columns=False)   # required: keeps response_mask and guard_rows
    trainer = GuardedTrainer(model=model, args=args, train_dataset=rows,   # rows: list of dicts, or a Dataset
                             data_collator=GuardCollator(tokenizer), guarded=guarded)
    trainer.train()                              # raises TraitGuardHalted if the guard halted
    trainer.save_model()                         # reached only by a run the guard let finish
    trainer.guard_callback.decisions            # every Decision, in order

Rows are dicts with ``prompt`` and the teacher's generated ``completion_ids`` (or, for text-only data,
``completion``), optionally the teacher's ``topk_ids`` (and ``topk_logprobs`` for ``distill=True``) and
precomputed per-sample ``signals`` (see :mod:`trait_guard.integrations.torch_loop` for where signals
come from). :class:`GuardCollator` trains on exactly the generated ids (:func:`trait_guard.chat.encode_rows`):
re-tokenizing the decoded text does not always give them back, and the stored top-k belong to them.

A HALT ends ``trainer.train()`` with :class:`trait_guard.errors.TraitGuardHalted` (after the Trainer
has stopped and written its halting checkpoint), whose ``summary`` holds ``halted_step``, ``reason``,
``global_step`` and ``checkpoint``. Returning normally would let the script go on to ``save_model()``
and ship the halted student. ``GuardedTrainer(..., raise_on_halt=False)`` returns normally instead;
then check ``trainer.guard_callback.halted_step`` (None, or the step whose batch raised the alarm).

Why a ``Trainer`` subclass and not ``Trainer(compute_loss_func=...)``: that hook is called as
``compute_loss_func(outputs, labels, num_items_in_batch)`` after ``model(**inputs)``, so it sees
neither the rows (their signals) nor the response mask, and cannot wrap the forward to record the
persona-vector layers. :class:`GuardedTrainer` overrides only ``compute_loss`` (the guarded loss),
``training_step`` (a halting step leaves no gradient, so the optimizer step is a no-op even for
Adam's momentum), ``prediction_step`` (evaluation: plain completion loss, the guard is not
consulted) and ``log`` (adds the guard's metrics to every training log entry).

Step numbering: the guard sees the batch of optimizer step ``state.global_step + 1``, so on HALT the
Trainer stops with ``state.global_step == halted_step``; that step's optimizer call happens but
changes no parameter. A checkpoint is written at the halting step (``save_on_halt``) together with
the guard's state (``trait_guard_state.json``). With gradient accumulation each micro-batch is one
guard observation (calibrate the guard with the per-device batch size). Across processes the
signals of all ranks are gathered first, so every rank takes the same decision.

transformers is a dependency of the package and this module's whole purpose, so it is imported at the
top; nothing else in :mod:`trait_guard` imports this module, so ``import trait_guard`` stays light.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from trait_guard.chat import EncodedBatch, encode_rows
from trait_guard.config import Action
from trait_guard.errors import TraitGuardHalted
from trait_guard.guard import Decision
from trait_guard.integrations.torch_loop import GuardedStep
from trait_guard.losses import completion_loss

__all__ = ["GUARD_STATE_FILE", "GuardCollator", "GuardedTrainer", "GuardedTrainerLoss", "TraitGuardCallback",
           "guard_metrics"]

logger = logging.getLogger(__name__)

GUARD_STATE_FILE = "trait_guard_state.json"
ROWS_KEY = "guard_rows"
_BATCH_KEYS = ("input_ids", "attention_mask", "response_mask", "last_prompt_index")

Gather = Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], slice]]


class GuardCollator:
    """Rows -> the dict the Trainer hands to ``compute_loss``: ``input_ids``, ``attention_mask``,
    ``response_mask``, ``last_prompt_index`` (tensors) and ``guard_rows`` (the rows, a plain list).

    The response tokens are each row's generated ``completion_ids`` as they are (``completion`` is
    tokenized only for rows without them), through :func:`trait_guard.chat.encode_rows`, the token path
    shared with scoring and the guard's signals. Needs ``TrainingArguments(remove_unused_columns=False)``,
    or the Trainer drops the extra keys. ``max_length`` truncates completions (never prompts).
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [dict(r) for r in rows]
        if any("prompt" not in r for r in rows):
            raise KeyError("guard rows need 'prompt' and 'completion_ids' (or 'completion'); some rows lack 'prompt'")
        if any(r.get("completion_ids") is None and "completion" not in r for r in rows):
            raise KeyError("guard rows need 'completion_ids' (the generated tokens) or 'completion'; "
                           "some rows have neither")
        batch = encode_rows(self.tokenizer, rows, max_length=self.max_length)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "response_mask": batch.response_mask, "last_prompt_index": batch.last_prompt_index,
                ROWS_KEY: rows}


def encoded_batch(inputs: dict[str, Any]) -> tuple[EncodedBatch, list[dict[str, Any]]]:
    """The :class:`EncodedBatch` and rows back from a :class:`GuardCollator` batch."""
    missing = [k for k in (*_BATCH_KEYS, ROWS_KEY) if k not in inputs]
    if missing:
        raise KeyError(f"the training batch lacks {missing} (it has {sorted(inputs)}): collate with GuardCollator "
                       "and set TrainingArguments(remove_unused_columns=False)")
    return EncodedBatch(*(inputs[k] for k in _BATCH_KEYS)), list(inputs[ROWS_KEY])


class GuardedTrainerLoss:
    """The guarded loss of one batch: forward with capture, the guard's decision, the weighted loss.

    ``gather(signals) -> (all ranks' signals, this rank's slice of them)`` makes multi-process runs take
    one decision (:class:`GuardedTrainer` sets it from its accelerator when there are several processes).
    ``halted`` turns on at the first HALT decision and stays on; ``pending`` holds the decisions not yet
    collected by :class:`TraitGuardCallback`.
    """

    def __init__(self, guarded: GuardedStep, distill: bool = False, gather: Gather | None = None):
        self.guarded, self.distill, self.gather = guarded, distill, gather
        self.decision: Decision | None = None
        self.pending: list[Decision] = []
        self.halted = False

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any], step: int | None = None,
                 ) -> tuple[torch.Tensor, Any]:
        """``(loss, model outputs)`` for the batch ``inputs`` (from :class:`GuardCollator`) at ``step``."""
        batch, rows = encoded_batch(inputs)
        with self.guarded.capture():
            outputs = model(**batch.model_inputs())
        logits = outputs.logits
        sample_slice: slice | None = None

        def gather(signals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            nonlocal sample_slice
            gathered, sample_slice = self.gather(signals)
            return gathered

        decision = self.guarded.decide(batch, logits, rows, step=step,
                                       gather=gather if self.gather is not None else None)
        self.decision = decision
        self.pending.append(decision)
        if decision.halt:
            self.halted = True
            return logits.sum() * 0.0, outputs  # keeps a grad_fn: backward runs, the step changes nothing
        loss = self.guarded.loss(logits, batch, decision, rows, distill=self.distill, sample_slice=sample_slice)
        return loss, outputs


def guard_metrics(decision: Decision, guard: Any) -> dict[str, Any]:
    """Log entries for one decision: numbers every time, ``guard/action`` and ``guard/reason`` (text)
    only at an alarm or a halt."""
    metrics: dict[str, Any] = {
        "guard/halt": float(decision.halt),
        "guard/mitigating": float(guard.mode is not Action.PASS),
        "guard/alarms": float(len(guard.alarms)),
    }
    if decision.sample_weights.numel():
        metrics["guard/weight_mean"] = float(decision.sample_weights.float().mean())
    for kind in ("cusum", "eprocess", "batch_z"):
        for name, value in decision.evidence.get(kind, {}).items():
            metrics[f"guard/{kind}/{name}"] = float(value)
    if decision.halt or (guard.alarms and guard.alarms[-1]["step"] == decision.step):
        metrics["guard/action"] = decision.action.value
        metrics["guard/reason"] = decision.reason
    return metrics


def _accelerate_gather(accelerator: Any) -> Gather:
    """All ranks' signals, in rank order, and this rank's slice of them."""

    def gather(signals: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], slice]:
        from accelerate.utils import gather_object

        parts = gather_object([{k: np.asarray(v) for k, v in signals.items()}])
        sizes = [len(next(iter(p.values()))) if p else 0 for p in parts]
        start = sum(sizes[: accelerator.process_index])
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return merged, slice(start, start + sizes[accelerator.process_index])

    return gather


def _checkpoint_folder(output_dir: str, global_step: int) -> str:
    """The folder the Trainer writes its checkpoint of ``global_step`` to."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")


class TraitGuardCallback(TrainerCallback):
    """Stops the Trainer at a HALT (and asks for a checkpoint); collects the decisions.

    ``decisions``: every Decision in order (one per micro-batch); ``halted_step``: the step whose
    batch halted training, or None; ``halted_reason``: the guard's reason for it. ``metrics()``: the
    latest decision's log entries, which :class:`GuardedTrainer` adds to each training log (so they
    reach ``state.log_history`` and every reporter).
    """

    def __init__(self, guard_loss: GuardedTrainerLoss, save_on_halt: bool = True):
        self.guard_loss = guard_loss
        self.save_on_halt = save_on_halt
        self.decisions: list[Decision] = []
        self.halted_step: int | None = None
        self.halted_reason: str | None = None

    @property
    def guard(self) -> Any:
        return self.guard_loss.guarded.guard

    def metrics(self) -> dict[str, Any]:
        return guard_metrics(self.decisions[-1], self.guard) if self.decisions else {}

    def on_step_end(self, args, state, control, **kwargs):
        self.decisions.extend(self.guard_loss.pending)
        self.guard_loss.pending.clear()
        if self.guard_loss.halted and self.halted_step is None:
            halt = next((d for d in reversed(self.decisions) if d.halt), None)
            self.halted_step = halt.step if halt is not None else state.global_step
            self.halted_reason = halt.reason if halt is not None else "halt"
            logger.warning("trait guard halted training at step %d: %s", self.halted_step, self.halted_reason)
            control.should_training_stop = True
            control.should_log = True
            if self.save_on_halt:
                control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = _checkpoint_folder(args.output_dir, state.global_step)
        if os.path.isdir(folder) and state.is_world_process_zero:
            with open(os.path.join(folder, GUARD_STATE_FILE), "w", encoding="utf-8") as f:
                json.dump({"halted_step": self.halted_step, "guard": self.guard.state_dict()}, f, default=float)
        return control


class GuardedTrainer(Trainer):
    """A ``Trainer`` whose loss is the guard's weighted, masked completion loss (see the module docstring).

    Extra keyword arguments: ``guarded`` (a :class:`GuardedStep` on the trained model), ``distill``
    (top-k logit distillation instead of the completion loss), ``save_on_halt``, ``raise_on_halt``
    (default True: :meth:`train` raises :class:`~trait_guard.errors.TraitGuardHalted` after a HALT).
    A :class:`GuardCollator` is the default collator when ``processing_class`` is given.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, guarded: GuardedStep, distill: bool = False, save_on_halt: bool = True,
                 raise_on_halt: bool = True, **kwargs: Any):
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None and len(args) < 3:
            kwargs["data_collator"] = GuardCollator(kwargs["processing_class"])
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("GuardedTrainer needs TrainingArguments(remove_unused_columns=False): the Trainer "
                             "would drop the batch's response_mask and guard_rows")
        gather = _accelerate_gather(self.accelerator) if self.accelerator.num_processes > 1 else None
        self.guard_loss = GuardedTrainerLoss(guarded, distill=distill, gather=gather)
        self.guard_callback = TraitGuardCallback(self.guard_loss, save_on_halt=save_on_halt)
        self.add_callback(self.guard_callback)
        self.raise_on_halt = raise_on_halt

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; then, if the guard halted and ``raise_on_halt``, raise
        :class:`~trait_guard.errors.TraitGuardHalted` so that no code after it ships the halted model."""
        output = super().train(*args, **kwargs)
        if self.guard_callback.halted_step is not None and self.raise_on_halt:
            raise self._halted_error()
        return output

    def _halted_error(self) -> TraitGuardHalted:
        """The error :meth:`train` raises after a HALT, naming the step, the reason and the halting
        checkpoint (when one was written)."""
        callback = self.guard_callback
        checkpoint = None
        if callback.save_on_halt:
            folder = _checkpoint_folder(self.args.output_dir, self.state.global_step)
            checkpoint = folder if os.path.isdir(folder) else None
        summary = {"halted_step": callback.halted_step, "reason": callback.halted_reason,
                   "global_step": self.state.global_step, "checkpoint": checkpoint}
        return TraitGuardHalted(
            f"the trait guard halted training at step {callback.halted_step}: {callback.halted_reason}"
            + (f" (checkpoint: {checkpoint})" if checkpoint else "")
            + "; the trained model is not fit to ship (GuardedTrainer(raise_on_halt=False) to return "
            "normally instead)", summary)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.guard_loss(model, inputs, step=self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard_loss.halted:
            # No gradient at all (not zeros): optimizers skip the parameters, so neither momentum
            # nor weight decay moves them in the halting step.
            model.zero_grad(set_to_none=True)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        batch, _ = encoded_batch(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**batch.model_inputs()).logits
            loss = completion_loss(logits, batch).detach()
        return (loss, None, None) if prediction_loss_only else (loss, logits.detach(), None)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log entry
            logs.update(self.guard_callback.metrics())
        super().log(logs, *args, **kwargs)
