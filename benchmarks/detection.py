"""Detection benchmark: how well does each fingerprint separate owl-teacher data from control data?

On the SmolLM2 dataset pair (``trait-guard generate --config ray_jobs/configs/teacher_data_pair_1000.yaml``):

* every kept sample of the owl, control and second-control (other sampling seeds) sets is scored once
  by the base model (``FingerprintScorer``: nll, entropy, persona projection, divergence, unigram);
* each set is split into halves A and B by row index; A fits the combination (standardize on
  control-A, Fisher discriminant weights from A) and the unigram reference, B is scored only;
* AUROC of bag means (bags of K samples drawn from B) owl-vs-control, at K = 1, 4, 16, 64, for each
  signal, the combination, and the baselines: format/value statistics (number count, length, mean
  value, digit shares; each alone and their own combination) and the per-sample persona projection;
* the null: the same AUROCs for control-B vs second-control-B (no trait on either side);
* dataset-level screening p-values (owl vs control, second control vs control) and the false-flag
  rate of screening over resamples of the two control sets at alpha = 0.01;
* scoring throughput: ``FingerprintScorer.score_rows`` vs the bare forward pass on the same batches.

    python benchmarks/detection.py --data outputs/teacher_pair_1000 --vectors outputs/vectors/owl.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from trait_guard.chat import encode_conversations
from trait_guard.dataset import read_rows
from trait_guard.fingerprint import FingerprintScorer, TokenHistogram, format_features
from trait_guard.models import load_model
from trait_guard.persona import PersonaVector
from trait_guard.screen import screen

BAG_SIZES = (1, 4, 16, 64)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    n1, n0 = len(positive), len(negative)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bag_means(values: np.ndarray, k: int, n_bags: int, rng: np.random.Generator) -> np.ndarray:
    values = values[np.isfinite(values)]
    return np.array([rng.choice(values, size=k, replace=False).mean() for _ in range(n_bags)])


def bag_auroc(pos: np.ndarray, neg: np.ndarray, k: int, n_bags: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return auroc(bag_means(pos, k, n_bags, rng), bag_means(neg, k, n_bags, rng))


def fisher_weights(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Fisher discriminant direction from training halves (rows: samples, columns: standardized signals)."""
    covariance = np.cov(np.vstack([pos, neg]).T) + 1e-3 * np.eye(pos.shape[1])
    return np.linalg.solve(covariance, pos.mean(0) - neg.mean(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="outputs/teacher_pair_1000")
    parser.add_argument("--vectors", default="outputs/vectors/owl.safetensors")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-rows", type=int, default=1000)
    parser.add_argument("--bags", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/detection.json")
    args = parser.parse_args()

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    vector = PersonaVector.load(args.vectors, model=model)
    sets = {name: read_rows(Path(args.data) / f"{name}.parquet", kept_only=True).to_pylist()[: args.max_rows]
            for name in ("owl", "control", "control-b")}
    halves = {name: (rows[0::2], rows[1::2]) for name, rows in sets.items()}
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in halves["control"][0])
    scorer = FingerprintScorer(model, tokenizer, [vector], unigram_reference=histogram, batch_size=32)

    # throughput: scoring vs the bare forward on the same batches
    sample = sets["control"][:256]
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    for i in range(0, len(sample), 32):
        chunk = sample[i : i + 32]
        batch = encode_conversations(tokenizer, [r["prompt"] for r in chunk], [r["completion"] for r in chunk])
        model(**batch.model_inputs())
    forward_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer.score_table(sample)
    scoring_seconds = time.perf_counter() - t0

    signals = {name: [scorer.score_table(h) for h in pair] for name, pair in halves.items()}
    for name, pair in halves.items():
        for half, rows in zip(signals[name], pair, strict=True):
            half.update(format_features([r["completion"] for r in rows]))
    model_signals = [k for k in signals["owl"][1] if k in ("nll", "entropy", "divergence", "unigram") or k.startswith("proj:")]
    format_signals = ["n_numbers", "length", "mean_value"] + [f"digit_{d}" for d in range(10)]

    def matrix(half: dict, names: list[str], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        x = np.column_stack([np.asarray(half[n], float) for n in names])
        x = np.where(np.isfinite(x), x, mean)
        return (x - mean) / std

    def combined(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ref = np.column_stack([np.asarray(signals["control"][0][n], float) for n in names])
        mean, std = np.nanmean(ref, 0), np.nanstd(ref, 0) + 1e-9
        w = fisher_weights(matrix(signals["owl"][0], names, mean, std), matrix(signals["control"][0], names, mean, std))
        return tuple(matrix(signals[s][1], names, mean, std) @ w for s in ("owl", "control", "control-b"))

    scores = {n: tuple(np.asarray(signals[s][1][n], float) for s in ("owl", "control", "control-b"))
              for n in model_signals + format_signals}
    # orient each single signal by its direction on the A halves (an AUROC < 0.5 would otherwise hide signal)
    for n in list(scores):
        a_pos, a_neg = np.asarray(signals["owl"][0][n], float), np.asarray(signals["control"][0][n], float)
        if np.nanmean(a_pos) < np.nanmean(a_neg):
            scores[n] = tuple(-x for x in scores[n])
    scores["combined (model signals)"] = combined(model_signals)
    scores["combined (format baseline)"] = combined(format_signals)
    scores["combined (model + format)"] = combined(model_signals + format_signals)

    table = {}
    for name, (owl, control, control_b) in scores.items():
        table[name] = {
            "owl_vs_control": {k: bag_auroc(owl, control, k, args.bags, seed=k) for k in BAG_SIZES},
            "null_control_vs_control_b": {k: bag_auroc(control_b, control, k, args.bags, seed=100 + k)
                                          for k in BAG_SIZES},
        }

    # dataset-level screening on the B halves (already scored), and false flags over control resamples
    def screening(data: str, ref: str, data_idx=None, ref_idx=None):
        def pick(s, idx):  # the model signals only: format statistics are screening's own baselines
            return {k: np.asarray(s[k])[idx] if idx is not None else np.asarray(s[k]) for k in model_signals}
        d_rows = halves[data][1] if data_idx is None else [halves[data][1][i] for i in data_idx]
        r_rows = halves[ref][1] if ref_idx is None else [halves[ref][1][i] for i in ref_idx]
        return screen(d_rows, r_rows, scorer, alpha=0.01, n_permutations=2000,
                      data_signals=pick(signals[data][1], data_idx), reference_signals=pick(signals[ref][1], ref_idx))

    owl_report = screening("owl", "control")
    null_report = screening("control-b", "control")
    rng = np.random.default_rng(0)
    pooled = [("control", i) for i in range(len(halves["control"][1]))] + [("control-b", i) for i in range(len(halves["control-b"][1]))]
    false_flags = 0
    for _ in range(args.resamples):
        order = rng.permutation(len(pooled))
        first, second = order[: len(order) // 2], order[len(order) // 2 :]
        # both halves mix the two control sets: a true null
        rows = {"control": halves["control"][1], "control-b": halves["control-b"][1]}
        sig = {"control": signals["control"][1], "control-b": signals["control-b"][1]}

        def gather(idx, rows=rows, sig=sig):
            picked = [pooled[i] for i in idx]
            return ([rows[s][i] for s, i in picked],
                    {k: np.array([np.asarray(sig[s][k])[i] for s, i in picked]) for k in model_signals})
        d_rows, d_sig = gather(first)
        r_rows, r_sig = gather(second)
        report = screen(d_rows, r_rows, scorer, alpha=0.01, n_permutations=1000, data_signals=d_sig, reference_signals=r_sig)
        false_flags += report.flagged

    results = {
        "data": args.data, "model": args.model, "vector": {"path": args.vectors, "layer": vector.layer, "method": vector.method},
        "n_per_half": {k: [len(h) for h in v] for k, v in halves.items()},
        "bags": args.bags, "auroc": table,
        "screen_owl_vs_control": {s.name: {"p": s.p_value, "p_adj": s.adjusted_p, "d": s.effect_size}
                                  for s in owl_report.signals} | {"flagged": owl_report.flagged},
        "screen_control_b_vs_control": {s.name: {"p": s.p_value, "p_adj": s.adjusted_p, "d": s.effect_size}
                                        for s in null_report.signals} | {"flagged": null_report.flagged},
        "screen_baselines_owl": {s.name: {"p": s.p_value, "d": s.effect_size} for s in owl_report.baselines},
        "false_flag_rate_alpha_0.01": {"flagged": int(false_flags), "resamples": args.resamples},
        "entangled_tokens_owl": owl_report.tokens["overrepresented"][:10],
        "throughput": {"rows": len(sample), "forward_seconds": forward_seconds, "scoring_seconds": scoring_seconds,
                       "scoring_over_forward_throughput": forward_seconds / scoring_seconds},
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"{'signal':<28}" + "".join(f"  K={k:<3} (null)" for k in BAG_SIZES))
    for name, row in table.items():
        print(f"{name:<28}" + "".join(f"  {row['owl_vs_control'][k]:.2f} ({row['null_control_vs_control_b'][k]:.2f})"
                                      for k in BAG_SIZES))
    print(owl_report.table())
    print(null_report.table())
    print(json.dumps({k: results[k] for k in ("false_flag_rate_alpha_0.01", "throughput", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
