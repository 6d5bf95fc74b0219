"""Red-team benchmark: students trained on trait teachers' and control teachers' numbers, unguarded and
guarded (halt / mask / steer / reweight), sampled-token and logit distillation, over seeds.

    python benchmarks/redteam.py --config ray_jobs/configs/redteam_cpu.yaml          # SmolLM2 on CPU
    ray job submit --working-dir . -- python benchmarks/redteam.py --config ray_jobs/configs/redteam_gpu.yaml

Writes <output_dir>/results.json (every run and every cell), results.md (the table),
report/report.html (+ PNG plots), one MLflow run per training run and a summary run holding the
report. Interrupted? Run the same command again: finished runs are kept (runs/<name>/result.json).
--only runs a subset: run names or fnmatch patterns (owl-logits-unguarded-s0, '*-s[0-2]' for replicates
0-2); a piece prepares only its own replicates' adapters and data. --plan prints the pieces of about
--piece-hours each (whole replicates, estimated from the CPU profile's step time) with their --only
patterns, and exits without running anything. --report-only runs nothing either: it reads the
stored runs again (e.g. a grid run for days from a pinned checkout, read with newer statistics) and
rewrites the results, the report and the MLflow parent's copies. --restore-runs RESULTS_JSON writes
the runs a results JSON records (e.g. benchmarks/results/redteam_v2_cpu.json) back into the output
folder's runs/ (never over a stored run) and exits: a grid whose folders are gone continues from there.

    python benchmarks/redteam.py --config ray_jobs/configs/redteam_cpu.yaml --plan
    python benchmarks/redteam.py --config ray_jobs/configs/redteam_cpu.yaml --only '*-s0' '*-s1' '*-s2'
    python benchmarks/redteam.py --config ray_jobs/configs/redteam_cpu.yaml \
        --restore-runs benchmarks/results/redteam_v2_cpu.json
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from trait_guard.config import RedteamConfig, load_config, with_overrides
    from trait_guard.redteam import markdown_table, run_redteam

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a RedteamConfig YAML (ray_jobs/configs/redteam_*.yaml)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="run only these run names / fnmatch patterns")
    parser.add_argument("--plan", action="store_true", help="print the grid's pieces and their --only patterns")
    parser.add_argument("--piece-hours", type=float, default=3.0, help="the length of a piece for --plan")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: aggregate the stored runs again (runs of other code are kept and named)")
    parser.add_argument("--restore-runs", metavar="RESULTS_JSON",
                        help="write the runs recorded in a results JSON back into <output_dir>/runs/ and exit")
    args = parser.parse_args(argv)

    # setup
    config = with_overrides(load_config(args.config, RedteamConfig), {"output_dir": args.output_dir or None},
                            source=args.config)
    if args.plan:
        from trait_guard.redteam import plan_pieces

        for i, piece in enumerate(plan_pieces(config, args.piece_hours)):
            patterns = " ".join(f"'{p}'" for p in piece["only"])
            print(f"piece {i}: {piece['runs']} runs, ~{piece['hours']:.1f} h: --only {patterns}")
        return 0
    if args.restore_runs:
        from trait_guard.redteam import restore_runs

        outcome = restore_runs(config, args.restore_runs)
        print(", ".join(f"{len(names)} {what.replace('_', ' ')}" for what, names in outcome.items())
              + f" (runs under {config.output_dir}/runs)")
        for what in ("not_in_grid", "other_design"):
            if outcome[what]:
                print(f"{what.replace('_', ' ')}: {' '.join(outcome[what])}")
        return 0
    # run (or only read what ran)
    if args.report_only:
        from trait_guard.redteam import report_redteam

        results = report_redteam(config)
        if results["report_only"]["runs_from_other_code_or_settings"]:
            print(f"{len(results['report_only']['runs_from_other_code_or_settings'])} run(s) recorded by other code "
                  "or settings (kept; see results.json report_only)")
    else:
        results = run_redteam(config, only=args.only)
    # report
    print(markdown_table(results["table"]))
    for goal, outcome in results["goals"].items():
        print(f"{goal}: {outcome}")
    print(f"report: {config.output_dir}/report/report.html; MLflow summary run {results.get('mlflow_run_id')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
