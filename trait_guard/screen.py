"""Dataset-level screening: does this teacher data differ from the base model's own output?

``screen`` scores a dataset and a reference set (the student's base model's own generations for the
same prompt family: a control teacher) with one :class:`~trait_guard.fingerprint.FingerprintScorer`,
runs a permutation test per signal in its suspicious direction, and combines the p-values with
Holm's correction (family-wise level ``alpha``). It also reports:

* kinship: whether the data's teachers share the student's base model (the precondition for
  subliminal transfer: it fails across base models);
* the token-histogram divergence (Jensen-Shannon, chi-square) and the most over-represented tokens;
* ``proj_diff:<trait>`` (S1, the persona-vectors paper's projection difference): where data and
  reference rows answer the same prompts (``prompt_id``), the per-prompt difference of the base model's
  response-averaged projections, data minus reference (the mean over the reference's rows for that
  prompt), tested by random sign flips: under "the data is the base model's own output" each
  difference is symmetric about 0. Pairing removes the prompt-to-prompt variance that the unpaired
  ``proj:<trait>`` test carries. Projection is linear, so this reuses the ``proj:`` signals already
  computed: no extra forward pass. It joins the Holm family.
* baselines measured the same way but kept out of the verdict: format and value statistics (number
  count, length, digit shares). A signal worth trusting must beat them; where they differ too, the
  data differs in form, and the report says so.

Exit codes of ``trait-guard screen``: 0 clean, 3 flagged.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from trait_guard.detect import PermutationTest, combine_pvalues
from trait_guard.errors import EXIT_FLAGGED, TraitGuardInputError
from trait_guard.files import to_jsonable
from trait_guard.fingerprint import (
    POWERED_SIGNALS,
    FingerprintScorer,
    TokenHistogram,
    format_features,
    suspicious_direction,
    teacher_signal_coverage,
)
from trait_guard.models import model_identity

FLAGGED_EXIT_CODE = EXIT_FLAGGED  # kept for callers of the old name
# the format statistics tested as baselines (kept out of the verdict)
FORMAT_BASELINES = ("n_numbers", "length", "mean_value")


@dataclass
class SignalTest:
    name: str
    direction: str
    data_mean: float
    reference_mean: float
    effect_size: float
    p_value: float
    adjusted_p: float | None = None
    flagged: bool = False


@dataclass
class ScreenReport:
    n_data: int
    n_reference: int
    alpha: float
    correction: str
    flagged: bool
    signals: list[SignalTest]
    baselines: list[SignalTest]
    kinship: dict[str, Any]
    tokens: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)
    signal_sides: dict[str, list[str]] = field(default_factory=dict)  # which signals each side has
    monitored: bool = True  # a signal with shown power was tested (fingerprint.POWERED_SIGNALS)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))

    def table(self) -> str:
        lines = [f"screened {self.n_data} samples against {self.n_reference} reference samples "
                 f"(permutation tests, {self.correction} at alpha={self.alpha})",
                 f"{'signal':<22} {'dir':<5} {'data':>9} {'ref':>9} {'d':>6} {'p':>9} {'p adj':>9}  verdict"]
        for s in self.signals:
            lines.append(f"{s.name:<22} {s.direction:<5} {s.data_mean:>9.4f} {s.reference_mean:>9.4f} "
                         f"{s.effect_size:>6.2f} {s.p_value:>9.2g} {s.adjusted_p:>9.2g}  {'FLAG' if s.flagged else 'ok'}")
        lines.append("baselines (not in the verdict):")
        for s in self.baselines:
            lines.append(f"  {s.name:<20} {s.direction:<5} {s.data_mean:>9.4f} {s.reference_mean:>9.4f} "
                         f"{s.effect_size:>6.2f} {s.p_value:>9.2g}")
        kin = self.kinship
        lines.append(f"kinship: {kin['verdict']} ({kin['detail']})")
        lines.append(f"tokens: JS divergence {self.tokens['js_divergence']:.4f} nats, chi-square p "
                     f"{self.tokens['chi_square_p']:.2g}; most over-represented: "
                     + ", ".join(f"{t['token']!r}(x{math.exp(t['log_ratio']):.1f})" for t in self.tokens["overrepresented"][:5]))
        for note in self.notes:
            lines.append(f"note: {note}")
        verdict = "FLAGGED" if self.flagged else "clean" if self.monitored else "UNMONITORED (no signal with shown power)"
        lines.append(f"VERDICT: {verdict}")
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class RowSummary:
    """What the screen reads from one side's rows besides their signals, gathered one batch at a time.

    Why: the screen of ``trait-guard run`` must not hold the rows (its driver's memory would grow
    with the data). Per row it keeps only the sample id (the scoring stage's row order), the prompt
    key (the pairing of ``proj_diff``), both as Arrow strings, and the three format baselines; the
    token histogram, the teachers' base models and the teacher-log-prob coverage are running totals.
    :meth:`of_rows` builds one from dicts, :meth:`of_tables` from the Arrow batches of
    :func:`trait_guard.dataset.scan_teacher_rows` (read column by column, no dict per row).
    """

    vocab_size: int
    histogram: TokenHistogram = field(init=False)
    base_fingerprints: set[Any] = field(default_factory=set)
    base_models: set[str] = field(default_factory=set)
    teacher_columns: dict[str, int] = field(default_factory=dict)  # rows with each teacher-log-prob column
    _ids: list[Any] = field(default_factory=list)  # Arrow string arrays, one per batch
    _keys: list[Any] = field(default_factory=list)
    _format: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.histogram = TokenHistogram(self.vocab_size)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._ids)

    @property
    def sample_ids(self) -> Any:
        """The rows' sample ids in row order, one Arrow string array (what the scoring stage looks rows up by)."""
        import pyarrow as pa

        return pa.concat_arrays(self._ids) if self._ids else pa.array([], pa.string())

    @property
    def prompt_keys(self) -> list[Any]:
        return [k for keys in self._keys for k in keys.to_pylist()]

    @classmethod
    def of_rows(cls, rows: Sequence[dict[str, Any]], vocab_size: int) -> RowSummary:
        import pyarrow as pa

        summary = cls(vocab_size)
        summary._add(pa.array([r.get("sample_id", f"row {i}") for i, r in enumerate(rows)], pa.string()),
                     pa.array([str(k) if k is not None else None for k in prompt_keys(rows)], pa.string()),
                     [r["completion"] for r in rows], [r["completion_ids"] for r in rows if r.get("completion_ids") is not None],
                     {r.get("base_fingerprint") for r in rows}, {r.get("base_model", "?") for r in rows},
                     teacher_signal_coverage(rows))
        return summary

    @classmethod
    def of_tables(cls, tables: Iterable[Any], vocab_size: int) -> RowSummary:
        import pyarrow.compute as pc

        summary = cls(vocab_size)
        for table in tables:
            keys = pc.if_else(pc.greater(pc.utf8_length(table.column("prompt_id")), 0), table.column("prompt_id"),
                              table.column("prompt")) if "prompt" in table.column_names else table.column("prompt_id")
            ids = table.column("completion_ids").combine_chunks()
            summary._add(table.column("sample_id").combine_chunks(), keys.combine_chunks(),
                         table.column("completion").to_pylist(), [pc.list_flatten(ids).to_numpy()],
                         set(table.column("base_fingerprint").unique().to_pylist()),
                         set(table.column("base_model").unique().to_pylist()), teacher_signal_coverage(table))
        return summary

    def _add(self, ids: Any, keys: Any, completions: list[str], token_ids: Iterable[Any], fingerprints: set[Any],
             models: set[str], coverage: dict[str, int]) -> None:
        self._ids.append(ids)
        self._keys.append(keys)
        features = format_features(completions)
        for name in FORMAT_BASELINES:
            self._format.setdefault(name, []).append(features[name])
        self.histogram.update(token_ids)
        self.base_fingerprints |= fingerprints
        self.base_models |= models
        for name, count in coverage.items():
            self.teacher_columns[name] = self.teacher_columns.get(name, 0) + count

    def features(self) -> dict[str, np.ndarray]:
        """The format baselines of every row, in row order."""
        return {name: np.concatenate(parts) for name, parts in self._format.items()}


def _permutation(name: str, data: np.ndarray, reference: np.ndarray, direction: str,
                 n_permutations: int, seed: int) -> SignalTest | None:
    data, reference = data[np.isfinite(data)], reference[np.isfinite(reference)]
    if len(data) < 2 or len(reference) < 2 or np.std(np.concatenate([data, reference])) == 0:
        return None  # both sides constant: nothing to test
    sign = -1.0 if direction == "down" else 1.0
    if np.std(reference) == 0:
        # A constant reference (e.g. divergence tokens of the base model's own output: always 0) has no
        # spread to standardize by; a rank test still compares the two samples exactly.
        from scipy.stats import mannwhitneyu

        alternative = "two-sided" if direction == "both" else "greater"
        p = float(mannwhitneyu(sign * data, sign * reference, alternative=alternative).pvalue)
        return SignalTest(name, direction, float(data.mean()), float(reference.mean()), math.inf, p)
    test = PermutationTest(n_permutations=n_permutations, alternative="two-sided" if direction == "both" else "greater",
                           seed=seed, name=name).fit(sign * reference).calibrate()
    result = test.test(sign * data)
    return SignalTest(name, direction, float(data.mean()), float(reference.mean()),
                      sign * result["effect_size"], result["p_value"])


PAIRED_PREFIX = "proj_diff:"


def paired_name(projection: str) -> str:
    """The paired test's name for a ``proj:<trait>`` signal: ``proj_diff:<trait>``."""
    return PAIRED_PREFIX + projection.removeprefix("proj:")


def paired_differences(data: np.ndarray, reference: np.ndarray, data_keys: list[Any],
                       reference_keys: list[Any]) -> np.ndarray:
    """Per data row whose key (prompt) the reference also answers: its value minus the mean of the
    reference's finite values for that key. Rows without a partner, or non-finite, are dropped."""
    by_key: dict[Any, list[float]] = {}
    for key, value in zip(reference_keys, np.asarray(reference, float), strict=True):
        if np.isfinite(value):
            by_key.setdefault(key, []).append(float(value))
    means = {key: float(np.mean(values)) for key, values in by_key.items()}
    return np.asarray([float(v) - means[k] for k, v in zip(data_keys, np.asarray(data, float), strict=True)
                       if np.isfinite(v) and k in means], dtype=np.float64)


def _sign_flip(name: str, differences: np.ndarray, direction: str, n_permutations: int, seed: int) -> SignalTest | None:
    """Monte Carlo sign-flip test of "the differences are symmetric about 0" against ``direction``;
    p = (1 + #{flipped statistic >= observed}) / (1 + n_permutations), valid at any sample size."""
    if len(differences) < 2 or np.std(differences) == 0:
        return None
    sign = -1.0 if direction == "down" else 1.0
    d = sign * differences
    observed = d.mean()
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 20) // len(d))  # flips drawn in blocks of ~1M values: memory bounded at any size
    null = np.concatenate([(rng.choice(np.array([-1.0, 1.0]), size=(min(rows, n_permutations - start), len(d))) * d)
                           .mean(axis=1) for start in range(0, n_permutations, rows)])
    exceed = np.abs(null) >= abs(observed) - 1e-12 if direction == "both" else null >= observed - 1e-12
    p = float((1 + exceed.sum()) / (1 + n_permutations))
    return SignalTest(name, direction, float(differences.mean()), 0.0,
                      float(differences.mean() / differences.std(ddof=1)), p)


