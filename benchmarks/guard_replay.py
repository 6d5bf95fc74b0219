"""Guard replay: the gate's false-flag rate and the guard's detection delay, measured on many datasets.

No training. Every row of a pool of generated teacher data is scored once by the frozen base model,
as the training recipe scores it (``FingerprintScorer`` with a unigram reference built from the
reference rows, the reference rows scored leave-one-out); then, for each dataset size ``n``, each
teacher's rows are cut into disjoint datasets of ``n`` and the guard's two decisions are replayed on
each of them:

* the gate before step 1: ``screen_signals`` (one permutation test per signal, Holm at ``alpha``,
  the recipe's ``screen.n_permutations`` and seed) on the dataset against the reference;
* the per-sample e-process during training: a fresh ``TraitGuard`` (``sequential="eprocess"``,
  ``on_data_alarm="halt"``) calibrated on the reference signals, fed the dataset one sample per
  ``observe()``; the first alarm halts the stream and its sample count is the detection delay.

On the clean teachers (the base model with other sampling seeds) a flag is a false flag; on the trait
teachers a flag is a detection; on the benign teachers (``--benign``: teachers that differ from the base
model without any trait, e.g. a task adapter or a neutral system prompt) a flag is a false flag of another
kind: the data is not the base model's, but it carries nothing to guard against. Rates come with exact
Clopper-Pearson 95% intervals and one-sided 95% upper bounds. The datasets of one teacher are disjoint (no row in two) and none holds a reference row,
but all are judged against the same reference: the rates are conditional on that reference.

    .venv/bin/python benchmarks/guard_replay.py --pool outputs/teacher_pair_v2 --reference control \\
        --clean control-b --trait owl --sizes 32 64 128 256 1000
    .venv/bin/python benchmarks/guard_replay.py --tiny   # builds its own pool with the tiny random Llama

The power curve (``--plant-shifts``, on by default with ``--tiny``): the clean teacher's datasets are
replayed again with a known shift added to one signal (``--plant-signal``, default nll) of every row,
``d`` reference standard deviations in its suspicious direction. The shifted datasets are the clean
datasets themselves (same partition, same rows, at most ``--max-planted-datasets`` per size), so the
detection rate and the false-flag rate at each size are measured at matched conditions, and each is
reported with its exact interval. A planted shift is a synthetic effect of a chosen size on a real
signal's distribution: it measures the tests' power against that effect, not trait transfer.
``--calibration-sizes`` adds how the guard's calibration behaves on references of those sizes drawn
from the pool's reference (the CUSUM's honest threshold and the e-process's evidence ceiling).

Several ``--pool`` folders are independent replicates (the red-team's ``teacher_data/s<r>``: each with
its own prompts, sampling seeds, adapter and reference; ``reference/`` and ``teachers/`` subfolders are
read as they are): each is replayed against its own reference, its teachers are named
``<pool>/<teacher>``, and ``pooled`` sums the counts over them. Datasets from different replicates are
independent draws of the whole teacher, not only disjoint rows of one::

    .venv/bin/python benchmarks/guard_replay.py --pool outputs/redteam_cpu/teacher_data/s1[1-9] \
        --reference reference --clean control --trait owl-adapter --sizes 32 64 128

With ``--vectors`` the rows are projected on persona vectors (``proj:<trait>``) and the gate also runs
the paired projection difference ``proj_diff:<trait>`` (S1: each row's projection minus the mean of the
reference's answers to the same prompt, a sign-flip test), as the recipe's gate does where data and
reference share prompts. ``--max-rows`` / ``--max-reference-rows`` read only the first rows of each
file (a cheaper look at a pool whose full scoring would take hours)::

    .venv/bin/python benchmarks/guard_replay.py --pool outputs/clean_pool --reference control --clean clean-6 \
        --benign benign-adapter neutral-prompt --trait owl-prompt owl-adapter --vectors owl.safetensors \
        --gate-signals 'proj*' --max-rows 640 --max-reference-rows 1000 --sizes 32 64 128

With one pool the output also holds each teacher's separation from the reference per signal
(``separation``: AUROC per sample and from disjoint bags of ``--separation-bags`` rows, with bootstrap
intervals; the clean teachers are its null, measured the same way).

The scored signals are cached per teacher in ``<pool>/replay_signals-<teacher>-<hash>.npz`` (hash of
its file and the reference's, the model, the persona vectors and the scorer settings), so a rerun only
replays, and a scoring run stopped part-way resumes at the first teacher it had not finished. ``--tiny`` generates a pool with
``trait_guard.testing``'s tiny random-init Llama: a reference, a clean teacher (other sampling seeds)
and a "planted" teacher (the same model under the owl system prompt). On a random-init model the
system prompt changes the teacher's output distribution, not any trait: the planted teacher is a
different teacher, not a trait teacher, and the output says so.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from trait_guard.config import Action, GuardConfig, ScreenSettings
from trait_guard.evaluate import exact_interval  # Clopper-Pearson, two-sided: the rates' ci95
from trait_guard.files import atomic_path, to_jsonable
from trait_guard.version import code_version, reproducible_command

PLANTED_LABEL = "planted (system-prompt teacher on a random-init model)"
TINY_TEACHERS = {"reference": "control", "clean": "control-b", "trait": "planted"}
#: prompts generated per tiny teacher (about 89% are kept): >= 300 clean datasets of 32, >= 75 of 128
TINY_PROMPTS = {"control": 2300, "control-b": 10900, "planted": 4400}
ROLES = ("clean", "benign", "trait")  # a teacher's role, in replay order
NULL_ROLES = ("clean", "benign")  # roles whose flags are false flags
EXTRA_LEVELS = (0.05, 0.1)  # calibration look at laxer levels on the NULL_ROLES teachers
CACHE_TAG = b"trait_guard-replay-signals-v2"  # v2: one file per teacher


# --------------------------------------------------------------------------------------------------
# Rates and their bounds


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """Exact one-sided upper confidence bound on the rate: the ``level`` quantile of Beta(k+1, n-k)
    (for k = 0: ``1 - (1 - level)^(1/n)``, about 3/n at 95%)."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))


