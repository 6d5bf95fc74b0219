"""The whole guarded pipeline, one stage after another (what ``trait-guard run`` and ``make demo`` do).

    extract   persona vectors for the trait from the student's base model (a Ray task)
    generate  teacher datasets (trait teacher, control teacher, ...): Ray Data on teacher actors
    score     every training and reference row, once, by the student's frozen base model on a Ray
              Data stage of scoring actors (trait_guard.scoring); the signals go to a cache, where
              the screen and the training run's gate read the very same values
    screen    each training set against the reference, dataset level (report kept as an artifact)
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
    ExtractSettings,
    GenerateJobConfig,
    RunJobConfig,
    TrainingSettings,
    TrainJobConfig,
    with_overrides,
)


def _stage(name: str) -> None:
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)


def run_pipeline(config: RunJobConfig, *, progress: bool = True, signing_key: Any = None) -> dict[str, Any]:
    from trait_guard.extras import ray  # a missing Ray names its extra
    from trait_guard.generation import generate_datasets
    from trait_guard.tracking import forward_context
    from trait_guard.train import run_training, student_tokenizer
    from trait_guard.traits import load_trait
    from trait_guard.version import code_version

    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    spec = load_trait(config.trait)
    tokenizer = student_tokenizer(config.student.model)  # the driver's only model file: a wrong model fails now
    if not ray.is_initialized():
        ray.init(address=config.generation_ray.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)

    _stage(f"1/4 extract persona vectors (a Ray task: {_placement(config.scoring)})")
    started = time.perf_counter()
    vector_path, separation_table = _extract_on_ray(config, out / "vectors" / f"{spec.name}.safetensors")
    print(separation_table, file=sys.stderr)
    from trait_guard.persona import PersonaVector

    vector = PersonaVector.load(vector_path)
    timings["extract"] = time.perf_counter() - started

    _stage("2/4 generate teacher data (Ray Data on teacher actors)")
    started = time.perf_counter()
    generation = GenerateJobConfig(output_dir=str(out / "teacher_data"), teachers=config.teachers,
                                   generation=config.generation, ray=config.generation_ray)
    report = generate_datasets(generation, progress=progress, signing_key=signing_key)
    print(report.table(), file=sys.stderr)
    timings["generate"] = time.perf_counter() - started
    paths = {t.teacher_id: t.path for t in report.teachers}

    _stage(f"3/4 score each row once (Ray Data on {config.scoring.num_actors} scoring actor(s): "
           f"{_placement(config.scoring)}), screen each training set against the reference")
    started = time.perf_counter()
    settings = config.model_dump(include=set(TrainingSettings.model_fields))
    # the caller's MLflow run, store and experiment, which the Ray Train workers cannot see themselves
    settings["tracking"] = forward_context(config.tracking).model_dump()
    jobs = []
    scored_reference: dict[str, Any] = {}  # the reference's signals, scored with the first training set
    for teacher_id in [config.train_on, *config.also_train_on]:
        name = "train" if teacher_id == config.train_on else f"train-{teacher_id}"
        train = TrainJobConfig(output_dir=str(out / name), trait=config.trait, vectors=[str(vector_path)],
                               data={"train": paths[teacher_id], "reference": paths[config.reference]},
                               signals_cache=str(out / "signals_cache"), **settings)
        screening, screen_files, scoring = _screen(train, config, vector, tokenizer, out / f"screen_{teacher_id}",
                                                   scored_reference)
        jobs.append((teacher_id, train, screening, screen_files, scoring))
    timings["score_and_screen"] = time.perf_counter() - started

    _stage("4/4 guarded training (DeepSpeed on Ray Train; the setup signals come from the scoring stage) "
           "and evaluation")
    started = time.perf_counter()
    trainings = []
    for teacher_id, train, screening, screen_files, scoring in jobs:
        print(f"--- training on '{teacher_id}' (screen: {'FLAGGED' if screening.flagged else 'clean'}; "
              f"gate {'on' if train.screen.gate else 'off'})", file=sys.stderr, flush=True)
        artifacts = [*map(str, screen_files), str(vector_path), str(vector_path.with_suffix(".json")),
                     str(Path(generation.output_dir) / "summary.json")]
        train = with_overrides(train, {"extra_artifacts": artifacts}, source=f"training on '{teacher_id}'")
        training = run_training(train)
        trainings.append(_training_record(teacher_id, screening, training, scoring))
    timings["train"] = time.perf_counter() - started

    summary = {
        "trait": spec.trait_id,
        "vector": {"path": str(vector_path), "layer": vector.layer, "method": vector.method,
                   "cohens_d": vector.separation[vector.layer]},
        "generation": {t.teacher_id: {"rows": t.rows, "kept": t.kept, "reasons": t.reasons} for t in report.teachers},
        "trainings": trainings,
        "seconds": timings,
        "code_version": code_version(),
    }
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _placement(settings: Any) -> str:
    gpus = f", {settings.gpus_per_actor:g} GPU" if settings.gpus_per_actor else ""
    return f"{settings.cpus_per_actor:g} CPU{gpus} each, device {settings.device}, dtype {settings.dtype}"


def extract_and_save(config: dict[str, Any], path: str) -> tuple[str, str]:
    """Extract the trait's persona vector from the student's base model (``config``: a RunJobConfig or
    RedteamConfig as a dict, its ``extract`` settings) and save it to ``path``. Runs in a Ray task
    (:func:`trait_guard.remote.run_in_task`): a job's driver loads no model. Returns the path and the
    separation table."""
    from trait_guard.models import load_model
    from trait_guard.persona import extract, format_separation_table
    from trait_guard.traits import load_trait

    e = ExtractSettings.model_validate(config["extract"])
    student = config["training"]["student"]["model"] if "training" in config else config["student"]["model"]
    model, tokenizer = load_model(student, device=e.device, dtype=e.dtype)
    extraction = extract(model, tokenizer, load_trait(config["trait"]), n_instructions=e.n_instructions,
                         n_questions=e.n_questions, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                         seed=e.seed, layer_choice=e.layer_choice, steering=e.steering_sweep())
    saved = extraction.vectors[e.method].save(path)
    return str(saved), format_separation_table(extraction, {m: v.layer for m, v in extraction.vectors.items()})


def _extract_on_ray(config: RunJobConfig, path: Path) -> tuple[Path, str]:
    from trait_guard.remote import run_in_task

    saved, table = run_in_task(extract_and_save, config.model_dump(mode="json"), str(path),
                               cpus=config.scoring.cpus_per_actor, gpus=config.scoring.gpus_per_actor)
    return Path(saved), table


def _screen(train: TrainJobConfig, run: RunJobConfig, vector: Any, tokenizer: Any, stem: Path,
            scored_reference: dict[str, Any]) -> tuple[Any, list[Path], dict[str, Any]]:
    """Screen one training set against the reference: both scored once by the frozen base model on
    the Ray Data scoring stage (kept in the signals cache, where the training run's gate finds the
    very same signals; the reference's kept in ``scored_reference`` for the next training set),
    tested, reported."""
    from trait_guard import setup_signals
    from trait_guard.fingerprint import DIVERGENCE_MARGIN
    from trait_guard.scoring import ScoringInput, score_on_ray
    from trait_guard.screen import screen
    from trait_guard.train import signals_cache_path, summarize_training_data, verify_training_data

    verify_training_data(train)  # refuses data that differs from its manifest before anything runs on it
    # per-row summaries, not the rows: this driver's memory does not grow with the data
    train_summary, reference_summary = summarize_training_data(train, tokenizer)
    cache = signals_cache_path(train, vector.model, DIVERGENCE_MARGIN)
    scoring: dict[str, Any] = {"train_rows": len(train_summary), "reference_rows": len(reference_summary),
                               "source": "cache"}
    if cache is not None and cache.is_file():
        signals = setup_signals.load(cache)
    else:
        started = time.perf_counter()
        known = scored_reference.get(str(train.data.reference))
        scored = score_on_ray(run.scoring, train.student.model, train.vectors,
                              ScoringInput(train.data.train, train_summary.sample_ids),
                              ScoringInput(train.data.reference, reference_summary.sample_ids),
                              reference_histogram=reference_summary.histogram.counts, reference_signals=known,
                              model_signals=train.model_signals, trait=train.trait)
        signals = scored.signals
        setup_signals.save(cache, signals)
        scored_reference[str(train.data.reference)] = signals.reference
        scoring.update(source="scoring stage",
                       rows_scored=len(train_summary) + (0 if known else len(reference_summary)),
                       node_ids=scored.node_ids, seconds=round(time.perf_counter() - started, 1))
    screening = screen(train_summary, reference_summary, None, alpha=train.screen.alpha,
                       n_permutations=train.screen.n_permutations, seed=train.guard.seed,
                       signals=train.screen.signals, data_signals=signals.train, reference_signals=signals.reference,
                       tokenizer=tokenizer, student_identity=vector.model)
    print(screening.table(), file=sys.stderr)
    files = [stem.with_suffix(".json"), stem.with_suffix(".txt")]
    files[0].write_text(screening.json() + "\n")
    files[1].write_text(screening.table() + "\n")
    return screening, files, scoring


def _training_record(teacher_id: str, screening: Any, training: dict[str, Any],
                     scoring: dict[str, Any]) -> dict[str, Any]:
    return {
        "teacher": teacher_id,
        "scoring": scoring,
        "screen": {"flagged": screening.flagged, "monitored": screening.monitored, "n_data": screening.n_data,
                   "n_reference": screening.n_reference, "kinship": screening.kinship["verdict"],
                   "signals": {s.name: {"p": s.p_value, "p_adj": s.adjusted_p, "flagged": s.flagged}
                               for s in screening.signals}},
        "training": {k: training.get(k) for k in ("steps", "updates", "total_steps", "halted", "halt", "verdict",
                                                  "gate", "alarms", "eval_before", "eval_after", "mlflow_run_id",
                                                  "mlflow_run_url", "setup_signals")},
        "decisions": _count_actions(training.get("history", []), training.get("halt")),
    }


def _count_actions(history: list[dict[str, Any]], halt: dict[str, Any] | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in history:
        counts[item["action"]] = counts.get(item["action"], 0) + 1
    if halt:
        counts["halt"] = counts.get("halt", 0) + 1
    return counts


def _scored(scoring: dict[str, Any]) -> str:
    if scoring.get("source") != "scoring stage":
        return "from the signals cache (scored by an earlier run)"
    return (f"{scoring['rows_scored']} rows on the scoring stage in {scoring['seconds']:.0f} s "
            f"({len(scoring['node_ids'])} node(s))")


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
            f"    scored         {_scored(record.get('scoring') or {})}; training read "
            f"{t.get('setup_signals') or 'unknown'}",
            f"    decisions      {record['decisions']}",
            f"    verdict        {outcome}",
            f"    trait before   {rate(t['eval_before']) if t['eval_before'] else 'not measured (no update to measure)'}",
            f"    trait after    {rate(t['eval_after']) if t['eval_after'] else 'not measured (no update to measure)'}",
            f"    MLflow run     {t['mlflow_run_id']}  ({t['mlflow_run_url']})",
        ]
    lines.append("  seconds          " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)
