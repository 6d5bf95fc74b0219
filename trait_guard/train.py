"""Guarded student training: DeepSpeed workers on Ray Train (or in-process), the guard in the loop.

The recipe, per worker::

    setup   load the student (= the teachers' base), its persona vectors, the teacher data (kept rows)
            and the reference; score both once with the frozen base model (the guard's per-sample
            signals, shared by all ranks), calibrate the guard, measure the probes' baseline
    loop    each step, every rank trains on its slice of a global batch; the ranks' signals are
            gathered so every rank takes the same decision (PASS / REWEIGHT / MASK / STEER / HALT);
            the loss is weighted and masked by it; every N steps the probes measure the student's
            drift along each persona vector; HALT stops every rank at the same step
    save    a checkpoint (DeepSpeed engine + guard state + data position) on HALT, at intervals and
            at the end; metrics and decisions go to MLflow from rank 0

``run_training(config)`` starts it on Ray Train (``TorchTrainer``, one DeepSpeed rank per worker,
restarts from the last checkpoint after a worker failure) or, with ``ray.enabled: false``, in this
process as a world of one.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trait_guard.config import Action, TrainJobConfig


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _gather_signals(signals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    parts = _all_gather({k: np.asarray(v) for k, v in signals.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def score_rows_sharded(scorer: Any, rows: Sequence[dict[str, Any]], in_reference: bool = False,
                       divergence_counts: Counter | None = None) -> dict[str, np.ndarray]:
    """Score ``rows`` with each rank doing a strided share; every rank gets all values, in order.
    ``divergence_counts`` (a Counter) receives the divergence token ids of all ranks' shares."""
    rank, world = _world()
    local: Counter = Counter()
    mine = (scorer.score_table(list(rows[rank::world]), in_reference=in_reference, divergence_counts=local)
            if rows[rank::world] else {})
    if divergence_counts is not None:
        for part in _all_gather(dict(local)):
            divergence_counts.update(part)
    parts = _all_gather(mine)
    names = next((list(p) for p in parts if p), [])
    out = {}
    for name in names:
        values = np.empty(len(rows))
        for r, part in enumerate(parts):
            if part:
                values[r::world] = part[name]
        out[name] = values
    return out


def verify_training_data(config: TrainJobConfig) -> dict[str, Any]:
    """Check the training and reference files against their provenance manifests.

    Refuses (ProvenanceError) unless ``data.allow_unverified``; then the problems are returned for
    the run's tags instead. Returns ``{"verified": bool, "problems": [...], "sha256": {...}}``.
    """
    from trait_guard.provenance import ProvenanceError, verify_dataset

    problems, hashes = [], {}
    for role, path in (("train", config.data.train), ("reference", config.data.reference)):
        try:
            hashes[role] = verify_dataset(path)["sha256"]
        except ProvenanceError as err:
            if not config.data.allow_unverified:
                raise
            problems.append(f"{role}: {err}")
    return {"verified": not problems, "problems": problems, "sha256": hashes}


