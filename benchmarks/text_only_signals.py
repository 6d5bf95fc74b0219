"""Signals that need no stored teacher log-probs, on a red-team grid's SmolLM2 data (issue 15).

For each replicate of a grid (``<grid>/teacher_data/s<r>/`` and its owl adapter ``<grid>/adapters/owl/s<r>``),
the base model scores three files with the signals of :mod:`trait_guard.trait_signals`:

* ``trait_llr:<trait>`` (S2): base model under the trait's positive vs negative instructions;
* ``teacher_llr`` (S3): the replicate's owl adapter (the teacher) vs the base model, read from the models;
* ``model_diff`` (S3): projection on the adapter-minus-base direction built from the reference's first
  prompts (as ``model_signals.model_diff`` builds it).

The files: the owl-adapter teacher's rows, the control teacher's (the base model, other seeds) and the
reference (the base model's own rows, the guard's reference), the first ``--train-rows`` /
``--reference-rows`` kept rows as the grid trains on them. None of these signals reads the stored
log-probs, so this is what the gate sees on data generated with ``top_k_logprobs: 0``.

Per dataset and signal: the gate's test (one-sided permutation test against the reference, Holm over
the three signals, :func:`trait_guard.screen.screen_signals`). Per signal: the per-sample AUROC of
owl-adapter rows against control rows (each row in one class once: independent samples), with a 95%
bootstrap CI. Across replicates: how many owl-adapter and control datasets the gate flags, exact CIs.

    .venv/bin/python benchmarks/text_only_signals.py --grid outputs/redteam_cpu --replicates 0 1 2 \\
        --out benchmarks/results/text_only_signals_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GATE_ALPHA = 0.01  # the training gate's default screen.alpha


def auroc_with_ci(positive: np.ndarray, negative: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The per-sample AUROC and its 95% percentile bootstrap CI (each class resampled)."""
    from trait_guard.validation import auroc, auroc_bootstrap_ci

    return {"auroc": auroc(positive, negative), "ci95": auroc_bootstrap_ci(positive, negative, n_boot, seed),
            "n": [int(np.isfinite(positive).sum()), int(np.isfinite(negative).sum())]}


def score_replicate(grid: Path, replicate: int, base: Any, tokenizer: Any, spec: Any, args: argparse.Namespace,
                    base_name: str) -> dict[str, Any]:
    """One replicate: the three files scored, the gate's tests per dataset, AUROC owl-adapter vs control."""
    from trait_guard.config import ModelSignalSettings
    from trait_guard.dataset import read_teacher_rows
    from trait_guard.screen import screen_signals
    from trait_guard.trait_signals import scorer_from_settings

    data = grid / "teacher_data" / f"s{replicate}"
    rows = {"owl-adapter": read_teacher_rows(data / "teachers" / "owl-adapter.parquet", limit=args.train_rows),
            "control": read_teacher_rows(data / "teachers" / "control.parquet", limit=args.train_rows),
            "reference": read_teacher_rows(data / "reference" / "reference.parquet", limit=args.reference_rows,
                                           role="reference")}
    # the scorer a training config's model_signals builds (the adapter merged into a copy of the base)
    settings = ModelSignalSettings(trait_llr=True, trait_llr_pairs=args.n_pairs,
                                   teacher_model=str(grid / "adapters" / "owl" / f"s{replicate}"), model_diff=True,
                                   model_diff_layer=args.model_diff_layer, model_diff_prompts=args.model_diff_prompts)
    scorer = scorer_from_settings(settings, base, tokenizer, base_name=base_name, spec=spec,
                                  batch_size=args.batch_size, neutral_prompts=[r["prompt"] for r in rows["reference"]])
    direction = scorer.model_diff
    started = time.perf_counter()
    signals = {name: scorer.score_table(side) for name, side in rows.items()}
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {"replicate": replicate, "rows": {k: len(v) for k, v in rows.items()},
                           "model_diff_layer": direction.layer, "model_diff_norm": direction.norm,
                           "score_seconds": round(seconds, 1), "gate": {}, "auroc_owl_vs_control": {},
                           "means": {side: {n: float(np.nanmean(v)) for n, v in s.items()} for side, s in signals.items()}}
    for dataset in ("owl-adapter", "control"):
        tests, flagged, _ = screen_signals(signals[dataset], signals["reference"], alpha=GATE_ALPHA,
                                           n_permutations=args.n_permutations, seed=replicate)
        out["gate"][dataset] = {"flagged": bool(flagged), "tests": {t.name: {
            "p": t.p_value, "p_adj": t.adjusted_p, "effect_size": t.effect_size, "flagged": t.flagged} for t in tests}}
    for name in scorer.names:
        out["auroc_owl_vs_control"][name] = auroc_with_ci(signals["owl-adapter"][name], signals["control"][name],
                                                          seed=replicate)
    return out


def summarize(replicates: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per signal across replicates: datasets flagged on it (owl-adapter, control) with exact CIs."""
    from trait_guard.evaluate import exact_interval

    summary = {}
    for name in names:
        row = {}
        for dataset in ("owl-adapter", "control"):
            k = sum(bool(r["gate"][dataset]["tests"].get(name, {}).get("flagged")) for r in replicates)
            low, high = exact_interval(k, len(replicates))
            row[dataset] = {"flagged": k, "datasets": len(replicates), "ci95": [low, high]}
        row["auroc"] = [r["auroc_owl_vs_control"][name]["auroc"] for r in replicates]
        summary[name] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    from trait_guard.models import load_model
    from trait_guard.trait_signals import MODEL_DIFF, TEACHER_LLR, trait_llr_name
    from trait_guard.traits import load_trait

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="a red-team grid's output folder (outputs/redteam_cpu)")
    parser.add_argument("--replicates", type=int, nargs="+", required=True, help="replicate ids to score")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the base model (default: %(default)s)")
    parser.add_argument("--trait", default="animal:owl", help="the watched trait (default: %(default)s)")
    parser.add_argument("--n-pairs", type=int, default=1, help="trait_llr instruction pairs (default: %(default)s)")
    parser.add_argument("--train-rows", type=int, default=96, help="kept rows per teacher, as the grid trains on")
    parser.add_argument("--reference-rows", type=int, default=128, help="kept reference rows, as the grid's guard")
    parser.add_argument("--model-diff-prompts", type=int, default=64)
    parser.add_argument("--model-diff-layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--n-permutations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", required=True, help="results JSON (rewritten after each replicate)")
    args = parser.parse_args(argv)

    grid = Path(args.grid)
    spec = load_trait(args.trait)
    base, tokenizer = load_model(args.model)
    names = [trait_llr_name(spec.trait_id), TEACHER_LLR, MODEL_DIFF]
    replicates = []
    for replicate in args.replicates:
        result = score_replicate(grid, replicate, base, tokenizer, spec, args, args.model)
        replicates.append(result)
        gate = {d: {n: f"{t['p_adj']:.2g}" for n, t in result["gate"][d]["tests"].items()} for d in result["gate"]}
        print(f"replicate {replicate} ({result['score_seconds']:.0f} s): gate p_adj {gate}; AUROC owl vs control "
              + ", ".join(f"{n} {v['auroc']:.2f}" for n, v in result["auroc_owl_vs_control"].items()), flush=True)
        record = {"settings": {k: v for k, v in vars(args).items()}, "replicates": replicates,
                  "summary": summarize(replicates, names)}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