def kinship(rows: Sequence[dict[str, Any]] | RowSummary, student_identity: Any) -> dict[str, Any]:
    """Do the data's teachers share the student's base model? (precondition for transfer)"""
    if isinstance(rows, RowSummary):
        fingerprints, models = rows.base_fingerprints, rows.base_models
    else:
        fingerprints, models = {r.get("base_fingerprint") for r in rows}, {r.get("base_model", "?") for r in rows}
    if None in fingerprints or "" in fingerprints:
        return {"verdict": "unknown", "kin": None, "detail": "rows without base_fingerprint provenance"}
    kin = fingerprints == {student_identity.fingerprint}
    names = sorted(models)
    if kin:
        detail = f"teacher base {names[0]} = student base {student_identity.name}: subliminal transfer is possible"
    else:
        detail = f"teacher bases {names} differ from the student's ({student_identity.name}): transfer unlikely"
    return {"verdict": "kin" if kin else "not kin", "kin": kin, "detail": detail, "teacher_bases": names}


def screen(
    data_rows: Sequence[dict[str, Any]] | RowSummary,
    reference_rows: Sequence[dict[str, Any]] | RowSummary,
    scorer: FingerprintScorer | None,
    *,
    alpha: float = 0.01,
    n_permutations: int = 2000,
    seed: int = 0,
    signals: list[str] | None = None,
    progress: Any = None,
    data_signals: dict[str, np.ndarray] | None = None,
    reference_signals: dict[str, np.ndarray] | None = None,
    tokenizer: Any = None,
    student_identity: Any = None,
) -> ScreenReport:
    """Screen ``data_rows`` against ``reference_rows`` (see the module docstring).

    Already computed per-sample signals may be passed to skip scoring (e.g. when resampling, or
    scored by the Ray Data stage of :mod:`trait_guard.scoring`); with both sides given, ``scorer``
    may be None and ``tokenizer`` / ``student_identity`` (the base model's, for the token table and
    the kinship check) stand in for it.

    Either side may be a :class:`RowSummary` instead of rows, when its signals are given (this is how
    ``trait-guard run`` screens without holding the rows).
    """
    started = time.perf_counter()
    if not data_rows or not reference_rows:
        raise TraitGuardInputError(f"screening needs rows on both sides (data: {len(data_rows)}, reference: {len(reference_rows)})")
    if scorer is None and (data_signals is None or reference_signals is None or tokenizer is None
                           or student_identity is None):
        raise TypeError("screen without a scorer needs data_signals, reference_signals, tokenizer and student_identity")
    tokenizer = scorer.tokenizer if scorer is not None else tokenizer
    student_identity = model_identity(scorer.model) if scorer is not None else student_identity
    if data_signals is None or reference_signals is None:
        if isinstance(data_rows, RowSummary) or isinstance(reference_rows, RowSummary):
            raise TypeError("screen needs the rows, not a RowSummary, for the side whose signals it scores")
    if data_signals is None:
        data_signals = scorer.score_table(list(data_rows), progress)
    if reference_signals is None:
        # the unigram reference histogram is normally built from these rows: score them leave-one-out
        reference_signals = scorer.score_table(list(reference_rows), progress, in_reference=True)
    vocab = len(tokenizer)
    data = data_rows if isinstance(data_rows, RowSummary) else RowSummary.of_rows(data_rows, vocab)
    reference = reference_rows if isinstance(reference_rows, RowSummary) else RowSummary.of_rows(reference_rows, vocab)
    tests, flagged, notes = screen_signals(data_signals, reference_signals, alpha=alpha, n_permutations=n_permutations,
                                         seed=seed, signals=signals, data_keys=data.prompt_keys,
                                         reference_keys=reference.prompt_keys)
    sides = signal_sides(data_signals, reference_signals)
    monitored = any(t.name in POWERED_SIGNALS for t in tests)
    if not monitored:
        notes.append("no signal with shown power (" + ", ".join(POWERED_SIGNALS) + ") could be tested: they need "
                     "teacher log-probs on both sides (generation.top_k_logprobs > 0); a clean verdict here means "
                     "little")
    one_sided = sorted(set(sides["data"]) ^ set(sides["reference"]))
    if one_sided:
        notes.append(f"signals on one side only, not tested: {one_sided} (data has {sides['data']}, reference has "
                     f"{sides['reference']})")

    data_format, ref_format = data.features(), reference.features()
    baselines = [t for n in FORMAT_BASELINES
                 if (t := _permutation(n, data_format[n], ref_format[n], "both", n_permutations, seed))]
    if any(b.p_value < alpha for b in baselines):
        notes.append("format baselines differ too (" + ", ".join(b.name for b in baselines if b.p_value < alpha)
                     + "): the data differs in form; compare signals conditioned on length before blaming a trait")

    data_hist, ref_hist = data.histogram, reference.histogram
    tokens: dict[str, Any] = {"js_divergence": math.nan, "chi_square_p": math.nan, "overrepresented": []}
    if data_hist.total and ref_hist.total:
        tokens = {"js_divergence": data_hist.js_divergence(ref_hist),
                  "chi_square_p": data_hist.chi_square(ref_hist)[1],
                  "overrepresented": data_hist.overrepresented(ref_hist, tokenizer)}
    return ScreenReport(len(data), len(reference), alpha, "holm", flagged, tests, baselines,
                        kinship(data, student_identity), tokens,
                        time.perf_counter() - started, notes, sides, monitored)