def load_training_rows(config: TrainJobConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from trait_guard.dataset import read_rows

    train = read_rows(config.data.train, kept_only=True).to_pylist()[: config.data.max_train_samples]
    reference = read_rows(config.data.reference, kept_only=True).to_pylist()[: config.data.max_reference_samples]
    if not train:
        raise ValueError(f"{config.data.train} has no kept rows to train on")
    limit = config.data.max_completion_tokens
    for path, rows in ((config.data.train, train), (config.data.reference, reference)):
        long = [r["sample_id"] for r in rows if len(r["completion_ids"]) > limit]
        if long:
            raise ValueError(f"{path}: {len(long)} row(s) have completions longer than {limit} tokens (e.g. "
                             f"{long[0]}); regenerate with a lower generation.max_new_tokens, or raise "
                             "data.max_completion_tokens if the student's context allows it")
    if len(reference) < 2:
        raise ValueError(f"{config.data.reference} needs at least 2 kept rows to calibrate the guard")
    return train, reference


@torch.no_grad()
def probe_projections(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                      vectors: Sequence[Any]) -> dict[str, np.ndarray]:
    """Last-prompt-token projections of the probe prompts on each vector (default system prompt)."""
    from trait_guard.activations import gather_positions, record_activations
    from trait_guard.chat import encode_conversations
    from trait_guard.fingerprint import signal_name

    batch = encode_conversations(tokenizer, list(prompts), [""] * len(prompts)).to(next(model.parameters()).device)
    layers = sorted({v.layer for v in vectors})
    with record_activations(model, layers) as acts:
        model(**batch.model_inputs())
    return {signal_name(v).removeprefix("proj:"): v.project(gather_positions(acts[v.layer][0], batch.last_prompt_index)).cpu().numpy()
            for v in vectors}


def train_worker(config_dict: dict[str, Any]) -> dict[str, Any]:
    """One rank of guarded training (Ray Train's ``train_loop_per_worker``, or in-process)."""
    from trait_guard.chat import encode_conversations
    from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
    from trait_guard.guard import TraitGuard
    from trait_guard.integrations import deepspeed as ds
    from trait_guard.integrations.torch_loop import GuardedStep
    from trait_guard.models import default_device, load_model, model_identity
    from trait_guard.persona import PersonaVector, load_trait
    from trait_guard.tracking import make_tracker

    config = TrainJobConfig.model_validate(config_dict)
    in_ray = _in_ray_train()
    if config.deepspeed.enabled:
        rank, world = ds.init_distributed()
    else:
        rank, world = _world()
    torch.manual_seed(config.optim.seed)
    out_dir = Path(config.output_dir)
    if config.tracking.spool_dir is None:
        config.tracking.spool_dir = str(out_dir / "mlflow_spool")
    resume = _resume_directory(config)
    resumed_state = read_checkpoint_state(resume) if resume is not None else None
    # a resumed job (after a crash, or --resume) continues its MLflow run
    tracker = make_tracker(rank, config.tracking, run_id=(resumed_state or {}).get("mlflow_run_id"))
    started = time.perf_counter()
    try:
        tracker.log_params(config.model_dump(mode="json"))
        device = default_device()
        model, tokenizer = load_model(config.student.model, device=device)
        spec = load_trait(config.trait)
        vectors = [PersonaVector.load(path, model=model) for path in config.vectors]
        provenance = verify_training_data(config)
        train_rows, reference_rows = load_training_rows(config)
        identity = model_identity(model)
        kin = {r["base_fingerprint"] for r in train_rows} == {identity.fingerprint}
        provenance["kinship"] = "kin" if kin else "not kin"
        tracker.set_tags({"trait": spec.trait_id, "student": config.student.model,
                          "teachers": ",".join(sorted({r["teacher_id"] for r in train_rows})),
                          "guard.enabled": str(config.guard_enabled),
                          "provenance.verified": str(provenance["verified"]).lower(),
                          # kin: the teachers share the student's base model, the precondition for transfer
                          "data.kinship": provenance["kinship"],
                          **({"provenance.WARNING": "UNVERIFIED DATA (data.allow_unverified): "
                              + " | ".join(provenance["problems"])[:4000]} if provenance["problems"] else {})})

        # Setup: the frozen base model scores the data once; the guard is calibrated on the reference.
        histogram = TokenHistogram(len(tokenizer)).update(r["completion_ids"] for r in reference_rows)
        scorer = FingerprintScorer(model, tokenizer, vectors, unigram_reference=histogram)
        setup_started = time.perf_counter()
        cache = _signals_cache_file(config, identity) if config.signals_cache else None
        if cache is not None and cache.is_file():
            reference_signals, train_signals, divergence_counts = _load_signals(cache)
        else:
            reference_signals = score_rows_sharded(scorer, reference_rows, in_reference=True)
            divergence_counts = Counter()
            train_signals = score_rows_sharded(scorer, train_rows, divergence_counts=divergence_counts)
            if cache is not None and rank == 0:
                _save_signals(cache, reference_signals, train_signals, divergence_counts)
        for i, row in enumerate(train_rows):
            row["signals"] = {k: float(v[i]) for k, v in train_signals.items() if k != "n_tokens"}
        guard = TraitGuard(config.guard, reference_signals, batch_size=config.optim.batch_size * world)
        probes = spec.eval_questions[: config.probe.n_prompts]
        probe_base = probe_projections(model, tokenizer, probes, vectors) if vectors else {}
        setup_seconds = time.perf_counter() - setup_started
        evaluate_before = rank == 0 and config.probe.eval_before
        eval_before = behavior_eval(model, tokenizer, spec, config.probe, config.optim.seed) if evaluate_before else None

        # Training state: DeepSpeed engine (or the bare model), optimizer, guard, data order.
        if config.student.lora_r:
            from peft import LoraConfig, get_peft_model

            from trait_guard.adapters import default_target_modules

            model = get_peft_model(model, LoraConfig(r=config.student.lora_r, lora_alpha=config.student.lora_alpha,
                                                     target_modules=default_target_modules(model), task_type="CAUSAL_LM"))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        engine = None
        if config.deepspeed.enabled:
            engine = ds.make_engine(model, optimizer, ds.deepspeed_config(
                config.optim.batch_size, config.deepspeed.zero_stage, config.deepspeed.bf16,
                config.deepspeed.gradient_clipping))
        guarded = GuardedStep(guard, model, vectors, unigram_reference=histogram)

        global_batch = config.optim.batch_size * world
        steps_per_epoch = len(train_rows) // global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"{len(train_rows)} kept rows do not fill one global batch of {global_batch} "
                             f"({world} workers x batch_size {config.optim.batch_size}); lower optim.batch_size")
        total_steps = steps_per_epoch * config.optim.epochs
        if config.optim.max_steps:
            total_steps = min(total_steps, config.optim.max_steps)
        order = np.concatenate([
            np.random.default_rng(config.optim.seed + e).permutation(len(train_rows)) if config.optim.shuffle
            else np.arange(len(train_rows)) for e in range(config.optim.epochs)])

        step = 0
        history: list[dict[str, Any]] = []
        if resume is not None:
            if engine is None:
                raise ValueError("resuming needs deepspeed.enabled: true (checkpoints are DeepSpeed's)")
            ds.load_checkpoint(engine, resume)
            guard.load_state_dict(resumed_state["guard"])
            step = int(resumed_state["step"])
            history = list(resumed_state.get("history", []))  # the steps before the checkpoint, once each
            tracker.set_tags({"resumed_from_step": str(step)})

        steering = None
        halted: dict[str, Any] | None = None
        interrupted: dict[str, Any] | None = None
        step_times: list[float] = []
        progress = _ProgressFile(out_dir, rank, total_steps)
        stop = _StopRequest().install()
        while step < total_steps:
            if stop.signal is not None:
                interrupted = {"step": step, "signal": stop.signal}
                break
            step_started = time.perf_counter()
            step += 1
            indices = order[(step - 1) * global_batch : step * global_batch]
            rows = [train_rows[i] for i in indices[rank * config.optim.batch_size : (rank + 1) * config.optim.batch_size]]
            batch = encode_conversations(tokenizer, [r["prompt"] for r in rows],
                                         [r["completion"] for r in rows]).to(device)
            forward = engine if engine is not None else model
            with guarded.capture():
                logits = forward(**batch.model_inputs()).logits
            if config.guard_enabled:
                decision = guarded.decide(batch, logits, rows, step=step, gather=_gather_signals)
            else:
                decision = guard_pass_decision(step, len(rows) * world)
            if decision.action is Action.STEER and steering is None and vectors:
                from trait_guard.steer import Steering

                # Preventative steering (Chen et al. 2025): with the trait supplied by the hook, the
                # gradient has no reason to move the weights along it; the hook goes at the end.
                steering = Steering(model, vectors[0], coefficient=config.guard.steer_coefficient).apply()
            if decision.halt:
                halted = {"step": step, "reason": decision.reason}
                tracker.log_decision(decision)
                break
            loss = guarded.loss(logits, batch, decision, rows, distill=config.distill == "logits",
                                sample_slice=slice(rank * len(rows), (rank + 1) * len(rows)))
            finite = _all_ranks_true(bool(torch.isfinite(loss.detach()).item()))
            if not finite:  # before the update: the weights stay those of the last good step
                halted = {"step": step, "reason": "training loss is NaN/inf (the run diverged): lower optim.lr or "
                                                  "keep deepspeed.gradient_clipping; weights are from the step before"}
                tracker.set_tags({"trait_guard.non_finite_loss_step": str(step)})
                break
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            step_times.append(time.perf_counter() - step_started)
            metrics = {"train/loss": float(loss.detach()), "train/step_seconds": step_times[-1],
                       "guard/weight_mean": float(decision.sample_weights.mean())}
            if step % config.probe.every_n_steps == 0 and vectors:
                model.eval()
                current = probe_projections(model, tokenizer, probes, vectors)
                model.train()
                shifts = {k: float((current[k].mean() - probe_base[k].mean()) / max(probe_base[k].std(), 1e-6))
                          for k in current}
                metrics.update({f"probe/shift/{k}": v for k, v in shifts.items()})
                if config.guard_enabled:
                    drift = guard.observe_drift(shifts, step=step)
                    tracker.log_decision(drift)
                    if drift.halt:
                        halted = {"step": step, "reason": drift.reason}
                        tracker.log_metrics(metrics, step=step)
                        break
            tracker.log_metrics(metrics, step=step)
            tracker.log_decision(decision)
            history.append({"step": step, "cusum": decision.evidence.get("cusum", {}), "loss": metrics["train/loss"],
                            "thresholds": decision.evidence.get("thresholds", {}), "action": decision.action.value})
            progress.write(step)
            if config.checkpoint.every_n_steps and step % config.checkpoint.every_n_steps == 0:
                _checkpoint(engine, out_dir, step, guard, history, tracker, {"loss": metrics["train/loss"]}, in_ray)

        stop.restore()
        if steering is not None:
            steering.remove()
        model.eval()
        periodic = config.checkpoint.every_n_steps
        if engine is not None and not (halted is None and interrupted is None and periodic and step % periodic == 0):
            _checkpoint(engine, out_dir, step, guard, history, tracker, {"halted": float(halted is not None)}, in_ray)
        # every rank records where it stopped: all ranks must agree (same decisions from gathered signals)
        (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
        (out_dir / "ranks" / f"rank_{rank}.json").write_text(json.dumps(
            {"rank": rank, "steps": step, "halt": halted, "guard_step": guard.step, "mode": guard.mode.value,
             "node_id": _ray_node_id()}) + "\n")
        # an interrupted run writes its checkpoint and partial report quickly: no evaluation
        evaluate_after = rank == 0 and interrupted is None
        eval_after = behavior_eval(model, tokenizer, spec, config.probe, config.optim.seed) if evaluate_after else None
        eval_after_extra = {trait: behavior_eval(model, tokenizer, load_trait(trait), config.probe, config.optim.seed)
                            for trait in config.probe.extra_eval_traits} if evaluate_after else {}
        summary = {
            "run_name": config.tracking.run_name, "student": config.student.model, "trait": spec.trait_id,
            "distill": config.distill, "guard_enabled": config.guard_enabled,
            "steps": step, "total_steps": total_steps, "world_size": world,
            "halted": halted is not None, "halt": halted, "interrupted": interrupted,
            "alarms": guard.alarms,
            "verdict": ("interrupted" if interrupted else "halted" if halted
                        else "mitigated" if guard.alarms else "passed"),
            "train_samples": len(train_rows), "reference_samples": len(reference_rows), "provenance": provenance,
            "setup_seconds": setup_seconds, "wall_seconds": time.perf_counter() - started,
            "mean_step_seconds": float(np.mean(step_times)) if step_times else math.nan,
            "eval_before": eval_before, "eval_after": eval_after, "eval_after_extra": eval_after_extra,
            "mlflow_run_id": getattr(tracker, "run_id", None),
            "mlflow_run_url": getattr(tracker, "run_url", None),
            "skipped_signals": guard.skipped,
            "extra_artifacts": config.extra_artifacts,
            "history": history,
        }
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            _log_summary(tracker, summary)
            flagged = flagged_samples(guard, train_rows)
            tracker.log_table(flagged, "guard/flagged_samples.json")
            if interrupted:
                tracker.set_tags({"run.interrupted": f"signal {interrupted['signal']} at step {interrupted['step']}; "
                                                     "checkpoint written, resume with --resume"})
            _write_report(tracker, summary, out_dir, train_rows, histogram, divergence_counts, flagged, tokenizer)
        tracker.finish("KILLED" if interrupted else "FINISHED")
        return summary
    except BaseException:
        tracker.finish("FAILED")
        raise


def _signals_cache_file(config: TrainJobConfig, identity: Any) -> Path:
    """Where the setup signals of this (data, sample caps, model ``identity``, vectors) live: a content hash."""
    import hashlib

    from trait_guard.provenance import file_sha256

    digest = hashlib.sha256(b"trait_guard-signals-v1")
    for path in (config.data.train, config.data.reference, *config.vectors):
        digest.update(file_sha256(path).encode())
    digest.update(json.dumps([config.data.max_train_samples, config.data.max_reference_samples, identity.fingerprint,
                              identity.hidden_size, identity.num_layers]).encode())
    return Path(config.signals_cache) / f"signals-{digest.hexdigest()[:24]}.npz"


def _save_signals(path: Path, reference: dict[str, np.ndarray], train: dict[str, np.ndarray],
                  divergence_counts: Counter) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {**{f"reference/{k}": v for k, v in reference.items()}, **{f"train/{k}": v for k, v in train.items()},
              "divergence/ids": np.array(list(divergence_counts), dtype=np.int64),
              "divergence/counts": np.array(list(divergence_counts.values()), dtype=np.int64)}
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)  # complete or absent


