"""The guard in a transformers ``Trainer``: a callback for any Trainer, and a trainer that computes the guarded loss.

:class:`TraitGuardCallback` works with ``Trainer`` and its subclasses, TRL's ``SFTTrainer`` and
``GKDTrainer`` included: data signals judged before each batch reaches the model (through
:class:`GuardDataCollator`, which reads TRL's completion mask), drift probes, HALT with rollback,
STEER and a look-ahead gate (docs/integrations.md; examples/trl_sft_guarded.py)::

    guard = TraitGuardCallback.from_vectors(model, tokenizer, vectors, reference=reference_signals,
                                            probe_prompts=prompts)
    trainer = SFTTrainer(..., args=SFTConfig(..., remove_unused_columns=False), callbacks=[guard])
    trainer.train()                              # raises TraitGuardHalted after a HALT (weights rolled back)

A callback cannot change the loss, so REWEIGHT and MASK need :class:`GuardedTrainer`, a ``Trainer``
subclass whose loss is the guard's::

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
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length

from trait_guard.chat import EncodedBatch, encode_rows
from trait_guard.config import Action, GuardConfig
from trait_guard.errors import TraitGuardHalted, TraitGuardInputError
from trait_guard.guard import Decision, TraitGuard
from trait_guard.integrations.torch_loop import DriftGuard, GatedRows, GuardedStep
from trait_guard.losses import completion_loss
from trait_guard.sequential import EProcessDetector, LookaheadGate

__all__ = ["GUARD_STATE_FILE", "GuardCollator", "GuardDataCollator", "GuardedTrainer", "GuardedTrainerLoss",
           "TraitGuardCallback", "guard_metrics", "response_mask_of"]

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


def response_mask_of(batch: dict[str, Any]) -> torch.Tensor | None:
    """The completion tokens of a collated batch: TRL's ``completion_mask`` when the collator returns
    it, else ``labels != -100`` (TRL folds ``completion_mask``/``assistant_masks`` into the labels at
    dataset preparation), else our own ``response_mask``; None when the batch says nothing."""
    for key in ("completion_mask", "response_mask"):
        if isinstance(batch.get(key), torch.Tensor):
            return batch[key].long()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        return (labels != -100).long()
    return None


class GuardDataCollator:
    """Wraps the training collator (TRL's ``DataCollatorForLanguageModeling``, the Trainer's default, any
    callable): takes the guard's column (``signals``: the rows' precomputed per-sample signals) off the
    rows, collates the rest with the wrapped collator, and queues the batch's signals for
    :class:`TraitGuardCallback`, which decides on them before the batch reaches the model.

    The completion tokens come from the collated batch (:func:`response_mask_of`: ``completion_mask``
    or ``labels != -100``); they feed the ``unigram`` signal when the guard has a reference histogram.
    :class:`TraitGuardCallback` installs this on the training dataloader at ``on_train_begin`` (only
    there: evaluation batches are not guard observations). Other attributes are the wrapped
    collator's.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], callback: TraitGuardCallback):
        self.collator, self.callback = collator, callback

    def __getattr__(self, name: str) -> Any:  # e.g. TRL's collator.pad_token_id
        if name in ("collator", "callback"):
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        key = self.callback.signals_key
        rows = list(rows)
        # sample_id (when the rows have it) lets the guard bet on each row once however many epochs see it
        guard_rows = [{"signals": dict(r[key]), **({"sample_id": r["sample_id"]} if r.get("sample_id") is not None
                                                    else {})}
                      if isinstance(r, dict) and r.get(key) is not None else {} for r in rows]
        stripped = [{k: v for k, v in r.items() if k != key} if isinstance(r, dict) else r for r in rows]
        batch = self.collator(stripped)
        encoded = None
        mask = response_mask_of(batch) if isinstance(batch, dict) else None
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if mask is not None and isinstance(ids, torch.Tensor) and mask.shape == ids.shape:
            first = torch.where(mask.any(1), mask.argmax(1), torch.zeros_like(mask[:, 0]))
            attention = batch.get("attention_mask", torch.ones_like(mask))
            encoded = EncodedBatch(ids, attention, mask, (first - 1).clamp_min(0))
        self.callback._queue.append((guard_rows, encoded))
        return batch