def signal_sides(data_signals: dict[str, np.ndarray], reference_signals: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Which signals each side has (at least one finite value)."""
    def present(signals: dict[str, np.ndarray]) -> list[str]:
        return sorted(n for n, v in signals.items() if n != "n_tokens" and np.isfinite(np.asarray(v, float)).any())

    return {"data": present(data_signals), "reference": present(reference_signals)}


def gate_resolution(n_data: int, n_reference: int, n_tests: int, alpha: float, n_permutations: int) -> str | None:
    """Why the gate could never flag at this ``alpha``, with the fix; None when it can.

    Holm over ``n_tests`` signals first needs one p-value below ``alpha / n_tests``. A Monte Carlo
    permutation p-value is at least ``1 / (n_permutations + 1)``, and no permutation p-value is below
    ``1 / C(n_data + n_reference, n_data)`` (the number of distinct splits): a request finer than
    that silently turns the gate off, so it is said instead.
    """
    import math

    if n_tests < 1 or n_data < 1 or n_reference < 1:
        return None
    needed = n_tests / alpha
    if n_permutations + 1 < needed:
        return (f"the gate cannot flag at alpha={alpha:g} over {n_tests} signals: its smallest p-value is "
                f"1/{n_permutations + 1}, Holm needs one below {alpha / n_tests:.2g}; raise screen.n_permutations "
                f"to at least {math.ceil(needed)} (or alpha)")
    if math.lgamma(n_data + n_reference + 1) - math.lgamma(n_data + 1) - math.lgamma(n_reference + 1) < math.log(needed):
        m = n_reference
        while math.comb(n_data + m, n_data) < needed:
            m += 1
        return (f"the gate cannot flag at alpha={alpha:g} over {n_tests} signals: {n_data} training rows against "
                f"{n_reference} reference rows have fewer than {math.ceil(needed)} distinct splits; use at least "
                f"{m} reference rows (or more training rows)")
    return None


def prompt_keys(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """What pairs a data row with reference rows: its ``prompt_id`` (the generator gives the same
    prompt the same id for every teacher), else the prompt text."""
    return [r.get("prompt_id") or r.get("prompt") for r in rows]


def screen_signals(data_signals: dict[str, np.ndarray], reference_signals: dict[str, np.ndarray], *, alpha: float,
                 n_permutations: int = 2000, seed: int = 0, signals: list[str] | None = None,
                 data_keys: list[Any] | None = None,
                 reference_keys: list[Any] | None = None) -> tuple[list[SignalTest], bool, list[str]]:
    """The screen's verdict from per-sample signals already computed: one permutation test per signal
    present on both sides (in its suspicious direction), plus, given the rows' prompt keys
    (:func:`prompt_keys`), a paired sign-flip test of each ``proj:`` signal (``proj_diff:``, S1);
    Holm over them all at family-wise ``alpha``. ``signals``: names or glob patterns of the signals
    to test (``["proj*", "trait_llr:*"]``: the trait-specific ones only); None or ``["*"]``: all.

    Returns ``(tests, flagged, notes)``. The training recipe calls this on its setup signals as the
    gate before step 1, so the gate and ``trait-guard screen`` agree on the same data.
    """
    sides = signal_sides(data_signals, reference_signals)
    names = [n for n in sides["data"] if n in sides["reference"]]

    def wanted(name: str) -> bool:
        return not signals or any(fnmatch.fnmatchcase(name, pattern) for pattern in signals)

    tests = [t for n in names if wanted(n) and
             (t := _permutation(n, np.asarray(data_signals[n], float), np.asarray(reference_signals[n], float),
                                suspicious_direction(n), n_permutations, seed))]
    notes: list[str] = []
    if data_keys is not None and reference_keys is not None:
        for name in (n for n in names if n.startswith("proj:")):
            paired = paired_name(name)
            if not wanted(paired):
                continue
            differences = paired_differences(data_signals[name], reference_signals[name], data_keys, reference_keys)
            test = _sign_flip(paired, differences, suspicious_direction(paired), n_permutations, seed)
            if test is not None:
                tests.append(test)
            elif len(differences) < 2:
                notes.append(f"{paired} not tested: {len(differences)} data row(s) share a prompt with the reference")
    if signals and signals != ["*"]:
        notes.append(f"tested signals restricted to {signals} (screen.signals): "
                     f"{', '.join(t.name for t in tests) or 'none'}; not tested: "
                     f"{', '.join(n for n in names if not wanted(n)) or 'none'}")
    flagged = False
    resolution = gate_resolution(len(next(iter(data_signals.values()), [])),
                                 len(next(iter(reference_signals.values()), [])), len(tests), alpha, n_permutations)
    if resolution:
        notes.append(resolution)
    if tests:
        combined = combine_pvalues({t.name: t.p_value for t in tests}, method="holm")
        for t in tests:
            t.adjusted_p = combined.adjusted[t.name]
            t.flagged = t.adjusted_p < alpha
        flagged = any(t.flagged for t in tests)
        from trait_guard.trait_signals import shown_power_note

        notes.append(shown_power_note([t.name for t in tests]))
    else:
        notes.append("no signal could be tested (constant or missing values)" if not signals or signals == ["*"] else
                     f"no signal could be tested: none of {sorted(names)} matches the tested signals {signals} "
                     "(screen.signals), or those that do are constant or missing")
    return tests, flagged, notes
