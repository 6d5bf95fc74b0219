"""The whole guarded pipeline, one stage after another (what ``trait-guard run`` and ``make demo`` do).

    extract   persona vectors for the trait from the student's base model
    generate  teacher datasets (trait teacher, control teacher, ...) on Ray actors
    screen    each training set against the reference, dataset level (report kept as an artifact);
              the signals go to a cache, where the training run's gate reads the very same values
    train     guarded student training: DeepSpeed on Ray Train; a flagged screen gates it before the
              first update (screen.gate), else decisions per batch and probes
    evaluate  the student's trait before and after (inside training, rank 0)

Every stage writes under ``output_dir`` and the training stage's MLflow run holds the reports. Run
inside the user's own ``mlflow.start_run()`` (or with ``MLFLOW_RUN_ID`` set), each training run is a
child of that run, also when it trains on Ray workers (:func:`trait_guard.tracking.forward_context`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from trait_guard.config import (
    GenerateJobConfig,
    RunJobConfig,
    TrainingSettings,
    TrainJobConfig,
    with_overrides,
)


def _stage(name: str) -> None:
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)


def run_pipeline(config: RunJobConfig, *, progress: bool = True, signing_key: Any = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from trait_guard.generation import generate_datasets
    from trait_guard.models import load_model
    from trait_guard.persona import extract, format_separation_table
    from trait_guard.tracking import forward_context
    from trait_guard.train import run_training
    from trait_guard.traits import load_trait
    from trait_guard.version import code_version

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    _stage("1/4 extract persona vectors")
    started = time.perf_counter()
    spec = load_trait(config.trait)
    model, tokenizer = load_model(config.student.model, device=config.extract.device, dtype=config.extract.dtype)
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
    report = generate_datasets(generation, progress=progress, signing_key=signing_key)
    print(report.table(), file=sys.stderr)
    timings["generate"] = time.perf_counter() - started
    paths = {t.teacher_id: t.path for t in report.teachers}

    _stage("3/4 screen each training set against the reference (the gate before training)")
    started = time.perf_counter()
    settings = config.model_dump(include=set(TrainingSettings.model_fields))
    # the caller's MLflow run, store and experiment, which the Ray Train workers cannot see themselves
    settings["tracking"] = forward_context(config.tracking).model_dump()
    jobs = []
    for teacher_id in [config.train_on, *config.also_train_on]:
        name = "train" if teacher_id == config.train_on else f"train-{teacher_id}"
        train = TrainJobConfig(output_dir=str(out / name), trait=config.trait, vectors=[str(vector_path)],
                               data={"train": paths[teacher_id], "reference": paths[config.reference]},
                               signals_cache=str(out / "signals_cache"), **settings)
        screening, screen_files = _screen(train, model, tokenizer, vector, out / f"screen_{teacher_id}")
        jobs.append((teacher_id, train, screening, screen_files))
    timings["screen"] = time.perf_counter() - started
    del model  # the training workers load their own copies

    _stage("4/4 guarded training (DeepSpeed on Ray Train) and evaluation")
    started = time.perf_counter()
    trainings = []
    for teacher_id, train, screening, screen_files in jobs:
        print(f"--- training on '{teacher_id}' (screen: {'FLAGGED' if screening.flagged else 'clean'}; "
              f"gate {'on' if train.screen.gate else 'off'})", file=sys.stderr, flush=True)
        artifacts = [*map(str, screen_files), str(vector_path), str(vector_path.with_suffix(".json")),
                     str(Path(generation.output_dir) / "summary.json")]
        train = with_overrides(train, {"extra_artifacts": artifacts}, source=f"training on '{teacher_id}'")
        training = run_training(train)
        trainings.append(_training_record(teacher_id, screening, training))
    timings["train"] = time.perf_counter() - started

    summary = {
        "trait": spec.trait_id,
        "vector": {"path": str(vector_path), "layer": vector.layer, "method": e.method,
                   "cohens_d": vector.separation[vector.layer]},
        "generation": {t.teacher_id: {"rows": t.rows, "kept": t.kept, "reasons": t.reasons} for t in report.teachers},
        "trainings": trainings,
        "seconds": timings,
        "code_version": code_version(),
    }
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _screen(train: TrainJobConfig, model: Any, tokenizer: Any, vector: Any, stem: Path) -> tuple[Any, list[Path]]:
    """Screen one training set against the reference: score both once with the frozen base model (kept in
    the signals cache, where the training run's gate finds the very same signals), test, report."""
    from trait_guard import setup_signals
    from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
    from trait_guard.models import model_identity
    from trait_guard.screen import screen
    from trait_guard.train import load_training_rows, signals_cache_path, verify_training_data

    verify_training_data(train)  # refuses data that differs from its manifest before anything runs on it
    train_rows, reference_rows = load_training_rows(train, tokenizer)
    histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in reference_rows)
    scorer = FingerprintScorer(model, tokenizer, [vector], unigram_reference=histogram)
    signals = setup_signals.score_setup(scorer, train_rows, reference_rows)
    setup_signals.save(signals_cache_path(train, model_identity(model), scorer.divergence_margin), signals)
    screening = screen(train_rows, reference_rows, scorer, alpha=train.screen.alpha,
                       n_permutations=train.screen.n_permutations, seed=train.guard.seed,
                       data_signals=signals.train, reference_signals=signals.reference)
    print(screening.table(), file=sys.stderr)
    files = [stem.with_suffix(".json"), stem.with_suffix(".txt")]
    files[0].write_text(screening.json() + "\n")
    files[1].write_text(screening.table() + "\n")
    return screening, files


