"""The guard in a plain PyTorch training loop: one call per step, plus the guarded loss.

::

    guarded = GuardedStep(guard, model, vectors, tokenizer=tokenizer, probe_prompts=prompts, rollback=True)
    for step, (batch, rows) in enumerate(loader, start=1):   # batch: trait_guard.chat.EncodedBatch
        with guarded.capture():                      # records the vector layers; steers while STEER is in force
            logits = model(**batch.model_inputs()).logits
        decision = guarded.decide(batch, logits, rows, step=step)
        if decision.halt:
            break
        loss = guarded.loss(logits, batch, decision)  # weighted, masked completion loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        if (drift := guarded.after_update(step)) is not None and drift.halt:   # snapshots + drift probes
            break
    record = guarded.roll_back()                     # after a HALT: weights of before the implicated steps

Where do the signals come from? If the rows carry precomputed per-sample signals (``signals`` in a
row, written by screening with the frozen base model), those are used: they are exactly what the
guard was calibrated on, and the step costs nothing extra. Otherwise the signals are computed from
the training forward pass itself (its logits and the captured hidden states, no second forward):
cheap, but measured by the student as it changes, so calibrate the guard with a loose target or
prefer precomputed signals for long runs. :meth:`GuardedStep.decide_rows` decides from precomputed
signals alone, before any forward (the transformers callback uses it so that the decision comes
before the batch reaches the model).

Divergence tokens need the teacher's stored top-k (``topk_ids``/``topk_logprobs`` in the rows); the
guard's token mask drops them from the loss when MASK is in force. The positions are those the
frozen base model found (``divergence_mask`` in a row, written at setup scoring): measured against
the student as it trains they would stop being masked exactly as it learns the teacher's choices.
Only rows without a stored mask fall back to the current logits.

Batches must be built from the rows' generated ids (:func:`trait_guard.chat.encode_rows`): the
teacher's per-token data belongs to those tokens, not to a re-tokenization of the text.

Beyond the per-batch decision, :class:`GuardedStep` carries the guard's other mechanisms so that every
integration (this loop, the transformers/TRL callback) has them, not only ``trait-guard train``:

* drift probes (:class:`DriftProbe`): every ``probe_every`` updates, the student's last-prompt-token
  projections on fixed probe prompts are compared with its own at step 0, in step-0 standard
  deviations; :meth:`TraitGuard.observe_drift` turns a shift past ``guard.drift_threshold`` into a
  drift alarm (HALT by default). Probes need no data signals, so they also guard on-policy training
  (GKD), where the student generates its own data; :class:`DriftGuard` is a guard with probes only.
* rollback (``rollback=True``): :class:`~trait_guard.rollback.WeightSnapshots` every
  ``guard.rollback_every_n_steps`` updates (and at step 0); :meth:`GuardedStep.roll_back` restores the
  weights of before the first step the alarm implicates.
* STEER: while the guard's mode is STEER, :meth:`GuardedStep.capture` also applies preventative
  steering (:class:`~trait_guard.steer.Steering`, ``guard.steer_coefficient`` times the first vector)
  to the forward it wraps. Probes are measured without it: they judge the weights, not the hook.
* the look-ahead gate (:class:`GatedRows`): rows pass a :class:`~trait_guard.sequential.LookaheadGate`
  before the loop sees them, so ``window`` later rows are scored before any row is trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from trait_guard.activations import record_activations
from trait_guard.chat import EncodedBatch
from trait_guard.config import Action, GuardConfig
from trait_guard.errors import TraitGuardInputError
from trait_guard.fingerprint import (
    TokenHistogram,
    divergence_mask,
    per_completion_token,
    signals_from_forward,
    teacher_tokens,
    unigram_surprisal,
)
from trait_guard.guard import SAMPLE_KEY, Decision, TraitGuard, sample_key
from trait_guard.losses import distillation_loss, token_weights, weighted_completion_loss
from trait_guard.persona import PersonaVector, probe_projections, probe_shifts
from trait_guard.rollback import RollbackRecord, WeightSnapshots
from trait_guard.sequential import GateStep, LookaheadGate

__all__ = ["DriftGuard", "DriftProbe", "GatedRows", "GuardedStep"]

logger = logging.getLogger(__name__)


class DriftGuard(TraitGuard):
    """A guard with drift probes only: no data reference, no data tests.

    For training whose data the guard cannot judge row by row (on-policy distillation such as TRL's
    GKD, where the student generates what it trains on), or when no reference signals exist yet. It
    decides on :meth:`observe_drift` exactly as :class:`TraitGuard` does (``config.drift_threshold``,
    ``config.on_drift_alarm``), keeps the same state and alarms, and refuses :meth:`observe`.
    """

    def __init__(self, config: GuardConfig | None = None):
        super().__init__(config or GuardConfig())  # no reference: TraitGuard's drift-only form

    def observe(self, signals: dict[str, np.ndarray], token_masks: list[np.ndarray] | None = None,
                step: int | None = None) -> Decision:
        raise TraitGuardInputError(
            "this guard has drift probes only (DriftGuard): it has no reference to judge data signals against. "
            "Build a TraitGuard(config, reference_signals, batch_size) to guard the data as well")


class DriftProbe:
    """The student's shift along persona vectors on fixed probe prompts, against its own step-0 self.

    ``measure()`` gives each vector's last-prompt-token projections on the prompts (eval mode, no
    gradient; the model's train/eval mode is restored). The first call after construction (or
    :meth:`reset`) is the baseline; :meth:`shifts` is then ``(mean now - mean at baseline) / sd at
    baseline`` per trait, the finetuning shift ``trait-guard train`` logs as ``probe/shift/<trait>``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, vectors: Sequence[PersonaVector],
                 prompts: Sequence[str]):
        if not vectors:
            raise TraitGuardInputError("drift probes need at least one persona vector")
        if len(prompts) < 2:
            raise TraitGuardInputError(f"drift probes need at least 2 probe prompts (got {len(prompts)}): the shift "
                                       "is measured in standard deviations across them")
        if tokenizer is None:
            raise TraitGuardInputError("drift probes need the student's tokenizer (tokenizer=...)")
        self.model, self.tokenizer, self.vectors, self.prompts = model, tokenizer, list(vectors), list(prompts)
        self.base: dict[str, np.ndarray] | None = None

    def measure(self) -> dict[str, np.ndarray]:
        training = self.model.training
        self.model.eval()
        try:
            return probe_projections(self.model, self.tokenizer, self.prompts, self.vectors)
        finally:
            self.model.train(training)

    def reset(self) -> None:
        """Take the baseline again at the next measurement."""
        self.base = None

    def shifts(self) -> dict[str, float]:
        """Per trait, the shift since the baseline in baseline standard deviations (0 at the baseline)."""
        current = self.measure()
        if self.base is None:
            self.base = current
        return probe_shifts(current, self.base)


