"""Calibrated detectors: decide on accumulated evidence, with a known false-alarm rate.

Why. The per-sample signals that betray a trait hidden in teacher data are weak: a persona
projection separates trait-teacher from control-teacher samples with AUROC ~0.6 (about 0.2 sd at
dataset level), and filtering single samples by such a score does not stop subliminal transfer.
Evidence accumulated over many samples is strong. So the guard never decides on one sample: it feeds
numbers (per-sample scores, per-batch scores, several signals at once) to detectors that are
calibrated on clean/control data, so that every alarm comes with a known false-alarm rate.

Contract (every :class:`Detector`, in the style of drift-detection libraries)::

    det.fit(reference)          # reference values from clean/control data -> det
    det.calibrate(...)          # threshold for a false-alarm target         -> det
    det.score(x)                # statistic, larger = more evidence           -> float
    det.predict(x)              # decision                                    -> Verdict
    det.state_dict()            # JSON-safe plain values (checkpoint/resume)  -> dict
    det.load_state_dict(state)  # restores exactly, mid-stream included       -> det
    Detector.from_state_dict(state)  # rebuilds any detector from its state

``predict`` before ``fit`` (or, where a threshold must be computed, before ``calibrate``) raises a
RuntimeError naming the missing call. Inputs are validated: a reference needs at least 2 values and a
non-zero spread, and NaN/inf anywhere raises ValueError naming the input and the first bad index.
A :class:`Verdict` always has ``flagged == (score > threshold)``; detectors that give a p-value
flag when ``p < alpha`` and report ``score = -log10(p)``, ``threshold = -log10(alpha)``.

Detectors.

* :class:`CUSUMDetector`: sequential, over per-batch scores (e.g. the mean persona projection of a
  batch). One-sided upper CUSUM on standardized scores, ``S_t = max(0, S_{t-1} + z_t - k)``, alarm
  when ``S_t > h`` (optionally two-sided). False alarms are controlled by the expected run length
  (ERT, also called ARL0): on clean data an alarm comes on average once every ``target_ert`` batches.
* :class:`PermutationTest`: dataset-level two-sample test of the mean of per-sample values against
  the reference; exact p-values by enumeration for small samples, Monte Carlo ones otherwise.
* :func:`combine_pvalues`: several signals' p-values at a family-wise level (Holm by default), as
  :func:`trait_guard.screen.screen` combines one permutation test per signal; :func:`split_ert` does
  the same for several CUSUMs.
* :class:`trait_guard.sequential.EProcessDetector`: an anytime-valid e-process over per-sample scores
  of streaming data (its own module).

There is no detector that judges one batch alone: weak per-sample signals become evidence only when
accumulated over many samples (see "Why" above).

Calibration of the CUSUM threshold (bootstrap + renewal theory). Batch scores are rarely Gaussian
(projections are skewed), and the ERT of a CUSUM depends on the whole shape of the distribution, so
``h`` is not taken from a Gaussian formula: clean streams are resampled with replacement from the
standardized reference scores (a bootstrap) and ``h`` is chosen so that their ERT equals the target.
The run length is not simulated stream by stream (at ERT 10,000 that is slow): CUSUM regenerates
every time ``S`` returns to 0, so a stream is a sequence of i.i.d. cycles ("excursions") that each end
in a return to 0 or in an alarm. By Wald's identity ``ERT(h) = E[cycle length](h) / P(cycle alarms)(h)``
exactly (for the bootstrap process). Many excursions are simulated in parallel with numpy, each until
it returns to 0 or passes a cap above any candidate ``h``; histograms of each excursion's peak and of
the running peak before every step give both terms of the ratio at every ``h`` on a fine grid at
once. ``ERT(h)`` is then non-decreasing on the grid (4096 points up to the cap, ~2x the answer, so
one grid step changes the ERT by ~0.2%) and ``h`` is the smallest grid point whose ERT reaches the
target: one simulation, no noisy bisection, and exact for discrete (tied) scores too. The number
of excursions is sized so that about ``n_streams`` false alarms are simulated at the solution, i.e.
the same information as running ``n_streams`` clean streams to their first alarm (relative standard
error ~ 1/sqrt(n_streams)). For the two-sided CUSUM, each side is simulated and the two alarm rates
are added (``1/ERT = 1/ERT_up + 1/ERT_down``, the classical approximation of van Dobben de Bruyn).

Honest calibration (``calibrate(..., reference_draws=B)``, what the guard uses). The bootstrap above
treats the reference as the clean distribution itself. It is only a sample: its mean is off by about
``sqrt(b / n)`` batch-sd (``n`` reference samples averaged ``b`` per batch), which moves the realized ERT
on fresh clean data by a factor ``exp(2 (h + 1.166) sqrt(b / n))`` either way (about 40 for n = 128,
b = 8, ERT ~3,000). So the threshold is chosen over the references one could have drawn: an outer
bootstrap resamples the reference B times; a detector standardized with a resample's moments sees the
original reference's batch scores as ``rho w + delta`` (``delta`` a t-statistic of the mean error,
``rho`` the sd ratio), which for the CUSUM is the same as changing its allowance to ``(k - delta)/rho``
and its threshold to ``h/rho``. ERT(h) curves simulated on a grid of allowances (with the exact
Lundberg exponent extending them past the simulated range) give every draw's needed threshold, and
``h`` is their 90% quantile: P(realized ERT < target) <= 10% over reference draws. Checked against
exact Gaussian ARLs (integral equation) on 300 fresh references of 50 samples at ERT 200: 9.3% of
them below the target (exact 95% CI [6.3%, 13.2%]), against 53.7% ([47.8%, 59.4%]) with the
reference taken as exact (tests/test_detect.py).

This module imports only numpy, the standard library and :mod:`trait_guard.files` at top level
(scipy loads for Fisher's method only); it needs no torch.
"""

from __future__ import annotations

import importlib
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from trait_guard.files import to_jsonable

__all__ = [
    "STATE_VERSION",
    "CUSUMDetector",
    "CombinedPValues",
    "Detector",
    "PermutationTest",
    "Verdict",
    "combine_pvalues",
    "split_ert",
]

STATE_VERSION = 1
_MIN_P = 1e-300  # p-values are floored here before -log10 so that scores stay finite
_CORRECTIONS = ("holm", "bonferroni", "fisher")
_ALTERNATIVES = ("greater", "two-sided")

D = TypeVar("D", bound="Detector")


# ----------------------------------------------------------------------------- helpers


def _neglog10(p: float) -> float:
    return -math.log10(max(float(p), _MIN_P))


