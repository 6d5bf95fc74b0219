"""Ray job: generate teacher datasets (owl teacher, control teacher, ...) on a pool of actors.

Submit to a cluster (the working directory is shipped to every node)::

    ray job submit --working-dir . -- python -m ray_jobs.generate_teacher_data \
        --config ray_jobs/configs/teacher_data_cpu.yaml [--signing-key keys/teacher.key] [--resume]

or run on a local Ray with ``python -m ray_jobs.generate_teacher_data --config ...``. Inside a Ray
job, ``ray.init()`` joins the cluster the job was submitted to.

The same as `trait-guard generate` (its options: --signing-key, --n-prompts, --output-dir,
--resume; exit status 2 with the fix on bad input).
"""

from __future__ import annotations

import sys

#: the `trait-guard` command this job runs (its options, checks and exit status)
COMMAND = "generate"


def main(argv: list[str] | None = None) -> int:
    from trait_guard.cli import main as cli_main

    return cli_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
