"""Ray job: dataset-level screening of teacher data against the student base model's own data.

    ray job submit --working-dir . -- python -m ray_jobs.screen_teacher_data \
        --data outputs/teacher_data/owl.parquet --reference outputs/teacher_data/control.parquet \
        --vectors outputs/vectors/owl.safetensors --json outputs/screen_report.json

The same as `trait-guard screen` (one permutation test per fingerprint signal, Holm-corrected), run
where the data lives; on a GPU cluster the scoring runs as a Ray task with one GPU (``--num-gpus 1``).
Exit status 0 clean, 3 flagged, 2 bad input, like the CLI.
"""

from __future__ import annotations

import sys

#: the `trait-guard` command this job runs (its options, checks and exit status)
COMMAND = "screen"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the scoring task (0: in the driver)")
    args, rest = parser.parse_known_args(argv)

    from trait_guard.cli import main as cli_main

    command = [COMMAND, *rest]
    if not args.num_gpus:
        return cli_main(command)
    import ray

    ray.init()
    return ray.get(ray.remote(num_gpus=args.num_gpus)(cli_main).remote(command))


if __name__ == "__main__":
    sys.exit(main())