def _values(x: Any, what: str) -> np.ndarray:
    """A 1-D float array without NaN/inf (a scalar becomes one value)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numbers ({exc})") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of numbers (got shape {arr.shape})")
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(bad.sum()) - n_nan
        parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} infinite" if n_inf else ""]
        raise ValueError(
            f"{what} contains {' and '.join(p for p in parts if p)} value(s) (first at index "
            f"{int(np.flatnonzero(bad)[0])}); drop or impute them before detection")
    return arr


def _scalar(x: Any, what: str) -> float:
    arr = _values(x, what)
    if arr.size != 1:
        raise ValueError(f"{what} must be a single number (got {arr.size} values)")
    return float(arr[0])


def _reference(x: Any, what: str = "reference") -> np.ndarray:
    arr = _values(x, what)
    if arr.size < 2:
        raise ValueError(f"{what} needs at least 2 values to estimate a spread (got {arr.size})")
    if not arr.std(ddof=1) > 0:
        raise ValueError(
            f"{what} has zero variance (all {arr.size} values equal {arr[0]!r}): a constant signal "
            "cannot calibrate a detector")
    return arr


def _check_number(value: Any, what: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number (got {value!r})")
    v = float(value)
    ok = math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        rng = f"{lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{what} must be finite and in {rng} (got {value!r})")
    return v


def _check_alpha(alpha: Any) -> float:
    """A significance level: a number strictly between 0 and 1."""
    return _check_number(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)


def _check_int(value: Any, what: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise ValueError(f"{what} must be an integer >= {low} (got {value!r})")
    return int(value)


def _check_choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))} (got {value!r})")
    return value


# ----------------------------------------------------------------------------- verdict and contract


# detectors defined in modules that import this one, loaded on demand by Detector.from_state_dict
_DEFINED_ELSEWHERE = {"EProcessDetector": "trait_guard.sequential"}


@dataclass
class Verdict:
    """One decision. ``flagged == (score > threshold)``; ``evidence`` holds JSON-safe details."""

    detector: str
    flagged: bool
    score: float
    threshold: float
    p_value: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "flagged": bool(self.flagged),
            "score": float(self.score),
            "threshold": float(self.threshold),
            "p_value": None if self.p_value is None else float(self.p_value),
            "evidence": to_jsonable(self.evidence, finite=False),
        }


class Detector(ABC):
    """Common contract: fit on clean reference data, calibrate a threshold, score, predict, checkpoint.

    Subclasses whose threshold must be computed (``needs_calibration = True``) refuse to predict until
    :meth:`calibrate` ran; the others are calibrated by construction (a p-value against ``alpha``).
    """

    needs_calibration: ClassVar[bool] = False
    gives_p_value: ClassVar[bool] = False
    _calibrate_hint: ClassVar[str] = "calibrate()"
    _registry: ClassVar[dict[str, type[Detector]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Detector._registry[cls.__name__] = cls

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string (got {name!r})")
        self.name = name
        self._fitted = False
        self._calibrated = not self.needs_calibration

    # -- contract
    @abstractmethod
    def fit(self: D, reference: Any) -> D:
        """Learn the clean distribution from reference values (clean/control data)."""

    def calibrate(self: D, **kwargs: Any) -> D:
        """Set the threshold for a false-alarm target (here: nothing to compute)."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.calibrate() got unexpected arguments {sorted(kwargs)}")
        self._calibrated = True
        return self

    @abstractmethod
    def score(self, x: Any) -> float:
        """The detector's statistic on ``x`` (larger = more evidence of a shift)."""

    @abstractmethod
    def predict(self, x: Any) -> Verdict:
        """Decide on ``x``."""

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    def _require(self, action: str, *, calibrated: bool = True) -> None:
        who = f"{type(self).__name__}({self.name!r}).{action}()"
        if not self.is_fitted:
            raise RuntimeError(
                f"{who} called before fit(): call fit(reference) with values from clean/control data first")
        if calibrated and not self.is_calibrated:
            raise RuntimeError(f"{who} called before calibrate(): call {self._calibrate_hint} after fit()")

    # -- checkpoint / resume
    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-safe)."""

    @abstractmethod
    def _get_state(self) -> dict[str, Any]:
        """Learned and streaming state (JSON-safe)."""

    @abstractmethod
    def _set_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_get_state`."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain JSON-safe values."""
        return to_jsonable({
            "type": type(self).__name__,
            "version": STATE_VERSION,
            "config": self._config(),
            "fitted": self._fitted,
            "calibrated": self._calibrated,
            "state": self._get_state(),
        }, finite=False)

    def load_state_dict(self: D, state: Mapping[str, Any]) -> D:
        """Restore from :meth:`state_dict` (its config replaces this detector's)."""
        state = _check_state(state, type(self).__name__)
        self.__init__(**state["config"])  # type: ignore[misc]  # re-validates the config
        self._set_state(dict(state["state"]))
        self._fitted = bool(state["fitted"])
        self._calibrated = bool(state["calibrated"])
        return self

    @staticmethod
    def from_state_dict(state: Mapping[str, Any]) -> Detector:
        """Rebuild a detector of the right class from :meth:`state_dict`."""
        if isinstance(state, Mapping) and state.get("type") in _DEFINED_ELSEWHERE:
            importlib.import_module(_DEFINED_ELSEWHERE[state["type"]])  # defining the class registers it
        if not isinstance(state, Mapping) or state.get("type") not in Detector._registry:
            known = ", ".join(sorted(Detector._registry))
            got = state.get("type") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state: type must be one of {known} (got {got!r})")
        cls = Detector._registry[state["type"]]
        obj = cls.__new__(cls)
        return obj.load_state_dict(state)


def _check_state(state: Any, type_name: str) -> dict[str, Any]:
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict from state_dict() (got {type(state).__name__})")
    keys = {"type", "version", "config", "fitted", "calibrated", "state"}
    if set(state) != keys:
        extra, missing = sorted(set(state) - keys), sorted(keys - set(state))
        raise ValueError(f"state: unexpected keys {extra}, missing keys {missing}")
    if state["type"] != type_name:
        raise ValueError(f"state: type is {state['type']!r}, cannot load into {type_name}")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"state: version {state['version']!r} is not supported (expected {STATE_VERSION})")
    return dict(state)


def _check_keys(state: Mapping[str, Any], keys: set[str], where: str) -> None:
    if set(state) != keys:
        extra, missing = sorted(set(state) - keys), sorted(keys - set(state))
        raise ValueError(f"{where}: unexpected keys {extra}, missing keys {missing}")


# ----------------------------------------------------------------------------- CUSUM calibration


class _Excursions(NamedTuple):
    grid: np.ndarray  # candidate thresholds g_0 = 0 < ... < g_G = cap
    steps: np.ndarray  # steps[j]: total steps of all cycles when h = g_j
    alarms: np.ndarray  # alarms[j]: cycles that alarm when h = g_j
    n_cycles: int


def _simulate_excursions(increments: np.ndarray, cap: float, n_cycles: int, rng: np.random.Generator,
                         n_grid: int = 4096, chunk: int = 1 << 19) -> _Excursions:
    """Simulate CUSUM cycles from S = 0 with increments resampled from ``increments``.

    A cycle ends when S returns to 0 or exceeds ``cap``. For a threshold h the cycle's length is the
    number of steps taken while its running peak (before the step) was <= h, and it alarms iff its
    peak exceeds h; both are histogrammed on ``grid`` so every grid h is evaluated at once.
    """
    delta = cap / n_grid
    step_hist = np.zeros(n_grid + 1, dtype=np.int64)
    peak_hist = np.zeros(n_grid + 2, dtype=np.int64)  # last bin: peak above cap
    n_incr = increments.size
    done = 0
    while done < n_cycles:
        m = min(chunk, n_cycles - done)
        s = np.zeros(m)
        peak = np.zeros(m)
        step_hist[0] += m  # first step of every cycle: running peak 0
        first = True
        while s.size:
            if not first:
                bins = np.minimum(np.ceil(peak / delta).astype(np.int64), n_grid)
                step_hist += np.bincount(bins, minlength=n_grid + 1)
            first = False
            s += increments[rng.integers(n_incr, size=s.size)]
            np.maximum(peak, s, out=peak)
            end = (s <= 0.0) | (s > cap)
            if end.any():
                ended = peak[end]
                bins = np.minimum(np.ceil(ended / delta).astype(np.int64), n_grid)
                bins[ended > cap] = n_grid + 1
                peak_hist += np.bincount(bins, minlength=n_grid + 2)
                keep = ~end
                s, peak = s[keep], peak[keep]
        done += m
    grid = np.arange(n_grid + 1) * delta
    steps = np.cumsum(step_hist)
    alarms = n_cycles - np.cumsum(peak_hist)[: n_grid + 1]
    return _Excursions(grid, steps, alarms, n_cycles)


