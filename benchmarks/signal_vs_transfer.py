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
    parser.add_argument("--out", help="results JSON (default: <grid>/signal_vs_transfer.json)")
    args = parser.parse_args(argv)

    records = dataset_records(args.grid, args.distill)
    for path in args.add_datasets:
        records = merge_dataset_records(records, json.loads(Path(path).read_text())["datasets"])
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
    out = Path(args.out or Path(args.grid) / "signal_vs_transfer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": reproducible_command(), "grid": portable_path(args.grid),
                               "added_datasets_from": [portable_path(p) for p in args.add_datasets],
                               "distill": args.distill, "teacher": args.teacher, "replicates": args.replicates,
                               "transfer": args.transfer, "threshold": args.threshold,
                               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "datasets": records, "signals": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