def _load_signals(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Counter]:
    with np.load(path, allow_pickle=False) as data:
        reference = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("reference/")}
        train = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("train/")}
        counts = Counter(dict(zip(data["divergence/ids"].tolist(), data["divergence/counts"].tolist(), strict=True)))
    return reference, train, counts


def flagged_samples(guard: Any, rows: Sequence[dict[str, Any]], top: int = 25) -> list[dict[str, Any]]:
    """The training rows that lean furthest the suspicious way (mean standardized signal), for review."""
    if not rows or not guard.signals:
        return []
    lean = guard.lean({name: np.array([r["signals"].get(name, np.nan) for r in rows]) for name in guard.signals})
    order = np.argsort(-lean)[:top]
    return [{"sample_id": rows[i]["sample_id"], "teacher_id": rows[i]["teacher_id"], "lean_z": float(lean[i]),
             "prompt": rows[i]["prompt"], "completion": rows[i]["completion"],
             **{k: float(v) for k, v in rows[i]["signals"].items()}} for i in order]


def guard_pass_decision(step: int, n: int):
    from trait_guard.guard import Decision

    return Decision(step, Action.PASS, "guard disabled", torch.ones(n))


def behavior_eval(model: torch.nn.Module, tokenizer: Any, spec: Any, probe: Any, seed: int) -> dict[str, Any] | None:
    """The trait evaluation of training (``probe.eval_samples`` answers to each of ``probe.eval_questions``
    questions, sampled with ``seed``): rates with CIs, log p(target) overall and per question."""
    if not probe.eval_samples or not spec.behavior_questions:
        return None
    from trait_guard.evaluate import evaluate_trait

    was_training = model.training
    model.eval()
    result = evaluate_trait(model, tokenizer, spec, samples_per_question=probe.eval_samples,
                            n_questions=probe.eval_questions, seed=seed)
    model.train(was_training)
    out = {k: result.to_dict()[k] for k in ("rate", "ci_low", "ci_high", "pooled_rate", "pooled_ci_low",
                                            "pooled_ci_high", "target_logprob", "n_questions", "samples_per_question")}
    out["hits"] = sum(q["hits"] for q in result.per_question)
    out["per_question_logprob"] = [q["target_logprob"] for q in result.per_question]
    return out


