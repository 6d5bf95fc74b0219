"""The guard policy: fingerprint signals in, a decision out. Plain numpy/torch, no framework.

Each training batch's per-sample signals (from :mod:`trait_guard.fingerprint`) are oriented and
standardized against a reference (the same signals on clean data from the student's base model) and
fed to one sequential test per signal (``guard.sequential``):

* ``eprocess`` (default, :class:`trait_guard.sequential.EProcessDetector`): every sample is ranked
  against the reference and bet on; the alarm comes when the wealth passes ``k / alpha`` for k
  signals, so P(any false data alarm in the whole run, on clean data) <= ``alpha`` by Ville's
  inequality (marginally over the reference draw), with no calibration run.
* ``cusum`` (:class:`trait_guard.detect.CUSUMDetector`): batch means, calibrated by bootstrap so that
  the whole guard raises a false alarm at most about once per ``target_ert`` clean batches (a union
  bound). The calibration is honest about the reference's size: its mean is itself uncertain by
  ``sqrt(batch / n)`` batch-sd, which moves the realized ERT by an order of magnitude for n in the
  hundreds, so ``h`` is chosen over ``reference_draws`` bootstrap references to keep
  P(realized ERT < target) <= 10% (:meth:`trait_guard.detect.CUSUMDetector.calibrate`). It re-arms
  at 0, so it is faster on a shift that starts late in a long stream.

A reference too small for what the config asks (the CUSUM's honest threshold delays detection by
more than 1.25x, or the e-process's evidence on a ``design_shift`` shift cannot reach ``1/alpha``:
stream samples join its ranking pool, so the reference caps the evidence) is named in
:attr:`TraitGuard.reference_warnings` and the log, with the reference size it needs;
:attr:`TraitGuard.calibration_summary` has the numbers.

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

Epochs: the e-process bets on each distinct sample once. A batch's signals may carry
:data:`SAMPLE_KEY`, one key per sample (:func:`sample_key` of its sample id; gathered across ranks with
the signals); a sample whose key was bet on before (the next epoch over the same rows) is left out of
the e-process and counted in :attr:`TraitGuard.seen_again`, since a clean sample bet on k times
compounds its bet k times and the per-run bound would no longer hold. Samples new in a later epoch
(data that change between epochs) are tested as they come. The lean, the masks and the decision still
cover every sample; the CUSUM (per-batch control) reads every batch as before.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trait_guard.config import Action, Direction, GuardConfig
from trait_guard.detect import CUSUMDetector, Verdict, split_ert
from trait_guard.errors import TraitGuardInputError
from trait_guard.fingerprint import TEACHER_LOGPROB_SIGNALS, suspicious_direction, teacher_signal_coverage
from trait_guard.sequential import (
    EProcessDetector,
    evidence_ceiling,
    min_reference_size,
    min_samples_to_alarm,
)

logger = logging.getLogger(__name__)

#: CUSUM: reference draws of the honest calibration (0: the reference taken as exact, the old way)
REFERENCE_DRAWS = 1000
#: a reserved entry of a batch's signals: one key per sample (:func:`sample_key`), not a signal
SAMPLE_KEY = "_sample_key"
#: CUSUM: the honest threshold keeps P(realized ERT < target) <= 1 - this, over reference draws
CALIBRATION_CONFIDENCE = 0.9
#: CUSUM: a reference is too small when its honest threshold delays detection more than this factor
MAX_DELAY_FACTOR = 1.25
#: e-process: the per-sample shift (reference sd) a reference must let the test see (AUROC 0.64)
DESIGN_SHIFT = 0.5


def sample_key(sample_id: Any) -> float:
    """A sample id as a float key (52 bits of its BLAKE2b hash: exact in float64), so that it travels with
    the signals through the ranks' all-gather."""
    import hashlib

    digest = hashlib.blake2b(str(sample_id).encode(), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> 12)