class GatedRows:
    """Rows through a :class:`~trait_guard.sequential.LookaheadGate`: each row comes out only after
    ``gate.window`` later rows were scored without an alarm, so the alarm comes before training.

    ``score(row) -> float`` is the row's score on the gate detector's scale (default: the precomputed
    signal ``signal`` of the row, e.g. ``row["signals"]["proj:owl"]``, standardized by ``guard`` when
    given, as the guard's own tests see it). On the alarm the rows scored but not yet released are
    held, iteration ends, and ``on_alarm(step: GateStep)`` is called once (the transformers callback
    and :meth:`GuardedStep.gate_alarm` turn it into a HALT). Iterating again after an alarm yields
    nothing; at the end of a clean stream the last ``window`` rows are released (no more evidence
    will come). ``held`` lists the ids (positions in the stream) of the withheld rows.

    Usable as a plain iterable in a torch loop, as a ``torch.utils.data.IterableDataset``'s source, or
    through ``datasets.IterableDataset.from_generator(gated.__iter__)`` for TRL trainers.

    Epochs: iterating again (the next epoch) continues the same test. Each distinct row is bet on once:
    a row whose ``key`` (default: its ``sample_id``) was tested in an earlier pass, or earlier in this
    one, is released at once without a second bet, because betting twice on one row breaks the
    test's guarantee (a clean row seen k times compounds its bet k times). Rows new in a later epoch
    (data that change between epochs) are tested as they come, so the per-run false-alarm bound holds
    over all distinct rows. Rows whose key is None are always tested. ``passes``, ``tested`` and
    ``seen_again`` count what happened.

    Resuming: :meth:`state_dict` / :meth:`load_state_dict` carry the test across an interruption (the
    transformers callback saves them in its checkpoints). A resumed stream bets on none of the rows
    tested before it, so the per-run bound still holds; rows that were scored but not yet released
    when the state was saved are released, as without the interruption, once ``window`` rows after
    them have been scored. A pass abandoned mid-way (the loop stopped early) hands its buffered rows
    to the next pass the same way.
    """

    def __init__(self, rows: Iterable[dict[str, Any]], gate: LookaheadGate,
                 score: Callable[[dict[str, Any]], float] | None = None, *, signal: str | None = None,
                 guard: TraitGuard | None = None, on_alarm: Callable[[GateStep], Any] | None = None,
                 key: Callable[[dict[str, Any]], Any] | None = None):
        if score is None:
            if signal is None:
                raise ValueError("give score=callable(row) or signal=<name of a precomputed signal>")

            def score(row: dict[str, Any]) -> float:
                value = float(row["signals"][signal])
                return float(guard.standardize(signal, np.array([value]))[0]) if guard is not None else value

        self.rows, self.gate, self.score, self.on_alarm = rows, gate, score, on_alarm
        self.key = key or (lambda row: row.get("sample_id") if isinstance(row, dict) else None)
        self.alarm: GateStep | None = None
        self._tested: set[Any] = set()
        self._requeue: set[Any] = set()  # keys scored clean but not released when the last pass stopped
        self._pending: dict[int, dict[str, Any]] = {}  # this pass's scored rows, by position, until released
        self.passes = self.tested = self.seen_again = 0

    @property
    def held(self) -> list[Any]:
        return list(self.gate.held)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.gate.alarmed:
            return
        self._requeue.update(self._buffered_keys(self.gate.take_buffered()))  # a pass abandoned mid-way
        self.passes += 1
        self._pending = pending = {}
        for index, row in enumerate(self.rows):
            key = self.key(row)
            if key is not None and key in self._requeue:  # scored before, never released: wait again, no bet
                self._requeue.discard(key)
                pending[index] = row
                for released in self.gate.requeue(index).released:
                    yield pending.pop(released)
                continue
            if key is not None and key in self._tested:
                self.seen_again += 1
                yield row
                continue
            if key is not None:
                self._tested.add(key)
            self.tested += 1
            pending[index] = row
            step = self.gate.push(index, self.score(row))
            for released in step.released:
                yield pending.pop(released)
            if step.alarmed:
                self.alarm = step
                logger.warning("look-ahead gate alarm after %d rows: %d rows held, never trained on",
                               index + 1, len(step.held))
                if self.on_alarm is not None:
                    self.on_alarm(step)
                return
        for released in self.gate.flush().released:
            yield pending.pop(released)
        if self.passes > 1:
            logger.info("look-ahead gate, pass %d: %d rows tested in all, %d seen again (released without a "
                        "second bet)", self.passes, self.tested, self.seen_again)

    def _buffered_keys(self, positions: Iterable[int]) -> list[Any]:
        keys = [self.key(self._pending[i]) for i in positions if i in self._pending]
        return [k for k in keys if k is not None]

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state for a resumed stream: the gate (its detector's evidence included), the keys
        tested so far, the keys of rows scored but not released, and the counters. Keys must be strings
        or numbers (sample ids are). Rows without a key are not remembered: a resumed stream scores
        them again."""
        tested = sorted(self._tested, key=repr)
        if any(not isinstance(k, (str, int, float)) or isinstance(k, bool) for k in tested):
            raise TraitGuardInputError("GatedRows.state_dict needs string or number row keys (sample ids); give "
                                       "key=lambda row: str(...) to make them so")
        gate = self.gate.state_dict()
        gate["buffer"] = []  # positions of this pass; the rows are carried by key in 'requeue'
        requeue = sorted(self._requeue | set(self._buffered_keys(self.gate.buffered)), key=repr)
        return {"gate": gate, "tested": tested, "requeue": requeue, "passes": self.passes,
                "tested_count": self.tested, "seen_again": self.seen_again}

    def load_state_dict(self, state: dict[str, Any]) -> GatedRows:
        """Continue the test saved by :meth:`state_dict` (this object's rows may be a fresh iterator over
        the same data: rows are matched by key)."""
        missing = {"gate", "tested", "requeue", "passes", "tested_count", "seen_again"} - set(state)
        if missing:
            raise TraitGuardInputError(f"GatedRows state lacks {sorted(missing)}: it was not written by "
                                       "GatedRows.state_dict")
        self.gate = LookaheadGate.from_state_dict(state["gate"])
        self._tested, self._requeue, self._pending = set(state["tested"]), set(state["requeue"]), {}
        self.passes, self.tested = int(state["passes"]), int(state["tested_count"])
        self.seen_again = int(state["seen_again"])
        return self


class GuardedStep:
    """Connects a :class:`TraitGuard` to a PyTorch loop (see the module docstring).

    Optional mechanisms: ``tokenizer`` + ``probe_prompts`` (with ``vectors``) turn on drift probes every
    ``probe_every`` updates; ``rollback=True`` keeps weight snapshots every
    ``guard.config.rollback_every_n_steps`` updates for :meth:`roll_back`; STEER needs ``vectors``.
    """

    def __init__(self, guard: TraitGuard, model: torch.nn.Module, vectors: Sequence[PersonaVector] = (),
                 unigram_reference: TokenHistogram | None = None, check_weights: bool = True, *,
                 tokenizer: Any = None, probe_prompts: Sequence[str] = (), probe_every: int = 10,
                 rollback: bool = False):
        for vector in vectors:
            vector.check_model(model, check_weights=check_weights)
        self.guard, self.model, self.vectors = guard, model, list(vectors)
        self.unigram_reference = unigram_reference
        self.check_weights = check_weights
        self.layers = sorted({v.layer for v in self.vectors})
        self._acts: dict[int, list[torch.Tensor]] | None = None
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1 (got {probe_every})")
        self.probe = DriftProbe(model, tokenizer, self.vectors, probe_prompts) if probe_prompts else None
        self.probe_every = probe_every
        self.rollback = rollback
        self.snapshots: WeightSnapshots | None = None
        self.updates = 0  # the last step whose update was applied (after_update)
        self.halted_step: int | None = None
        self.last_shifts: dict[str, float] = {}
        self._steering: Any = None
        self._started = False

    # -- step 0 --------------------------------------------------------------------------------
    def start(self, step: int = 0) -> None:
        """Take the step-0 references: the probes' baseline and the first weight snapshot. Called once
        before the first update (the callback calls it at ``on_train_begin``; otherwise the first
        :meth:`capture`, :meth:`decide` or :meth:`decide_rows` does)."""
        if self._started:
            return
        self._started = True
        self.updates = step
        if self.probe is not None:
            self.probe.reset()
            self.probe.shifts()  # the baseline
        if self.rollback:
            self.snapshots = WeightSnapshots(self.model, self.guard.config.rollback_every_n_steps, start_step=step)

    # -- the forward -----------------------------------------------------------------------------
    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the persona-vector layers during the training forward (detached: the guard only
        reads them), and steer it while STEER is in force. Hooks are removed on exit."""
        self.start()
        with self.steering(), record_activations(self.model, self.layers) as acts:
            self._acts = acts
            yield
        # keep the records until decide() has read them

    @contextmanager
    def steering(self) -> Iterator[bool]:
        """Preventative steering (Chen et al. 2025) on the wrapped forward while the guard's mode is
        STEER: with the trait supplied by the hook, the gradient has no reason to move the weights along
        it. Yields whether it steers. Without vectors STEER cannot act, and says so once."""
        if self.guard.mode is not Action.STEER:
            yield False
            return
        if not self.vectors:
            if self._steering is None:
                logger.warning("guard mode is STEER but no persona vector was given: nothing to steer with")
                self._steering = False
            yield False
            return
        if not self._steering:
            from trait_guard.steer import Steering

            self._steering = Steering(self.model, self.vectors[0], coefficient=self.guard.config.steer_coefficient,
                                      check_weights=False)  # the student moves away from the base it came from
        with self._steering:
            yield True

    # -- signals and decisions ------------------------------------------------------------------
    def signals(self, batch: EncodedBatch, logits: torch.Tensor | None,
                rows: Sequence[dict[str, Any]] | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray] | None]:
        """Per-sample signals for this batch: precomputed ones from the rows, else from the forward;
        and the per-row divergence-token masks (the frozen base model's when the rows carry them)."""
        teacher = teacher_tokens(rows) if rows is not None else None
        if rows is not None and rows and all("signals" in r for r in rows):
            names = list(dict.fromkeys(name for r in rows for name in r["signals"]))
            signals = {name: np.array([r["signals"].get(name, np.nan) for r in rows], dtype=float) for name in names}
            if self.unigram_reference is not None and "unigram" not in signals:
                signals["unigram"] = unigram_surprisal(self.unigram_reference, batch)
            return self._with_keys(signals, rows), self._masks(logits, batch, rows, teacher, None)
        if logits is None:
            raise TraitGuardInputError(
                "the rows carry no precomputed 'signals' and there is no forward to compute them from: score the "
                "rows with trait_guard.fingerprint.FingerprintScorer (the student's frozen base model) and keep "
                "a 'signals' column, or decide after the forward with GuardedStep.decide")
        hidden = {}
        if self.layers:
            if self._acts is None:
                raise RuntimeError("no captured activations: run the forward inside `with guarded.capture():`")
            hidden = {i: self._acts[i][-1] for i in self.layers}
        signals, mask = signals_from_forward(logits, hidden, batch, self.vectors, teacher)
        if self.unigram_reference is not None:
            signals["unigram"] = unigram_surprisal(self.unigram_reference, batch)
        return self._with_keys(signals, rows), self._masks(logits, batch, rows, teacher, mask)

    @staticmethod
    def _with_keys(signals: dict[str, np.ndarray], rows: Sequence[dict[str, Any]] | None) -> dict[str, np.ndarray]:
        """The signals plus each row's :data:`~trait_guard.guard.SAMPLE_KEY` when the rows carry sample ids:
        the guard's e-process then bets on each distinct row once, however many epochs see it."""
        if rows and all(r.get("sample_id") is not None for r in rows):
            signals[SAMPLE_KEY] = np.array([sample_key(r["sample_id"]) for r in rows], dtype=float)
        return signals

    @staticmethod
    def _masks(logits: torch.Tensor | None, batch: EncodedBatch, rows: Sequence[dict[str, Any]] | None,
               teacher: Any, forward_mask: torch.Tensor | None) -> list[np.ndarray] | None:
        """Per row: its stored frozen-base divergence mask, else one from this forward's logits."""
        if teacher is None:
            return None
        if rows is not None and all(r.get("divergence_mask") is not None for r in rows):
            return [np.asarray(r["divergence_mask"], dtype=bool) for r in rows]
        if logits is None:
            return None  # no forward yet: MASK has nothing to act on before it
        if forward_mask is None:
            forward_mask = divergence_mask(logits.detach(), batch, teacher)
        return per_completion_token(forward_mask, batch)

    def decide(self, batch: EncodedBatch, logits: torch.Tensor, rows: Sequence[dict[str, Any]] | None = None,
               step: int | None = None, gather: Any = None) -> Decision:
        """The guard's decision for this batch.

        ``gather(signals) -> signals`` may combine the signals of all ranks (an all-gather) before the
        guard sees them, so every rank takes the same decision; the decision's weights and masks are
        then sliced back to this rank's rows by the caller (see the DeepSpeed/Ray Train adapters).
        """
        self.start()
        signals, masks = self.signals(batch, logits, rows)
        self._acts = None
        return self._observe(signals, masks, step, gather)

    def decide_rows(self, rows: Sequence[dict[str, Any]], batch: EncodedBatch | None = None,
                    step: int | None = None, gather: Any = None) -> Decision:
        """The decision for a batch from its rows' precomputed ``signals`` alone (plus ``unigram`` from
        the batch's completion tokens when a reference histogram is set), before any forward: the batch
        never reaches the model unjudged."""
        self.start()
        if not rows or not all("signals" in r for r in rows):
            raise TraitGuardInputError(
                "deciding before the forward needs precomputed per-row 'signals' (score the rows with "
                "trait_guard.fingerprint.FingerprintScorer on the student's frozen base model and keep the "
                "'signals' column; with transformers, set remove_unused_columns=False so that it reaches the "
                "collator)")
        if self.unigram_reference is not None and batch is None:
            raise ValueError("the unigram signal needs the batch's token ids: pass batch=")
        signals, masks = self.signals(batch, None, rows)  # type: ignore[arg-type]
        return self._observe(signals, masks, step, gather)

    def _observe(self, signals: dict[str, np.ndarray], masks: list[np.ndarray] | None, step: int | None,
                 gather: Any) -> Decision:
        if gather is None:
            decision = self.guard.observe(signals, token_masks=masks, step=step)
        else:
            decision = self.guard.observe(gather(signals), token_masks=None, step=step)
            decision.token_masks = self.guard.keep_masks(masks)  # this rank's rows only
        if decision.halt and self.halted_step is None:
            self.halted_step = decision.step
        return decision

    def gate_alarm(self, flagged: Sequence[str], reason: str) -> Decision:
        """A gate in front of training (the dataset screen, or :class:`GatedRows`) flagged the data: the
        configured mitigation is in force from now on (HALT: no further update)."""
        decision = self.guard.gate(list(flagged), reason)
        if decision.halt and self.halted_step is None:
            self.halted_step = self.updates
        return decision

    # -- after each update ----------------------------------------------------------------------
    def after_update(self, step: int) -> Decision | None:
        """Call after the update of ``step``: takes the weight snapshot that step is due, and runs the
        drift probes every ``probe_every`` steps. Returns the drift decision (halt: stop, then
        :meth:`roll_back`), or None when no probe ran."""
        self.start(step - 1)
        self.updates = step
        if self.snapshots is not None:
            self.snapshots.after_update(self.model, step, self.guard.quiet_since)
        if self.probe is None or step % self.probe_every:
            return None
        self.last_shifts = self.probe.shifts()
        drift = self.guard.observe_drift(self.last_shifts, step=step)
        if drift.halt and self.halted_step is None:
            self.halted_step = step
        return drift

    def roll_back(self) -> dict[str, Any] | None:
        """After a HALT, restore the weights of before the first step the alarms implicate (the
        guard's change point: a data alarm's evidence start, step 0 for drift and gate alarms).
        Returns the record (:class:`~trait_guard.rollback.RollbackRecord` as a dict; ``unavailable``
        says why not when it cannot), or None when no alarm implicates data (or nothing halted)."""
        change_point = self.guard.change_point
        if self.halted_step is None or change_point is None:
            return None
        halted_at = self.halted_step
        if change_point >= self.updates:
            return RollbackRecord(halted_at, change_point, self.updates,
                                  f"halt at step {halted_at}: no update was applied after the change point (step "
                                  f"{change_point}), the weights are kept").to_dict()
        if self.snapshots is None:
            return {"halted_at_step": halted_at, "change_point": change_point,
                    "unavailable": "no weight snapshots (GuardedStep(rollback=True) keeps them)"}
        try:
            restored = self.snapshots.restore(self.model, change_point)
        except RuntimeError as error:
            return {"halted_at_step": halted_at, "change_point": change_point, "unavailable": str(error)}
        return RollbackRecord(halted_at, change_point, restored,
                              f"halt at step {halted_at}: the alarm implicates the steps after step {change_point}; "
                              f"weights restored to step {restored}").to_dict()

    # -- resuming --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state for resuming: the guard's (its detectors' evidence and the keys of the rows it
        bet on), the update count, the halt and the probes' step-0 baseline. The weight snapshots are
        not in it: after a resume, rollback reaches back to the resumed step at most."""
        base = self.probe.base if self.probe is not None else None
        return {"guard": self.guard.state_dict(), "updates": self.updates, "halted_step": self.halted_step,
                "probe_base": None if base is None else {k: np.asarray(v, float).tolist() for k, v in base.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> GuardedStep:
        """Continue from :meth:`state_dict`. Call it after :meth:`start` (the callback does, at
        ``on_train_begin`` of a resumed run): the probes then keep measuring against the original step-0
        baseline instead of the resumed weights."""
        self.guard.load_state_dict(state["guard"])
        self.updates = int(state.get("updates", self.updates))
        self.halted_step = state.get("halted_step")
        base = state.get("probe_base")
        if base is not None and self.probe is not None:
            if set(base) != {v.trait for v in self.vectors}:
                raise TraitGuardInputError(f"the saved probe baseline measures {sorted(base)}, these probes measure "
                                           f"{sorted(v.trait for v in self.vectors)}: resume with the same vectors")
            self.probe.base = {k: np.asarray(v, float) for k, v in base.items()}
        return self

    # -- the loss --------------------------------------------------------------------------------
    @staticmethod
    def loss(logits: torch.Tensor, batch: EncodedBatch, decision: Decision,
             rows: Sequence[dict[str, Any]] | None = None, distill: bool = False,
             sample_slice: slice | None = None) -> torch.Tensor:
        """Completion loss (or top-k distillation when ``distill``) weighted and masked by the decision."""
        sample_weights = decision.sample_weights
        if sample_slice is not None:  # this rank's rows of a decision taken on all ranks' samples
            sample_weights = sample_weights[sample_slice]
        token_masks = decision.token_masks
        weights = token_weights(batch, sample_weights.to(logits.device), token_masks).to(logits.device)
        if distill:
            if rows is None or not all(r.get("topk_ids") for r in rows):
                raise TraitGuardInputError("distillation needs rows with the teacher's topk_ids/topk_logprobs "
                                 "(generate with generation.top_k_logprobs > 0)")
            return distillation_loss(logits, batch, [r["topk_ids"] for r in rows],
                                     [r["topk_logprobs"] for r in rows], weights)
        return weighted_completion_loss(logits, batch, weights)
