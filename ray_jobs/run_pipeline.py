"""Ray job: the whole guarded pipeline (extract -> generate -> screen -> guarded training -> evaluate).

    ray job submit --working-dir . -- python -m ray_jobs.run_pipeline --config ray_jobs/configs/run_cpu.yaml

The CPU config runs on the embedded SmolLM2-135M-Instruct; ray_jobs/configs/run_gpu.yaml is the GPU
cluster profile (Qwen2.5-7B-Instruct, LoRA, ZeRO-2, bf16).
"""

from __future__ import annotations

import argparse
import sys

from trait_guard.config import RunJobConfig, load_config
from trait_guard.pipeline import format_summary, run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a RunJobConfig YAML")
    args = parser.parse_args(argv)

    # setup
    config = load_config(args.config, RunJobConfig)
    # run
    summary = run_pipeline(config, progress=sys.stderr.isatty())
    # report
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