def _lundberg(increments: np.ndarray) -> float | None:
    """theta > 0 with mean(exp(theta * X)) = 1 (ERT grows like exp(theta * h)); None if none exists."""
    if increments.mean() >= 0 or increments.max() <= 0:
        return None

    def f(theta: float) -> float:
        a = theta * increments
        top = a.max()
        return float(top + np.log(np.mean(np.exp(a - top))))

    hi = 1.0
    while f(hi) <= 0:
        hi *= 2.0
        if hi > 1e6:
            return None
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
    return hi


def _bootstrap_ert(sides: list[np.ndarray], target: float, n_streams: int, max_cycles: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[_Excursions], int, float]:
    """ERT on a grid of h of the CUSUM whose sides step by increments resampled from ``sides``
    (the two alarm rates added), simulated with about ``n_streams`` false alarms at ``target``.

    The grid's cap is raised 1.6x (at most 12 times) until the ERT at the cap passes the target, so
    the target lies inside the grid. Returns ``(ert, per-side excursions, cycles, mean cycle length)``.
    """
    # first cap (largest h considered; raised below if too low): ERT grows like exp(theta h)
    # with a negative drift, and like h^2 without (k = 0), which also bounds the drifting case
    cap = 2.0 + 2.0 * math.sqrt(target)
    thetas = [_lundberg(s) for s in sides if s.max() > 0]  # sides that can alarm
    if all(t is not None for t in thetas):
        cap = min(cap, 2.0 + 1.5 * math.log(target) / min(t for t in thetas if t is not None))
    for _ in range(12):
        pilot = [_simulate_excursions(s, cap, 20_000, rng) for s in sides]
        mean_len = min(p.steps[-1] / p.n_cycles for p in pilot)
        n_cycles = int(min(max_cycles, max(20_000, math.ceil(n_streams * target / mean_len))))
        sims = [_simulate_excursions(s, cap, n_cycles, rng) for s in sides]
        rate = np.zeros_like(sims[0].grid)
        for sim in sims:
            rate = rate + sim.alarms / sim.steps
        with np.errstate(divide="ignore"):
            ert = 1.0 / rate
        if ert[-1] >= target * 1.05:
            break
        cap *= 1.6
    else:
        raise RuntimeError(f"CUSUM calibration did not reach target_ert={target} (cap {cap:.3g})")
    return ert, sims, n_cycles, mean_len


# ----------------------------------------------------------------------------- honest calibration

_H_OFFSET = 1.166  # Siegmund's overshoot correction: detection delay ~ (h + 1.166) / (shift - k)


class _Curve(NamedTuple):
    """log ERT(h) of one CUSUM side with allowance ``kappa`` on standardized batch scores: simulated on
    ``grid`` up to its last point, and ``intercept + theta * h`` beyond (Cramer-Lundberg asymptote)."""

    kappa: float
    grid: np.ndarray
    log_ert: np.ndarray
    theta: float
    intercept: float
    cycles: int

    def __call__(self, h: np.ndarray) -> np.ndarray:
        inside = np.interp(h, self.grid, self.log_ert)
        return np.where(h <= self.grid[-1], inside, self.intercept + self.theta * h)


def _ert_curve(w: np.ndarray, kappa: float, target: float, n_alarms: int, rng: np.random.Generator,
               max_cycles: int) -> _Curve | None:
    """ERT(h) of the upper CUSUM on increments ``w - kappa`` (``w`` resampled), for every h at once.

    The excursion simulation of :meth:`CUSUMDetector.calibrate` is run to an ERT of ``min(target, t)``
    with ``t`` starting at 2,000 (about ``n_alarms`` false alarms simulated there); beyond it, log ERT is
    extended linearly with the exact Lundberg exponent ``theta`` of the increments (renewal theory:
    ERT ~ C exp(theta h)), ``C`` fitted on the top decade of the simulated curve. ``t`` grows tenfold
    until that decade lies where the asymptote holds (``theta (h + 1.166) >= 4``: the correction term
    is below 2%). Against direct calibration at ERT 30,000 the extrapolated h agreed within 0.1.
    None when the side has no negative drift (``kappa <= 0``: no finite Lundberg exponent).
    """
    increments = w - kappa
    theta = _lundberg(increments)
    if theta is None:
        return None
    t_sim = min(target, 2000.0)
    while True:
        cap = 2.0 + 1.5 * math.log(2.0 * t_sim) / theta
        for _ in range(12):
            pilot = _simulate_excursions(increments, cap, 20_000, rng)
            mean_len = pilot.steps[-1] / pilot.n_cycles
            n_cycles = int(min(max_cycles, max(20_000, math.ceil(n_alarms * t_sim / mean_len))))
            sim = _simulate_excursions(increments, cap, n_cycles, rng)
            with np.errstate(divide="ignore"):
                ert = sim.steps / sim.alarms
            if ert[-1] >= 1.05 * t_sim:
                break
            cap *= 1.6
        else:
            raise RuntimeError(f"CUSUM calibration did not reach ERT {t_sim:g} at allowance {kappa:.3g}")
        top = int(np.argmax(ert >= t_sim))
        low = int(np.argmax(ert >= t_sim / 10.0))
        if t_sim >= target or theta * (sim.grid[low] + _H_OFFSET) >= 4.0:
            break
        t_sim = min(target, 10.0 * t_sim)
    window = slice(low, top + 1)
    log_ert = np.log(ert[: top + 1])
    intercept = float(np.average(log_ert[window] - theta * sim.grid[window], weights=sim.alarms[window]))
    return _Curve(float(kappa), sim.grid[: top + 1].copy(), log_ert, float(theta), intercept, n_cycles)


def _kappa_grid(kappas: np.ndarray, floor: float, anchor: float, points: int) -> np.ndarray:
    """Allowances at which to simulate: ``points`` evenly spaced over the replicates' central 99.6%
    (never below ``floor``), plus ``anchor`` (the reference taken as exact)."""
    finite = kappas[np.isfinite(kappas)]
    lo, hi = np.quantile(finite, [0.002, 0.998]) if finite.size else (anchor, anchor)
    lo, hi = max(float(lo), floor), max(float(hi), anchor)
    return np.unique(np.concatenate([np.linspace(min(lo, anchor), hi, points), [anchor]]))


