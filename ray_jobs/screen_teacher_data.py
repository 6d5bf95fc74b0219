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
from pathlib import Path

#: the `trait-guard` command this job runs (its options, checks and exit status)
COMMAND = "screen"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="every other option is `trait-guard screen`'s: "
                                            "python -m trait_guard.cli screen --help")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the scoring task (0: in the driver)")
    parser.add_argument("--json", help="write the screen report (JSON) here, on the machine that runs the job")
    args, rest = parser.parse_known_args(argv)

    from trait_guard.cli import main as cli_main

    command = [COMMAND, *rest]
    if not args.num_gpus:
        return cli_main(command + (["--json", args.json] if args.json else []))
    import ray

    ray.init()
    code, report = ray.get(ray.remote(num_gpus=args.num_gpus)(_screen_on_a_worker).remote(command, bool(args.json)))
    if args.json and report is not None:  # the task ran on another node: its files stay there
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(report, encoding="utf-8")
    return code


def _screen_on_a_worker(command: list[str], want_report: bool) -> tuple[int, str | None]:
    """`trait-guard screen` in a Ray task (on a GPU node): its exit status and, when asked, the JSON
    report's text, written there to a temporary file and sent back to the job's driver."""
    import tempfile

    from trait_guard.cli import main as cli_main

    if not want_report:
        return cli_main(command), None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "screen.json"
        code = cli_main([*command, "--json", str(path)])
        return code, path.read_text(encoding="utf-8") if path.exists() else None


if __name__ == "__main__":
    sys.exit(main())
