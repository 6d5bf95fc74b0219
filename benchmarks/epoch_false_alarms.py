"""The guard's per-run false-alarm rate when training runs several epochs over the same clean rows.

The e-process's guarantee (P(any false data alarm in a run) <= alpha, Ville's inequality) holds for a
stream of distinct samples. An epoch loop shows it the same rows again; betting on a clean row k times
compounds that bet k times. This benchmark simulates many independent runs on clean data (a fresh
reference and a fresh set of training rows, both drawn from one distribution, per run) and counts the
runs with any data alarm, two ways on the same data:

* ``repeated``: every epoch's batch fed to the guard as it is (the guard before sample keys);
* ``keyed``: the batch carries each row's sample key (``guard.SAMPLE_KEY``), so the e-process bets on
  each distinct row once and counts the rest as seen again (what the recipe, ``GuardedStep`` and the
  transformers integrations do for rows with sample ids).

No model, no training: the guard's decisions only. Seconds on a laptop.

    .venv/bin/python benchmarks/epoch_false_alarms.py --runs 400 --epochs 10 \\
        --out benchmarks/results/epoch_false_alarms.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def simulate(runs: int, epochs: int, rows: int, reference_rows: int, alpha: float, seed: int) -> dict:
    import numpy as np

    from trait_guard.evaluate import exact_interval
    from trait_guard.guard import SAMPLE_KEY, GuardConfig, TraitGuard, sample_key

    keys = np.array([sample_key(f"row-{i}") for i in range(rows)])
    alarms = {"repeated": 0, "keyed": 0}
    alarm_epochs: dict[str, list[int]] = {"repeated": [], "keyed": []}
    for run in range(runs):
        rng = np.random.default_rng([seed, run])
        reference = {"proj:t": rng.normal(0.0, 1.0, reference_rows)}
        clean = {"proj:t": rng.normal(0.0, 1.0, rows)}  # the same distribution as the reference
        for mode in alarms:
            guard = TraitGuard(GuardConfig(signals=["proj:t"], alpha=alpha), reference, batch_size=rows)
            batch = clean if mode == "repeated" else {**clean, SAMPLE_KEY: keys}
            epoch = next((e + 1 for e in range(epochs) if guard.observe(batch).halt), None)
            if epoch is not None:
                alarms[mode] += 1
                alarm_epochs[mode].append(epoch)
    out = {}
    for mode, count in alarms.items():
        low, high = exact_interval(count, runs)
        out[mode] = {"runs_with_alarm": count, "runs": runs, "rate": count / runs, "ci95": [low, high],
                     "median_alarm_epoch": float(np.median(alarm_epochs[mode])) if alarm_epochs[mode] else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=400, help="independent clean runs (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs over the same rows (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=64, help="training rows per run, one batch (default: %(default)s)")
    parser.add_argument("--reference-rows", type=int, default=2000, help="reference rows (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05, help="the guard's per-run level (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    results = simulate(args.runs, args.epochs, args.rows, args.reference_rows, args.alpha, args.seed)
    record = {"settings": vars(args), "results": results, "seconds": round(time.perf_counter() - started, 1)}
    for mode, r in results.items():
        print(f"{mode:>9}: {r['runs_with_alarm']}/{r['runs']} runs with a false alarm = {r['rate']:.3f} "
              f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (alpha {args.alpha})")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