def _tabulate(curves: list[_Curve], top: float, points: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The curves' log ERT on one uniform grid of thresholds ``[0, top]``: ``(grid, table[curve, point])``."""
    grid = np.linspace(0.0, top, points)
    return grid, np.stack([c(grid) for c in curves])


def _side_log_ert(kappa_grid: np.ndarray, table: tuple[np.ndarray, np.ndarray], kappas: np.ndarray,
                  scales: np.ndarray, h: np.ndarray, clip: bool = False) -> np.ndarray:
    """``log ERT`` ``[replicates, len(h)]`` of one side: replicate r's threshold ``h`` acts as ``h / scale_r``
    on a CUSUM with allowance ``kappa_r``, interpolated linearly in kappa between the tabulated curves
    (clipped at the top of the grid, which only lowers the ERT: conservative). A replicate below the
    lowest curve gets -inf (no threshold of use brings it to the target), or with ``clip`` the lowest
    curve."""
    u, values = table
    low = kappa_grid[0]
    kap = np.where(np.isfinite(kappas), kappas, -np.inf)
    below = kap < low
    kap = np.clip(kap, low, kappa_grid[-1])
    if kappa_grid.size == 1:
        j, frac = np.zeros(kap.size, dtype=np.int64), np.zeros(kap.size)
    else:
        j = np.clip(np.searchsorted(kappa_grid, kap, side="right") - 1, 0, kappa_grid.size - 2)
        frac = (kap - kappa_grid[j]) / (kappa_grid[j + 1] - kappa_grid[j])
    x = np.clip(h[None, :] / scales[:, None], 0.0, u[-1]) / (u[1] - u[0])
    i = np.minimum(x.astype(np.int64), u.size - 2)
    f = x - i
    rows = j[:, None]
    near = values[rows, i] * (1.0 - f) + values[rows, i + 1] * f
    if kappa_grid.size == 1:
        out = near
    else:
        far = values[rows + 1, i] * (1.0 - f) + values[rows + 1, i + 1] * f
        out = near * (1.0 - frac[:, None]) + far * frac[:, None]
    if not clip:
        out[below] = -np.inf
    return out


def _reference_draws(samples: np.ndarray, batch_size: int, draws: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """How far off the detector's standardization would be had the reference been drawn again.

    Bootstrap world: the reference's empirical distribution F_n plays the unknown clean distribution
    F, and a resample R* of it plays the reference. A detector standardized with R*'s moments sees
    clean batch scores as ``rho * w + delta`` (``w``: clean standardized batch score), with
    ``delta = sqrt(b) (mean(F_n) - mean(R*)) / sd(R*)`` (a t-statistic, nearly pivotal: its bootstrap
    distribution is accurate to O(1/n)) and ``rho = sd(F_n) / sd(R*)``. Returns (delta, rho) per draw;
    a resample without spread (the detector would refuse it) gets NaN.
    """
    n = samples.size
    mean, spread = samples.mean(), samples.std()  # F_n's own moments (ddof 0: a distribution)
    delta, rho = np.empty(draws), np.empty(draws)
    rows = max(1, (1 << 22) // n)
    for start in range(0, draws, rows):
        stop = min(draws, start + rows)
        resampled = samples[rng.integers(n, size=(stop - start, n))]
        m, s = resampled.mean(axis=1), resampled.std(axis=1, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            delta[start:stop] = np.where(s > 0, math.sqrt(batch_size) * (mean - m) / s, np.nan)
            rho[start:stop] = np.where(s > 0, spread / s, np.nan)
    return delta, rho


def _needed_h(log_ert: np.ndarray, h: np.ndarray, target: float) -> np.ndarray:
    """Per replicate, the smallest threshold on ``h`` whose ERT reaches ``target`` (inf if none)."""
    ok = log_ert >= math.log(target)
    first = np.where(ok.any(axis=1), ok.argmax(axis=1), -1)
    out = np.full(log_ert.shape[0], np.inf)
    hit = first > 0
    j = first[hit]
    rows = np.flatnonzero(hit)
    lo, hi = log_ert[rows, j - 1], log_ert[rows, j]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(np.isfinite(lo) & (hi > lo), (math.log(target) - lo) / (hi - lo), 1.0)
    out[rows] = h[j - 1] + np.clip(frac, 0.0, 1.0) * (h[j] - h[j - 1])
    out[first == 0] = h[0]
    return out


def _upper_quantile(values: np.ndarray, q: float) -> float:
    """The ``ceil(q n)``-th smallest value (an order statistic, never interpolated: inf stays inf)."""
    ordered = np.sort(values)
    return float(ordered[min(ordered.size - 1, max(0, math.ceil(q * ordered.size) - 1))])


def _round_up(n: float) -> int:
    """``n`` rounded up to two significant digits (a size to ask for, not a false precision)."""
    n = max(1.0, float(n))
    step = 10 ** max(0, int(math.floor(math.log10(n))) - 1)
    return int(math.ceil(n / step) * step)


class _ReplicateERT(NamedTuple):
    """log ERT(h) of the CUSUM as a reference replicate ``(delta, rho)`` would calibrate it, interpolated
    from the curves simulated per side: ``grids[s]`` the allowances of side s, ``tables[s]`` its curves
    tabulated (:func:`_tabulate`), ``h`` the thresholds evaluated."""

    k: float
    h: np.ndarray
    grids: list[np.ndarray]
    tables: list[tuple[np.ndarray, np.ndarray]]

    def log_ert(self, delta: np.ndarray, rho: np.ndarray, clip: bool = False) -> np.ndarray:
        """``log ERT`` ``[replicates, len(h)]``: the sides' alarm rates added (see :func:`_side_log_ert`)."""
        k = self.k
        kappa = [(k - delta) / rho, (k + delta) / rho]
        total = np.zeros((delta.size, self.h.size))
        for grid, tab, kap in zip(self.grids, self.tables, kappa, strict=False):
            total += np.exp(-_side_log_ert(grid, tab, kap, rho, self.h, clip))
        with np.errstate(divide="ignore"):
            return -np.log(total)

    def at(self, table: np.ndarray, threshold: float) -> np.ndarray:
        """Every row of ``table`` (a :meth:`log_ert` result) interpolated linearly at ``threshold``."""
        h = self.h
        j = min(int(np.searchsorted(h, threshold)), h.size - 1)
        if j == 0:
            return table[:, 0]
        frac = (threshold - h[j - 1]) / (h[j] - h[j - 1])
        return table[:, j - 1] * (1.0 - frac) + table[:, j] * frac


def _allowance_curves(w: np.ndarray, delta: np.ndarray, rho: np.ndarray, k: float, two_sided: bool,
                      target: float, n_alarms: int, rng: np.random.Generator,
                      max_cycles: int) -> list[list[_Curve]]:
    """Per CUSUM side, ERT curves simulated at a grid of allowances covering the replicates' own
    (:func:`_kappa_grid`; upper side ``(k - delta) / rho``, lower ``(k + delta) / rho``), so that the
    cost does not grow with the number of replicates. Raises if a side cannot drift down."""
    floor = 0.25 * k  # an allowance below this needs a threshold > ~4x the nominal: no longer a detector
    sides = [(w, (k - delta) / rho)] + ([(-w, (k + delta) / rho)] if two_sided else [])
    curves = []
    for base, kappas in sides:
        side = [_ert_curve(base, kappa, target, n_alarms, rng, max_cycles)
                for kappa in _kappa_grid(kappas, floor, k, 10)]
        if any(c is None for c in side):
            raise ValueError(f"k={k} leaves a CUSUM side without negative drift on the reference: use a larger k")
        curves.append([c for c in side if c is not None])
    return curves


def _replicate_ert(curves: list[list[_Curve]], k: float, rho: np.ndarray, target: float) -> _ReplicateERT:
    """Tabulate ``curves`` for :class:`_ReplicateERT`, with thresholds ``h`` up to 1.5x the largest one a
    curve needs for ``target`` (scaled by the largest ``rho``), tables far enough for the smallest."""
    reach = max((math.log(target) - c.intercept) / c.theta for side in curves for c in side)
    h = np.linspace(0.0, 1.5 * max(reach, 1.0) * max(1.0, float(rho.max())), 512)
    grids = [np.array([c.kappa for c in side]) for side in curves]
    tables = [_tabulate(side, float(h[-1] / min(1.0, float(rho.min())))) for side in curves]
    return _ReplicateERT(k, h, grids, tables)


def _honest_threshold(model: _ReplicateERT, delta: np.ndarray, rho: np.ndarray, target: float,
                      confidence: float) -> tuple[float, bool, np.ndarray, np.ndarray]:
    """The ``confidence`` quantile of the replicates' needed thresholds: ``(h, feasible, needed, table)``.

    Not feasible (inf) when too many replicates fall below the lowest allowance simulated; ``h`` is
    then the best this reference allows (those replicates clipped to the lowest curve), and ``table``
    (the replicates' log ERT, for :meth:`_ReplicateERT.at`) the clipped one. ``needed`` is unclipped.
    """
    table = model.log_ert(delta, rho)
    needed = _needed_h(table, model.h, target)
    honest = _upper_quantile(needed, confidence)
    feasible = math.isfinite(honest)
    if not feasible:
        table = model.log_ert(delta, rho, clip=True)
        honest = _upper_quantile(_needed_h(table, model.h, target), confidence)
    return honest, feasible, needed, table


def _needed_reference_n(model: _ReplicateERT, delta: np.ndarray, rho: np.ndarray, nominal: float, target: float,
                        confidence: float, max_inflation: float, n: int) -> int | None:
    """The reference size (rounded up, :func:`_round_up`) whose delay factor stays below
    ``max_inflation`` with headroom, by bisection on log scale over up to 10,000x the ``n`` units now;
    None if even that is not enough."""

    def inflation(scale: float) -> float:  # a reference ``scale`` times larger: deviations / sqrt(scale)
        shrink = 1.0 / math.sqrt(scale)
        d, r = delta[:400], rho[:400]  # the size asked for needs no more precision than this
        need = _needed_h(model.log_ert(d * shrink, 1.0 + (r - 1.0) * shrink), model.h, target)
        return (_upper_quantile(need, confidence) + _H_OFFSET) / (nominal + _H_OFFSET)

    goal = 1.0 + 0.8 * (max_inflation - 1.0)  # headroom: a reference of this size passes the check
    lo, hi = 0.0, math.log(1e4)
    if inflation(math.exp(hi)) > goal:
        return None
    for _ in range(9):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if inflation(math.exp(mid)) <= goal else (mid, hi)
    return _round_up(n * math.exp(hi))


def _realized_ert(model: _ReplicateERT, table: np.ndarray, threshold: float, target: float) -> dict[str, Any]:
    """Quantiles over replicates of the ERT that ``threshold`` realizes, and the share below ``target``."""
    ert = np.exp(model.at(table, threshold))
    return {"p10": float(np.quantile(ert, 0.1)), "median": float(np.median(ert)),
            "below_target": float(np.mean(ert < target))}


def _reference_bootstrap(w: np.ndarray, samples: np.ndarray, batch_size: int, k: float, two_sided: bool,
                         target: float, draws: int, confidence: float, max_inflation: float, n_alarms: int,
                         rng: np.random.Generator, max_cycles: int) -> dict[str, Any]:
    """The threshold that keeps P(realized ERT < target) <= 1 - ``confidence`` over reference draws.

    ``w``: the standardized clean batch scores (the shape the CUSUM sees); ``samples``: the reference
    units whose mean and sd standardize it (per-sample values averaged ``batch_size`` at a time, or the
    batch scores themselves with ``batch_size`` 1). For each of ``draws`` bootstrap references
    (:func:`_reference_draws`), replicate r's detector sees clean batch scores ``rho_r w + delta_r``, so
    its upper CUSUM with threshold h is the CUSUM of ``w`` with allowance ``(k - delta_r) / rho_r`` and
    threshold ``h / rho_r`` (the lower one: ``(k + delta_r) / rho_r``). ERT(h) curves are simulated on a
    grid of allowances (:func:`_ert_curve`) and interpolated, so the cost does not grow with ``draws``.
    Replicate r needs threshold ``h_r`` to reach the target on the clean distribution; the answer is
    the ``confidence`` quantile of ``h_r`` (an order statistic). The nominal threshold (the reference
    taken as exact, as :meth:`CUSUMDetector.calibrate` without reference draws) is the same
    computation at ``delta = 0, rho = 1``.
    """
    delta, rho = _reference_draws(samples, batch_size, draws, rng)
    valid = np.isfinite(delta) & np.isfinite(rho)
    delta, rho = delta[valid], rho[valid]
    curves = _allowance_curves(w, delta, rho, k, two_sided, target, n_alarms, rng, max_cycles)
    model = _replicate_ert(curves, k, rho, target)
    nominal = float(_needed_h(model.log_ert(np.zeros(1), np.ones(1)), model.h, target)[0])
    honest, feasible, needed, table = _honest_threshold(model, delta, rho, target, confidence)
    delay_factor = (honest + _H_OFFSET) / (nominal + _H_OFFSET)
    needed_n = None
    if not feasible or delay_factor > max_inflation:
        needed_n = _needed_reference_n(model, delta, rho, nominal, target, confidence, max_inflation, samples.size)
    finite = np.isfinite(needed)
    quantiles = np.quantile(needed[finite], [0.1, 0.5, 0.9]) if finite.any() else [math.inf] * 3
    return {
        "h": honest,
        "nominal_h": nominal,
        "feasible": feasible,
        "confidence": confidence,
        "reference_n": int(samples.size),
        "batch_size": int(batch_size),
        "draws": int(delta.size),
        "needed_h_quantiles": {"p10": float(quantiles[0]), "median": float(quantiles[1]), "p90": float(quantiles[2])},
        "needed_h_infinite": float(np.mean(~finite)),
        "mean_offset_sd": float(np.std(delta)),
        "realized_ert": _realized_ert(model, table, honest, target),
        "realized_ert_nominal_h": _realized_ert(model, table, nominal, target),
        "delay_factor": delay_factor,
        "max_delay_factor": max_inflation,
        "needed_reference_n": needed_n,
        "allowance_grid": [[c.kappa for c in side] for side in curves],
        "simulated_cycles": int(sum(c.cycles for side in curves for c in side)),
    }


# ----------------------------------------------------------------------------- CUSUM


class CUSUMDetector(Detector):
    """Sequential CUSUM over per-batch scores, with a bootstrap-calibrated expected run length.

    ``fit(reference_batch_scores)`` standardizes with the reference mean and sd; ``calibrate(target_ert)``
    sets ``h``; then either stream (``update`` / ``run`` / ``reset``) or judge a whole sequence from
    a fresh state (``predict``, which leaves the streaming state alone).

    Args:
        k: drift allowance in reference sd (0.5 is optimal for detecting a 1 sd shift).
        h: alarm threshold in reference sd; leave None and call :meth:`calibrate`.
        two_sided: also run the lower CUSUM ``S-_t = max(0, S-_{t-1} - z_t - k)`` (alarms on drops).
        name: detector name in verdicts.
    """

    needs_calibration = True
    _calibrate_hint = "calibrate(target_ert=...) (or pass h=... to the constructor)"

    def __init__(self, k: float = 0.5, h: float | None = None, two_sided: bool = False,
                 name: str = "cusum") -> None:
        super().__init__(name)
        self.k = _check_number(k, "k", low=0.0)
        if not isinstance(two_sided, bool):
            raise ValueError(f"two_sided must be a bool (got {two_sided!r})")
        self.two_sided = two_sided
        self.h: float | None = None if h is None else _check_number(h, "h", low=0.0)
        self._h_given = h is not None
        self._calibrated = self._h_given
        self.mean: float | None = None
        self.sd: float | None = None
        self._ref: np.ndarray | None = None
        self.calibration: dict[str, Any] | None = None
        self.step = 0
        self.reset()

    # -- fit / calibrate
    def fit(self, reference: Any) -> CUSUMDetector:
        """Reference: per-batch scores of clean/control batches (same batch size as in use)."""
        ref = _reference(reference, "reference batch scores")
        self._ref = ref
        self.mean = float(ref.mean())
        self.sd = float(ref.std(ddof=1))
        self._fitted = True
        if not self._h_given:  # a bootstrap threshold belongs to the old reference
            self.h, self.calibration, self._calibrated = None, None, False
        self.reset()
        return self

    def calibrate(self, target_ert: float = 10_000, n_streams: int = 1000, seed: int = 0, *,
                  max_cycles: int = 30_000_000, reference_draws: int = 0, reference_samples: Any = None,
                  batch_size: int = 1, confidence: float = 0.9, max_delay_factor: float = 1.25) -> CUSUMDetector:
        """Choose ``h`` so that clean streams (bootstrapped from the reference) alarm every
        ``target_ert`` batches on average.

        With ``reference_draws > 0`` the reference is not taken as exact (the honest calibration, which
        :class:`~trait_guard.guard.TraitGuard` uses): ``h`` is chosen so that the *realized* ERT on the
        clean distribution reaches the target for a fraction ``confidence`` of the references one could
        have drawn (an outer bootstrap over ``reference_draws`` resampled references, see
        :func:`_reference_bootstrap`). ``reference_samples``: the reference units whose moments set the
        standardization, when the batch scores given to :meth:`fit` were averaged from them
        ``batch_size`` at a time (the guard passes its per-sample reference); default: the batch scores
        themselves, ``batch_size`` 1. ``calibration['reference_bootstrap']`` then reports the nominal h
        (reference taken as exact), the spread of the needed h, the realized-ERT quantiles of both
        thresholds, the delay factor ``(h + 1.166) / (nominal h + 1.166)`` it costs, and, when that
        exceeds ``max_delay_factor`` or no useful threshold exists (``feasible`` false), the reference
        size that brings it under (``needed_reference_n``). Here ``n_streams`` is the number of false
        alarms simulated per ERT curve.

        ``n_streams`` sets the precision: the simulation holds as much information as that many clean
        streams run to their first false alarm (relative standard error of the ERT ~ 1/sqrt(n_streams)).
        ``max_cycles`` bounds the work (excursions simulated); ``seed`` makes it reproducible.
        Details in the module docstring; the outcome is in :attr:`calibration`.

        Without reference draws the bootstrap can only be as good as the reference: its mean is
        uncertain by ``1/sqrt(n)`` sd, which moves the ERT on the true clean distribution by a factor
        of about ``exp(2 (h + 1.166) / sqrt(n))`` (``calibration['ert_factor_reference_se']``, with n
        the number of *independent* reference batch scores: batch scores bootstrapped from fewer
        samples carry less information than their count says): 1.23 for ERT 200 with n = 2,000, 1.13
        for ERT 10,000 with n = 20,000. Use reference draws, or thousands of reference batch scores.
        """
        self._require("calibrate", calibrated=False)
        target = _check_number(target_ert, "target_ert", low=1.0, low_open=True)
        n_streams = _check_int(n_streams, "n_streams", low=10)
        max_cycles = _check_int(max_cycles, "max_cycles", low=1000)
        draws = _check_int(reference_draws, "reference_draws", low=0)
        assert self._ref is not None
        z = (self._ref - self.mean) / self.sd
        if draws:
            return self._calibrate_to_reference(z, target, n_streams, seed, max_cycles, draws, reference_samples,
                                                batch_size, confidence, max_delay_factor)
        return self._calibrate_to_bootstrap(z, target, n_streams, seed, max_cycles)

    def _calibrate_to_bootstrap(self, z: np.ndarray, target: float, n_streams: int, seed: int,
                                max_cycles: int) -> CUSUMDetector:
        """:meth:`calibrate` without reference draws: the smallest grid h whose bootstrap ERT reaches the
        target (:func:`_bootstrap_ert`), the reference taken as exact."""
        assert self._ref is not None
        sides = [z - self.k] + ([-z - self.k] if self.two_sided else [])
        if all(s.max() <= 0 for s in sides):
            raise ValueError(
                f"k={self.k} is larger than every standardized reference score: the CUSUM can never "
                "move on clean data, so no threshold can be calibrated; use a smaller k")
        rng = np.random.default_rng(seed)
        ert, sims, n_cycles, mean_len = _bootstrap_ert(sides, target, n_streams, max_cycles, rng)
        j = int(np.argmax(ert >= target))  # smallest grid h whose ERT reaches the target
        h = float(sims[0].grid[j])
        alarms = int(sum(sim.alarms[j] for sim in sims))
        self.h = h
        self._h_given = False
        self._calibrated = True
        self.calibration = {
            "method": "bootstrap-renewal",
            "target_ert": target,
            "estimated_ert": float(ert[j]) if np.isfinite(ert[j]) else None,
            "simulated_alarms": alarms,
            "relative_se": 1.0 / math.sqrt(alarms) if alarms else None,
            "n_cycles": n_cycles,
            "mean_cycle_length": float(mean_len),
            "n_streams": n_streams,
            "seed": seed,
            "two_sided": self.two_sided,
            "k": self.k,
            "reference_n": int(self._ref.size),
            # the reference mean is itself uncertain by 1/sqrt(n) sd; that moves the true ERT by
            # about this factor (x or /, one standard error; Gaussian approximation)
            "ert_factor_reference_se": math.exp(2.0 * (h + 1.166) / math.sqrt(self._ref.size)),
        }
        return self

    def _calibrate_to_reference(self, z: np.ndarray, target: float, n_streams: int, seed: int, max_cycles: int,
                                draws: int, reference_samples: Any, batch_size: int, confidence: float,
                                max_delay_factor: float) -> CUSUMDetector:
        """:meth:`calibrate` with reference draws (the honest calibration)."""
        if draws < 50:
            raise ValueError(f"reference_draws must be 0 (reference taken as exact) or at least 50 (got {draws})")
        samples = z if reference_samples is None else _reference(reference_samples, "reference_samples")
        batch_size = _check_int(batch_size, "batch_size", low=1)
        confidence = _check_number(confidence, "confidence", low=0.5, high=1.0, high_open=True)
        max_delay_factor = _check_number(max_delay_factor, "max_delay_factor", low=1.0, low_open=True)
        if not self.k > 0:
            raise ValueError("the honest calibration needs k > 0 (with k = 0 no reference is large enough: the "
                             "reference's mean error alone drives the CUSUM up); use k > 0 or reference_draws=0")
        w = (z - z.mean()) / z.std()
        rng = np.random.default_rng(seed)
        result = _reference_bootstrap(w, samples, batch_size, self.k, self.two_sided, target, draws, confidence,
                                      max_delay_factor, n_streams, rng, max_cycles)
        self.h = result["h"]
        self._h_given = False
        self._calibrated = True
        self.calibration = {
            "method": "reference-bootstrap", "target_ert": target, "n_streams": n_streams, "seed": seed,
            "two_sided": self.two_sided, "k": self.k, "reference_n": int(samples.size),
            "reference_bootstrap": result,
        }
        return self

    # -- streaming
    def reset(self) -> None:
        """Start a new stream: statistics to 0, alarm cleared (the global step count is kept)."""
        self._upper = 0.0
        self._lower = 0.0
        self.steps_since_reset = 0
        self.alarm_step: int | None = None

    @property
    def statistic(self) -> float:
        return max(self._upper, self._lower)

    def _evidence(self, z: float | None) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "statistic": self.statistic,
            "upper": self._upper,
            "step": self.step,
            "steps_since_reset": self.steps_since_reset,
            "alarm_step": self.alarm_step,
            "z": z,
        }
        if self.two_sided:
            ev["lower"] = self._lower
            ev["direction"] = "down" if self._lower > self._upper else "up"
        return ev

    def update(self, batch_score: float) -> Verdict:
        """Advance the stream by one batch score. ``flagged`` while the statistic is above ``h``;
        ``alarm_step`` is the (1-based, global) step of the first alarm since the last reset."""
        self._require("update")
        z = (_scalar(batch_score, "batch_score") - self.mean) / self.sd  # type: ignore[operator]
        self._advance(z)
        return Verdict(self.name, self.statistic > self.h, self.statistic, self.h,  # type: ignore[arg-type]
                       None, self._evidence(z))

    def _advance(self, z: float) -> bool:
        self._upper = max(0.0, self._upper + z - self.k)
        if self.two_sided:
            self._lower = max(0.0, self._lower - z - self.k)
        self.step += 1
        self.steps_since_reset += 1
        alarm = max(self._upper, self._lower) > self.h  # type: ignore[operator]
        if alarm and self.alarm_step is None:
            self.alarm_step = self.step
        return alarm

    def run(self, scores: Any) -> int | None:
        """Feed ``scores`` in order; return the index (into ``scores``) of the first alarm, or None.

        Stops at the alarm: later scores are not consumed and the state is the state at the alarm
        (call :meth:`reset` before watching on). Scores are validated before any is consumed.
        """
        self._require("run")
        z = (_values(scores, "batch scores") - self.mean) / self.sd
        for i, zi in enumerate(z.tolist()):
            if self._advance(zi):
                return i
        return None

    # -- whole sequence
    def _path(self, scores: Any) -> tuple[np.ndarray, np.ndarray]:
        z = ((_values(scores, "batch scores") - self.mean) / self.sd).tolist()
        up = np.empty(len(z))
        down = np.zeros(len(z))
        u = d = 0.0
        for i, zi in enumerate(z):
            u = max(0.0, u + zi - self.k)
            up[i] = u
            if self.two_sided:
                d = max(0.0, d - zi - self.k)
                down[i] = d
        return up, down

    def score(self, x: Any) -> float:
        """Largest CUSUM statistic over the sequence ``x`` of batch scores, from a fresh state."""
        self._require("score", calibrated=False)
        up, down = self._path(x)
        return float(np.maximum(up, down).max())

    def predict(self, x: Any) -> Verdict:
        """Judge a whole sequence of batch scores from a fresh state (the stream is untouched)."""
        self._require("predict")
        up, down = self._path(x)
        stat = np.maximum(up, down)
        above = np.flatnonzero(stat > self.h)
        peak = int(stat.argmax())
        ev: dict[str, Any] = {
            "alarm_index": int(above[0]) if above.size else None,
            "n_steps": int(stat.size),
            "final_statistic": float(stat[-1]),
            "max_index": peak,
        }
        if self.two_sided:
            ev["direction"] = "down" if down[peak] > up[peak] else "up"
        return Verdict(self.name, bool(above.size), float(stat[peak]), self.h, None, ev)  # type: ignore[arg-type]

    # -- state
    def _config(self) -> dict[str, Any]:
        return {"k": self.k, "h": self.h if self._h_given else None, "two_sided": self.two_sided,
                "name": self.name}

    def _get_state(self) -> dict[str, Any]:
        return {
            "reference": None if self._ref is None else self._ref.tolist(),
            "mean": self.mean,
            "sd": self.sd,
            "h": self.h,
            "calibration": self.calibration,
            "upper": self._upper,
            "lower": self._lower,
            "step": self.step,
            "steps_since_reset": self.steps_since_reset,
            "alarm_step": self.alarm_step,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        _check_keys(state, set(self._get_state()), "state.state")
        self._ref = None if state["reference"] is None else np.asarray(state["reference"], dtype=np.float64)
        self.mean, self.sd, self.h = state["mean"], state["sd"], state["h"]
        self.calibration = state["calibration"]
        self._upper, self._lower = float(state["upper"]), float(state["lower"])
        self.step, self.steps_since_reset = int(state["step"]), int(state["steps_since_reset"])
        self.alarm_step = state["alarm_step"]


# ----------------------------------------------------------------------------- permutation test


class PermutationTest(Detector):
    """Two-sample permutation test of the mean of per-sample values against the reference.

    ``alternative='greater'`` (default): the data's signal is higher than the reference's.
    p-values: exact by enumerating every split when there are at most ``n_permutations`` of them
    (``exact='auto'``), else Monte Carlo with ``(count + 1) / (n_permutations + 1)`` (valid: never
    below the true p in expectation). Flags when ``p < alpha``. Seeded, so a call is reproducible.
    Cost: about ``n_permutations * (n + n_ref)`` shuffled values (~0.1 s for 500 + 500 samples,
    ~0.7 s for 10k + 10k on one core); for 100k-sample sets pass fewer permutations (the smallest
    possible p is ``1 / (n_permutations + 1)``).
    """

    gives_p_value = True

    def __init__(self, n_permutations: int = 2000, alternative: str = "greater", alpha: float = 0.01,
                 seed: int = 0, exact: bool | str = "auto", name: str = "permutation") -> None:
        super().__init__(name)
        self.n_permutations = _check_int(n_permutations, "n_permutations", low=1)
        self.alternative = _check_choice(alternative, "alternative", _ALTERNATIVES)
        self.alpha = _check_alpha(alpha)
        self.seed = _check_int(seed, "seed", low=0)
        if exact not in (True, False, "auto"):
            raise ValueError(f"exact must be True, False or 'auto' (got {exact!r})")
        self.exact = exact
        self._ref: np.ndarray | None = None

    def fit(self, reference: Any) -> PermutationTest:
        """Reference: per-sample signal values from clean/control data."""
        self._ref = _reference(reference, "reference samples")
        self._fitted = True
        return self

    def calibrate(self, alpha: float | None = None) -> PermutationTest:  # type: ignore[override]
        """The permutation null is exact, so calibrating only sets the level ``alpha``."""
        if alpha is not None:
            self.alpha = _check_alpha(alpha)
        self._calibrated = True
        return self

    def _statistic(self, sums: np.ndarray, n: int, m: int, total: float) -> np.ndarray:
        if self.alternative == "greater":
            return sums  # the test group's sum orders splits like the difference in means
        return np.abs(sums * (1.0 / n + 1.0 / m) - total / m)

    def test(self, samples: Any) -> dict[str, Any]:
        """The test's numbers: p_value, mean_difference, effect_size, counts, method."""
        self._require("test", calibrated=False)
        x = _values(samples, "samples")
        ref = self._ref
        assert ref is not None
        n, m = x.size, ref.size
        pooled = np.concatenate([x, ref])
        size = n + m
        total = float(pooled.sum())
        observed = self._statistic(np.array([x.sum()]), n, m, total)[0]
        # splits with equal sums must tie despite rounding (~ size * eps * max|x|)
        tol = 1e-12 * size * float(np.abs(pooled).max())
        if self.alternative == "two-sided":
            tol *= 1.0 / n + 1.0 / m
        log_splits = math.lgamma(size + 1) - math.lgamma(n + 1) - math.lgamma(m + 1)
        small_enough = log_splits < math.log(max(self.n_permutations, 5_000_000)) + 1.0
        n_splits = math.comb(size, n) if small_enough else None
        exact = self.exact is True or (
            self.exact == "auto" and n_splits is not None and n_splits <= self.n_permutations)
        if exact:
            if n_splits is None or n_splits > 5_000_000:
                raise ValueError(f"exact test needs about 10^{log_splits / math.log(10):.1f} splits "
                                 "(> 5,000,000); use exact=False or 'auto'")
            count = 0
            combos = itertools.combinations(range(size), n)
            while True:
                block = np.fromiter(itertools.chain.from_iterable(itertools.islice(combos, 100_000)),
                                    dtype=np.int64)
                if block.size == 0:
                    break
                sums = pooled[block.reshape(-1, n)].sum(axis=1)
                count += int((self._statistic(sums, n, m, total) >= observed - tol).sum())
            p = count / n_splits
            draws = n_splits
        else:
            rng = np.random.default_rng(self.seed)
            small = min(n, m)  # sum the smaller group of each permutation
            rows = max(1, (1 << 20) // size)
            count, left = 0, self.n_permutations
            while left:
                r = min(rows, left)
                perm = rng.permuted(np.broadcast_to(pooled, (r, size)), axis=1)
                part = perm[:, :small].sum(axis=1)
                sums = part if small == n else total - part
                count += int((self._statistic(sums, n, m, total) >= observed - tol).sum())
                left -= r
            p = (count + 1) / (self.n_permutations + 1)
            draws = self.n_permutations
        var_x = float(x.var(ddof=1)) if n > 1 else 0.0
        pooled_sd = math.sqrt(((n - 1) * var_x + (m - 1) * float(ref.var(ddof=1))) / (n + m - 2))
        diff = float(x.mean() - ref.mean())
        return {
            "p_value": float(p),
            "mean_difference": diff,
            "effect_size": diff / pooled_sd,
            "n": n,
            "reference_n": m,
            "alternative": self.alternative,
            "method": "exact" if exact else "monte-carlo",
            "permutations": draws,
            "count": count,
        }

    def score(self, x: Any) -> float:
        """``-log10(p)``."""
        return _neglog10(self.test(x)["p_value"])

    def predict(self, x: Any) -> Verdict:
        self._require("predict")
        ev = self.test(x)
        p = ev.pop("p_value")
        ev["alpha"] = self.alpha
        return Verdict(self.name, p < self.alpha, _neglog10(p), _neglog10(self.alpha), p, ev)

    def _config(self) -> dict[str, Any]:
        return {"n_permutations": self.n_permutations, "alternative": self.alternative,
                "alpha": self.alpha, "seed": self.seed, "exact": self.exact, "name": self.name}

    def _get_state(self) -> dict[str, Any]:
        return {"reference": None if self._ref is None else self._ref.tolist()}

    def _set_state(self, state: dict[str, Any]) -> None:
        _check_keys(state, {"reference"}, "state.state")
        self._ref = None if state["reference"] is None else np.asarray(state["reference"], dtype=np.float64)


# ----------------------------------------------------------------------------- several signals


class CombinedPValues(NamedTuple):
    """Result of :func:`combine_pvalues`.

    ``p_value``: p of the family-level null "no signal is shifted" (Holm/Bonferroni: the smallest
    adjusted p; Fisher: Fisher's combined p). ``adjusted``: per-signal adjusted p-values (Holm or
    Bonferroni; reject a signal when its adjusted p < alpha, family-wise error <= alpha); empty for
    Fisher, which tests only the family-level null.
    """

    p_value: float
    adjusted: dict[str, float]

    def rejected(self, alpha: float) -> list[str]:
        """Signals rejected at family-wise level ``alpha`` (none for Fisher)."""
        return [name for name, p in self.adjusted.items() if p < alpha]


def combine_pvalues(p_values: Mapping[str, float], method: str = "holm") -> CombinedPValues:
    """Combine named p-values: ``'holm'`` (default), ``'bonferroni'`` or ``'fisher'``.

    Holm's step-down: sort p ascending, ``adj_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))``;
    Bonferroni: ``min(1, m p)``. Both control the family-wise error rate under any dependence.
    Fisher: ``-2 sum log p ~ chi2(2m)``, more powerful when many signals shift a little, but valid
    only for independent p-values.
    """
    method = _check_choice(method, "method", _CORRECTIONS)
    if not isinstance(p_values, Mapping) or not p_values:
        raise ValueError("p_values must be a non-empty dict of name -> p-value")
    ps = {str(k): _check_number(v, f"p_values[{k!r}]", low=0.0, high=1.0) for k, v in p_values.items()}
    m = len(ps)
    if method == "bonferroni":
        adjusted = {k: min(1.0, m * p) for k, p in ps.items()}
        return CombinedPValues(min(adjusted.values()), adjusted)
    if method == "holm":
        order = sorted(ps, key=ps.__getitem__)  # stable: ties keep the given order
        adjusted, running = {}, 0.0
        for i, k in enumerate(order):
            running = max(running, min(1.0, (m - i) * ps[k]))
            adjusted[k] = running
        return CombinedPValues(min(adjusted.values()), {k: adjusted[k] for k in ps})
    from scipy.special import chdtrc  # chi-square survival function

    if min(ps.values()) == 0.0:
        return CombinedPValues(0.0, {})
    statistic = -2.0 * sum(math.log(p) for p in ps.values())
    return CombinedPValues(float(chdtrc(2 * m, statistic)), {})


def split_ert(target_ert: float, n_signals: int) -> float:
    """ERT for each of ``n_signals`` CUSUMs watched together so the family keeps ``target_ert``.

    Union bound: each CUSUM calibrated to ERT ``k * target`` false-alarms at a long-run rate of
    ``1 / (k * target)`` per batch; the rate of "any of the k alarms" is at most the sum, ``1/target``,
    whatever the dependence between signals (correlated signals make the family more conservative).
    Calibrate each with ``calibrate(target_ert=split_ert(target, k))`` and alarm when any alarms.
    """
    target = _check_number(target_ert, "target_ert", low=1.0, low_open=True)
    k = _check_int(n_signals, "n_signals", low=1)
    return target * k