def check_signal_sides(watched: list[str], train_rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]],
                       train_name: str = "the training data", reference_name: str = "the reference") -> dict[str, Any]:
    """Refuse, before any training, a watched teacher-log-prob signal that one side can compute and the
    other cannot (at step 1 it would either crash or compare against nothing).

    ``train_rows`` / ``reference_rows``: the rows, or their :class:`~trait_guard.screen.RowSummary`.
    Returns, per side, how many rows carry each such signal's column (for the run's records).
    """
    coverage = {side: rows.teacher_columns if hasattr(rows, "teacher_columns") else teacher_signal_coverage(rows)
                for side, rows in (("train", train_rows), ("reference", reference_rows))}
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

    def __init__(self, config: GuardConfig, reference: dict[str, np.ndarray] | None = None, batch_size: int = 0, *,
                 reference_draws: int | None = None, design_shift: float | None = None):
        """``reference``: per-sample signals of clean data from the student's base model; None builds a
        guard with drift probes only (:meth:`drift_only`), which refuses :meth:`observe`.

        ``reference_draws`` (CUSUM; default ``config.reference_draws`` when the config has it, else
        :data:`REFERENCE_DRAWS`): the outer bootstrap of the honest calibration, 0 for the old one that
        takes the reference as exact. ``design_shift`` (default ``config.design_shift`` when the config
        has it, else :data:`DESIGN_SHIFT`): the smallest per-sample shift, in reference sd, that the
        e-process must be able to see; a reference too small for it is warned about
        (:attr:`reference_warnings`)."""
        self.config = config
        self.batch_size = batch_size
        self.reference_draws = int(getattr(config, "reference_draws", REFERENCE_DRAWS)
                                   if reference_draws is None else reference_draws)
        self.design_shift = float(getattr(config, "design_shift", DESIGN_SHIFT) if design_shift is None else design_shift)
        if not (math.isfinite(self.design_shift) and self.design_shift > 0):
            raise ValueError(f"design_shift must be a positive number of reference sd (got {design_shift!r})")
        self.reference_n: dict[str, int] = {}
        self.reference_warnings: list[str] = []
        self.drift_only_guard = reference is None
        if reference is None:  # drift probes only: nothing to calibrate
            self.kind = config.sequential
            self.signals, self.skipped, self.constant = [], {}, {}
            self.mean, self.std, self.detectors = {}, {}, {}
            self.low_point, self.last_zero = {}, {}
            self.step, self.mode, self.alarms = 0, Action.PASS, []
            self.bet_on, self.seen_again = set(), 0
            return
        self.bet_on: set[float] = set()  # the sample keys the e-process has bet on
        self.seen_again = 0  # samples left out of the e-process because it had bet on them already
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
            self.reference_n[name] = int(values.size)
            self.detectors[name] = self._detector(name, self.standardize(name, values))
        self.reference_warnings = self.warnings()
        for warning in self.reference_warnings:
            logger.warning("trait_guard: %s", warning)
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
        batch = max(1, self.batch_size)
        batch_means = self._calibration_rng.choice(z, size=(self.config.bootstrap_batches, batch), replace=True).mean(1)
        # the draws give the batch means' shape; their moments are set exactly (mean 0, sd 1/sqrt(b): i.i.d.
        # draws from the standardized reference), so the only standardization error left is the
        # reference's own, which the honest calibration measures
        spread = batch_means.std(ddof=1)
        if spread > 0:
            batch_means = (batch_means - batch_means.mean()) / spread / math.sqrt(batch)
        detector = CUSUMDetector(k=self.config.drift_allowance, two_sided=two_sided, name=name).fit(batch_means)
        target = split_ert(self.config.target_ert, k)
        if not self.reference_draws or not self.config.drift_allowance > 0:  # the reference taken as exact
            return detector.calibrate(target_ert=target, seed=self.config.seed)
        return detector.calibrate(target_ert=target, seed=self.config.seed, n_streams=200,
                                  reference_draws=self.reference_draws, reference_samples=z, batch_size=batch,
                                  confidence=CALIBRATION_CONFIDENCE, max_delay_factor=MAX_DELAY_FACTOR)

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
        """What the in-training test cannot do with ``n_samples`` training samples and this reference,
        or None: :meth:`warnings` joined (the training recipe logs this as the guard's warning)."""
        found = self.warnings(n_samples)
        return " | ".join(found) if found else None

    def warnings(self, n_samples: int | None = None) -> list[str]:
        """Why the in-training test could not deliver what the config asks, each with the fix.

        * e-process, data: it needs a minimum run of top-ranked samples to reach ``k / alpha``
          (:func:`min_samples_to_alarm`); less data than that cannot be judged by it, whatever it holds.
        * e-process, reference: stream samples join the pool they are ranked against, so a reference of
          ``m`` samples caps the evidence any stream can give (:func:`evidence_ceiling`); below
          :func:`min_reference_size` for :attr:`design_shift` (within ``n_samples`` when given) a shift
          of that size is caught in fewer than about 4 of 5 streams. Names the reference size needed.
        * CUSUM, reference: the honest threshold (calibrated over reference draws) is infeasible or
          delays detection by more than :data:`MAX_DELAY_FACTOR`; names the reference size needed.
        """
        if not self.signals:
            return []
        k = len(self.signals)
        out = []
        if self.kind == "eprocess":
            alpha = self.config.alpha / k
            need = min_samples_to_alarm(alpha)
            if n_samples is not None and n_samples < need:
                return [f"the e-process needs at least {need} samples to reach 1/alpha (alpha={self.config.alpha:g} "
                        f"over {k} signals) and the training data has {n_samples}: in training it cannot alarm. "
                        "Rely on the gate, raise guard.alpha, or use guard.sequential: cusum"]
            m = min(self.reference_n.values())
            needed = min_reference_size(self.design_shift, alpha, n_samples=n_samples)
            data = f" within the {n_samples} training samples" if n_samples is not None else ""
            if needed is None:
                out.append(f"the e-process cannot be expected to catch a {self.design_shift:g}-sd per-sample shift"
                           f"{data} at alpha={self.config.alpha:g} over {k} signals, whatever the reference size: "
                           "the data is too short for it. Rely on the gate, or raise guard.alpha")
            elif m < needed:
                ceiling = evidence_ceiling(m, self.design_shift, n_samples=n_samples)
                out.append(f"the reference has {m} samples: against it the e-process's evidence on a "
                           f"{self.design_shift:g}-sd per-sample shift peaks near E = 10^{ceiling.log10_e:.1f} "
                           f"(after ~{ceiling.at_sample} samples; stream samples join the ranking pool and "
                           f"dilute the reference){data}, below 1/alpha = 10^{-math.log10(alpha):.1f} "
                           f"(alpha={self.config.alpha:g} over {k} signals): use a reference of at least "
                           f"{needed} samples (data.max_reference_samples / more reference rows), or rely on the gate")
            return out
        if getattr(self, "reference_draws", 0) and not self.config.drift_allowance > 0:
            out.append("CUSUM with guard.drift_allowance 0: no reference is large enough for an honest threshold (the "
                       "reference's mean error alone drives the statistic up), so it takes the reference as exact and "
                       "its realized false-alarm rate is not controlled; use drift_allowance > 0 (0.5) or eprocess")
        for name, detector in self.detectors.items():
            result = (detector.calibration or {}).get("reference_bootstrap")
            if not result or (result["feasible"] and result["delay_factor"] <= result["max_delay_factor"]):
                continue
            size = (f"use a reference of at least {result['needed_reference_n']} samples"
                    if result["needed_reference_n"] else "no reference up to 10,000x larger is enough")
            realized = result["realized_ert_nominal_h"]
            head = (f"CUSUM on '{name}': the reference of {result['reference_n']} samples is too small for "
                    f"ERT {detector.calibration['target_ert']:g} at batch {result['batch_size']}: ")
            if not result["feasible"]:
                out.append(head + f"its mean is off by {result['mean_offset_sd']:.2f} batch-sd (one SE), so in "
                           f"{result['needed_h_infinite']:.0%} of reference draws no useful threshold reaches the "
                           f"target; the guard uses h={result['h']:.3g} (nominal {result['nominal_h']:.3g}) "
                           f"without that guarantee. {size}, or guard.sequential: eprocess")
            else:
                out.append(head + f"the honest threshold h={result['h']:.3g} (nominal {result['nominal_h']:.3g}, "
                           f"whose realized ERT would fall to {realized['p10']:.3g} in 1 of 10 reference draws) "
                           f"delays detection {result['delay_factor']:.2f}x; {size}")
        return out

    @property
    def calibration_summary(self) -> dict[str, Any]:
        """Per signal, what the calibration rests on (JSON-safe; for the run summary and the report):
        the reference size, and for the CUSUM the honest and nominal thresholds, the spread of the
        needed threshold over reference draws, the realized-ERT quantiles and the delay factor; for the
        e-process the evidence ceiling on a :attr:`design_shift` shift and the reference size it needs."""
        signals: dict[str, Any] = {}
        k = max(1, len(self.signals))
        for name, detector in self.detectors.items():
            entry: dict[str, Any] = {"reference_n": self.reference_n.get(name)}
            if self.kind == "cusum":
                entry["h"] = detector.h
                entry["calibration"] = detector.calibration
            else:
                alpha = self.config.alpha / k
                ceiling = evidence_ceiling(self.reference_n[name], self.design_shift)
                entry.update({"alpha": alpha, "design_shift": self.design_shift,
                              "ceiling_log10_e": ceiling.log10_e, "ceiling_at_sample": ceiling.at_sample,
                              "needed_reference_n": min_reference_size(self.design_shift, alpha)})
            signals[name] = entry
        draws = getattr(self, "reference_draws", 0)
        return {"sequential": self.kind, "reference_draws": draws if self.kind == "cusum" else None,
                "signals": signals, "warnings": list(getattr(self, "reference_warnings", []))}

    @property
    def false_alarm_control(self) -> str:
        """The guard's false-alarm guarantee on clean data, per run (for the summary and the report)."""
        if self.kind == "eprocess":
            return (f"anytime-valid: P(any false data alarm in the run) <= {self.config.alpha:g} "
                    f"(Ville's inequality, alpha/{max(1, len(self.signals))} per signal)")
        if getattr(self, "reference_draws", 0) and self.detectors and self.config.drift_allowance > 0:
            return (f"CUSUM: at least {self.config.target_ert:g} clean batches per false data alarm on average, for "
                    f"{CALIBRATION_CONFIDENCE:.0%} of the references one could have drawn (honest bootstrap over "
                    f"{self.reference_draws} reference draws; union bound over signals)")
        return (f"CUSUM: on average one false data alarm per {self.config.target_ert:g} clean batches "
                "(bootstrap-calibrated ERT taking the reference as exact; union bound over signals)")

    @classmethod
    def drift_only(cls, config: GuardConfig | None = None) -> TraitGuard:
        """A guard with drift probes only (no data reference, so no data tests): it decides on
        :meth:`observe_drift` and refuses :meth:`observe`. For on-policy training (the student
        generates its own data) or before any reference signals exist."""
        return cls(config or GuardConfig(), None)

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
        if getattr(self, "drift_only_guard", False):
            raise TraitGuardInputError(
                "this guard has drift probes only (built without reference signals): it has no reference to "
                "judge data signals against. Build TraitGuard(config, reference_signals, batch_size) to guard "
                "the data as well")
        self.step = self.step + 1 if step is None else step
        missing = [n for n in self.signals if n not in signals]  # skipped signals may be absent
        if missing:
            raise ValueError(f"batch signals lack {missing}; the guard was calibrated on {self.signals}")
        signals = dict(signals)
        keys = signals.pop(SAMPLE_KEY, None)
        n = len(next(iter(signals.values())))
        fresh = self._first_bets(keys, n)
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
            if self.kind != "cusum":
                z = z[fresh]  # each distinct sample is bet on once (see the module docstring, "Epochs")
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

    def _first_bets(self, keys: Any, n: int) -> np.ndarray:
        """Which of a batch's ``n`` samples the e-process has not bet on yet (all, without keys; a NaN key,
        a row without a sample id, is always new). Marks the new ones as bet on."""
        fresh = np.ones(n, dtype=bool)
        if keys is None:
            return fresh
        keys = np.asarray(keys, dtype=float)
        if keys.shape != (n,):
            raise ValueError(f"{SAMPLE_KEY} holds {keys.shape} keys for a batch of {n} samples")
        for i, key in enumerate(keys.tolist()):
            if not math.isfinite(key):
                continue
            if key in self.bet_on:
                fresh[i] = False
            else:
                self.bet_on.add(key)
        self.seen_again += int((~fresh).sum())
        return fresh

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
                # getattr: integrations.torch_loop.DriftGuard still builds itself without __init__
                "reference_n": dict(getattr(self, "reference_n", {})),
                "reference_warnings": list(getattr(self, "reference_warnings", [])),
                "detectors": {n: d.state_dict() for n, d in self.detectors.items()},
                "bet_on": sorted(getattr(self, "bet_on", ())), "seen_again": getattr(self, "seen_again", 0),
                "config": self.config.model_dump(mode="json")}

    def load_state_dict(self, state: dict[str, Any]) -> TraitGuard:
        if state["signals"] != self.signals:
            raise ValueError(f"guard state watches {state['signals']}, this guard watches {self.signals}")
        self.step, self.mode, self.alarms = int(state["step"]), Action(state["mode"]), list(state["alarms"])
        self.mean, self.std = dict(state["mean"]), dict(state["std"])
        self.last_zero = {**self.last_zero, **{k: int(v) for k, v in state.get("last_zero", {}).items()}}
        self.low_point = {**self.low_point, **{k: float(v) for k, v in state.get("low_point", {}).items()}}
        self.bet_on = {float(k) for k in state.get("bet_on", [])}
        self.seen_again = int(state.get("seen_again", 0))
        for name, detector_state in state["detectors"].items():
            self.detectors[name].load_state_dict(detector_state)
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], reference: dict[str, np.ndarray] | None,
                        batch_size: int = 0) -> TraitGuard:
        guard = cls(GuardConfig.model_validate(state["config"]), reference, batch_size)
        return guard.load_state_dict(state)