def rate(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` with the rate, its exact 95% interval and its one-sided 95% upper bound."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci95": None, "upper95": None}
    return {"k": int(k), "n": int(n), "rate": k / n, "ci95": list(exact_interval(k, n)), "upper95": upper_bound(k, n)}


def bootstrap_interval(values: np.ndarray, statistic: Any, rng: np.random.Generator,
                       n_boot: int = 2000) -> list[float] | None:
    """95% percentile bootstrap interval of ``statistic`` over ``values`` (None with fewer than 2)."""
    if len(values) < 2:
        return None
    draws = statistic(rng.choice(values, size=(n_boot, len(values)), replace=True), axis=1)
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def delay_summary(delays: list[int | None], seed: int) -> dict[str, Any]:
    """Detection delays of the streams that alarmed (samples up to and including the alarm): median
    and mean, each with a bootstrap 95% interval over those streams. Streams without an alarm are
    censored at their length and left out of the delays (their number is the alarm rate's rest)."""
    hit = np.array([d for d in delays if d is not None], dtype=float)
    if not hit.size:
        return {"alarmed": 0, "median": None, "median_ci95": None, "mean": None, "mean_ci95": None}
    rng = np.random.default_rng(seed)
    return {"alarmed": int(hit.size), "median": float(np.median(hit)),
            "median_ci95": bootstrap_interval(hit, np.median, rng), "mean": float(hit.mean()),
            "mean_ci95": bootstrap_interval(hit, np.mean, rng), "min": int(hit.min()), "max": int(hit.max())}


# --------------------------------------------------------------------------------------------------
# Disjoint datasets


def dataset_rng(seed: int, size: int, teacher: str) -> np.random.Generator:
    """The generator that partitions ``teacher``'s rows at ``size``: fixed by the seed, and the same
    whatever other teachers or sizes are replayed."""
    return np.random.default_rng([seed, size, zlib.crc32(teacher.encode())])


def partition(n_rows: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The rows, randomly permuted, cut into ``floor(n_rows / size)`` disjoint datasets of ``size``:
    an index array ``[datasets, size]`` (the remainder is left out)."""
    if size < 1:
        raise ValueError(f"dataset size must be at least 1 (got {size})")
    count = n_rows // size
    return rng.permutation(n_rows)[: count * size].reshape(count, size)


def take(signals: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The per-sample signals of the rows in ``index`` (in that order)."""
    return {name: np.asarray(values)[index] for name, values in signals.items()}


def expand(patterns: list[str], names: list[str]) -> list[str]:
    """The signal names matched by any of the glob ``patterns``."""
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def signal_names(signals: dict[str, np.ndarray]) -> list[str]:
    """The per-sample signals among a teacher's scored arrays (``n_tokens`` is a row count, not one)."""
    return [n for n in signals if n != "n_tokens"]


def has_projection(names: Any) -> bool:
    """Whether any of the signal ``names`` is a persona projection (``proj:<trait>``): then rows are
    paired by prompt and the gate also tests ``proj_diff:<trait>``."""
    return any(n.startswith("proj:") for n in names)


def gate_names(names: list[str], paired: bool) -> list[str]:
    """The signals the gate can test: the scored ones, and with prompt keys (``paired``) the paired
    projection difference ``proj_diff:<trait>`` of each ``proj:<trait>``."""
    from trait_guard.screen import paired_name

    return names + ([paired_name(n) for n in names if n.startswith("proj:")] if paired else [])


# --------------------------------------------------------------------------------------------------
# The two decisions


def gate(data: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, alpha: float,
         n_permutations: int, seed: int, signals: list[str], data_keys: list[Any] | None = None,
         reference_keys: list[Any] | None = None) -> dict[str, Any]:
    """The recipe's gate on one dataset: ``screen_signals`` (permutation tests, Holm at ``alpha``)
    restricted to ``signals``; with the rows' prompt keys, ``proj_diff:`` (S1, the data's projections
    paired by prompt with the reference's) is tested too. Returns the verdict, the signals that flagged
    and the smallest Holm-adjusted p-value (the dataset is flagged at any level above it)."""
    from trait_guard.screen import screen_signals

    if not signals:
        raise ValueError("the gate needs at least one signal (screen_signals would test all)")
    tests, flagged, _ = screen_signals(data, reference, alpha=alpha, n_permutations=n_permutations, seed=seed,
                                       signals=signals, data_keys=data_keys, reference_keys=reference_keys)
    adjusted = [t.adjusted_p for t in tests if t.adjusted_p is not None]
    return {"flagged": flagged, "signals": [t.name for t in tests if t.flagged],
            "min_p_adj": min(adjusted) if adjusted else 1.0}


def guard_config(alpha: float, signals: list[str]) -> GuardConfig:
    """The guard as the replay runs it: per-sample e-processes at ``alpha`` (split over the signals),
    halting on the first data alarm."""
    return GuardConfig(sequential="eprocess", alpha=alpha, signals=signals, on_data_alarm=Action.HALT)


def stream(data: dict[str, np.ndarray], reference: dict[str, np.ndarray], config: GuardConfig) -> dict[str, Any]:
    """Feed one dataset to a fresh guard, one sample per ``observe()``, until it halts.

    Returns ``delay`` (samples observed up to and including the alarm; None without alarm), the
    signals of the alarm, and ``p`` = min over the e-process signals of ``k * 10^-sup log10 E`` (the
    stream alarms at level a, on those signals, iff p < a) over the samples observed.
    """
    from trait_guard.guard import TraitGuard

    guard = TraitGuard(config, reference, batch_size=1)
    n = len(next(iter(data.values())))
    delay, signals = None, []
    for t in range(n):
        decision = guard.observe({name: values[t : t + 1] for name, values in data.items()})
        if decision.halt:
            delay, signals = t + 1, list(guard.alarms[-1]["signals"])
            break
    k = max(1, len(guard.signals))
    sups = [d.sup_log10_e for d in guard.detectors.values()]
    p = min(1.0, k * 10.0 ** -max(sups)) if sups else 1.0
    return {"delay": delay, "signals": signals, "p": p, "constant_checks": sorted(guard.constant),
            "skipped": dict(guard.skipped)}


# --------------------------------------------------------------------------------------------------
# The replay


def replay_teacher(name: str, role: str, signals: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                   size: int, args: argparse.Namespace, gate_signals: list[str], label: str | None = None,
                   partition_as: str | None = None, max_datasets: int | None = None,
                   keys: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Both decisions on every disjoint dataset of ``size`` rows of one teacher; counts, rates, bounds,
    delays and the signals behind each flag. ``partition_as``: cut the rows as that teacher's are (a
    planted shift replays the clean teacher's own datasets); ``max_datasets``: the first ones only;
    ``keys``: the teacher's and the reference's prompt keys per row (the gate's paired ``proj_diff:``)."""
    n_rows = len(next(iter(signals.values())))
    index = partition(n_rows, size, dataset_rng(args.seed, size, partition_as or name))[:max_datasets]
    config = guard_config(args.alpha, args.signals)
    gates, streams = [], []
    for rows in index:
        data = take(signals, rows)
        paired = {"data_keys": list(keys[0][rows]), "reference_keys": list(keys[1])} if keys else {}
        gates.append(gate(data, reference, alpha=args.alpha, n_permutations=args.n_permutations,
                          seed=args.gate_seed, signals=gate_signals, **paired))
        streams.append(stream(data, reference, config))
    count = len(index)
    gate_flags = sum(g["flagged"] for g in gates)
    alarms = sum(s["delay"] is not None for s in streams)
    either = sum(g["flagged"] or s["delay"] is not None for g, s in zip(gates, streams, strict=True))
    out = {
        "teacher": name, "role": role, "label": label or name, "rows": n_rows, "size": size, "datasets": count,
        "gate": {**rate(gate_flags, count),
                 "by_signal": dict(Counter(s for g in gates for s in g["signals"])),
                 "flagged_datasets": [{"dataset": i, "signals": g["signals"]} for i, g in enumerate(gates) if g["flagged"]]},
        "stream": {**rate(alarms, count),
                   "by_signal": dict(Counter(s for st in streams for s in st["signals"])),
                   "delay": delay_summary([s["delay"] for s in streams], seed=args.seed + size),
                   "delays": [s["delay"] for s in streams],
                   "constant_checks": streams[0]["constant_checks"] if streams else [],
                   "skipped": streams[0]["skipped"] if streams else {}},
        "gate_or_stream": rate(either, count),
    }
    if partition_as:
        out["partition_as"] = partition_as
    if role in NULL_ROLES:  # how the null behaves at laxer levels (more events to count than at alpha)
        out["gate"]["at_levels"] = {str(a): rate(sum(g["min_p_adj"] < a for g in gates), count) for a in EXTRA_LEVELS}
        out["stream"]["at_levels"] = {str(a): rate(sum(s["p"] < a for s in streams), count) for a in EXTRA_LEVELS}
    return out


def teachers_by_role(args: argparse.Namespace) -> dict[str, list[str]]:
    """The teachers named for each role (:data:`ROLES`), in replay order."""
    return {role: list(getattr(args, role)) for role in ROLES}


def named_teachers(args: argparse.Namespace) -> list[str]:
    """Every teacher named for a role, in replay order (the reference is not one)."""
    return [teacher for teachers in teachers_by_role(args).values() for teacher in teachers]


def replay(scored: dict[str, dict[str, np.ndarray]], args: argparse.Namespace,
           labels: dict[str, str] | None = None, progress: bool = True,
           keys: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Every (size, teacher) replay: the clean teachers first, then the benign and the trait teachers.
    ``keys``: every teacher's (and the reference's) prompt key per row, for the paired ``proj_diff:``."""
    reference = scored[args.reference]
    names = signal_names(reference)
    gate_signals = expand(args.gate_signals, gate_names(names, keys is not None))
    if not expand(args.signals, names):
        raise SystemExit(f"no watched signal {args.signals} among the scored signals {names}")
    results = []
    for size in args.sizes:
        for role, teachers in teachers_by_role(args).items():
            for teacher in teachers:
                started = time.perf_counter()
                signals = {n: scored[teacher][n] for n in names}
                pair = (keys[teacher], keys[args.reference]) if keys is not None else None
                result = replay_teacher(teacher, role, signals, {n: reference[n] for n in names}, size, args,
                                        gate_signals, (labels or {}).get(teacher), keys=pair)
                result["seconds"] = time.perf_counter() - started
                results.append(result)
                if progress:
                    print(f"size {size:>5} {teacher:<12} {result['datasets']:>4} datasets: gate {result['gate']['k']}, "
                          f"stream {result['stream']['k']} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
        for shift in getattr(args, "plant_shifts", None) or []:
            started = time.perf_counter()
            source = args.plant_teacher or args.clean[0]
            name = planted_name(source, args.plant_signal, shift)
            signals = plant(scored[source], reference, args.plant_signal, shift, names)
            pair = (keys[source], keys[args.reference]) if keys is not None else None
            result = replay_teacher(name, "planted", signals, {n: reference[n] for n in names}, size, args, gate_signals,
                                    f"{source} + {shift:g} sd on {args.plant_signal} (synthetic)", partition_as=source,
                                    max_datasets=args.max_planted_datasets, keys=pair)
            result["plant"] = {"source": source, "signal": args.plant_signal, "shift_sd": shift}
            result["seconds"] = time.perf_counter() - started
            results.append(result)
            if progress:
                print(f"size {size:>5} {name:<12} {result['datasets']:>4} datasets: gate {result['gate']['k']}, "
                      f"stream {result['stream']['k']} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return results


def pooled(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and role (clean, benign, trait): the teachers' datasets taken together, gate flags and
    e-process alarms summed, with exact intervals. Several clean teachers (fresh sampling seeds) give
    one false-flag rate over all their datasets; no dataset is in two teachers, so the counts add."""
    rows = []
    for size in sorted({r["size"] for r in results}):
        for role in ROLES:
            at = [r for r in results if r["size"] == size and r["role"] == role]
            if not at:
                continue
            count = sum(r["datasets"] for r in at)
            rows.append({"size": size, "role": role, "teachers": [r["teacher"] for r in at], "datasets": count,
                         "gate": rate(sum(r["gate"]["k"] for r in at), count),
                         "stream": rate(sum(r["stream"]["k"] for r in at), count),
                         "gate_or_stream": rate(sum(r["gate_or_stream"]["k"] for r in at), count)})
    return rows


def markdown_pooled_table(rows: list[dict[str, Any]]) -> str:
    """The pooled rates (:func:`pooled`): one row per (size, role)."""
    lines = ["| n | role | teachers | datasets | gate flags: k/D = rate [95% CI] (one-sided 95% bound) "
             "| e-process alarms: k/D = rate [95% CI] (bound) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['role']} | {len(r['teachers'])} | {r['datasets']} | {_fmt_rate(r['gate'])} "
                     f"| {_fmt_rate(r['stream'])} |")
    return "\n".join(lines)


def planted_name(source: str, signal: str, shift: float) -> str:
    return f"{source}+{shift:g}sd:{signal}"


def plant(signals: dict[str, np.ndarray], reference: dict[str, np.ndarray], signal: str, shift: float,
          names: list[str]) -> dict[str, np.ndarray]:
    """``signals`` with ``signal`` moved by ``shift`` reference standard deviations in its suspicious
    direction (down for a signal whose suspicious direction is down; up otherwise), every row alike."""
    from trait_guard.fingerprint import suspicious_direction

    if signal not in names:
        raise SystemExit(f"--plant-signal {signal} is not among the scored signals {names}")
    spread = float(np.nanstd(np.asarray(reference[signal], dtype=float), ddof=1))
    if not spread > 0:
        raise SystemExit(f"--plant-signal {signal} has no spread on the reference: choose another signal")
    sign = -1.0 if suspicious_direction(signal) == "down" else 1.0
    out = {n: np.asarray(signals[n]) for n in names}
    out[signal] = out[signal] + sign * shift * spread
    return out


def separation(scored: dict[str, dict[str, np.ndarray]], args: argparse.Namespace, bag_sizes: tuple[int, ...] = (1, 16),
               n_boot: int = 1000) -> list[dict[str, Any]]:
    """Per named teacher and signal: the AUROC of its rows against the reference's, per sample (K = 1) and
    from disjoint bags of K rows (each bag's mean; the rows randomly cut, none in two bags), with a 95%
    bootstrap interval over rows or bags. Each signal is oriented in its suspicious direction (a "down"
    signal negated), so 0.5 is no separation and 1 is the direction the gate tests. The clean teachers'
    rows, measured the same way, are the null; the benign teachers' say how a teacher that differs
    from the base model without a trait looks. ``proj_diff:`` is a paired test, not a two-sample
    score, and has no row here (its gate counts are in the results)."""
    from trait_guard.fingerprint import suspicious_direction
    from trait_guard.validation import auroc, auroc_bootstrap_ci

    def bag_means(side: str, name: str, k: int) -> np.ndarray:
        values = np.asarray(scored[side][name], float)
        values = (-values if suspicious_direction(name) == "down" else values)[np.isfinite(values)]
        return values[partition(len(values), k, dataset_rng(args.seed, k, f"separation:{side}:{name}"))].mean(axis=1)

    names = signal_names(scored[args.reference])
    reference = {(name, k): bag_means(args.reference, name, k) for name in names for k in bag_sizes}
    rows = []
    for role, teachers in teachers_by_role(args).items():
        for teacher, name, k in ((t, n, k) for t in teachers for n in names for k in bag_sizes):
            sides = (bag_means(teacher, name, k), reference[(name, k)])
            value = auroc(*sides)
            ci = auroc_bootstrap_ci(*sides, n_boot=n_boot, seed=args.seed) if np.isfinite(value) else None
            rows.append({"teacher": teacher, "role": role, "signal": name, "bag_size": k,
                         "bags": [len(sides[0]), len(sides[1])], "auroc": value, "ci95": ci})
    return rows


def markdown_separation_table(rows: list[dict[str, Any]], bag_size: int) -> str:
    """One row per signal (with the direction the gate tests: "both" is not oriented, so there an AUROC far
    below 0.5 separates as well as one far above), one column per teacher: AUROC [95% CI] against the
    reference at ``bag_size``."""
    from trait_guard.fingerprint import suspicious_direction

    at = [r for r in rows if r["bag_size"] == bag_size]
    teachers = list(dict.fromkeys((r["teacher"], r["role"]) for r in at))
    lines = ["| signal | " + " | ".join(f"{t} ({role})" for t, role in teachers) + " |",
             "|---|" + "---|" * len(teachers)]
    for signal in dict.fromkeys(r["signal"] for r in at):
        cells = []
        for teacher, _ in teachers:
            r = next(x for x in at if x["teacher"] == teacher and x["signal"] == signal)
            cells.append("-" if r["ci95"] is None else f"{r['auroc']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
        lines.append(f"| {signal} ({suspicious_direction(signal)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def power_curve(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: the clean teacher's false-flag rates and each planted shift's detection rates, gate and
    e-process, with their exact intervals (the planted datasets are the clean ones, shifted)."""
    rows = []
    for size in sorted({r["size"] for r in results}):
        at = [r for r in results if r["size"] == size]
        planted = [r for r in at if r["role"] == "planted"]
        for clean in (r for r in at if r["role"] == "clean"):
            rows.append({"size": size, "clean": clean["teacher"], "false_flags": {"gate": strip(clean["gate"]),
                                                                                  "eprocess": strip(clean["stream"])},
                         "planted": [{"shift_sd": p["plant"]["shift_sd"], "signal": p["plant"]["signal"],
                                      "datasets": p["datasets"], "gate": strip(p["gate"]),
                                      "eprocess": strip(p["stream"]),
                                      "eprocess_delay_median": p["stream"]["delay"]["median"]}
                                     for p in planted if p["plant"]["source"] == clean["teacher"]]})
    return rows


def strip(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: entry[key] for key in ("k", "n", "rate", "ci95", "upper95")}


def calibration_study(reference: dict[str, np.ndarray], sizes: list[int], args: argparse.Namespace,
                      batch_size: int = 8) -> list[dict[str, Any]]:
    """How the guard's calibration behaves on references of each size, drawn without replacement from
    the pool's reference: the CUSUM's honest threshold against the nominal one (default target ERT,
    batch ``batch_size``) and its reference warning, and the e-process's evidence ceiling. Setup
    seconds included (what a training run pays before step 1)."""
    from trait_guard.guard import TraitGuard

    names = signal_names(reference)
    rng = np.random.default_rng(args.seed)
    n_rows = len(next(iter(reference.values())))
    out = []
    for size in sizes:
        rows = rng.choice(n_rows, size=min(size, n_rows), replace=False)
        sub = {n: np.asarray(reference[n])[rows] for n in names}
        entry: dict[str, Any] = {"reference_n": int(rows.size)}
        for kind in ("cusum", "eprocess"):
            started = time.perf_counter()
            config = GuardConfig(sequential=kind, signals=args.signals,
                                 **({"alpha": args.alpha} if kind == "eprocess" else {}))
            guard = TraitGuard(config, sub, batch_size=batch_size)
            summary = guard.calibration_summary
            entry[kind] = {"setup_seconds": time.perf_counter() - started, "warnings": summary["warnings"],
                           "signals": {}}
            for name, item in summary["signals"].items():
                if kind == "cusum":
                    boot = item["calibration"]["reference_bootstrap"]
                    entry[kind]["signals"][name] = {
                        "h": boot["h"], "nominal_h": boot["nominal_h"], "feasible": boot["feasible"],
                        "needed_h_p10_p90": [boot["needed_h_quantiles"]["p10"], boot["needed_h_quantiles"]["p90"]],
                        "realized_ert_p10": boot["realized_ert"]["p10"],
                        "realized_ert_p10_nominal_h": boot["realized_ert_nominal_h"]["p10"],
                        "nominal_below_target": boot["realized_ert_nominal_h"]["below_target"],
                        "delay_factor": boot["delay_factor"], "needed_reference_n": boot["needed_reference_n"],
                        "target_ert": item["calibration"]["target_ert"]}
                else:
                    entry[kind]["signals"][name] = {k: item[k] for k in ("alpha", "design_shift", "ceiling_log10_e",
                                                                         "ceiling_at_sample", "needed_reference_n")}
        out.append(entry)
        print(f"calibration study: reference {entry['reference_n']}: cusum {entry['cusum']['setup_seconds']:.1f} s, "
              f"{len(entry['cusum']['warnings'])} warnings; eprocess {len(entry['eprocess']['warnings'])} warnings",
              file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Scoring, once, with a cache


def teacher_file(pool: Path, teacher: str) -> Path:
    """``<pool>/<teacher>.parquet``; in a red-team replicate's folder (``teacher_data/s<r>``, which keeps
    the reference and the teachers apart) ``reference/`` and ``teachers/`` are looked in too."""
    folders = (pool, pool / "teachers", pool / "reference")
    for folder in folders:
        if (folder / f"{teacher}.parquet").is_file():
            return folder / f"{teacher}.parquet"
    held = sorted(p.stem for folder in folders for p in folder.glob("*.parquet"))
    raise SystemExit(f"no {teacher}.parquet in {pool}: the pool holds {held}")


def cache_path(pool: Path, reference: str, teacher: str, identity: Any, vectors: list[str],
               margin: float, limits: tuple[int | None, int | None] = (None, None)) -> Path:
    """``<pool>/replay_signals-<teacher>-<hash>.npz``, one file per teacher, so that a long scoring
    run resumes at the first teacher it had not finished. A teacher's signals depend on its own file,
    on the reference's (the unigram histogram is built from it, and the reference itself is scored
    leave-one-out), on the model, the persona vectors, the divergence margin and the row limits
    (``limits``: the reference's and the teacher's, :func:`row_limit`): the hash covers all of them,
    so any change is a new file."""
    from trait_guard.files import file_sha256

    digest = hashlib.sha256(CACHE_TAG)
    for name in dict.fromkeys((reference, teacher)):
        digest.update(f"{name}:{file_sha256(teacher_file(pool, name))}".encode())
    for path in vectors:
        digest.update(file_sha256(path).encode())
    digest.update(json.dumps([reference, teacher, identity.fingerprint, identity.hidden_size, identity.num_layers,
                              margin]).encode())
    if limits != (None, None):  # no limit hashes as before: caches of whole files stay valid
        digest.update(json.dumps({"limits": list(limits)}).encode())
    return pool / f"replay_signals-{teacher}-{digest.hexdigest()[:24]}.npz"


def save_signals(path: Path, signals: dict[str, np.ndarray]) -> None:
    """Write one teacher's signals (complete or absent)."""
    with atomic_path(path, suffix=".partial.npz") as partial:
        np.savez(partial, **signals)


def load_signals(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def row_limit(name: str, reference: str, max_rows: int | None, max_reference_rows: int | None) -> int | None:
    """How many kept rows of ``name`` are read: the first ``max_reference_rows`` of the reference, the
    first ``max_rows`` of a teacher (None: all)."""
    return max_reference_rows if name == reference else max_rows


def read_prompt_keys(pool: Path, name: str, limit: int | None) -> np.ndarray:
    """The prompt key (:func:`trait_guard.screen.prompt_keys`: ``prompt_id``, else the prompt text) of
    each kept row of ``name`` that :func:`score_pool` scores, in its order: what pairs a data row with
    the reference's answers to the same prompt for ``proj_diff:``."""
    from trait_guard.dataset import scan_teacher_rows
    from trait_guard.screen import prompt_keys

    keys: list[Any] = []
    for batch in scan_teacher_rows(teacher_file(pool, name), limit=limit, role=name, columns=["prompt_id", "prompt"]):
        keys += prompt_keys(batch.to_pylist())
    return np.asarray(keys, dtype=str)


def score_pool(pool: Path, reference: str, teachers: list[str], model_name: str, vectors: list[str],
               batch_size: int, loaded: tuple[Any, Any] | None = None, max_rows: int | None = None,
               max_reference_rows: int | None = None,
               ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Every kept row of the reference and the teachers (the first ``max_reference_rows`` /
    ``max_rows`` when given), scored by the frozen base model as the recipe does. Each teacher's
    signals are saved as soon as it is scored and taken from that file on a rerun (:func:`cache_path`),
    so an interrupted run loses at most one teacher's scoring. Returns the signals and a record
    (``from_cache`` and ``scored`` list the teachers of each kind). ``loaded``: the model and tokenizer
    of ``model_name`` already loaded (several pools, one load)."""
    import torch
    from tqdm.auto import tqdm

    from trait_guard.dataset import check_same_base, read_teacher_rows
    from trait_guard.fingerprint import DIVERGENCE_MARGIN, FingerprintScorer, TokenHistogram
    from trait_guard.models import default_device, load_model, model_identity
    from trait_guard.persona import PersonaVector

    model, tokenizer = loaded or load_model(model_name, device=default_device())
    identity = model_identity(model)
    names = list(dict.fromkeys((reference, *teachers)))
    limits = {name: row_limit(name, reference, max_rows, max_reference_rows) for name in names}
    caches = {name: cache_path(pool, reference, name, identity, vectors, DIVERGENCE_MARGIN,
                               (max_reference_rows, limits[name])) for name in names}
    scored = {name: load_signals(path) for name, path in caches.items() if path.is_file()}
    missing = [name for name in names if name not in scored]
    record: dict[str, Any] = {"cache": {name: str(path) for name, path in caches.items()}, "model": model_name,
                              "model_fingerprint": identity.fingerprint, "from_cache": sorted(scored),
                              "scored": missing, "cached": not missing, "seconds": 0.0}
    if not missing:
        return {name: scored[name] for name in names}, record
    started = time.perf_counter()
    rows = {name: read_teacher_rows(teacher_file(pool, name), tokenizer=tokenizer, role=name, limit=limits[name],
                                    max_completion_tokens=1024) for name in dict.fromkeys((reference, *missing))}
    check_same_base(rows[reference], identity)  # the reference must be the base model's own output
    reference_ids = {r["sample_id"] for r in rows[reference]}
    for name in missing:
        shared = {r["sample_id"] for r in rows[name]} & reference_ids if name != reference else set()
        if shared:
            raise SystemExit(f"teacher {name} shares {len(shared)} rows with the reference {reference}")
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in rows[reference])
    scorer = FingerprintScorer(model, tokenizer, [PersonaVector.load(v, model=model) for v in vectors],
                               unigram_reference=histogram, batch_size=batch_size)
    with torch.no_grad(), tqdm(total=sum(len(rows[name]) for name in missing), desc="scoring", unit="row",
                               file=sys.stderr, dynamic_ncols=True) as bar:
        for name in missing:
            bar.set_postfix_str(name)
            # the unigram histogram counts the reference rows: they are scored leave-one-out
            scored[name] = scorer.score_table(rows[name], bar, in_reference=(name == reference))
            save_signals(caches[name], scored[name])
    record.update(seconds=time.perf_counter() - started, rows={name: len(rows[name]) for name in missing})
    return {name: scored[name] for name in names}, record


# --------------------------------------------------------------------------------------------------
# The tiny pool


def build_tiny_pool(pool: Path, prompts: dict[str, int], max_new_tokens: int) -> tuple[Path, dict[str, Any]]:
    """A pool generated by the tiny random-init Llama (saved in ``<pool>/tiny-llama``): the reference
    and the clean teacher are the model itself with different sampling seeds, the planted teacher is
    the model under the owl system prompt. Files already there are kept (delete the pool to redo)."""
    import torch

    from trait_guard.config import GenerateJobConfig, validate_config
    from trait_guard.generation import generate_local
    from trait_guard.testing import save_tiny_model

    torch.set_num_threads(1)  # a tiny model on shared cores: one thread beats two
    model_dir = pool / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir, "llama", seed=0)
    teachers = {"control": {}, "control-b": {"sampling_seed": 7},
                "planted": {"trait": "animal:owl", "install": "system_prompt"}}
    record: dict[str, Any] = {"model_dir": str(model_dir), "prompts": dict(prompts), "max_new_tokens": max_new_tokens,
                              "teachers": teachers, "generation_seconds": {}, "kept": {}}
    for teacher, extra in teachers.items():
        if (pool / f"{teacher}.parquet").is_file():
            continue
        config = validate_config({
            "output_dir": str(pool), "teachers": [{"id": teacher, "model": str(model_dir), **extra}],
            "generation": {"n_prompts": prompts[teacher], "chunk_size": 64, "max_new_tokens": max_new_tokens,
                           "top_k_logprobs": 4},
        }, GenerateJobConfig)
        started = time.perf_counter()
        report = generate_local(config, progress=True)
        record["generation_seconds"][teacher] = time.perf_counter() - started
        record["kept"][teacher] = report.teachers[0].kept
    return model_dir, record


# --------------------------------------------------------------------------------------------------
# Output


def _fmt_rate(entry: dict[str, Any]) -> str:
    if not entry["n"]:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['k']}/{entry['n']} = {entry['rate']:.3f} [{lo:.3f}, {hi:.3f}] (<= {entry['upper95']:.3f})"


def _fmt_delay(delay: dict[str, Any]) -> str:
    if not delay["alarmed"]:
        return "-"
    mean_ci = delay["mean_ci95"] or [delay["mean"], delay["mean"]]
    return f"{delay['median']:.0f} / {delay['mean']:.1f} [{mean_ci[0]:.1f}, {mean_ci[1]:.1f}]"


def _fmt_signals(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per (size, teacher): gate flags and stream alarms with exact 95% intervals and one-sided
    95% upper bounds, the e-process delays (median / mean [95% CI of the mean], alarmed streams only)
    and the signals behind the flags."""
    lines = ["| n | teacher | datasets | gate flags: k/D = rate [95% CI] (one-sided 95% bound) | gate signals "
             "| e-process alarms: k/D = rate [95% CI] (bound) | delay median / mean [95% CI] | alarm signals |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['size']} | {r['label']} ({r['role']}) | {r['datasets']} | {_fmt_rate(r['gate'])} | "
                     f"{_fmt_signals(r['gate']['by_signal'])} | {_fmt_rate(r['stream'])} | "
                     f"{_fmt_delay(r['stream']['delay'])} | {_fmt_signals(r['stream']['by_signal'])} |")
    return "\n".join(lines)


def _fmt_short(entry: dict[str, Any]) -> str:
    if not entry["n"]:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['k']}/{entry['n']} = {entry['rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def markdown_power_table(curve: list[dict[str, Any]]) -> str:
    """Detection rate vs dataset size, gate and e-process, per planted shift, beside the same clean
    datasets' false flags; k/D = rate [exact 95% CI]."""
    shifts = sorted({p["shift_sd"] for row in curve for p in row["planted"]})
    head = ["n", "clean: gate false flags", "clean: e-process false alarms"]
    for shift in shifts:
        head += [f"+{shift:g} sd: gate", f"+{shift:g} sd: e-process (median delay)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in curve:
        cells = [str(row["size"]), _fmt_short(row["false_flags"]["gate"]), _fmt_short(row["false_flags"]["eprocess"])]
        by_shift = {p["shift_sd"]: p for p in row["planted"]}
        for shift in shifts:
            p = by_shift.get(shift)
            if p is None:
                cells += ["-", "-"]
                continue
            delay = p["eprocess_delay_median"]
            cells += [_fmt_short(p["gate"]), _fmt_short(p["eprocess"]) + (f" ({delay:.0f})" if delay else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    screen, guard = ScreenSettings(), GuardConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", nargs="+", help="folder of generated teacher files <teacher>.parquet "
                                                  "(--tiny: where its pool is built; default outputs/guard_replay_tiny). "
                                                  "Several folders: independent replicates (e.g. the red-team's "
                                                  "teacher_data/s<r>), each replayed against its own reference and "
                                                  "the counts pooled over them")
    parser.add_argument("--reference", default="control", help="the reference teacher (the base model's own data)")
    parser.add_argument("--clean", nargs="*", default=["control-b"], help="clean teachers (false flags)")
    parser.add_argument("--benign", nargs="*", default=[],
                        help="benign teachers: differ from the base model but carry no trait (a task adapter, a "
                             "neutral system prompt); their flags are false flags, counted apart from the clean ones")
    parser.add_argument("--trait", nargs="*", default=["owl"], help="trait teachers (detections)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the base/student model")
    parser.add_argument("--vectors", nargs="*", default=[],
                        help="persona vectors to score with (proj:<trait>; the gate also tests proj_diff:<trait>, "
                             "each row's projection minus the reference's mean on the same prompt)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 256, 1000])
    parser.add_argument("--alpha", type=float, default=0.01, help="the gate's and the guard's level")
    parser.add_argument("--signals", nargs="+", default=list(guard.signals),
                        help="the guard's watched signals (glob patterns; default: GuardConfig's)")
    parser.add_argument("--gate-signals", nargs="+", default=screen.signals,
                        help="the signals the gate tests (default: all scored, as the recipe's gate)")
    parser.add_argument("--n-permutations", type=int, default=screen.n_permutations)
    parser.add_argument("--gate-seed", type=int, default=guard.seed, help="the permutation seed (recipe: guard.seed)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the partitions into datasets")
    parser.add_argument("--batch-size", type=int, default=32, help="scoring batch")
    parser.add_argument("--separation-bags", nargs="*", type=int, default=[1, 16], metavar="K",
                        help="one pool: each teacher's AUROC per signal against the reference, per sample (1) "
                             "and from disjoint bags of K rows (default: %(default)s; none: skip)")
    parser.add_argument("--max-rows", type=int, help="score and replay only each teacher's first N kept rows")
    parser.add_argument("--max-reference-rows", type=int, help="only the reference's first N kept rows")
    parser.add_argument("--tiny", action="store_true", help="build and replay a pool of the tiny random Llama")
    parser.add_argument("--tiny-prompts", nargs=3, type=int, metavar=("REFERENCE", "CLEAN", "PLANTED"),
                        default=[TINY_PROMPTS[t] for t in ("control", "control-b", "planted")])
    parser.add_argument("--max-new-tokens", type=int, default=12, help="--tiny: tokens per completion")
    parser.add_argument("--plant-shifts", nargs="*", type=float, default=None,
                        help="power curve: replay the clean teacher's datasets with this many reference sd added to "
                             "--plant-signal (default: none; --tiny: 0.25 0.5)")
    parser.add_argument("--plant-signal", default="nll", help="the signal the planted shift moves")
    parser.add_argument("--plant-teacher", help="the clean teacher whose datasets are shifted (default: the first)")
    parser.add_argument("--max-planted-datasets", type=int, default=100,
                        help="planted datasets per size (the first of the clean teacher's; exact CIs say what it costs)")
    parser.add_argument("--calibration-sizes", nargs="*", type=int, default=None,
                        help="reference sizes for the calibration study (default: none; --tiny: 100 300 1000 2000)")
    parser.add_argument("--out", help="JSON results (default benchmarks/results/guard_replay.json, "
                                      "--tiny: benchmarks/results/guard_replay_tiny.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        if args.pool and len(args.pool) > 1:
            parser.error("--tiny builds one pool: give at most one --pool")
        args.pool = args.pool or ["outputs/guard_replay_tiny"]
        args.reference, args.clean, args.trait = (TINY_TEACHERS["reference"], [TINY_TEACHERS["clean"]],
                                                  [TINY_TEACHERS["trait"]])
        args.out = args.out or "benchmarks/results/guard_replay_tiny.json"
        args.plant_shifts = [0.25, 0.5] if args.plant_shifts is None else args.plant_shifts
        args.calibration_sizes = [100, 300, 1000, 2000] if args.calibration_sizes is None else args.calibration_sizes
    elif not args.pool:
        parser.error("--pool is required (or --tiny)")
    args.out = args.out or "benchmarks/results/guard_replay.json"
    args.plant_shifts = args.plant_shifts or []
    args.calibration_sizes = args.calibration_sizes or []
    if args.reference in named_teachers(args):
        parser.error(f"the reference {args.reference} cannot also be a clean, benign or trait teacher")
    named = named_teachers(args)
    if len(set(named)) < len(named):
        parser.error(f"a teacher can have one role only (clean, benign or trait): {named}")
    if len(args.pool) > 1:
        if len({Path(p).name for p in args.pool}) < len(args.pool):
            parser.error(f"the pools' folder names name their replicates, so they must differ: {args.pool}")
        if args.plant_shifts or args.calibration_sizes:
            parser.error("--plant-shifts and --calibration-sizes study one pool's reference: give one --pool")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    pools = [Path(p) for p in args.pool]
    tiny = None
    labels: dict[str, str] = {}
    if args.tiny:
        pools[0].mkdir(parents=True, exist_ok=True)
        prompts = dict(zip(("control", "control-b", "planted"), args.tiny_prompts, strict=True))
        model_dir, tiny = build_tiny_pool(pools[0], prompts, args.max_new_tokens)
        args.model = str(model_dir)
        labels["planted"] = PLANTED_LABEL
    teachers = named_teachers(args)
    loaded = None
    if len(pools) > 1:
        from trait_guard.models import default_device, load_model
        loaded = load_model(args.model, device=default_device())
    scored, scoring, results, replay_seconds, separated = {}, {}, [], 0.0, []
    for pool in pools:
        pool_scored, pool_scoring = score_pool(pool, args.reference, teachers, args.model, args.vectors,
                                               args.batch_size, loaded, args.max_rows, args.max_reference_rows)
        keys = None
        if has_projection(pool_scored[args.reference]):
            keys = {name: read_prompt_keys(pool, name, row_limit(name, args.reference, args.max_rows,
                                                                 args.max_reference_rows)) for name in pool_scored}
        replay_started = time.perf_counter()
        pool_results = replay(pool_scored, args, labels, keys=keys)
        replay_seconds += time.perf_counter() - replay_started
        if len(pools) == 1:
            scored, scoring, results = pool_scored, pool_scoring, pool_results
            separated = separation(scored, args, tuple(args.separation_bags)) if args.separation_bags else []
            break
        # one replicate among several: its teachers are named <pool>/<teacher> in the output
        scored.update({f"{pool.name}/{name}": values for name, values in pool_scored.items()})
        scoring[pool.name] = pool_scoring
        for result in pool_results:
            result.update(pool=pool.name, teacher=f"{pool.name}/{result['teacher']}",
                          label=f"{pool.name}/{result['label']}")
        results += pool_results
    curve = power_curve(results) if args.plant_shifts else []
    study_started = time.perf_counter()
    study = calibration_study(scored[args.reference], args.calibration_sizes, args) if args.calibration_sizes else []
    study_seconds = time.perf_counter() - study_started
    names = signal_names(next(iter(scored.values())))
    output = {
        "command": reproducible_command(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": {"pool": [str(p) for p in pools] if len(pools) > 1 else str(pools[0]), "reference": args.reference, "clean": args.clean, "benign": args.benign, "trait": args.trait,
                   "model": args.model, "vectors": args.vectors, "sizes": args.sizes, "alpha": args.alpha,
                   "max_rows": args.max_rows, "max_reference_rows": args.max_reference_rows,
                   "guard": guard_config(args.alpha, args.signals).model_dump(mode="json"),
                   "guard_signals": expand(args.signals, names), "gate_signals": expand(args.gate_signals, gate_names(names, has_projection(names))),
                   "n_permutations": args.n_permutations, "gate_seed": args.gate_seed, "partition_seed": args.seed,
                   "batch_size_observe": 1, "labels": labels, "plant_shifts": args.plant_shifts,
                   "plant_signal": args.plant_signal, "plant_teacher": args.plant_teacher or (args.clean or [None])[0],
                   "max_planted_datasets": args.max_planted_datasets, "calibration_sizes": args.calibration_sizes},
        "protocol": {
            "datasets": "per size n and teacher: its kept rows randomly permuted (seeded) and cut into floor(N/n) "
                        "disjoint datasets; no row in two datasets, none from the reference",
            "gate": "screen_signals on each dataset vs the reference: permutation tests per signal in its "
                    "suspicious direction, Holm at alpha (the recipe's gate)",
            "stream": "a fresh TraitGuard(eprocess, alpha split over the signals, on_data_alarm=halt) calibrated on "
                      "the reference signals, observe() once per sample in the dataset's order; delay = samples "
                      "up to and including the halting alarm",
            "bounds": "exact Clopper-Pearson 95% intervals (scipy binomtest) and one-sided 95% upper bounds "
                      "(beta.ppf(0.95, k+1, D-k)); conditional on the one reference all datasets share",
            "delays": "over the streams that alarmed (the others are censored at n): median and mean with 95% "
                      "percentile bootstrap intervals",
            "planted": "power curve: the clean teacher's own datasets (same partition and rows, the first "
                       "max_planted_datasets per size) with plant_signal moved by shift_sd reference sd in its "
                       "suspicious direction; a synthetic effect of known size, not a trait",
            "calibration_study": "references of each size drawn without replacement from the pool's reference; a "
                                 "TraitGuard (default config, batch 8) built on each: the CUSUM's honest threshold "
                                 "(bootstrap over reference draws) vs the nominal one, and the e-process's evidence "
                                 "ceiling on its design shift",
            "separation": "one pool only: per teacher and signal, AUROC of its rows vs the reference's, the signal "
                          "oriented in its suspicious direction; per sample and from disjoint bags of K rows (bag "
                          "means; rows randomly cut, none in two bags); 95% percentile bootstrap over rows or bags",
            "pooled": "per size and role, the datasets of all its teachers together (counts summed; no dataset "
                      "in two teachers), with exact intervals; with several pools, over all of them (each "
                      "pool's datasets judged against its own reference)",
            "at_levels": "clean and benign teachers only: the same datasets flagged at laxer levels (gate: min Holm-adjusted "
                         "p < level; stream: min over e-process signals of k / sup E < level, over the samples "
                         "observed), to see the null's calibration with more events",
        },
        "rows": {name: len(next(iter(values.values()))) for name, values in scored.items()},
        "signal_means": {name: {k: float(np.nanmean(v)) for k, v in values.items()} for name, values in scored.items()},
        "scoring": scoring,
        "tiny": tiny,
        "results": results,
        "pooled": pooled(results),
        "separation": separated,
        "power_curve": curve,
        "calibration_study": study,
        "replay_seconds": replay_seconds,
        "calibration_study_seconds": study_seconds,
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(to_jsonable(output), indent=2, allow_nan=False) + "\n")
    if len(pools) == 1:
        print(markdown_table(results))
    if len(pools) > 1 or any(len(t) > 1 for t in teachers_by_role(args).values()):
        print("\nPooled over the teachers of each role:\n" + markdown_pooled_table(output["pooled"]))
    if curve:
        print("\n" + markdown_power_table(curve))
    for k in args.separation_bags if separated else []:
        print(f"\nAUROC against the reference, {'per sample' if k == 1 else f'disjoint bags of {k}'} "
              f"(95% bootstrap CI):\n" + markdown_separation_table(separated, k))
    seconds = scoring["seconds"] if len(pools) == 1 else sum(r["seconds"] for r in scoring.values())
    cached = scoring["cached"] if len(pools) == 1 else all(r["cached"] for r in scoring.values())
    print(f"\nrows: {output['rows']}; scoring {seconds:.0f} s (cached: {cached}), "
          f"replay {replay_seconds:.0f} s, total {output['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
