"""The guard policy: fingerprint signals in, a decision out. Plain numpy/torch, no framework.

Each training batch's per-sample signals (from :mod:`trait_guard.fingerprint`) are oriented and
standardized against a reference (the same signals on clean data from the student's base model) and
fed to one sequential test per signal (``guard.sequential``):

* ``eprocess`` (default, :class:`trait_guard.sequential.EProcessDetector`): every sample is ranked
  against the reference and bet on; the alarm comes when the wealth passes ``k / alpha`` for k
  signals, so P(any false data alarm in the whole run, on clean data) <= ``alpha`` by Ville's
  inequality (marginally over the reference draw), with no calibration run.
* ``cusum`` (:class:`trait_guard.detect.CUSUMDetector`): batch means, calibrated by bootstrap so that
  the whole guard raises a false alarm about once per ``target_ert`` clean batches (a union bound).
  It re-arms at 0, so it is faster on a shift that starts late in a long stream.

Single samples are never judged alone: published per-sample screening failed to stop subliminal
transfer, while evidence accumulated over many samples succeeds (docs/science.md). Each alarm records
its change point (the last step at which its evidence was at its low: 0 for a CUSUM, the running
minimum of the log-wealth for an e-process), which :mod:`trait_guard.rollback` uses on HALT.

Before the first batch, :meth:`TraitGuard.gate` takes the dataset screen's verdict on all training rows
(:mod:`trait_guard.screen`): a flagged screen puts the configured mitigation in force from step 1, and
HALT then means no update at all. A guard that watches no signal with shown power
(``guard.powered_signals``) says so: :attr:`TraitGuard.monitored` is False and the run's verdict is
"unmonitored", never "passed".

Until an alarm the decision is PASS (or MASK when divergence tokens are always masked). After a data
alarm the guard stays in its configured mitigation: REWEIGHT (weight ``exp(-max(z, 0) / T)`` per sample,
z being how far it leans the suspicious way), MASK (drop divergence tokens from the loss), STEER (the
training loop enables preventative steering) or HALT. A drift alarm (the student itself moving along
a persona vector, measured on probe prompts) escalates to ``on_drift_alarm``, HALT by default.

Its state (detector statistics, counters, mode) saves to JSON-safe dicts for checkpoint and resume.
Multi-rank runs gather the signals of all ranks before calling :meth:`TraitGuard.observe`, so every
rank sees the same inputs and takes the same action.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trait_guard.config import Action, Direction, GuardConfig
from trait_guard.detect import CUSUMDetector, Verdict, split_ert
from trait_guard.errors import TraitGuardInputError
from trait_guard.fingerprint import TEACHER_LOGPROB_SIGNALS, suspicious_direction, teacher_signal_coverage
from trait_guard.sequential import EProcessDetector, min_samples_to_alarm


def check_signal_sides(watched: list[str], train_rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]],
                       train_name: str = "the training data", reference_name: str = "the reference") -> dict[str, Any]:
    """Refuse, before any training, a watched teacher-log-prob signal that one side can compute and the
    other cannot (at step 1 it would either crash or compare against nothing).

    Returns, per side, how many rows carry each such signal's column (for the run's records).
    """
    coverage = {"train": teacher_signal_coverage(train_rows), "reference": teacher_signal_coverage(reference_rows)}
    for name, column in TEACHER_LOGPROB_SIGNALS.items():
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in watched):
            continue
        has_train, has_reference = coverage["train"][name] > 0, coverage["reference"][name] > 0
        if has_train == has_reference:
            continue
        lacking, having = (train_name, reference_name) if has_reference else (reference_name, train_name)
        raise TraitGuardInputError(
            f"signal '{name}' needs the teacher's '{column}' column: {having} has it but {lacking} has not "
            "(generated with generation.top_k_logprobs: 0, or text-only data), so the two cannot be compared. "
            f"Regenerate {lacking} with generation.top_k_logprobs > 0, or remove '{name}' from guard.signals "
            "(the guard then watches no teacher-log-prob signal and says so)")
    return coverage


@dataclass
class Decision:
    """What the training loop must do with this batch, and why."""

    step: int
    action: Action
    reason: str
    sample_weights: torch.Tensor  # [batch] in [min_weight, 1]; all 1 on PASS, all 0 on HALT
    token_masks: list[np.ndarray] | None = None  # per sample, over completion tokens: 1 keep, 0 drop
    verdicts: list[Verdict] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def halt(self) -> bool:
        return self.action is Action.HALT

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "action": self.action.value, "reason": self.reason,
                "flagged": [v.detector for v in self.verdicts if v.flagged], "evidence": self.evidence}


class TraitGuard:
    """Calibrated detectors over fingerprint signals, and the policy that turns alarms into actions."""

    def __init__(self, config: GuardConfig, reference: dict[str, np.ndarray], batch_size: int):
        self.config = config
        self.batch_size = batch_size
        self.signals = self._select(reference)
        if not self.signals:
            raise TraitGuardInputError(
                f"none of the watched signals {config.signals} is in the reference signals {sorted(reference)}; "
                "score the reference with the same FingerprintScorer (and persona vectors) as the training data"
            )
        # A signal constant on the reference (divergence tokens when the reference teacher IS the base
        # model: exactly 0) cannot be standardized. With a tolerance configured it becomes an exact
        # check (alarm when a batch's mean leaves the constant by more than the tolerance: on data from
        # the base model itself that never happens); otherwise it is skipped and reported.
        self.skipped: dict[str, str] = {}
        self.constant: dict[str, float] = {}
        for name in list(self.signals):
            values = np.asarray(reference[name], dtype=float)
            values = values[np.isfinite(values)]
            if len(values) >= 2 and values.std() > 0:
                continue
            self.signals.remove(name)
            if len(values) and name in config.constant_reference_tolerance:
                self.constant[name] = float(values[0])
            else:
                self.skipped[name] = f"reference has {len(values)} finite values and no spread"
        if not self.signals and not self.constant:
            raise TraitGuardInputError(
                f"no watched signal can be calibrated on the reference: {self.skipped}. No finite values means "
                "the base model produced NaN/inf (a broken checkpoint?) or the reference completions are empty; "
                "no spread means the reference is too small or all alike: use more reference rows")
        self.kind = config.sequential
        self.mean, self.std, self.detectors = {}, {}, {}
        self._calibration_rng = np.random.default_rng(config.seed)  # CUSUM bootstrap draws, signal by signal
        for name in self.signals:
            values = np.asarray(reference[name], dtype=float)
            values = values[np.isfinite(values)]
            self.mean[name], self.std[name] = float(values.mean()), float(values.std(ddof=1))
            self.detectors[name] = self._detector(name, self.standardize(name, values))
        self.low_point: dict[str, float] = {name: 0.0 for name in self.signals}  # e-process: min log10 E so far
        self.step = 0
        self.mode = Action.PASS  # the mitigation in force after an alarm
        self.alarms: list[dict[str, Any]] = []
        # per CUSUM signal, the last step at which its statistic was 0 (the change-point estimate)
        self.last_zero: dict[str, int] = {name: 0 for name in self.signals}

    def _detector(self, name: str, z: np.ndarray) -> Any:
        """One signal's calibrated sequential test on its oriented, standardized reference values."""
        two_sided = self.direction(name) == "both"
        k = max(1, len(self.signals))
        if self.kind == "eprocess":  # Bonferroni over signals: P(any false alarm in the run) <= alpha
            return EProcessDetector(alpha=self.config.alpha / k, two_sided=two_sided, seed=self.config.seed,
                                    name=name).fit(z)
        batch_means = self._calibration_rng.choice(z, size=(self.config.bootstrap_batches, self.batch_size), replace=True).mean(1)
        detector = CUSUMDetector(k=self.config.drift_allowance, two_sided=two_sided, name=name)
        return detector.fit(batch_means).calibrate(target_ert=split_ert(self.config.target_ert, k), seed=self.config.seed)

    def _update(self, name: str, z: np.ndarray) -> Verdict:
        """Feed one batch of a signal to its test (every sample to an e-process, the mean to a CUSUM),
        and note whether the evidence is back at its low point (the change-point estimate)."""
        detector = self.detectors[name]
        if self.kind == "cusum":
            verdict = detector.update(float(np.nanmean(z)))
            quiet = detector.statistic == 0.0
        else:
            for value in z[np.isfinite(z)]:
                verdict = detector.update(float(value))
            quiet = detector.log10_e <= self.low_point[name]
            self.low_point[name] = min(self.low_point[name], detector.log10_e)
        if quiet:
            self.last_zero[name] = self.step
        return verdict

    def blind_spot(self, n_samples: int) -> str | None:
        """Why the in-training test could never alarm on ``n_samples`` training samples, or None. An
        e-process needs a minimum run of top-ranked samples to reach ``k / alpha``; less data than
        that cannot be judged by it, whatever it holds."""
        if self.kind != "eprocess" or not self.signals:
            return None
        need = min_samples_to_alarm(self.config.alpha / len(self.signals))
        if n_samples >= need:
            return None
        return (f"the e-process needs at least {need} samples to reach 1/alpha (alpha={self.config.alpha:g} over "
                f"{len(self.signals)} signals) and the training data has {n_samples}: in training it cannot alarm. "
                "Rely on the gate, raise guard.alpha, or use guard.sequential: cusum")

    @property
    def false_alarm_control(self) -> str:
        """The guard's false-alarm guarantee on clean data, per run (for the summary and the report)."""
        if self.kind == "eprocess":
            return (f"anytime-valid: P(any false data alarm in the run) <= {self.config.alpha:g} "
                    f"(Ville's inequality, alpha/{max(1, len(self.signals))} per signal)")
        return (f"CUSUM: on average one false data alarm per {self.config.target_ert:g} clean batches "
                "(bootstrap-calibrated ERT, union bound over signals)")

    @property
    def powered(self) -> list[str]:
        """The calibrated signals with shown power (``config.powered_signals``)."""
        return [n for n in [*self.signals, *self.constant]
                if any(fnmatch.fnmatchcase(n, p) for p in self.config.powered_signals)]

    @property
    def monitored(self) -> bool:
        """Whether the guard watches at least one signal with shown power; if not, it cannot pass a run."""
        return bool(self.powered)

    @property
    def quiet_since(self) -> int:
        """No future alarm can implicate a step at or before this one: every CUSUM statistic has been
        0 since (the earliest of the per-signal last-zero steps)."""
        return min(self.last_zero.values(), default=self.step)

    @property
    def change_point(self) -> int | None:
        """The last step none of the alarms implicates (the batches after it carry the evidence), or
        None without an alarm that implicates data. The gate and drift alarms implicate step 1 on."""
        points = [a["change_point"] for a in self.alarms if a.get("change_point") is not None]
        return min(points) if points else None

    def gate(self, flagged_signals: list[str], reason: str) -> Decision:
        """The dataset screen flagged the training data before step 1: the configured mitigation is in
        force from the first batch (HALT: train nothing). Returns the step-0 decision to log."""
        self.mode = self.config.on_data_alarm
        self.alarms.append({"step": 0, "channel": "gate", "signals": list(flagged_signals), "change_point": 0})
        return self._decide(0, np.zeros(0), None, [], {"gate": {"signals": list(flagged_signals)}}, reason)

    # -- configuration helpers -----------------------------------------------------------------
    def _select(self, available: dict[str, Any]) -> list[str]:
        return sorted({n for pattern in self.config.signals for n in available if fnmatch.fnmatchcase(n, pattern)})

    def direction(self, name: str) -> Direction:
        return suspicious_direction(name, self.config.directions)

    def lean(self, signals: dict[str, np.ndarray]) -> np.ndarray:
        """Per sample, how far it leans the suspicious way: the mean of its standardized calibrated
        signals (a missing value counts as 0, the reference mean; a signal missing for the whole batch
        is left out). Drives REWEIGHT and the flagged-samples report."""
        n = len(next(iter(signals.values())))
        standardized = [self.standardize(name, signals[name]) for name in self.signals if name in signals]
        rows = [np.where(np.isfinite(z), z, 0.0) for z in standardized if np.isfinite(z).any()]
        return np.mean(rows, axis=0) if rows else np.zeros(n)

    def standardize(self, name: str, values: np.ndarray) -> np.ndarray:
        z = (np.asarray(values, dtype=float) - self.mean[name]) / self.std[name]
        return -z if self.direction(name) == "down" else z

    # -- the policy --------------------------------------------------------------------------------
    def observe(self, signals: dict[str, np.ndarray], token_masks: list[np.ndarray] | None = None,
                step: int | None = None) -> Decision:
        """Decide for one batch given its per-sample signals (all ranks' samples, gathered)."""
        self.step = self.step + 1 if step is None else step
        missing = [n for n in self.signals if n not in signals]  # skipped signals may be absent
        if missing:
            raise ValueError(f"batch signals lack {missing}; the guard was calibrated on {self.signals}")
        n = len(next(iter(signals.values())))
        watched = [np.asarray(signals[name], dtype=float) for name in [*self.signals, *self.constant] if name in signals]
        if any(np.isinf(v).any() for v in watched) or (watched and not any(np.isfinite(v).any() for v in watched)):
            # the model or the data is numerically broken, or the guard sees nothing: never let it pass
            self.mode = Action.HALT
            reason = ("non-finite guard signals (inf, or NaN for every watched signal): the model produced "
                      "NaN/inf or the batch has no usable completions")
            # a numerical failure, not a trait: nothing to roll back beyond the batch not trained on
            self.alarms.append({"step": self.step, "channel": "data", "signals": ["non-finite"], "change_point": None})
            return self._decide(n, np.zeros(n), token_masks, [], {}, reason)
        verdicts = []
        for name in self.signals:
            z = self.standardize(name, signals[name])
            if np.isfinite(z).any():
                verdicts.append(self._update(name, z))
        for name, constant in self.constant.items():
            if name not in signals or not np.isfinite(signals[name]).any():
                continue
            tolerance = self.config.constant_reference_tolerance[name]
            deviation = float(abs(np.nanmean(signals[name]) - constant))
            verdicts.append(Verdict(name, deviation > tolerance, deviation, tolerance, None,
                                    {"reference_constant": constant, "rule": "|batch mean - constant| > tolerance"}))
        flagged = [v for v in verdicts if v.flagged]
        if flagged and self.mode is Action.PASS:
            self.mode = self.config.on_data_alarm
            # a CUSUM's evidence began after its last zero; a constant-reference check judges one batch
            change_point = min(self.last_zero.get(v.detector, self.step - 1) for v in flagged)
            self.alarms.append({"step": self.step, "channel": "data", "signals": [v.detector for v in flagged],
                                "change_point": change_point})
        lean = self.lean(signals)
        if self.kind == "cusum":  # the batch mean standardized on the bootstrap batch means
            batch_z = {v.detector: float(v.evidence.get("z", np.nan)) for v in verdicts if v.detector in self.detectors}
        else:  # the mean of the samples' standardized values
            batch_z = {name: float(np.nanmean(self.standardize(name, signals[name]))) for name in self.signals
                       if np.isfinite(signals[name]).any()}
        evidence = {"batch_z": batch_z, self.kind: {v.detector: v.score for v in verdicts},
                    "thresholds": {v.detector: v.threshold for v in verdicts}}
        return self._decide(n, lean, token_masks, verdicts, evidence,
                            f"data alarm on {', '.join(v.detector for v in flagged)}" if flagged else None)

    def observe_drift(self, shifts: dict[str, float], step: int | None = None) -> Decision:
        """Decide after a probe: ``shifts`` are the student's finetuning shifts along persona vectors,
        in base-model standard deviations (positive: toward the trait)."""
        self.step = self.step if step is None else step
        over = {k: v for k, v in shifts.items() if v > self.config.drift_threshold}
        verdicts = [Verdict(detector=f"drift:{k}", flagged=k in over, score=float(v),
                            threshold=self.config.drift_threshold, p_value=None, evidence={"shift": float(v)})
                    for k, v in shifts.items()]
        reason = None
        if over:
            self.mode = Action(self.config.on_drift_alarm)
            # the student's own drift carries no time stamp of its cause: all its training is implicated
            self.alarms.append({"step": self.step, "channel": "drift", "signals": sorted(over), "change_point": 0})
            reason = "student drift " + ", ".join(f"{k}={v:.2f}" for k, v in over.items())
        return self._decide(0, np.zeros(0), None, verdicts, {"drift": dict(shifts)}, reason)

    def _decide(self, n: int, lean: np.ndarray, token_masks: list[np.ndarray] | None,
                verdicts: list[Verdict], evidence: dict[str, Any], alarm_reason: str | None) -> Decision:
        weights = torch.ones(n)
        masks = self.keep_masks(token_masks)
        action = self.mode
        if action is Action.PASS and self.masking:
            action = Action.MASK
        if action is Action.REWEIGHT and n:
            # Not renormalized: a batch that leans toward the trait as a whole should teach less.
            raw = np.maximum(np.exp(-np.maximum(lean, 0.0) / self.config.reweight_temperature), self.config.min_weight)
            weights = torch.as_tensor(raw, dtype=torch.float32)
        if action is Action.HALT:
            weights = torch.zeros(n)
        reason = alarm_reason or ("no alarm" if self.mode is Action.PASS else
                                  f"mitigation {self.mode.value} in force since step {self.alarms[-1]['step']} "
                                  f"({self.alarms[-1]['channel']} alarm)")
        return Decision(self.step, action, reason, weights, masks, verdicts, evidence)

    @property
    def masking(self) -> bool:
        """Whether divergence tokens are dropped from the loss now."""
        return self.config.mask_divergence_tokens == "always" or (
            self.config.mask_divergence_tokens == "on_alarm" and self.mode is Action.MASK)

    def keep_masks(self, divergence_masks: list[np.ndarray] | None) -> list[np.ndarray] | None:
        """Per-sample token masks (1 keep, 0 drop) from divergence-token masks, or None when not masking.
        Rank-local: in multi-rank runs each rank applies it to its own rows."""
        if divergence_masks is None or not self.masking:
            return None
        return [(~np.asarray(m, dtype=bool)).astype(np.float32) for m in divergence_masks]

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "mode": self.mode.value, "alarms": list(self.alarms), "last_zero": dict(self.last_zero),
                "low_point": dict(self.low_point),
                "signals": list(self.signals), "skipped": dict(self.skipped), "constant": dict(self.constant), "mean": dict(self.mean), "std": dict(self.std),
                "detectors": {n: d.state_dict() for n, d in self.detectors.items()},
                "config": self.config.model_dump(mode="json")}

    def load_state_dict(self, state: dict[str, Any]) -> TraitGuard:
        if state["signals"] != self.signals:
            raise ValueError(f"guard state watches {state['signals']}, this guard watches {self.signals}")
        self.step, self.mode, self.alarms = int(state["step"]), Action(state["mode"]), list(state["alarms"])
        self.mean, self.std = dict(state["mean"]), dict(state["std"])
        self.last_zero = {**self.last_zero, **{k: int(v) for k, v in state.get("last_zero", {}).items()}}
        self.low_point = {**self.low_point, **{k: float(v) for k, v in state.get("low_point", {}).items()}}
        for name, detector_state in state["detectors"].items():
            self.detectors[name].load_state_dict(detector_state)
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], reference: dict[str, np.ndarray], batch_size: int) -> TraitGuard:
        guard = cls(GuardConfig.model_validate(state["config"]), reference, batch_size)
        return guard.load_state_dict(state)
