"""Ray job: guarded student training (DeepSpeed workers on Ray Train, the guard deciding every batch).

    ray job submit --working-dir . -- python -m ray_jobs.guarded_training \
        --config ray_jobs/configs/train_cpu.yaml [--resume outputs/train/checkpoints/step_000010]

Inside a Ray job, ``ray.init()`` joins the cluster the job was submitted to; Ray Train places one
DeepSpeed rank per worker and restarts from the last checkpoint after a worker failure.

The same as `trait-guard train` (its options, checks and exit status), so the Ray job's status tells
the truth: 0 trained, 4 halted or gated by the guard (the job FAILS; --allow-halt: 0), 2 bad input
(the message names the fix), 128+N stopped by signal N (it prints the --resume command).
"""

from __future__ import annotations

import sys

#: the `trait-guard` command this job runs (its options, checks and exit status)
COMMAND = "train"


def main(argv: list[str] | None = None) -> int:
    from trait_guard.cli import main as cli_main

    return cli_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