class TraitGuardCallback(TrainerCallback):
    """The guard in any transformers ``Trainer``: ``Trainer``, TRL's ``SFTTrainer``, ``GKDTrainer`` and
    other subclasses, with ``callbacks=[TraitGuardCallback(...)]`` (see docs/integrations.md).

    What it does, on the :class:`GuardedStep` it is given (``guarded``):

    * data (a :class:`~trait_guard.guard.TraitGuard`): the training dataloader's collator is wrapped
      (:class:`GuardDataCollator`) so that each batch's precomputed per-row ``signals`` (plus
      ``unigram`` from the completion tokens, with a reference histogram) are judged at
      ``on_step_begin``, before the batch reaches the model. Needs ``remove_unused_columns=False``
      (the Trainer drops unknown columns otherwise) and one sample per row (no packing).
    * probes: every ``probe_every`` steps, the student's shift along the persona vectors on fixed
      probe prompts against step 0 (``on_step_end``, after the update); a drift alarm acts per
      ``guard.on_drift_alarm``. This is all that applies to on-policy training (GKD): there the
      student generates what it trains on, so there are no teacher rows to judge (use
      :class:`~trait_guard.integrations.torch_loop.DriftGuard`).
    * HALT: the halting step's gradients are dropped before the optimizer step (no update, not even
      Adam's momentum), training stops, the weights are restored to the snapshot from before the
      first step the alarm implicates (``GuardedStep(rollback=True)``), the model is tagged
      ``trait-guard-halted``, a checkpoint of the restored weights is written with
      ``trait_guard_state.json`` (``save_on_halt``), and ``trainer.train()`` raises
      :class:`~trait_guard.errors.TraitGuardHalted` (``raise_on_halt``; it is raised from
      ``on_train_end``, after the Trainer's own end-of-training work and the reporters' callbacks).
    * STEER: while the guard's mode is STEER, preventative steering is applied to each training step's
      forward passes (on at ``on_step_begin``, off at ``on_step_end``: evaluation, probes and saved
      models never see it).
    * a look-ahead gate in front of the data: :meth:`gate` wraps the rows in a
      :class:`~trait_guard.integrations.torch_loop.GatedRows` whose alarm halts training.
    * resuming: each checkpoint holds the guard's state (:data:`GUARD_STATE_FILE`: the guard, the update
      count, the probes' baseline, the gates); a resumed run loads it at ``on_train_begin``, so the guard
      bets on each row once per run, across the interruption (see :meth:`_resume`).

    Records: ``decisions`` (every Decision: data, drift, gate; in order), ``halted_step`` (the step
    whose update the halt cancelled, or the last step for a drift or gate halt; None if none),
    ``halted_reason``, ``rollback`` (the rollback record) and ``metrics()`` (the latest log entries,
    added to each training log by ``on_log``). ``guarded`` may also be a :class:`GuardedTrainerLoss`:
    that is how :class:`GuardedTrainer` uses it (the decisions then come from its loss).
    """

    def __init__(self, guarded: GuardedStep | GuardedTrainerLoss, *, save_on_halt: bool = True,
                 raise_on_halt: bool = True, signals_key: str = "signals"):
        if isinstance(guarded, GuardedTrainerLoss):
            self.guard_loss: GuardedTrainerLoss | None = guarded
            self.guarded = guarded.guarded
        elif isinstance(guarded, GuardedStep):
            self.guard_loss, self.guarded = None, guarded
        else:
            raise TypeError(f"TraitGuardCallback needs a GuardedStep (got {type(guarded).__name__}); "
                            "or use TraitGuardCallback.from_vectors(model, tokenizer, vectors, ...)")
        self.save_on_halt, self.raise_on_halt, self.signals_key = save_on_halt, raise_on_halt, signals_key
        self.decisions: list[Decision] = []
        self.halted_step: int | None = None
        self.halted_reason: str | None = None
        self.rollback: dict[str, Any] | None = None
        self._queue: deque[tuple[list[dict[str, Any]], EncodedBatch | None]] = deque()
        self._steer = ExitStack()
        self._steering = False
        self._shifts: dict[str, float] = {}
        self.gates: list[GatedRows] = []  # look-ahead gates built by gate(): their state is checkpointed
        self.resumed_from: str | None = None
        #: the checkpoint a resumed run continues (GuardedTrainer sets it; with a plain Trainer set it when the
        #: checkpoint is not <output_dir>/checkpoint-<step>)
        self.resume_folder: str | None = None
        self._discard = 0  # resumed iterable data: collated batches the Trainer skips, never trained on

    @classmethod
    def from_vectors(cls, model: torch.nn.Module, tokenizer: Any = None, vectors: Sequence[Any] = (), *,
                     reference: dict[str, np.ndarray] | None = None, config: GuardConfig | None = None,
                     batch_size: int = 8, probe_prompts: Sequence[str] = (), probe_every: int = 10,
                     unigram_reference: Any = None, rollback: bool = True, **kwargs: Any) -> TraitGuardCallback:
        """The callback in one line: persona ``vectors`` (PersonaVector objects or saved files, loaded
        for ``model``), the data guard when ``reference`` signals are given (else probes only: a
        :class:`~trait_guard.integrations.torch_loop.DriftGuard`), probes on ``probe_prompts`` and
        rollback. ``config`` defaults to ``GuardConfig()``; ``batch_size`` calibrates a CUSUM guard."""
        from trait_guard.persona import PersonaVector

        vectors = [v if isinstance(v, PersonaVector) else PersonaVector.load(v, model=model) for v in vectors]
        config = config or GuardConfig()
        if reference is None and not probe_prompts:
            raise TraitGuardInputError("a guard without reference signals watches only drift probes, and no "
                                       "probe_prompts were given: it would watch nothing. Pass reference=<signals "
                                       "of clean rows> and/or probe_prompts=[...] with vectors")
        guard = TraitGuard(config, reference, batch_size) if reference is not None else DriftGuard(config)
        guarded = GuardedStep(guard, model, vectors, unigram_reference=unigram_reference, tokenizer=tokenizer,
                              probe_prompts=probe_prompts, probe_every=probe_every, rollback=rollback)
        return cls(guarded, **kwargs)

    @property
    def guard(self) -> Any:
        return self.guarded.guard

    @property
    def watches_data(self) -> bool:
        """Whether this callback judges the training rows (a data guard without GuardedTrainer's loss)."""
        return self.guard_loss is None and not isinstance(self.guard, DriftGuard)

    def metrics(self) -> dict[str, Any]:
        """The latest decision's log entries, the probes' last shifts and the halt's step numbers."""
        metrics = guard_metrics(self.decisions[-1], self.guard) if self.decisions else {}
        metrics.update({f"probe/shift/{k}": v for k, v in self._shifts.items()})
        if self.halted_step is not None and self.guard_loss is None:
            metrics["guard/halted_step"] = float(self.halted_step)
            if self.rollback and "restored_step" in self.rollback:
                metrics["guard/restored_step"] = float(self.rollback["restored_step"])
        return metrics

    def gate(self, rows: Any, window: int, *, signal: str, alpha: float | None = None) -> GatedRows:
        """``rows`` behind a look-ahead gate: an e-process on the precomputed ``signal`` (fitted on the
        guard's reference, at ``alpha``, default the guard's), releasing each row only after ``window``
        later rows were scored clean. Its alarm puts the guard in its data-alarm mode (HALT: training
        stops at the next step without an update, and rolls back to step 0: the gate implicates the
        whole stream). Give the result to the Trainer as an iterable dataset
        (``datasets.IterableDataset.from_generator(gated.__iter__)``) with ``max_steps``."""
        guard = self.guard
        detectors = getattr(guard, "detectors", {})
        if signal not in detectors:
            raise TraitGuardInputError(f"the gate's signal '{signal}' is not one the guard is calibrated on "
                                       f"({sorted(detectors)})")
        reference = getattr(detectors[signal], "_ref", None)
        if not isinstance(detectors[signal], EProcessDetector) or reference is None:
            raise TraitGuardInputError("the look-ahead gate needs the e-process guard (guard.sequential: eprocess)")
        detector = EProcessDetector(alpha=alpha or guard.config.alpha, two_sided=guard.direction(signal) == "both",
                                    seed=guard.config.seed, name=f"gate:{signal}").fit(reference)

        def on_alarm(step: Any) -> None:
            reason = (f"look-ahead gate alarm on {signal} (log10 E = {step.verdict.score:.2f} > "
                      f"{step.verdict.threshold:.2f}); {len(step.held)} rows held, never trained on")
            self.decisions.append(self.guarded.gate_alarm([signal], reason))

        gated = GatedRows(rows, LookaheadGate(detector, window), signal=signal, guard=guard, on_alarm=on_alarm)
        self.gates.append(gated)
        return gated

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.guarded.start(state.global_step)
        if state.global_step > 0:
            self._resume(args, state)
        if not self.watches_data:
            return control
        if self.guard.config.on_data_alarm in (Action.REWEIGHT, Action.MASK):
            logger.warning("guard.on_data_alarm is %s, which changes the loss: a callback cannot, so after an alarm "
                           "the decisions are only recorded. Use GuardedTrainer, or on_data_alarm halt/steer",
                           self.guard.config.on_data_alarm.value)
        if args.remove_unused_columns:
            raise TraitGuardInputError(
                "TraitGuardCallback judges each row's precomputed 'signals' column, which the Trainer drops: set "
                "remove_unused_columns=False in the TrainingArguments / SFTConfig (or use a DriftGuard / "
                "reference=None for drift probes only)")
        if args.dataloader_num_workers:
            raise TraitGuardInputError(
                "TraitGuardCallback reads the batches in the training process: set dataloader_num_workers=0 "
                f"(got {args.dataloader_num_workers})")
        loader = train_dataloader
        while hasattr(loader, "base_dataloader"):  # accelerate's DataLoaderShard wraps the torch DataLoader
            loader = loader.base_dataloader
        if loader is None or not hasattr(loader, "collate_fn"):
            raise TraitGuardInputError("the Trainer passed no training dataloader to the callback: cannot see the "
                                       "batches (use GuardedTrainer, or GuardedStep in your own loop)")
        if "ChatML" in type(loader.collate_fn).__name__:
            logger.warning("this looks like GKD (DataCollatorForChatML): the guard judges the dataset's rows, but "
                           "on-policy steps train on the student's own generations, which no data signal "
                           "describes; rely on the drift probes (docs/integrations.md)")
        if not isinstance(loader.collate_fn, GuardDataCollator):
            # Read by the dataloader's iterator, created after this event (one per epoch).
            loader.collate_fn = GuardDataCollator(loader.collate_fn, self)
        self._queue.clear()
        if state.global_step > 0 and not args.ignore_data_skip and not has_length(train_dataloader):
            # A resumed Trainer skips the batches its epoch already trained on. Data without a length
            # (the Trainer's own has_length test) is skipped by iterating it: those batches pass the
            # collator but never reach the model.
            self._discard = (state.global_step % max(state.max_steps, 1)) * args.gradient_accumulation_steps
        return control

    def _resume(self, args, state) -> None:
        """A resumed run (``trainer.train(resume_from_checkpoint=...)``): continue the guard saved with the
        checkpoint, so its evidence, the rows it bet on (each row once per run) and the probes' step-0
        baseline carry over, and the per-run false-alarm bound still holds."""
        candidates = [self.resume_folder, args.resume_from_checkpoint]
        folder = next((c for c in candidates if isinstance(c, str) and os.path.isdir(c)),
                      _checkpoint_folder(args.output_dir, state.global_step))
        path = os.path.join(folder, GUARD_STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("resuming at step %d without the guard's state (%s is not there): the guard starts "
                           "afresh, so rows trained before are bet on again and its false-alarm bound holds per "
                           "resumed segment, not per run", state.global_step, path)
            return
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("halted_step") is not None:
            raise TraitGuardInputError(
                f"{folder} was written when the guard halted this run at step {saved['halted_step']} "
                f"({saved.get('reason') or 'see its trait_guard_state.json'}); its weights are the rolled-back "
                "ones, and resuming would train on the data the guard flagged. Remove the flagged rows and start "
                "a new run from the base model")
        gates = saved.get("gates", [])
        if len(gates) != len(self.gates):
            raise TraitGuardInputError(
                f"{path} holds {len(gates)} look-ahead gate state(s), this run built {len(self.gates)}: build the "
                "same gates (callback.gate(...)) before trainer.train(resume_from_checkpoint=...)")
        self.guarded.load_state_dict(saved)
        for gated, gate_state in zip(self.gates, gates, strict=True):
            gated.load_state_dict(gate_state)
        self.resumed_from = folder
        logger.info("trait guard resumed from %s at step %d (%d samples bet on so far)", folder,
                    state.global_step, len(getattr(self.guard, "bet_on", ())))

    def _decide_next(self, state) -> None:
        """Judge the next micro-batch, which the dataloader has collated and the model has not seen."""
        if not self.watches_data:
            return
        if not self._queue:
            raise RuntimeError("TraitGuardCallback: a training step began without a batch from the guarded "
                               "collator (was the training dataloader replaced after on_train_begin?)")
        while self._discard and len(self._queue) > 1:
            self._queue.popleft()
            self._discard -= 1
        rows, encoded = self._queue.popleft()
        if not all(r.get("signals") for r in rows):
            if self.guarded.unigram_reference is None:
                raise TraitGuardInputError(
                    f"the training rows reach the collator without their '{self.signals_key}' column: keep it in "
                    "the dataset (precomputed with FingerprintScorer on the student's frozen base model), set "
                    "remove_unused_columns=False, and do not pack (packing=False: per-sample signals need one "
                    "sample per row)")
            rows = [{"signals": {}} for _ in rows]
        self.decisions.append(self.guarded.decide_rows(rows, encoded, step=state.global_step + 1))

    def _steer_if_in_force(self) -> None:
        if self.guard.mode is Action.STEER and not self._steering:
            self._steering = self._steer.enter_context(self.guarded.steering())

    def on_step_begin(self, args, state, control, **kwargs):
        self._decide_next(state)
        self._steer_if_in_force()
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        self._decide_next(state)  # gradient accumulation: each micro-batch is one observation
        self._steer_if_in_force()
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.guard.mode is Action.HALT and model is not None:
            # No gradient at all (not zeros): optimizers skip the parameters, so neither momentum nor
            # weight decay moves them in the halting step.
            model.zero_grad(set_to_none=True)
        return control

    def _steer_off(self) -> None:
        self._steer.close()
        self._steering = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._steer_off()
        if self.guard_loss is not None:
            self.decisions.extend(self.guard_loss.pending)
            self.guard_loss.pending.clear()
        if self.halted_step is not None:
            return control
        if self.guard.mode is Action.HALT:  # this step's update was cancelled (data, gate or numeric alarm)
            self._halt(args, state, control, model, state.global_step)
            return control
        drift = self.guarded.after_update(state.global_step)  # snapshots, and the probes when due
        if drift is not None:
            self._shifts = dict(self.guarded.last_shifts)
            self.decisions.append(drift)
            if drift.halt:
                self._halt(args, state, control, model, state.global_step)
        return control

    def _halt(self, args, state, control, model, step: int) -> None:
        """Stop the Trainer, roll the weights back, tag the model and ask for the halting checkpoint."""
        halt = next((d for d in reversed(self.decisions) if d.halt), None)
        self.halted_step = step
        self.halted_reason = halt.reason if halt is not None else "halt"
        if self.guarded.halted_step is None or self.guarded.halted_step > step:
            self.guarded.halted_step = step
        self.rollback = self.guarded.roll_back() if self.guarded.rollback else None
        logger.warning("trait guard halted training at step %d: %s%s", step, self.halted_reason,
                       f" ({self.rollback['reason']})" if self.rollback and self.rollback.get("reason") else "")
        control.should_training_stop = True
        control.should_log = True
        if self.save_on_halt:
            control.should_save = True
        if self.guard_loss is not None:
            return  # GuardedTrainer: its own checkpoint and error say it
        if model is not None and hasattr(model, "add_model_tags"):
            model.add_model_tags(["trait-guard-halted"])  # the model card of any later save says so
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self._write_state(args.output_dir)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.halted_step is None and self.guard.mode is Action.HALT:  # a gate alarm ended the data
            self._halt(args, state, control, model, state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.guard_loss is None and logs is not None and "loss" in logs:
            # Reporters called after this callback see them in `logs`; the history entry is a copy of it.
            metrics = self.metrics()
            logs.update(metrics)
            entry = state.log_history[-1] if state.log_history else None
            if entry is not None and entry.get("step") == state.global_step and "loss" in entry:
                entry.update(metrics)
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = _checkpoint_folder(args.output_dir, state.global_step)
        if os.path.isdir(folder) and state.is_world_process_zero:
            self._write_state(folder)
        return control

    def _write_state(self, folder: str) -> None:
        state = {**self.guarded.state_dict(), "halted_step": self.halted_step,
                 "gates": [g.state_dict() for g in self.gates]}
        if self.guard_loss is None:
            state.update(reason=self.halted_reason, rollback=self.rollback)
        with open(os.path.join(folder, GUARD_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, default=float)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._steer_off()
        if self.halted_step is None and self.guard.mode is Action.HALT and self.guard_loss is None:
            self._halt(args, state, control, model, state.global_step)
        if self.halted_step is not None and self.raise_on_halt:
            summary = {"halted_step": self.halted_step, "reason": self.halted_reason, "rollback": self.rollback,
                       "global_step": state.global_step}
            restored = f"; weights restored to step {self.rollback['restored_step']}" if (
                self.rollback and "restored_step" in self.rollback) else ""
            raise TraitGuardHalted(
                f"the trait guard halted training at step {self.halted_step}: {self.halted_reason}{restored}; the "
                "trained model is not fit to ship (TraitGuardCallback(raise_on_halt=False) to return normally)",
                summary)
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
        self.guard_callback = TraitGuardCallback(self.guard_loss, save_on_halt=save_on_halt, raise_on_halt=False)
        self.add_callback(self.guard_callback)
        self.raise_on_halt = raise_on_halt

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; then, if the guard halted and ``raise_on_halt``, raise
        :class:`~trait_guard.errors.TraitGuardHalted` so that no code after it ships the halted model."""
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)
        self.guard_callback.resume_folder = resume if isinstance(resume, str) else None
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
