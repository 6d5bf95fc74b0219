"""Ray job: guarded student training (DeepSpeed workers on Ray Train, the guard deciding every batch).

    ray job submit --working-dir . -- python -m ray_jobs.guarded_training \
        --config ray_jobs/configs/train_cpu.yaml [--resume outputs/train/checkpoints/step_000010]

Inside a Ray job, ``ray.init()`` joins the cluster the job was submitted to; Ray Train places one
DeepSpeed rank per worker and restarts from the last checkpoint after a worker failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from trait_guard.config import TrainJobConfig, load_config, with_overrides
from trait_guard.train import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a TrainJobConfig YAML")
    parser.add_argument("--resume", help="a checkpoint folder to continue from")
    args = parser.parse_args(argv)

    # setup
    config = with_overrides(load_config(args.config, TrainJobConfig), {"resume_from": args.resume or None},
                            source=args.config)
    # run
    summary = run_training(config)
    # report
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