def _training_record(teacher_id: str, screening: Any, training: dict[str, Any]) -> dict[str, Any]:
    return {
        "teacher": teacher_id,
        "screen": {"flagged": screening.flagged, "monitored": screening.monitored, "n_data": screening.n_data,
                   "n_reference": screening.n_reference, "kinship": screening.kinship["verdict"],
                   "signals": {s.name: {"p": s.p_value, "p_adj": s.adjusted_p, "flagged": s.flagged}
                               for s in screening.signals}},
        "training": {k: training.get(k) for k in ("steps", "updates", "total_steps", "halted", "halt", "verdict",
                                                  "gate", "alarms", "eval_before", "eval_after", "mlflow_run_id",
                                                  "mlflow_run_url")},
        "decisions": _count_actions(training.get("history", []), training.get("halt")),
    }


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

    lines = [
        "",
        f"trait_guard run: {summary['trait']}",
        f"  persona vector   layer {summary['vector']['layer']} ({summary['vector']['method']}), "
        f"held-out d = {summary['vector']['cohens_d']:.2f}",
        "  teacher data     " + "; ".join(f"{k}: {v['kept']}/{v['rows']} kept" for k, v in summary["generation"].items()),
    ]
    for record in summary["trainings"]:
        s, t = record["screen"], record["training"]
        halt = t.get("halt") or {}
        if t["halted"] and halt.get("gate"):
            outcome = f"GATED before the first update ({t['updates']} updates): {halt['reason']}"
        elif t["halted"]:
            outcome = f"HALTED at step {halt['step']} of {t['total_steps']} ({t['updates']} updates): {halt['reason']}"
        else:
            outcome = f"{t['verdict'].upper()} after {t['steps']} steps"
        screen_verdict = "FLAGGED" if s["flagged"] else "clean" if s["monitored"] else "UNMONITORED"
        lines += [
            f"  student on '{record['teacher']}'",
            f"    screened       {s['n_data']} samples vs {s['n_reference']} reference: {screen_verdict} "
            f"(kinship: {s['kinship']})",
            "                   " + ", ".join(f"{k} p_adj={v['p_adj']:.2g}{' *' if v['flagged'] else ''}"
                                              for k, v in s["signals"].items()),
            f"    decisions      {record['decisions']}",
            f"    verdict        {outcome}",
            f"    trait before   {rate(t['eval_before']) if t['eval_before'] else 'not measured (no update to measure)'}",
            f"    trait after    {rate(t['eval_after']) if t['eval_after'] else 'not measured (no update to measure)'}",
            f"    MLflow run     {t['mlflow_run_id']}  ({t['mlflow_run_url']})",
        ]
    lines.append("  seconds          " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)
