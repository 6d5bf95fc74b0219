"""Ray job: the whole guarded pipeline (extract -> generate -> screen -> guarded training -> evaluate).

    ray job submit --working-dir . -- python -m ray_jobs.run_pipeline --config ray_jobs/configs/run_cpu.yaml

The CPU config runs on the embedded SmolLM2-135M-Instruct; ray_jobs/configs/run_gpu.yaml is the GPU
cluster profile (Qwen2.5-7B-Instruct, LoRA, ZeRO-2, bf16).

The same as `trait-guard run` (its options and exit status: 4 when the guard halted a student, so
the Ray job fails unless --allow-halt; 2 with the fix on bad input).
"""

from __future__ import annotations

import sys

#: the `trait-guard` command this job runs (its options, checks and exit status)
COMMAND = "run"


def main(argv: list[str] | None = None) -> int:
    from trait_guard.cli import main as cli_main

    return cli_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
