"""Red-team benchmark: students trained on trait teachers' and control teachers' numbers, unguarded and
guarded (halt / mask / steer / reweight), sampled-token and logit distillation, over seeds.

    python benchmarks/redteam.py --config ray_jobs/configs/redteam_cpu.yaml          # SmolLM2 on CPU
    ray job submit --working-dir . -- python benchmarks/redteam.py --config ray_jobs/configs/redteam_gpu.yaml

Writes <output_dir>/results.json (every run and every cell), results.md (the table),
report/report.html (+ PNG plots), one MLflow run per training run and a summary run holding the
report. Interrupted? Run the same command again: finished runs are kept (runs/<name>/result.json).
--only runs a subset by run name (e.g. owl-logits-unguarded-s0), for a quick look.
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
    parser.add_argument("--only", nargs="+", metavar="RUN", help="run only these run names")
    args = parser.parse_args(argv)

    # setup
    config = with_overrides(load_config(args.config, RedteamConfig), {"output_dir": args.output_dir or None},
                            source=args.config)
    # run
    results = run_redteam(config, only=args.only)
    # report
    print(markdown_table(results["table"]))
    for goal, outcome in results["goals"].items():
        print(f"{goal}: {outcome}")
    print(f"report: {config.output_dir}/report/report.html; MLflow summary run {results.get('mlflow_run_id')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
