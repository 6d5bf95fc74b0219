"""Detection benchmark: how well does each fingerprint separate owl-teacher data from control data?

    .venv/bin/python benchmarks/detection.py --data outputs/teacher_pair_v2 --vectors outputs/vectors/owl.safetensors

Data: ``trait-guard generate --config ray_jobs/configs/teacher_data_pair_1000.yaml --output-dir
outputs/teacher_pair_v2`` (owl system-prompt teacher, control, and control-b: the control with other
sampling seeds; every row carries its generated ``completion_ids``, the teacher's top-k log-probs and
the log-prob of each generated token). The first ``--max-rows`` kept rows of each set are read with
every integrity check (``read_teacher_rows``).

Protocol:

* each set is split by row parity into halves A (fit) and B (measured). A fits the orientation of
  each signal, the standardization and Fisher weights of the combinations, and the unigram
  reference (a histogram of control-A, so control-A is scored leave-one-out: ``in_reference=True``);
  B is only scored;
* every row is scored once by the base model on the ids path (``chat.encode_rows``) with the default
  ``FingerprintScorer`` (divergence margin 0.1 nats): nll, entropy, persona projection, divergence,
  llr, unigram. The B halves are scored a second time with ``divergence_margin=0.0`` (the old rule,
  every top-1 disagreement) for the divergence rates and the margin-0 AUROC;
* divergence rates: pooled over tokens (divergent tokens / tokens) per set, at margin 0 and 0.1;
* AUROC owl-B vs control-B, and the null control-b-B vs control-B measured the same way:
  per sample (K = 1) with a 95% bootstrap CI; from disjoint bags (each B half partitioned into
  floor(n/K) bags of K, so no sample is in two bags) for K = 1, 4, 16 with 95% bootstrap CIs over
  bags and the mean over 20 random partitions; and, for comparison with the results before the data
  path fix only, the old overlapping-bag protocol (400 bags drawn from the pool of 500, K = 1, 4, 16,
  64), whose null spread grows with K;
* baselines: format/value statistics (number count, length, mean value, leading-digit shares), each
  alone and their Fisher combination;
* dataset-level screening (``screen``, permutation tests, Holm at 0.01) on the B halves, owl vs
  control and control-b vs control, with the default margin and with divergence at margin 0;
* a resample check of the screen on the pooled control halves (exchangeable by construction: it
  checks the code path, it does not measure a false-flag rate);
* scoring throughput: ``FingerprintScorer.score_table`` vs the bare forward on the same batches.

Writes ``benchmarks/results/detection.json`` (with the code version, the date and the wall time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trait_guard.chat import encode_rows
from trait_guard.dataset import read_teacher_rows
from trait_guard.files import to_jsonable
from trait_guard.fingerprint import (
    DIVERGENCE_MARGIN,
    FingerprintScorer,
    TokenHistogram,
    divergence_token_table,
    format_features,
)
from trait_guard.models import load_model
from trait_guard.persona import PersonaVector
from trait_guard.screen import screen
from trait_guard.version import code_version, reproducible_command

SETS = ("owl", "control", "control-b")
OVERLAPPING_BAG_SIZES = (1, 4, 16, 64)
DISJOINT_BAG_SIZES = (1, 4, 16)
FORMAT_SIGNALS = ["n_numbers", "length", "mean_value"] + [f"digit_{d}" for d in range(10)]
#: signals whose bag statistic is also computed token-pooled (sum over the bag's tokens / its tokens)
TOKEN_POOLED = ("divergence", "llr")
ALPHA = 0.01


# --------------------------------------------------------------------------------------------------
# AUROC and bags


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney), finite values."""
    from trait_guard.validation import auroc as mann_whitney_auroc

    return mann_whitney_auroc(positive, negative)


