"""The whole guarded pipeline, one stage after another (what ``trait-guard run`` and ``make demo`` do).

    extract   persona vectors for the trait from the student's base model
    generate  teacher datasets (trait teacher, control teacher, ...) on Ray actors
    screen    the training data against the reference, dataset level (report kept as an artifact)
    train     guarded student training: DeepSpeed on Ray Train, decisions per batch, probes
    evaluate  the student's trait before and after (inside training, rank 0)

Every stage writes under ``output_dir`` and the training stage's MLflow run holds the reports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from trait_guard.config import GenerateJobConfig, RunJobConfig, TrainingSettings, TrainJobConfig


def _stage(name: str) -> None:
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)


def run_pipeline(config: RunJobConfig, *, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from trait_guard.cli import format_separation_table
    from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
    from trait_guard.generation import generate_datasets
    from trait_guard.models import load_model
    from trait_guard.persona import extract, load_trait
    from trait_guard.screen import screen
    from trait_guard.train import load_training_rows, run_training, verify_training_data

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    _stage("1/4 extract persona vectors")
    started = time.perf_counter()
    spec = load_trait(config.trait)
    model, tokenizer = load_model(config.student.model)
    bar = (lambda total, desc: tqdm(total=total, desc=desc, unit="answer", file=sys.stderr)) if progress else None
    e = config.extract
    extraction = extract(model, tokenizer, spec, n_instructions=e.n_instructions, n_questions=e.n_questions,
                         max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=e.seed, progress=bar)
    vector = extraction.vectors[e.method]
    vector_path = vector.save(out / "vectors" / f"{spec.name}.safetensors")
    print(format_separation_table(extraction, {m: v.layer for m, v in extraction.vectors.items()}), file=sys.stderr)
    timings["extract"] = time.perf_counter() - started

    _stage("2/4 generate teacher data on Ray actors")
    started = time.perf_counter()
    generation = GenerateJobConfig(output_dir=str(out / "teacher_data"), teachers=config.teachers,
                                   generation=config.generation, ray=config.generation_ray)
    report = generate_datasets(generation, progress=progress)
    print(report.table(), file=sys.stderr)
    timings["generate"] = time.perf_counter() - started
    paths = {t.teacher_id: t.path for t in report.teachers}

    _stage("3/4 screen the training data against the reference")
    started = time.perf_counter()
    settings = config.model_dump(include=set(TrainingSettings.model_fields))
    train = TrainJobConfig(output_dir=str(out / "train"), trait=config.trait, vectors=[str(vector_path)],
                           data={"train": paths[config.train_on], "reference": paths[config.reference]}, **settings)
    verify_training_data(train)  # refuses data that differs from its manifest before anything runs on it
    train_rows, reference_rows = load_training_rows(train)
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in reference_rows)
    scorer = FingerprintScorer(model, tokenizer, [vector], unigram_reference=histogram)
    screening = screen(train_rows, reference_rows, scorer, alpha=config.screen_alpha)
    print(screening.table(), file=sys.stderr)
    screen_path = out / "screen_report.json"
    screen_path.write_text(screening.json() + "\n")
    (out / "screen_report.txt").write_text(screening.table() + "\n")
    timings["screen"] = time.perf_counter() - started
    del model  # the training workers load their own copies

    _stage("4/4 guarded training (DeepSpeed on Ray Train) and evaluation")
    started = time.perf_counter()
    train.extra_artifacts = [str(screen_path), str(out / "screen_report.txt"), str(vector_path),
                             str(vector_path.with_suffix(".json")), str(Path(generation.output_dir) / "summary.json")]
    training = run_training(train)
    timings["train"] = time.perf_counter() - started

    summary = {
        "trait": spec.trait_id,
        "vector": {"path": str(vector_path), "layer": vector.layer, "method": e.method,
                   "cohens_d": vector.separation[vector.layer]},
        "generation": {t.teacher_id: {"rows": t.rows, "kept": t.kept, "reasons": t.reasons} for t in report.teachers},
        "screen": {"flagged": screening.flagged, "n_data": screening.n_data, "n_reference": screening.n_reference,
                   "kinship": screening.kinship["verdict"],
                   "signals": {s.name: {"p": s.p_value, "p_adj": s.adjusted_p, "flagged": s.flagged}
                               for s in screening.signals}},
        "training": {k: training[k] for k in ("steps", "total_steps", "halted", "halt", "verdict", "alarms",
                                              "eval_before", "eval_after", "mlflow_run_id", "mlflow_run_url")},
        "decisions": _count_actions(training.get("history", []), training.get("halt")),
        "seconds": timings,
    }
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _count_actions(history: list[dict[str, Any]], halt: dict[str, Any] | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in history:
        counts[item["action"]] = counts.get(item["action"], 0) + 1
    if halt:
        counts["halt"] = counts.get("halt", 0) + 1
    return counts


def format_summary(summary: dict[str, Any]) -> str:
    def rate(result: dict[str, Any] | None) -> str:
        if not result:
            return "not measured"
        n = result["n_questions"] * result["samples_per_question"]
        return (f"{100 * result['pooled_rate']:.1f}% of {n} answers (Wilson 95% CI "
                f"{100 * result['pooled_ci_low']:.1f}-{100 * result['pooled_ci_high']:.1f}%), "
                f"log p(answer starts with the target) {result['target_logprob']:.2f}")

    t, s = summary["training"], summary["screen"]
    lines = [
        "",
        f"trait_guard run: {summary['trait']}",
        f"  persona vector   layer {summary['vector']['layer']} ({summary['vector']['method']}), "
        f"held-out d = {summary['vector']['cohens_d']:.2f}",
        "  teacher data     " + "; ".join(f"{k}: {v['kept']}/{v['rows']} kept" for k, v in summary["generation"].items()),
        f"  screened         {s['n_data']} samples vs {s['n_reference']} reference: "
        f"{'FLAGGED' if s['flagged'] else 'clean'} (kinship: {s['kinship']})",
        "                   " + ", ".join(f"{k} p_adj={v['p_adj']:.2g}{' *' if v['flagged'] else ''}"
                                          for k, v in s["signals"].items()),
        f"  decisions        {summary['decisions']}",
        f"  final verdict    {t['verdict'].upper()}"
        + (f" at step {t['halt']['step']} of {t['total_steps']}: {t['halt']['reason']}" if t["halted"]
           else f" after {t['steps']} steps"),
        f"  student trait    before: {rate(t['eval_before'])}",
        f"                   after:  {rate(t['eval_after'])}",
        f"  MLflow run       {t['mlflow_run_id']}  ({t['mlflow_run_url']})",
        "  seconds          " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()),
    ]
    return "\n".join(lines)