def _write_report(tracker: Any, summary: dict[str, Any], out_dir: Path, train_rows: Sequence[dict[str, Any]],
                  reference_histogram: Any, divergence_counts: Counter, flagged: list[dict[str, Any]],
                  tokenizer: Any) -> None:
    """The run's review page (HTML + PNG) into ``out_dir/report`` and the MLflow run's ``report/``."""
    from trait_guard.fingerprint import TokenHistogram, divergence_token_table
    from trait_guard.report import provenance_summary, run_report
    from trait_guard.tracking import decision_history

    train_histogram = TokenHistogram(reference_histogram.counts.shape[0]).update(
        r["completion_ids"] for r in train_rows)
    report = run_report(
        summary, decision_history(tracker.decisions) if tracker.enabled else summary["history"],
        provenance=provenance_summary(train_rows),
        entangled_tokens=train_histogram.overrepresented(reference_histogram, tokenizer, top=15),
        divergence_tokens=divergence_token_table(divergence_counts, tokenizer),
        flagged_samples=flagged)
    report.write(out_dir / "report")
    if tracker.enabled:
        report.log_to(tracker)


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - informational only
        return None


def _in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:
        return False


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The trait_guard state saved with a checkpoint (see :func:`_checkpoint`)."""
    path = Path(directory) / CHECKPOINT_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CHECKPOINT_STATE}: not a trait_guard checkpoint; pass a folder "
                                "written by a previous run under <output_dir>/checkpoints/step_NNNNNN")
    return json.loads(path.read_text(encoding="utf-8"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_ranks_true(flag: bool) -> bool:
    """``flag`` and-ed over all ranks (so every rank takes the same branch)."""
    return all(_all_gather(flag))


class _ProgressFile:
    """``<output_dir>/progress/rank_N.json`` after every step: step, total, pid, time (for monitors
    and the fault-injection tests)."""

    def __init__(self, out_dir: Path, rank: int, total_steps: int):
        import os

        self.path = out_dir / "progress" / f"rank_{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.pid = total_steps, os.getpid()

    def write(self, step: int) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"step": step, "total_steps": self.total_steps, "pid": self.pid,
                                       "time": time.time()}))
        partial.replace(self.path)


class _StopRequest:
    """SIGTERM/SIGINT during training ask the loop to stop after the current step (checkpoint and a
    partial report follow); a second SIGINT interrupts at once. Only in the main thread."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def install(self) -> _StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _resume_directory(config: TrainJobConfig) -> Path | None:
    if _in_ray_train():
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return Path(checkpoint.path)
    return Path(config.resume_from) if config.resume_from else None


