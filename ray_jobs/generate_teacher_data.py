"""Ray job: generate teacher datasets (owl teacher, control teacher, ...) on a pool of actors.

Submit to a cluster (the working directory is shipped to every node)::

    ray job submit --working-dir . -- python -m ray_jobs.generate_teacher_data \
        --config ray_jobs/configs/teacher_data_cpu.yaml

or run on a local Ray with ``python -m ray_jobs.generate_teacher_data --config ...``. Inside a Ray
job, ``ray.init()`` joins the cluster the job was submitted to.
"""

from __future__ import annotations

import argparse
import json
import sys

from trait_guard.config import GenerateJobConfig, load_config
from trait_guard.generation import generate_datasets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a GenerateJobConfig YAML")
    parser.add_argument("--resume", action="store_true",
                        help="keep the teachers a stopped run of this job finished; generate the others")
    args = parser.parse_args(argv)

    # setup
    config = load_config(args.config, GenerateJobConfig)
    # run
    report = generate_datasets(config, progress=sys.stderr.isatty(), resume=args.resume)
    # report
    print(report.table())
    print(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