def bootstrap_ci(positive: np.ndarray, negative: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95% percentile bootstrap CI of the AUROC, resampling each class with replacement."""
    from trait_guard.validation import auroc_bootstrap_ci

    return auroc_bootstrap_ci(positive, negative, n_boot, seed)


def disjoint_bags(values: np.ndarray, weights: np.ndarray | None, k: int, rng: np.random.Generator) -> np.ndarray:
    """A random partition of the samples into floor(n/K) bags of K (the rest left out); per bag the mean of
    the finite values, weighted by ``weights`` (token counts: a token-pooled rate) when given."""
    order = rng.permutation(len(values))[: (len(values) // k) * k].reshape(-1, k)
    x = values[order]
    w = np.ones_like(x) if weights is None else weights[order].astype(float)
    w = np.where(np.isfinite(x), w, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(np.where(np.isfinite(x), x, 0.0) * w, 1) / w.sum(1)


def disjoint_bag_auroc(pos: np.ndarray, neg: np.ndarray, k: int, *, pos_w=None, neg_w=None, n_boot: int,
                       n_partitions: int, seed: int) -> dict[str, Any]:
    """AUROC of disjoint-bag statistics: the point estimate and a bootstrap CI over bags from one partition
    (seeded), and the mean/min/max over ``n_partitions`` random partitions."""
    rng = np.random.default_rng(seed)
    bags_pos, bags_neg = disjoint_bags(pos, pos_w, k, rng), disjoint_bags(neg, neg_w, k, rng)
    spread = [auroc(disjoint_bags(pos, pos_w, k, rng), disjoint_bags(neg, neg_w, k, rng)) for _ in range(n_partitions)]
    return {"auroc": auroc(bags_pos, bags_neg), "ci95": bootstrap_ci(bags_pos, bags_neg, n_boot, seed + 1),
            "n_bags": [len(bags_pos), len(bags_neg)],
            "partitions": {"n": n_partitions, "mean": float(np.mean(spread)), "min": float(np.min(spread)),
                           "max": float(np.max(spread))}}


def overlapping_bag_auroc(pos: np.ndarray, neg: np.ndarray, k: int, n_bags: int, seed: int) -> float:
    """The protocol before the data-path fix: ``n_bags`` bags of K drawn (each without replacement) from one
    pool; bags overlap more as K grows, so its null spreads wide at K = 64 (science review 1.3)."""
    rng = np.random.default_rng(seed)

    def bags(values: np.ndarray) -> np.ndarray:
        values = values[np.isfinite(values)]
        return np.array([rng.choice(values, size=k, replace=False).mean() for _ in range(n_bags)])

    return auroc(bags(pos), bags(neg))


def fisher_weights(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Fisher discriminant direction from training halves (rows: samples, columns: standardized signals)."""
    covariance = np.cov(np.vstack([pos, neg]).T) + 1e-3 * np.eye(pos.shape[1])
    return np.linalg.solve(covariance, pos.mean(0) - neg.mean(0))


# --------------------------------------------------------------------------------------------------
# Data and scoring


def load_halves(data: Path, tokenizer: Any, max_rows: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """Per set, its first ``max_rows`` kept rows (every integrity check), split by row parity into (A, B)."""
    halves = {}
    for name in SETS:
        rows = read_teacher_rows(data / f"{name}.parquet", tokenizer=tokenizer, limit=max_rows, role=name)
        halves[name] = (rows[0::2], rows[1::2])
    return halves


def throughput(model: Any, tokenizer: Any, scorer: FingerprintScorer, rows: list[dict], batch_size: int) -> dict:
    """Seconds for the bare forward pass over ``rows`` (the same ids-path batches) vs the full scoring."""
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        model(**encode_rows(tokenizer, rows[i : i + batch_size]).model_inputs())
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer.score_table(rows)
    scoring = time.perf_counter() - t0
    return {"rows": len(rows), "batch_size": batch_size, "forward_seconds": forward, "scoring_seconds": scoring,
            "scoring_over_forward_throughput": forward / scoring}


def score_set(scorer: FingerprintScorer, rows: list[dict], in_reference: bool = False) -> dict[str, Any]:
    """Per-sample signals (plus format features), per-row divergence-token masks and the divergent token ids."""
    masks: list[np.ndarray] = []
    counts: Counter = Counter()
    signals = scorer.score_table(rows, in_reference=in_reference, divergence_counts=counts, token_masks=masks)
    signals.update(format_features([r["completion"] for r in rows]))
    return {"signals": signals, "masks": masks, "divergent_tokens": counts}


def pooled_rate(masks: list[np.ndarray]) -> dict[str, float]:
    """Divergent tokens / tokens over all rows."""
    divergent, tokens = sum(int(m.sum()) for m in masks), sum(len(m) for m in masks)
    return {"rate": divergent / tokens if tokens else float("nan"), "divergent_tokens": divergent, "tokens": tokens}


# --------------------------------------------------------------------------------------------------
# Scores on B: single signals oriented on A, Fisher combinations fitted on A


def oriented(scored: dict, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per signal, the B-half scores of each set, negated where owl-A's mean is below control-A's (an
    AUROC below 0.5 would otherwise hide a signal that goes down)."""
    out = {}
    for n in names:
        a_pos = np.asarray(scored["owl"][0]["signals"][n], float)
        a_neg = np.asarray(scored["control"][0]["signals"][n], float)
        sign = -1.0 if np.nanmean(a_pos) < np.nanmean(a_neg) else 1.0
        out[n] = {s: sign * np.asarray(scored[s][1]["signals"][n], float) for s in SETS}
    return out


def combined(scored: dict, names: list[str]) -> dict[str, np.ndarray]:
    """Fisher combination of ``names``: standardized on control-A, weights from owl-A vs control-A, applied to B."""
    def matrix(signals: dict, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        x = np.column_stack([np.asarray(signals[n], float) for n in names])
        return (np.where(np.isfinite(x), x, mean) - mean) / std

    ref = np.column_stack([np.asarray(scored["control"][0]["signals"][n], float) for n in names])
    mean, std = np.nanmean(ref, 0), np.nanstd(ref, 0) + 1e-9
    w = fisher_weights(matrix(scored["owl"][0]["signals"], mean, std), matrix(scored["control"][0]["signals"], mean, std))
    return {s: matrix(scored[s][1]["signals"], mean, std) @ w for s in SETS}


def auroc_row(scores: dict[str, np.ndarray], weights: dict[str, np.ndarray] | None, args: argparse.Namespace,
              seed: int) -> dict[str, Any]:
    """Every AUROC measure of one signal: owl vs control and the null control-b vs control."""
    row: dict[str, Any] = {}
    for label, pos_set in (("owl_vs_control", "owl"), ("null_control_b_vs_control", "control-b")):
        pos, neg = scores[pos_set], scores["control"]
        pw, nw = (weights[pos_set], weights["control"]) if weights else (None, None)
        row[label] = {
            "per_sample": {"auroc": auroc(pos, neg), "ci95": bootstrap_ci(pos, neg, args.bootstrap, seed)},
            "disjoint_bags": {k: disjoint_bag_auroc(pos, neg, k, pos_w=pw, neg_w=nw, n_boot=args.bootstrap,
                                                    n_partitions=args.partitions, seed=seed + 10 * k)
                              for k in DISJOINT_BAG_SIZES if min(len(pos), len(neg)) >= 2 * k},
        }
        if weights is None:  # the old protocol had plain bag means only
            row[label]["overlapping_bags"] = {k: overlapping_bag_auroc(pos, neg, k, args.bags, seed + 100 * k)
                                              for k in OVERLAPPING_BAG_SIZES if min(len(pos), len(neg)) >= k}
        seed += 1000
    return row


# --------------------------------------------------------------------------------------------------
# Screening


def screen_summary(report: Any) -> dict[str, Any]:
    return {"flagged": report.flagged, "monitored": report.monitored,
            "signals": {s.name: {"p": s.p_value, "p_adj": s.adjusted_p, "d": s.effect_size,
                                 "data_mean": s.data_mean, "reference_mean": s.reference_mean} for s in report.signals},
            "baselines": {s.name: {"p": s.p_value, "d": s.effect_size} for s in report.baselines},
            "tokens": {"js_divergence": report.tokens["js_divergence"], "chi_square_p": report.tokens["chi_square_p"],
                       "overrepresented": report.tokens["overrepresented"][:10]},
            "notes": report.notes}


def pooled_control_resamples(halves: dict, scored: dict, model_signals: list[str], scorer: FingerprintScorer,
                             resamples: int) -> dict[str, Any]:
    """Screen random halves of the pooled control-B and control-b-B rows against each other."""
    pool = [(s, i) for s in ("control", "control-b") for i in range(len(halves[s][1]))]
    rng = np.random.default_rng(0)

    def gather(idx: np.ndarray) -> tuple[list[dict], dict[str, np.ndarray]]:
        picked = [pool[i] for i in idx]
        return ([halves[s][1][i] for s, i in picked],
                {k: np.array([scored[s][1]["signals"][k][i] for s, i in picked]) for k in model_signals})

    flagged = 0
    for _ in range(resamples):
        order = rng.permutation(len(pool))
        (d_rows, d_sig), (r_rows, r_sig) = gather(order[: len(pool) // 2]), gather(order[len(pool) // 2 :])
        flagged += screen(d_rows, r_rows, scorer, alpha=ALPHA, n_permutations=1000, data_signals=d_sig,
                          reference_signals=r_sig).flagged
    return {"flagged": int(flagged), "resamples": resamples,
            "note": "both sides are random halves of one pool (exchangeable by construction): checks the code "
                    "path, not the false-flag rate on independent benign data; the resamples are dependent"}


# --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="outputs/teacher_pair_v2")
    parser.add_argument("--vectors", default="outputs/vectors/owl.safetensors")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-rows", type=int, default=1000, help="kept rows per set (split into halves A and B)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bags", type=int, default=400, help="bags per side, overlapping-bag protocol")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples per CI")
    parser.add_argument("--partitions", type=int, default=20, help="random disjoint-bag partitions for the spread")
    parser.add_argument("--resamples", type=int, default=20, help="pooled-control screen resamples")
    parser.add_argument("--out", default="benchmarks/results/detection.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model)
    vector = PersonaVector.load(args.vectors, model=model)
    halves = load_halves(Path(args.data), tokenizer, args.max_rows)
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in halves["control"][0])
    scorer = FingerprintScorer(model, tokenizer, [vector], unigram_reference=histogram, batch_size=args.batch_size)
    scorer_margin0 = FingerprintScorer(model, tokenizer, [], batch_size=args.batch_size, divergence_margin=0.0)

    speed = throughput(model, tokenizer, scorer, halves["control"][1][:256], args.batch_size)
    t0 = time.perf_counter()
    # control-A is the unigram reference's own rows: scored leave-one-out
    scored = {s: tuple(score_set(scorer, rows, in_reference=(s == "control" and half == 0))
                       for half, rows in enumerate(halves[s])) for s in SETS}
    scored_margin0 = {s: score_set(scorer_margin0, halves[s][1]) for s in SETS}  # B halves only
    scoring_seconds = time.perf_counter() - t0
    print(f"scored in {scoring_seconds:.0f} s", flush=True)

    rates = {s: {"margin_0.1_all_rows": pooled_rate(scored[s][0]["masks"] + scored[s][1]["masks"]),
                 "margin_0.1_B": pooled_rate(scored[s][1]["masks"]),
                 "margin_0_B": pooled_rate(scored_margin0[s]["masks"])} for s in SETS}

    model_signals = [k for k in scored["owl"][1]["signals"]
                     if k in ("nll", "entropy", "divergence", "llr", "unigram") or k.startswith("proj:")]
    scores = oriented(scored, model_signals + FORMAT_SIGNALS)
    scores["divergence (margin 0)"] = {s: np.asarray(scored_margin0[s]["signals"]["divergence"], float) for s in SETS}
    scores["combined (model signals)"] = combined(scored, model_signals)
    scores["combined (format baseline)"] = combined(scored, FORMAT_SIGNALS)
    scores["combined (model + format)"] = combined(scored, model_signals + FORMAT_SIGNALS)
    n_tokens = {s: np.asarray(scored[s][1]["signals"]["n_tokens"], float) for s in SETS}
    table = {name: auroc_row(values, None, args, seed=i * 10_000) for i, (name, values) in enumerate(scores.items())}
    for i, name in enumerate(TOKEN_POOLED):  # bag statistic: the bag's tokens pooled
        table[f"{name} (token-pooled)"] = auroc_row(scores[name], n_tokens, args, seed=(100 + i) * 10_000)

    def run_screen(data: str, divergence_from: dict | None = None) -> Any:
        sig = {s: {k: np.asarray(scored[s][1]["signals"][k]) for k in model_signals} for s in (data, "control")}
        if divergence_from is not None:
            for s in sig:
                sig[s]["divergence"] = np.asarray(divergence_from[s]["signals"]["divergence"])
        return screen(halves[data][1], halves["control"][1], scorer, alpha=ALPHA, n_permutations=2000,
                      data_signals=sig[data], reference_signals=sig["control"])

    screens = {f"{d}_vs_control": {"margin_0.1": screen_summary(run_screen(d)),
                                    "margin_0": screen_summary(run_screen(d, scored_margin0))}
               for d in ("owl", "control-b")}
    resample_check = pooled_control_resamples(halves, scored, model_signals, scorer, args.resamples)

    means = {s: {h: {k: float(np.nanmean(np.asarray(v, float))) for k, v in scored[s][i]["signals"].items()}
                 for i, h in enumerate(("A", "B"))} for s in SETS}
    results = {
        "command": reproducible_command(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "data": args.data, "model": args.model,
        "vector": {"path": args.vectors, "trait": vector.trait, "layer": vector.layer, "method": vector.method},
        "protocol": {
            "halves": "row parity of the first max_rows kept rows: A (even) fits, B (odd) is measured",
            "unigram_reference": "histogram of control-A completion_ids; control-A scored leave-one-out",
            "orientation": "each single signal negated where owl-A mean < control-A mean; divergence (margin 0) "
                           "fixed 'up' (scored on B only)",
            "combinations": "Fisher discriminant on A, standardized on control-A, applied to B",
            "divergence_margin_default": DIVERGENCE_MARGIN,
            "per_sample": "AUROC on B (K = 1), 95% percentile bootstrap CI resampling samples",
            "disjoint_bags": "each B half randomly partitioned into floor(n/K) bags; 95% bootstrap CI over the "
                             "bags of one partition; mean/min/max over random partitions",
            "overlapping_bags": "the protocol before the data-path fix: bags of K drawn from the pool of B "
                                "(overlapping); its null spreads with K (science review 1.3)",
            "token_pooled": "bag statistic sum(value * n_tokens) / sum(n_tokens) (K = 1: per-sample)",
            "null": "control-b-B vs control-B, the same measures",
            "screen": f"permutation tests (2,000), Holm at alpha = {ALPHA}, B halves",
        },
        "args": vars(args),
        "n_per_half": {s: [len(h) for h in halves[s]] for s in SETS},
        "divergence_rates": rates,
        "llr_token_pooled_B": {s: float(np.nansum(scored[s][1]["signals"]["llr"] * n_tokens[s])
                                        / n_tokens[s][np.isfinite(scored[s][1]["signals"]["llr"])].sum())
                               for s in SETS},
        "signal_means": means,
        "auroc": table,
        "screen": screens,
        "pooled_control_resample_check": resample_check,
        "divergent_tokens_B": {s: {"margin_0.1": divergence_token_table(scored[s][1]["divergent_tokens"], tokenizer),
                                   "margin_0": divergence_token_table(scored_margin0[s]["divergent_tokens"], tokenizer)}
                               for s in SETS},
        "throughput": speed,
        "scoring_seconds": scoring_seconds,
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
    print_summary(results)


def print_summary(results: dict[str, Any]) -> None:
    def ci(entry: dict) -> str:
        return f"{entry['auroc']:.2f} [{entry['ci95'][0]:.2f},{entry['ci95'][1]:.2f}]"

    for s, r in results["divergence_rates"].items():
        print(f"divergence rate {s:<10} margin 0: {r['margin_0_B']['rate']:.4f}  margin 0.1: "
              f"{r['margin_0.1_B']['rate']:.4f} (B)  {r['margin_0.1_all_rows']['rate']:.4f} (all)")
    print(f"{'signal':<28} {'K=1 owl':>18} {'K=1 null':>18} "
          + " ".join(f"{'bags K=' + str(k) + ' owl':>18} {'null':>18}" for k in DISJOINT_BAG_SIZES))
    for name, row in results["auroc"].items():
        o, n = row["owl_vs_control"], row["null_control_b_vs_control"]
        print(f"{name:<28} {ci(o['per_sample']):>18} {ci(n['per_sample']):>18} "
              + " ".join(f"{ci(o['disjoint_bags'][k]):>18} {ci(n['disjoint_bags'][k]):>18}" for k in o["disjoint_bags"]))
    for name, by_margin in results["screen"].items():
        for margin, rep in by_margin.items():
            print(f"screen {name} ({margin}): flagged={rep['flagged']} "
                  + ", ".join(f"{k} p_adj={v['p_adj']:.3g}" for k, v in rep["signals"].items()))
    print(json.dumps({k: results[k] for k in ("pooled_control_resample_check", "throughput", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