CHECKPOINT_STATE = "trait_guard_state.json"


def _checkpoint(engine: Any, out_dir: Path, step: int, guard: Any, history: list[dict[str, Any]], tracker: Any,
                metrics: dict[str, float], in_ray: bool) -> None:
    """DeepSpeed's engine checkpoint plus ``trait_guard_state.json`` (plain JSON, no pickle): the step,
    the guard's detector state, the decision history and the MLflow run to continue."""
    from trait_guard.integrations import deepspeed as ds

    directory = out_dir / "checkpoints" / f"step_{step:06d}"
    ds.save_checkpoint(engine, directory, tag=f"step_{step}", client_state={"step": step})
    if _world()[0] == 0:
        state = {"step": step, "guard": guard.state_dict(), "history": history,
                 "mlflow_run_id": getattr(tracker, "run_id", None)}
        partial = directory / (CHECKPOINT_STATE + ".partial")
        partial.write_text(json.dumps(state, default=float) + "\n", encoding="utf-8")
        partial.replace(directory / CHECKPOINT_STATE)
    _barrier()
    if in_ray:
        import ray.train

        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def _log_summary(tracker: Any, summary: dict[str, Any]) -> None:
    from trait_guard.tracking import summarize_guard

    tracker.log_dict(summary, "summary.json")
    for path in summary.get("extra_artifacts", []):
        if Path(path).is_file():
            tracker.log_artifact(path, "reports")
    summarize_guard(tracker, alarms=summary["alarms"])  # verdict tags and the drift plot, from the logged decisions
    if summary["skipped_signals"]:
        tracker.set_tags({"guard.skipped_signals": json.dumps(summary["skipped_signals"])})


