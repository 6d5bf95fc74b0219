"""Detection signals against the transfer they should predict, over a red-team grid's datasets (issue 15).

Reads a grid's output folder (``benchmarks/redteam.py``): per (teacher, replicate) the unguarded run's
panel log-odds shift and the gate's per-signal effect sizes from a guarded run on the same rows
(``trait_guard.validation``). Prints and writes, per signal, Spearman's rho with the measured transfer
(bootstrap 95% interval over datasets, and its permutation p: exact up to 8 datasets), the AUROC for
"transfer > --threshold nats" and the flag rates among transferring and benign datasets (exact
intervals). The transfer is the panel shift, or with ``--transfer excess`` its excess over the same
replicate's control student. No model is loaded; nothing is trained.

    .venv/bin/python benchmarks/signal_vs_transfer.py outputs/redteam_cpu \\
        --out benchmarks/results/signal_vs_transfer_cpu.json

A hypothesis read off some replicates is tested on others with ``--replicates`` (the datasets not seen
when it was formed), e.g. one teacher's datasets of replicates 7 and on against their excess:

    .venv/bin/python benchmarks/signal_vs_transfer.py outputs/redteam_cpu --teacher owl-adapter \\
        --transfer excess --replicates 7 8 9 10 11 --out benchmarks/results/signal_vs_transfer_holdout_cpu.json

A grid whose run folders were restored from a results JSON (``redteam.py --restore-runs``) lacks
the gate's per-run summaries; ``--add-datasets`` takes those datasets from an earlier output of this
script (e.g. benchmarks/results/signal_vs_transfer_cpu.json), and the grid's newer runs beside them.

A group test fixed before its data, e.g. "benign adapters score higher on unigram than owl adapters",
is ``--compare HIGH LOW``: per signal, the exact one-sided Mann-Whitney test that HIGH's datasets have
larger gate effect sizes than LOW's. A group is a teacher, or ``teacher@r,r`` for some of its
replicates (the datasets not seen when the test was fixed):

    .venv/bin/python benchmarks/signal_vs_transfer.py outputs/redteam_cpu --add-datasets \
        benchmarks/results/signal_vs_transfer_cpu.json --compare benign-adapter@4,5 owl-adapter \
        --out benchmarks/results/unigram_replication_cpu.json

Each replicate of the grid generates its own prompts, sampling seeds and adapters, so its datasets
are independent units. The rates and correlations are only as wide as the datasets run: the output
lists every dataset, so a reader can see how many there were of each teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def parse_group(text: str) -> tuple[str, list[int] | None]:
    """``teacher`` or ``teacher@r,r,...`` -> (teacher, replicates or None for all)."""
    teacher, _, replicates = text.partition("@")
    try:
        chosen = [int(r) for r in replicates.split(",")] if replicates else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a group is TEACHER or TEACHER@R,R (replicate numbers, "
                                         f"e.g. benign-adapter@4,5)") from None
    if not teacher:
        raise argparse.ArgumentTypeError(f"{text!r}: name a teacher before '@' (e.g. benign-adapter@4,5)")
    return teacher, chosen


def group_values(records: list[dict[str, Any]], group: tuple[str, list[int] | None], signal: str) -> list[tuple[int, float]]:
    """(replicate, gate effect size of ``signal``) of each dataset in ``group`` that has a finite one."""
    teacher, replicates = group
    return [(r["replicate"], r["signals"][signal]["effect_size"]) for r in records
            if r["teacher"] == teacher and (replicates is None or r["replicate"] in replicates)
            and signal in r["signals"] and r["signals"][signal]["effect_size"] is not None]


def compare_groups(records: list[dict[str, Any]], high: tuple[str, list[int] | None],
                   low: tuple[str, list[int] | None]) -> list[dict[str, Any]]:
    """Per signal both groups have: the exact one-sided Mann-Whitney test that ``high``'s datasets have
    larger gate effect sizes than ``low``'s (U counts the (high, low) pairs where high is larger, ties
    one half; p is exact over the group labels' arrangements, each dataset an independent unit)."""
    from scipy.stats import mannwhitneyu

    names = sorted({name for r in records for name in r["signals"]})
    rows = []
    for name in names:
        a, b = group_values(records, high, name), group_values(records, low, name)
        if not a or not b:
            continue
        x, y = [v for _, v in a], [v for _, v in b]
        test = mannwhitneyu(x, y, alternative="greater", method="exact")
        rows.append({"signal": name, "u": float(test.statistic), "u_max": len(x) * len(y), "p": float(test.pvalue),
                     "high": dict(a), "low": dict(b)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from trait_guard.validation import (
        TRANSFER_MEASURES,
        dataset_records,
        markdown_table,
        merge_dataset_records,
        signal_validation,
    )
    from trait_guard.version import portable_path, reproducible_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="a red-team output folder (holds runs/<name>/result.json and summary.json)")
    parser.add_argument("--distill", default="logits", help="which distillation's runs to read")
    parser.add_argument("--threshold", type=float, default=0.5, help="nats of the transfer measure that count as transfer")
    parser.add_argument("--teacher", help="only this teacher's datasets: does a signal order one teacher's datasets "
                                          "by the transfer each caused (not only tell the teachers apart)?")
    parser.add_argument("--replicates", type=int, nargs="+", metavar="R",
                        help="only these replicates' datasets (e.g. the ones a hypothesis was not read off)")
    parser.add_argument("--transfer", choices=TRANSFER_MEASURES, default="panel_shift",
                        help="the transfer to set the signals against: the student's panel shift, or its excess over "
                             "the same replicate's control student (leaves the controls out)")
    parser.add_argument("--add-datasets", nargs="+", metavar="JSON", default=[],
                        help="earlier outputs of this script whose datasets complete the grid's: those it lacks, or "
                             "holds without the gate's signals (runs restored with redteam.py --restore-runs)")
    parser.add_argument("--compare", nargs=2, type=parse_group, metavar=("HIGH", "LOW"),
                        help="also test, per signal, that HIGH's datasets have larger gate effect sizes than LOW's "
                             "(exact one-sided Mann-Whitney); a group is TEACHER or TEACHER@R,R (some replicates); "
                             "--teacher and --replicates do not apply to it")
    parser.add_argument("--out", help="results JSON (default: <grid>/signal_vs_transfer.json)")
    args = parser.parse_args(argv)

    records = dataset_records(args.grid, args.distill)
    for path in args.add_datasets:
        records = merge_dataset_records(records, json.loads(Path(path).read_text())["datasets"])
    compared = compare_groups(records, *args.compare) if args.compare else []
    if args.compare and not compared:
        print(f"--compare: no signal has datasets in both groups {args.compare} (a group's datasets need a "
              f"finished unguarded run and a guarded run's gate)", file=sys.stderr)
        return 1
    records = [r for r in records if args.teacher in (None, r["teacher"])
               and (args.replicates is None or r["replicate"] in args.replicates)]
    if not records:
        print(f"{args.grid} holds no finished unguarded {args.distill} run of that selection yet", file=sys.stderr)
        return 1
    rows = signal_validation(records, threshold=args.threshold, transfer=args.transfer)
    for r in records:
        shift = "-" if r["panel_shift"] is None else f"{r['panel_shift']:+.3f}"
        excess = "-" if r["excess"] is None else f"{r['excess']:+.3f}"
        print(f"{r['teacher']:>16} s{r['replicate']}: panel shift {shift}, excess {excess}, "
              f"gate {'FLAGGED' if r['gate_flagged'] else 'clean' if r['gate_flagged'] is False else '-'}")
    print()
    print(markdown_table(rows, args.threshold))
    if compared:
        high, low = (f"{t}@{','.join(map(str, r))}" if r else t for t, r in args.compare)
        print(f"\n{high} above {low} (exact one-sided Mann-Whitney on the gate's effect sizes):\n")
        print("| signal | U / max | p | " + high + " | " + low + " |\n|---|---|---|---|---|")
        for row in compared:
            print(f"| {row['signal']} | {row['u']:g} / {row['u_max']} | {row['p']:.3g} | "
                  f"{' '.join(f'{v:+.2f}' for v in row['high'].values())} | "
                  f"{' '.join(f'{v:+.2f}' for v in sorted(row['low'].values()))} |")
    out = Path(args.out or Path(args.grid) / "signal_vs_transfer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": reproducible_command(), "grid": portable_path(args.grid),
                               "added_datasets_from": [portable_path(p) for p in args.add_datasets],
                               "distill": args.distill, "teacher": args.teacher, "replicates": args.replicates,
                               "transfer": args.transfer, "threshold": args.threshold,
                               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "datasets": records, "signals": rows,
                               "compare": {"high": args.compare[0], "low": args.compare[1], "tests": compared}
                               if args.compare else None}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
