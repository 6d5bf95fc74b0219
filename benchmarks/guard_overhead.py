"""Benchmark: what the guard costs per training step on the embedded model.

Three ways to take the same training step (forward, backward, AdamW) on the same batches, interleaved
step by step so machine noise hits all of them alike:

* ``unguarded``: completion-only loss;
* ``guarded (precomputed)``: the production path of ``trait-guard train``: per-sample signals were
  scored once by the frozen base model before training (that cost is reported separately, as
  ``scoring_seconds_per_batch``), the guard reads them, decides, and the loss is weighted/masked;
* ``guarded (in-loop)``: signals computed from the training forward itself (hidden states captured
  by hooks, no second forward).

The probe (student drift on the trait's evaluation prompts, every N steps) is timed on its own.

    python benchmarks/guard_overhead.py --steps 12 --out benchmarks/results/guard_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from trait_guard.chat import encode_conversations
from trait_guard.families import NumberFamily
from trait_guard.fingerprint import FingerprintScorer
from trait_guard.guard import GuardConfig, TraitGuard
from trait_guard.integrations.torch_loop import GuardedStep
from trait_guard.losses import completion_loss
from trait_guard.models import load_model, model_identity
from trait_guard.persona import PersonaVector
from trait_guard.train import probe_projections
from trait_guard.traits import load_trait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--vectors", default=None, help="a persona vector file (default: a random direction)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/guard_overhead.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    identity = model_identity(model)
    if args.vectors:
        vector = PersonaVector.load(args.vectors, model=model)
    else:
        g = torch.Generator().manual_seed(0)
        vector = PersonaVector("animal:owl", identity, torch.randn(identity.num_layers + 1, identity.hidden_size,
                                                                    generator=g), layer=identity.num_layers // 2)
    rng = np.random.default_rng(0)
    prompts = NumberFamily().prompts(args.batch_size * (args.steps + 8), seed=0)
    rows = [{"prompt": p.user, "completion": ", ".join(str(x) for x in rng.integers(0, 999, rng.integers(4, 10))),
             "topk_ids": None} for p in prompts]
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    scorer = FingerprintScorer(model, tokenizer, [vector])
    t0 = time.perf_counter()
    reference = scorer.score_table([r for b in batches[-8:] for r in b])
    scoring_seconds_per_batch = (time.perf_counter() - t0) / 8
    for b in batches[:-8]:
        signals = scorer.score_rows(b)[0]
        for i, r in enumerate(b):
            r["signals"] = {k: float(v[i]) for k, v in signals.items() if k != "n_tokens"}

    guard_config = GuardConfig(signals=["proj:*", "nll"])
    precomputed = GuardedStep(TraitGuard(guard_config, reference, args.batch_size), model, [vector])
    in_loop = GuardedStep(TraitGuard(guard_config, reference, args.batch_size), model, [vector])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(mode: str, batch_rows: list[dict]) -> float:
        batch = encode_conversations(tokenizer, [r["prompt"] for r in batch_rows], [r["completion"] for r in batch_rows])
        started = time.perf_counter()
        if mode == "unguarded":
            loss = completion_loss(model(**batch.model_inputs()).logits, batch)
        else:
            guarded = precomputed if mode == "guarded (precomputed)" else in_loop
            use_rows = batch_rows if mode == "guarded (precomputed)" else [
                {k: v for k, v in r.items() if k != "signals"} for r in batch_rows]
            with guarded.capture():
                logits = model(**batch.model_inputs()).logits
            decision = guarded.decide(batch, logits, use_rows)
            loss = guarded.loss(logits, batch, decision)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    modes = ["unguarded", "guarded (precomputed)", "guarded (in-loop)"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    step("unguarded", batches[0])  # warm-up
    for i, b in enumerate(batches[1 : args.steps + 1]):
        for m in modes[i % 3:] + modes[: i % 3]:  # rotate the order every step
            times[m].append(step(m, b))
    model.eval()
    probes = load_trait("animal:owl").eval_questions[:10]
    t0 = time.perf_counter()
    for _ in range(3):
        probe_projections(model, tokenizer, probes, [vector])
    probe_seconds = (time.perf_counter() - t0) / 3

    median = {m: float(np.median(v)) for m, v in times.items()}
    results = {
        "model": args.model, "batch_size": args.batch_size, "steps": args.steps, "torch_threads": torch.get_num_threads(),
        "median_step_seconds": median,
        "ratio_guarded_precomputed_vs_unguarded": median["guarded (precomputed)"] / median["unguarded"],
        "ratio_guarded_in_loop_vs_unguarded": median["guarded (in-loop)"] / median["unguarded"],
        "scoring_seconds_per_batch_before_training": scoring_seconds_per_batch,
        "probe_seconds_10_prompts": probe_seconds,
        "all_step_seconds": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "all_step_seconds"}, indent=2))


if __name__ == "__main__":
    main()