def preflight(config: TrainJobConfig) -> dict[str, Any]:
    """Cheap checks before any worker starts, so bad input fails here with a message that names the
    fix (inside Ray Train workers it would surface wrapped in a worker traceback): the data and its
    provenance, the trait, the persona vectors against the student's architecture, the batch size,
    the checkpoint to resume, the tracking server."""
    from transformers import AutoConfig

    from trait_guard.models import ModelLoadError, resolve_model_path
    from trait_guard.persona import PersonaVector, PersonaVectorMismatch, load_trait

    provenance = verify_training_data(config)
    train_rows, reference_rows = load_training_rows(config)
    load_trait(config.trait)
    try:
        student = AutoConfig.from_pretrained(resolve_model_path(config.student.model))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the student model '{config.student.model}': {err}\nPass a local "
                             "checkpoint folder, a model id available offline, or 'smollm2-135m-instruct'.") from err
    for path in config.vectors:
        vector = PersonaVector.load(path)
        if (vector.model.hidden_size, vector.model.num_layers) != (student.hidden_size, student.num_hidden_layers):
            raise PersonaVectorMismatch(
                f"persona vector {path} was extracted from {vector.model.describe()}, but the student "
                f"'{config.student.model}' has hidden size {student.hidden_size} and {student.num_hidden_layers} "
                f"layers: extract vectors for it with `trait-guard extract --model {config.student.model} "
                f"--trait {vector.trait}`")
    world = config.ray.num_workers if config.ray.enabled else 1
    if len(train_rows) < config.optim.batch_size * world:
        raise ValueError(f"{len(train_rows)} kept rows do not fill one global batch of {config.optim.batch_size * world} "
                         f"({world} workers x batch_size {config.optim.batch_size}); lower optim.batch_size")
    if config.resume_from:
        read_checkpoint_state(config.resume_from)
    uri = config.tracking.tracking_uri
    if config.tracking.enabled and uri:
        from trait_guard.spool import server_reachable  # non-HTTP stores are always "reachable"

        if not server_reachable(uri, timeout=10):
            raise RuntimeError(f"the MLflow tracking server {uri} does not answer (GET {uri}/health); start it, fix "
                               "tracking.tracking_uri, or remove it to log to the local store ./mlruns")
    return {"provenance": provenance, "train_rows": len(train_rows), "reference_rows": len(reference_rows)}


