"""Is subliminal transfer a property of the teacher's data, or of the student's training draw?

The red-team grid (``benchmarks/redteam.py``) ties one student seed to each replicate's data, so a
replicate that did not transfer could have data that do not carry the trait, or a student whose data
order and initialization missed it. This script retrains the unguarded student of chosen replicates on
the very same data files with other student seeds (``optim.seed``: data order and the LoRA
initialization), nothing else changed, and reports each student's panel log-odds shift beside the
grid's own. If the shift follows the data across seeds, a data signal could in principle predict it;
if it scatters within one dataset as much as between datasets, no data signal can.

    python benchmarks/student_seeds.py --config ray_jobs/configs/redteam_cpu.yaml --replicates 0 2 \\
        --student-seeds 100 200 --out benchmarks/results/student_seeds_cpu.json

Reads the grid's outputs (``output_dir`` of the config: the replicates' teacher data, the persona
vector and the base model's panel baselines must exist, i.e. the grid ran these replicates) and writes
its runs to ``<output_dir>_student_seeds/``. Runs already there are kept (rerun: delete the folder).
Control students are not retrained: their panel drift over the grid's replicates is about 0.01 nats
(docs/redteam.md), two orders below the shifts compared here; the table gives each run's raw shift.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from trait_guard.config import RedteamConfig, load_config
    from trait_guard.redteam import (
        base_model_baselines,
        grid_vector,
        measured_trait,
        run_metrics,
        teacher_data,
        train_config,
    )
    from trait_guard.train import run_training
    from trait_guard.version import reproducible_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the red-team grid's config (its output_dir is read)")
    parser.add_argument("--teacher", default="owl-adapter", help="the trait teacher whose students are retrained")
    parser.add_argument("--distill", default="logits")
    parser.add_argument("--replicates", nargs="+", type=int, required=True, help="grid replicates (data) to reuse")
    parser.add_argument("--student-seeds", nargs="+", type=int, required=True,
                        help="student seeds to train with (each replicate's own is its id, already in the grid)")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args(argv)

    config = load_config(args.config, RedteamConfig)
    grid_out = Path(config.output_dir)
    out = grid_out.with_name(grid_out.name + "_student_seeds")
    vector = grid_vector(config, grid_out)
    trait = measured_trait(config, args.teacher)
    rows = []
    for replicate in args.replicates:
        grid_result = grid_out / "runs" / f"{args.teacher}-{args.distill}-unguarded-s{replicate}" / "result.json"
        if not grid_result.is_file():
            print(f"{grid_result} is missing: run the grid's replicate {replicate} first", file=sys.stderr)
            return 1
        paths = teacher_data(config, grid_out, replicate, [args.teacher])  # existing files: nothing generated
        baseline = base_model_baselines(config, grid_out, [replicate])[(trait, replicate)]
        own = json.loads(grid_result.read_text())
        rows.append({"replicate": replicate, "student_seed": replicate, "source": "grid",
                     "panel_shift": own.get("panel_shift"), "logprob_shift": own.get("logprob_shift")})
        for seed in args.student_seeds:
            train = train_config(config, out, args.teacher, args.distill, "unguarded", replicate, paths, vector)
            train.optim.seed = seed
            name = f"{args.teacher}-{args.distill}-unguarded-s{replicate}-student{seed}"
            train.output_dir = str(out / "runs" / name)
            train.tracking.run_name = name
            result_path = Path(train.output_dir) / "result.json"
            if result_path.is_file():
                result = json.loads(result_path.read_text())
            else:
                started = time.perf_counter()
                result = run_metrics(run_training(train), baseline)
                result["seconds"] = time.perf_counter() - started
                result_path.write_text(json.dumps(result, indent=1) + "\n")
            rows.append({"replicate": replicate, "student_seed": seed, "source": "retrained",
                         "panel_shift": result.get("panel_shift"), "logprob_shift": result.get("logprob_shift"),
                         "seconds": result.get("seconds")})
            print(f"replicate {replicate}, student seed {seed}: panel shift {_fmt(result.get('panel_shift'))}, "
                  f"d log p {_fmt(result.get('logprob_shift'))}", flush=True)

    print("\n| replicate | student seed | panel shift | d log p(target) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicate']} | {r['student_seed']}{' (grid)' if r['source'] == 'grid' else ''} | "
              f"{_fmt(r['panel_shift'])} | {_fmt(r['logprob_shift'])} |")
    split = variance_split(rows)
    if split:
        print(f"\nbetween datasets: sd {split['between_sd']:.3f}; within a dataset (student seeds): pooled sd "
              f"{split['within_sd']:.3f}; ICC {split['icc']:.3f}; one-way ANOVA F {split['f']:.1f}, p {split['p']:.2g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": reproducible_command(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": args.config, "teacher": args.teacher, "distill": args.distill, "runs": rows,
        "variance_split": split}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def variance_split(rows: list[dict]) -> dict | None:
    """How the panel shift varies between datasets (replicates) and within one dataset (student seeds):
    a one-way random-effects ANOVA over the replicates with at least two students. ``icc`` is the share
    of the variance between datasets, (MSB - MSW) / (MSB + (k - 1) MSW) with k the mean students per
    dataset; ``f``/``p`` test that the datasets' means differ (scipy.stats.f_oneway)."""
    import numpy as np
    from scipy import stats

    groups: dict[int, list[float]] = {}
    for r in rows:
        if r["panel_shift"] is not None:
            groups.setdefault(r["replicate"], []).append(float(r["panel_shift"]))
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    if len(groups) < 2:
        return None
    values = list(groups.values())
    n, g = sum(len(v) for v in values), len(values)
    grand = np.mean(np.concatenate(values))
    msb = sum(len(v) * (np.mean(v) - grand) ** 2 for v in values) / (g - 1)
    msw = sum(((np.asarray(v) - np.mean(v)) ** 2).sum() for v in values) / (n - g)
    k = n / g
    f, p = stats.f_oneway(*values)
    return {"datasets": g, "students": n, "between_sd": float(np.std([np.mean(v) for v in values], ddof=1)),
            "within_sd": float(np.sqrt(msw)), "icc": float((msb - msw) / (msb + (k - 1) * msw)),
            "f": float(f), "p": float(p)}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


if __name__ == "__main__":
    sys.exit(main())
