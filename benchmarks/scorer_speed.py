"""Benchmark: FingerprintScorer.score_table against the plain computation it replaced, on real rows.

    python benchmarks/scorer_speed.py --data outputs/redteam_cpu/teacher_data/s11/teachers/control.parquet \
        --out benchmarks/results/scorer_speed.json

The plain computation (``plain_scores`` below, the scorer as it was before 2026-12-02): rows batched
in file order, the whole sequence's logits ``[batch, seq, vocab]``, a log-softmax over every position,
the response positions picked afterwards. The scorer now batches rows of similar length, keeps the
logits (``logits_to_keep``) and activations from the last position before the earliest response on,
and normalizes the response positions only. Both score the same rows with the same model on one
torch thread, alternating (plain, scorer, plain, scorer, ...) so that a shared machine's load falls
on both alike; the ratio is taken within one run. The largest difference between the two on every
signal is reported beside it (float rounding only: they compute the same quantities).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def plain_scores(model: Any, tokenizer: Any, rows: list[dict[str, Any]], vectors: list[Any],
                 batch_size: int) -> dict[str, np.ndarray]:
    """nll, entropy, n_tokens and the persona projections, computed the plain way (file order, every
    position's logits normalized)."""
    import torch

    from trait_guard.activations import masked_mean, record_activations
    from trait_guard.chat import encode_rows
    from trait_guard.fingerprint import signal_name

    layers = sorted({v.layer for v in vectors})
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(rows), batch_size):
        batch = encode_rows(tokenizer, rows[start : start + batch_size])
        with torch.no_grad(), record_activations(model, layers) as acts:
            logits = model(**batch.model_inputs()).logits.float()
            response = batch.response_mask[:, 1:].float()
            logprobs = logits[:, :-1].log_softmax(-1)
            nll = -logprobs.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            entropy = -(logprobs.exp() * logprobs).sum(-1)
            n = response.sum(1)
            part = {"nll": (nll * response).sum(1) / n, "entropy": (entropy * response).sum(1) / n, "n_tokens": n}
            for vector in vectors:
                part[signal_name(vector)] = vector.project(masked_mean(acts[vector.layer][0], batch.response_mask))
        for name, values in part.items():
            out.setdefault(name, []).append(values.numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a teacher Parquet file (its kept rows are scored)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--vectors", nargs="*", default=[], help="persona vectors to project on (proj:<trait>)")
    parser.add_argument("--rows", type=int, default=160, help="rows scored (the first of the file)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds (plain, scorer)")
    parser.add_argument("--out", default="benchmarks/results/scorer_speed.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from trait_guard.dataset import read_teacher_rows
    from trait_guard.fingerprint import FingerprintScorer
    from trait_guard.models import load_model
    from trait_guard.persona import PersonaVector
    from trait_guard.version import code_version, reproducible_command

    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model, device="cpu")
    vectors = [PersonaVector.load(v, model=model) for v in args.vectors]
    rows = read_teacher_rows(Path(args.data), tokenizer=tokenizer, role="data", max_completion_tokens=1024)
    rows = [{k: r[k] for k in ("prompt", "completion", "completion_ids")} for r in rows[: args.rows]]
    scorer = FingerprintScorer(model, tokenizer, vectors, batch_size=args.batch_size)
    seconds: dict[str, list[float]] = {"plain": [], "scorer": []}
    results: dict[str, dict[str, np.ndarray]] = {}
    for round_ in range(args.repeats):
        for name, score in (("plain", lambda: plain_scores(model, tokenizer, rows, vectors, args.batch_size)),
                            ("scorer", lambda: scorer.score_table(rows))):
            started = time.perf_counter()
            results[name] = score()
            seconds[name].append(time.perf_counter() - started)
            print(f"round {round_} {name}: {seconds[name][-1]:.1f} s", file=sys.stderr, flush=True)
    difference = {name: float(np.nanmax(np.abs(results["scorer"][name] - values)))
                  for name, values in results["plain"].items()}
    rate = {name: len(rows) / float(np.median(values)) for name, values in seconds.items()}
    output = {
        "command": reproducible_command(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "machine": {"platform": platform.platform(), "torch_threads": 1},
        "config": {"data": args.data, "model": args.model, "vectors": args.vectors, "rows": len(rows),
                   "batch_size": args.batch_size, "repeats": args.repeats},
        "seconds": seconds,
        "rows_per_second_median": rate,
        "speedup": rate["scorer"] / rate["plain"],
        "max_abs_difference": difference,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=2) + "\n")
    print(f"plain {rate['plain']:.2f} rows/s, scorer {rate['scorer']:.2f} rows/s: {output['speedup']:.2f}x; "
          f"largest difference {max(difference.values()):.2e} -> {args.out}")


if __name__ == "__main__":
    main()