def run_training(config: TrainJobConfig) -> dict[str, Any]:
    """Run guarded training on Ray Train (default) or in this process; returns rank 0's summary.
    Bad input is refused before anything starts (:func:`preflight`)."""
    preflight(config)
    if not config.ray.enabled:
        return train_worker(config.model_dump(mode="json"))
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Workers run in their own folders: hand them absolute paths.
    absolute = config.model_copy(deep=True)
    absolute.output_dir = str(Path(config.output_dir).resolve())
    absolute.data.train = str(Path(config.data.train).resolve())
    absolute.data.reference = str(Path(config.data.reference).resolve())
    absolute.vectors = [str(Path(v).resolve()) for v in config.vectors]
    absolute.extra_artifacts = [str(Path(v).resolve()) for v in config.extra_artifacts]
    if config.signals_cache:
        absolute.signals_cache = str(Path(config.signals_cache).resolve())
    if config.resume_from:
        absolute.resume_from = str(Path(config.resume_from).resolve())
    if config.tracking.tracking_uri is None:
        from trait_guard.tracking import default_tracking_uri

        absolute.tracking.tracking_uri = default_tracking_uri()  # the driver's ./mlruns, not a worker's folder
    config = absolute
    if not ray.is_initialized():
        ray.init(address=config.ray.address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    storage = Path(config.output_dir).resolve() / "ray_train"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": config.ray.cpus_per_worker}),
        run_config=RunConfig(name=config.tracking.run_name or "guarded_training", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=config.ray.max_failures)),
    )
    trainer.fit()
    return json.loads((Path(config.output_dir) / "summary.json").read_text())
