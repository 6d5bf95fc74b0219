"""Which layer of the student carries the trait? Persona-vector layers checked two ways, side by side.

For one trait (default: ``animal:owl``) this extracts persona vectors with both methods
(``response_mean``: difference of means averaged over answer tokens, the default for data projections;
``last_prompt``: at the last prompt token) and reports, per hidden-state index:

* ``d_q``: Cohen's d of positive vs negative answers on held-out *questions* (same instructions);
* ``d_instr``: Cohen's d on held-out questions answered under a held-out *instruction pair*
  (leave-one-pair-out): a direction that only encodes the wording of the system prompts scores
  high on ``d_q`` and near 0 here;
* the causal check: steer with ``c * v`` (``c`` a fraction of the layer's median residual norm) and
  measure the target's panel log-odds on one-word questions extraction never saw. ``slope`` is the
  least-squares slope in nats per unit ``c`` (``se``: its standard error across questions), ``rise`` the
  fraction of coefficient steps on which the log-odds goes up, ``eff`` the effect at the largest ``c``.

The layer chosen by steering is the monotone one (rises on every step) with the largest slope; the
separation layer (largest ``d_instr`` on the other half of the held-out questions) is reported beside
it. As a control, ``--random-controls`` random unit directions orthogonal to the vector are steered at
each chosen layer with the same coefficients: a perturbation of the same size that does not point along
the trait. Everything is written to JSON.

Examples::

    python benchmarks/persona_layers.py --tiny                # smoke run on a tiny random model, seconds
    python benchmarks/persona_layers.py                       # SmolLM2-135M-Instruct, all layers (slow on CPU)
    python benchmarks/persona_layers.py --layer-stride 2 --steer-questions 6   # cheaper sweep

Cost: extraction samples (instructions x questions x 2) answers twice; the sweep costs one prompt pass
and one short batched pass per (layer x nonzero coefficient x question x method).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from trait_guard.files import to_jsonable
from trait_guard.models import EMBEDDED_MODEL, load_model
from trait_guard.persona import (
    METHODS,
    ExtractionResult,
    SteeringSweep,
    extract,
)
from trait_guard.traits import load_trait
from trait_guard.version import reproducible_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model name or path (default: the embedded SmolLM2)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random-init Llama and small counts: checks the script runs, measures nothing")
    parser.add_argument("--trait", default="animal:owl", help="trait spec reference (its panel is the target)")
    parser.add_argument("--instructions", type=int, default=None, help="instruction pairs used (default: all)")
    parser.add_argument("--questions", type=int, default=None,
                        help="extraction and evaluation questions used, each (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length when sampling")
    parser.add_argument("--steer-questions", type=int, default=8,
                        help="held-out one-word questions (behavior_questions) the steering effect is scored on")
    parser.add_argument("--coefficients", default="-0.5,-0.25,0,0.25,0.5",
                        help="steering coefficients, as fractions of the layer's median residual norm")
    parser.add_argument("--layer-stride", type=int, default=1, help="sweep every k-th layer, ending at the last")
    parser.add_argument("--layers", default=None, help="comma-separated layers to sweep (overrides --layer-stride)")
    parser.add_argument("--random-controls", type=int, default=2,
                        help="random directions (orthogonal to the vector) steered at each chosen layer, as a "
                             "control for what any perturbation of that size does")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", default=None,
                        help="JSON output (default: benchmarks/results/persona_layers.json, or "
                             "persona_layers_tiny.json with --tiny)")
    return parser.parse_args(argv)


def progress_bar(total: int, description: str):
    """A progress bar on stderr, redrawn at most every 20 s (the runs are long; the logs stay short)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, file=sys.stderr, mininterval=20)


def load(args: argparse.Namespace):
    """The model under test, and settings shrunk to seconds for ``--tiny``."""
    if args.tiny:
        from trait_guard.testing import make_tiny_model

        args.instructions, args.questions = args.instructions or 2, args.questions or 4
        args.max_new_tokens, args.steer_questions = min(args.max_new_tokens, 6), min(args.steer_questions, 3)
        return make_tiny_model("llama", seed=args.seed)
    return load_model(args.model)


def format_table(result: ExtractionResult) -> str:
    """Per layer and method: d_q, d_instr, steering slope +- se, rise, effect at max c."""
    def num(x: float, fmt: str = "+.2f") -> str:
        return "-" if x is None or not math.isfinite(x) else format(x, fmt)

    header = "".join(f" | {'d_q':>5} {'d_instr':>7} {'slope':>6} {'se':>5} {'rise':>4} {'eff':>6}" for _ in METHODS)
    lines = [" " * 5 + "".join(f" | {m:<40}" for m in METHODS), f"{'layer':>5}{header}"]
    for row in result.table[1:]:
        cells = "".join(
            f" | {num(row[f'd_{m}'], '.2f'):>5} {num(row[f'd_instr_{m}'], '.2f'):>7} {num(row[f'slope_{m}']):>6} "
            f"{num(row[f'slope_se_{m}'], '.2f'):>5} {num(row[f'increasing_{m}'], '.0%'):>4} "
            f"{num(row[f'effect_{m}']):>6}" for m in METHODS)
        lines.append(f"{int(row['layer']):>5}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/persona_layers{'_tiny' if args.tiny else ''}.json")
    started = time.perf_counter()
    model, tokenizer = load(args)
    spec = load_trait(args.trait)
    sweep = SteeringSweep(
        coefficients=tuple(float(c) for c in args.coefficients.split(",")),
        layers=tuple(int(x) for x in args.layers.split(",")) if args.layers else None,
        layer_stride=args.layer_stride, n_questions=args.steer_questions, methods=METHODS,
        random_controls=args.random_controls, seed=args.seed)
    result = extract(model, tokenizer, spec, n_instructions=args.instructions, n_questions=args.questions,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, layer_choice="steering", steering=sweep,
                     progress=None if args.quiet else progress_bar)
    total, cpu = time.perf_counter() - started, time.process_time()
    print(f"\n{spec.trait_id} on {'tiny random Llama' if args.tiny else args.model}: judge {result.kept}")
    print(f"instruction hold-out: {result.instruction_holdout}\nsteering: {result.steering_note}\n")
    print(format_table(result))
    for method, choice in result.choices.items():
        print(f"\n{method}: uses layer {choice.layer} (by {choice.chosen_by}); separation layer "
              f"{choice.separation_layer} (by {choice.separation_by}-held-out d), steering layer "
              f"{choice.steering_layer}\n  {choice.reason}")
        for layer, curves in sorted(result.controls.get(method, {}).items()):  # the sweep's random directions
            slopes = ", ".join(f"{c.slope:+.2f} (rise {c.increasing_fraction:.0%}, eff {c.effect_at_max:+.2f})"
                               for c in curves)
            print(f"  random orthogonal directions at layer {layer}: slopes {slopes}")
    print(f"\nextraction + sweep {result.seconds:.0f} s (sweep {result.steering_seconds:.0f} s); total {total:.0f} s "
          f"wall, {cpu:.0f} s CPU on {torch.get_num_threads()} thread(s)")
    record = {"command": reproducible_command(), "model": "tiny-llama" if args.tiny else args.model,
              "trait": spec.trait_id, "settings": vars(args), "torch_threads": torch.get_num_threads(),
              "total_seconds": total, "cpu_seconds": cpu, **result.to_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_jsonable(record), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
