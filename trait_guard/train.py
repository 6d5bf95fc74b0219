"""Guarded student training: DeepSpeed workers on Ray Train (or in-process), the guard in the loop.

The recipe, one named step each (``train_worker`` runs them in order on every rank)::

    _open_run             rank and world, output folder, resume state (refused when trained on other
                          inputs: check_resume_recipe), the MLflow tracker
    _load_inputs          the student (= the teachers' base), its persona vectors, the teacher data
                          (kept rows, checked) and the reference, provenance and kinship tags
    _score_and_calibrate  the frozen base model scores every row once (setup_signals); the dataset
                          screen tests them before step 1 (the gate: a FLAGGED screen puts
                          guard.on_data_alarm in force from the start, HALT = no update at all); the
                          guard is calibrated on the reference; the probes' baseline
    _schedule             the data order and the number of optimizer steps
    _build_trainer        LoRA (optional), optimizer, learning-rate schedule, DeepSpeed engine (trait_guard's
                          config, or the user's JSON merged with it)
    _restore              a checkpoint's engine, guard state and history (after a crash or --resume)
    _train_loop           each step every rank trains on its slice of a global batch (with gradient
                          accumulation: several micro-batches, each one guard observation); the ranks'
                          signals are gathered so every rank takes the same decision (PASS /
                          REWEIGHT / MASK / STEER / HALT); every N steps the probes measure drift;
                          rank 0 prints a progress line
    _finish               final checkpoint, per-rank record, evaluation, summary, report, MLflow

Batches are built from the rows' generated ``completion_ids`` (:func:`trait_guard.chat.encode_rows`):
the text a person reviews decodes from exactly the tokens the student learns, and the teacher's
stored per-token data lines up with them.

``run_training(config)`` starts it on Ray Train (``TorchTrainer``, one DeepSpeed rank per worker,
restarts from the last checkpoint after a worker failure; an earlier run in the same output folder
is resumed when it was trained on the same inputs, else moved aside: :func:`set_aside_stale_run`) or,
with ``ray.enabled: false``, in this process as a world of one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trait_guard import setup_signals
from trait_guard.checkpoint import (
    in_ray_train,
    input_differences,
    input_digests,
    latest_checkpoint,
    read_checkpoint_state,
    resume_directory,
    save_checkpoint,
    set_aside,
)
from trait_guard.config import Action, TrainJobConfig
from trait_guard.errors import TraitGuardInputError
from trait_guard.evaluate import PanelResult, spec_panel_logodds
from trait_guard.persona import probe_projections, probe_shifts
from trait_guard.ranks import all_ranks_true, gather_signals, world
from trait_guard.rollback import RollbackRecord, WeightSnapshots, snapshot_support
from trait_guard.run_state import ProgressFile, StopRequest


def verify_training_data(config: TrainJobConfig) -> dict[str, Any]:
    """Check the training and reference files against their provenance manifests.

    With ``data.trusted_keys`` (or ``$TRAIT_GUARD_TRUSTED_KEYS``) the folders' signatures must be by a
    trusted key too (:mod:`trait_guard.signing`). Refuses (ProvenanceError) unless
    ``data.allow_unverified``; then the problems are returned for the run's tags instead. Returns
    ``{"verified", "problems", "sha256", "signed", "tags", ...}`` (see :func:`provenance.verify_files`).
    """
    from trait_guard.provenance import verify_files

    return verify_files({"train": config.data.train, "reference": config.data.reference},
                        allow_unverified=config.data.allow_unverified, trusted_keys=config.data.trusted_keys or None)


def load_training_rows(config: TrainJobConfig, tokenizer: Any = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The kept training and reference rows, checked by the one teacher-data reader (column types,
    unique ids, per-token lengths, length limit; with a ``tokenizer``, ids in its vocabulary that
    decode to the reviewed text) before any model is used on them."""
    from trait_guard.dataset import read_teacher_rows

    data = config.data
    train = read_teacher_rows(data.train, tokenizer=tokenizer, limit=data.max_train_samples, role="train",
                              max_completion_tokens=data.max_completion_tokens)
    reference = read_teacher_rows(data.reference, tokenizer=tokenizer, limit=data.max_reference_samples,
                                  role="reference", max_completion_tokens=data.max_completion_tokens)
    _check_row_counts(config, len(train), len(reference))
    return train, reference


def summarize_training_data(config: TrainJobConfig, tokenizer: Any) -> tuple[Any, Any]:
    """The rows :func:`load_training_rows` returns, with the same checks and refusals, as
    :class:`~trait_guard.screen.RowSummary` objects (what the screen and the scoring stage need per
    row), read a batch at a time: for drivers, whose memory must not grow with the data."""
    from trait_guard.dataset import scan_teacher_rows
    from trait_guard.screen import RowSummary

    data, vocab = config.data, len(tokenizer)
    train, reference = (
        RowSummary.of_tables(scan_teacher_rows(path, tokenizer=tokenizer, limit=limit, role=role,
                                               max_completion_tokens=data.max_completion_tokens), vocab)
        for path, limit, role in ((data.train, data.max_train_samples, "train"),
                                  (data.reference, data.max_reference_samples, "reference")))
    _check_row_counts(config, len(train), len(reference))
    return train, reference


def _check_row_counts(config: TrainJobConfig, n_train: int, n_reference: int) -> None:
    if not n_train:
        raise TraitGuardInputError(f"{config.data.train} has no kept rows to train on")
    if n_reference < 2:
        raise TraitGuardInputError(f"{config.data.reference} needs at least 2 kept rows to calibrate the guard")


def student_tokenizer(model: str) -> Any:
    """The student's tokenizer alone (no weights), for the data checks before any model loads."""
    from transformers import AutoTokenizer

    from trait_guard.models import ModelLoadError, prepare_tokenizer, resolve_model_path

    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(model)))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the student model (its tokenizer) '{model}': {err}\nPass a local "
                             "checkpoint folder, a model id available offline, or 'smollm2-135m-instruct'.") from err


# ----------------------------------------------------------------------------- the recipe's state


@dataclass
class RunContext:
    """Where this rank stands: who it is, where it writes, what it resumes, where it logs."""

    config: TrainJobConfig
    rank: int
    world: int
    out_dir: Path
    in_ray: bool
    resume: Path | None
    resumed_state: dict[str, Any] | None
    tracker: Any
    started: float
    recipe: dict[str, Any] = field(default_factory=dict)  # what its checkpoints record (_recipe_state)


@dataclass
class Inputs:
    model: torch.nn.Module
    tokenizer: Any
    device: Any
    spec: Any
    vectors: list[Any]
    train_rows: list[dict[str, Any]]
    reference_rows: list[dict[str, Any]]
    identity: Any
    provenance: dict[str, Any]


@dataclass
class Setup:
    guard: Any
    histogram: Any
    signals: setup_signals.SetupSignals
    gate: dict[str, Any] | None
    probes: list[str]
    probe_base: dict[str, np.ndarray]
    seconds: float
    eval_before: dict[str, Any] | None
    panel_before: dict[str, Any] | None = None  # panel log-odds of the base model (probe.panel_eval_questions)
    panel_curve: list[dict[str, Any]] = field(default_factory=list)  # panel_curve_point records


@dataclass
class Outcome:
    step: int  # the last step reached (a halting step included)
    updates: int  # optimizer updates applied in the whole run (a halting step applies none)
    history: list[dict[str, Any]]
    halted: dict[str, Any] | None = None
    interrupted: dict[str, Any] | None = None
    step_times: list[float] = field(default_factory=list)
    rollback: dict[str, Any] | None = None  # a halted run's restored weights (see trait_guard.rollback)

    @property
    def weights_step(self) -> int:
        """The step whose weights the run leaves behind (its updates, or where a rollback went)."""
        return self.rollback["restored_step"] if self.rollback and "restored_step" in self.rollback else self.updates


def train_worker(config_dict: dict[str, Any]) -> dict[str, Any]:
    """One rank of guarded training (Ray Train's ``train_loop_per_worker``, or in-process)."""
    config = TrainJobConfig.model_validate(config_dict)
    run = _open_run(config)
    try:
        inputs = _load_inputs(run)
        setup = _score_and_calibrate(run, inputs)
        order, total_steps = _schedule(config, len(inputs.train_rows), run.world)
        model, optimizer, engine, scheduler = _build_trainer(config, inputs.model, total_steps, run.world)
        step, history = _restore(run, engine, setup.guard)
        outcome = _train_loop(run, inputs, setup, model, (optimizer, scheduler), engine, order, total_steps, step,
                              history)
        return _finish(run, inputs, setup, model, engine, outcome, total_steps)
    except BaseException:
        run.tracker.finish("FAILED")
        raise


# ----------------------------------------------------------------------------- the recipe's steps


def _open_run(config: TrainJobConfig) -> RunContext:
    from trait_guard.integrations import deepspeed as ds
    from trait_guard.tracking import make_tracker

    rank, size = ds.init_distributed() if config.deepspeed.enabled else world()
    torch.manual_seed(config.optim.seed)
    out_dir = Path(config.output_dir)
    tracking = config.tracking
    if tracking.spool_dir is None:
        tracking = tracking.model_copy(update={"spool_dir": str(out_dir / "mlflow_spool")})
    resume = resume_directory(config.resume_from)
    recipe = _recipe_state(config)  # the input files hashed once, for every checkpoint of this run
    resumed_state = _resumed_state(config, resume, recipe, rank)
    # a resumed job (after a crash, or --resume) continues its MLflow run
    tracker = make_tracker(rank, tracking, run_id=(resumed_state or {}).get("mlflow_run_id"))
    return RunContext(config, rank, size, out_dir, in_ray_train(), resume, resumed_state, tracker, time.perf_counter(),
                      recipe)


def _resumed_state(config: TrainJobConfig, resume: Path | None, recipe: dict[str, Any],
                   rank: int) -> dict[str, Any] | None:
    """The state of the checkpoint to resume (None for a fresh run), checked before anything uses it
    (the MLflow run it names included) against this run's recipe and inputs (:func:`check_resume_recipe`:
    a checkpoint trained on other data or vectors is refused; one written before trait_guard recorded
    its inputs resumes, with a warning on rank 0)."""
    if resume is None:
        return None
    state = read_checkpoint_state(resume)
    warning = check_resume_recipe(config, state, resume, recipe)
    if warning and rank == 0:
        print(f"trait_guard: warning: {warning}", flush=True)
    return state


def _load_inputs(run: RunContext) -> Inputs:
    from trait_guard.dataset import check_same_base
    from trait_guard.models import default_device, load_model, model_identity
    from trait_guard.persona import PersonaVector
    from trait_guard.traits import load_trait

    config, tracker = run.config, run.tracker
    tracker.log_params(config.model_dump(mode="json"))
    placement = config.student_placement()  # dtype auto: bf16 only under DeepSpeed bf16 on a GPU worker
    device = default_device() if placement["device"] == "auto" else placement["device"]  # this rank's GPU
    model, tokenizer = load_model(config.student.model, device=device, dtype=placement["dtype"])
    spec = load_trait(config.trait)
    vectors = [PersonaVector.load(path, model=model) for path in config.vectors]
    provenance = verify_training_data(config)
    train_rows, reference_rows = load_training_rows(config, tokenizer)
    identity = model_identity(model)
    check_same_base(reference_rows, identity)  # the reference must be the student's base model's own output
    kin = {r["base_fingerprint"] for r in train_rows} == {identity.fingerprint}
    provenance["kinship"] = "kin" if kin else "not kin"
    tracker.set_tags({"trait": spec.trait_id, "student": config.student.model,
                      "teachers": ",".join(sorted({r["teacher_id"] for r in train_rows})),
                      "guard.enabled": str(config.guard_enabled),
                      "provenance.verified": str(provenance["verified"]).lower(),
                      **provenance.get("tags", {}),  # provenance.signed, the signer and its key fingerprint
                      # kin: the teachers share the student's base model, the precondition for transfer
                      "data.kinship": provenance["kinship"],
                      **({"provenance.WARNING": "UNVERIFIED DATA (data.allow_unverified): "
                          + " | ".join(provenance["problems"])[:4000]} if provenance["problems"] else {})})
    return Inputs(model, tokenizer, device, spec, vectors, train_rows, reference_rows, identity, provenance)


def _setup_signals(run: RunContext, inputs: Inputs, scorer: Any) -> setup_signals.SetupSignals:
    """The frozen base model's signals of every row: from the cache when this exact setup was scored
    before (``signals_cache``), else scored now, each rank a share."""
    config = run.config
    cache = signals_cache_path(config, inputs.identity, scorer.divergence_margin)
    if cache is not None and cache.is_file():
        return setup_signals.load(cache)
    scorer.extra = _model_signal_scorers(config, inputs)  # loaded only to score (a teacher model is large)
    signals = setup_signals.score_setup(scorer, inputs.train_rows, inputs.reference_rows)
    if cache is not None and run.rank == 0:
        setup_signals.save(cache, signals)
    return signals


def signals_cache_path(config: TrainJobConfig, identity: Any, divergence_margin: float) -> Path | None:
    """This run's setup-signals cache file (None without ``signals_cache``): keyed by the contents of the
    data and vector files, the sample limits, the model identity and the divergence margin."""
    from trait_guard.trait_signals import settings_key

    if not config.signals_cache:
        return None
    return setup_signals.cache_file(config.signals_cache, [config.data.train, config.data.reference], config.vectors,
                                    [config.data.max_train_samples, config.data.max_reference_samples],
                                    identity, divergence_margin, settings_key(config.model_signals))


def screen_gate(config: TrainJobConfig, signals: setup_signals.SetupSignals,
                train_rows: Sequence[dict[str, Any]] | None = None,
                reference_rows: Sequence[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The dataset screen on the setup signals (all training rows vs the reference): the same test as
    ``trait-guard screen`` (:func:`trait_guard.screen.screen_signals`), with the rows' prompts pairing
    the paired projection test (``proj_diff:``) when both row lists are given. None when the gate is off."""
    if not (config.guard_enabled and config.screen.gate):
        return None
    from trait_guard.screen import prompt_keys, screen_signals

    paired = train_rows is not None and reference_rows is not None
    tests, flagged, notes = screen_signals(signals.train, signals.reference, alpha=config.screen.alpha,
                                           n_permutations=config.screen.n_permutations, seed=config.guard.seed,
                                           signals=config.screen.signals,
                                           data_keys=prompt_keys(list(train_rows)) if paired else None,
                                           reference_keys=prompt_keys(list(reference_rows)) if paired else None)
    return {"flagged": flagged, "alpha": config.screen.alpha, "notes": notes,
            "flagged_signals": [t.name for t in tests if t.flagged],
            "tests": {t.name: {"p": t.p_value, "p_adj": t.adjusted_p, "effect_size": t.effect_size,
                               "flagged": t.flagged} for t in tests}}


def _model_signal_scorers(config: TrainJobConfig, inputs: Inputs) -> list[Any]:
    """The scorers of ``model_signals`` (S2, S3: :mod:`trait_guard.trait_signals`), scored with the others."""
    from trait_guard.trait_signals import scorer_from_settings

    scorer = scorer_from_settings(config.model_signals, inputs.model, inputs.tokenizer,
                                  base_name=config.student.model, spec=inputs.spec, device=inputs.device,
                                  dtype=config.student_placement()["dtype"],
                                  neutral_prompts=[r["prompt"] for r in
                                                   inputs.reference_rows[: config.model_signals.model_diff_prompts]])
    return [scorer] if scorer is not None else []


def _signals_at_hand(config: TrainJobConfig, coverage: dict[str, Any], signals: setup_signals.SetupSignals) -> str:
    """The gate's note on its signals: what was at hand (stored log-probs on both sides, the teacher
    model in ``model_signals``, the watched trait's spec), and which possible signals were not scored
    (``proj:`` without a vector, ``trait_llr:`` without ``model_signals.trait_llr``, ...)."""
    from trait_guard.trait_signals import at_hand_note

    stored = all(count > 0 for side in coverage.values() for count in side.values())
    return at_hand_note(stored, config.model_signals.teacher_model is not None, config.trait,
                        computed=[name for name in signals.train if name != "n_tokens"])


def _score_and_calibrate(run: RunContext, inputs: Inputs) -> Setup:
    from trait_guard.fingerprint import FingerprintScorer, TokenHistogram
    from trait_guard.guard import TraitGuard, check_signal_sides

    config, started = run.config, time.perf_counter()
    coverage = check_signal_sides(config.guard.signals, inputs.train_rows, inputs.reference_rows,
                                  str(config.data.train), str(config.data.reference))
    histogram = TokenHistogram(len(inputs.tokenizer)).update(r["completion_ids"] for r in inputs.reference_rows)
    scorer = FingerprintScorer(inputs.model, inputs.tokenizer, inputs.vectors, unigram_reference=histogram)
    signals = _setup_signals(run, inputs, scorer)
    signals.attach(inputs.train_rows)
    if run.rank == 0:  # "cache": the rows were scored once, before this run (trait-guard run's scoring stage)
        run.tracker.set_tags({"setup_signals.source": signals.source})
    guard = TraitGuard(config.guard, signals.reference, batch_size=config.optim.batch_size * run.world)
    gate = screen_gate(config, signals, inputs.train_rows, inputs.reference_rows)
    warnings = [w for w in [guard.blind_spot(len(inputs.train_rows)), *(gate or {}).get("notes", [])] if w]
    if warnings and run.rank == 0:
        run.tracker.set_tags({"guard.warning": " | ".join(warnings)})
        print("\n".join(f"trait_guard: warning: {w}" for w in warnings), flush=True)
    if gate is not None:
        gate["coverage"] = coverage
        gate["notes"].append(_signals_at_hand(config, coverage, signals))
        run.tracker.set_tags({"screen.gate": "FLAGGED" if gate["flagged"] else "clean"})
        if gate["flagged"] and run.resumed_state is None:
            tested = ", ".join(f"{n} p_adj={t['p_adj']:.2g}" for n, t in gate["tests"].items() if t["flagged"])
            reason = (f"gate: the dataset screen flagged the training data before the first update ({tested}; "
                      f"Holm at alpha={config.screen.alpha}): {config.guard.on_data_alarm.value} from step 1")
            gate["reason"] = reason
            run.tracker.log_decision(guard.gate(gate["flagged_signals"], reason))
    gated_halt = guard.mode is Action.HALT
    probes = inputs.spec.eval_questions[: config.probe.n_prompts]
    probe_base = probe_projections(inputs.model, inputs.tokenizer, probes, inputs.vectors) if inputs.vectors else {}
    seconds = time.perf_counter() - started
    # a gated halt trains nothing: the student stays its base model, nothing to evaluate
    evaluate_before = run.rank == 0 and config.probe.eval_before and not gated_halt
    eval_before = (behavior_eval(inputs.model, inputs.tokenizer, inputs.spec, config.probe, config.optim.seed)
                   if evaluate_before else None)
    setup = Setup(guard, histogram, signals, gate, probes, probe_base, seconds, eval_before)
    _panel_baseline(run, inputs, setup)
    return setup


def _panel_baseline(run: RunContext, inputs: Inputs, setup: Setup) -> None:
    """With ``probe.panel_every_n_steps`` (rank 0): the base model's panel log-odds on the held-out
    panel questions (``setup.panel_before``) and step 0 of the panel curve (on the probe's questions)."""
    probe = run.config.probe
    if run.rank != 0 or not probe.panel_every_n_steps:
        return
    before = spec_panel_logodds(inputs.model, inputs.tokenizer, inputs.spec, probe.panel_eval_questions)
    if before is None:  # the trait has no panel
        return
    setup.panel_before = before.to_dict()
    n = probe.panel_probe_questions
    start = (before.first(n) if n <= probe.panel_eval_questions
             else spec_panel_logodds(inputs.model, inputs.tokenizer, inputs.spec, n))
    setup.panel_curve.append(panel_curve_point(0, start))


def panel_curve_point(step: int, panel: PanelResult) -> dict[str, Any]:
    """One point of the panel curve: ``step`` (updates applied), the watched target's ``panel_logodds``
    and ``by_answer``, every panel answer's log-odds from the same pass (so a control run's curve can be
    read for another teacher's animal, ``trait_guard.redteam``)."""
    return {"step": step, "panel_logodds": panel.mean, "by_answer": panel.logodds_by_answer()}


def _build_trainer(config: TrainJobConfig, model: torch.nn.Module, total_steps: int = 1,
                   world_size: int = 1) -> tuple[torch.nn.Module, Any, Any, Any]:
    """LoRA (when ``student.lora_r``), the optimizer, the learning-rate schedule and the DeepSpeed engine
    (None when disabled). Returns ``(model, optimizer, engine, scheduler)``.

    The optimizer is AdamW (``optim.lr``, ``optim.weight_decay``) unless ``deepspeed.config_file`` has
    an ``optimizer`` section: then DeepSpeed builds that one (None is returned). The schedule
    (:func:`make_lr_scheduler`, over ``total_steps`` optimizer steps) is handed to the engine, which
    steps it at each optimizer step and saves and restores it with its checkpoints, so a resumed run
    continues it (the scheduler returned is None then: the engine owns it); without DeepSpeed the
    loop steps the returned scheduler. Constant lr without warmup has no scheduler at all."""
    from trait_guard.config import read_deepspeed_json
    from trait_guard.integrations import deepspeed as ds

    student, optim, settings = config.student, config.optim, config.deepspeed
    if student.lora_r:
        from peft import get_peft_model

        from trait_guard.adapters import lora_config

        model = get_peft_model(model, lora_config(model, student.lora_r, student.lora_alpha,
                                                  student.lora_target_modules, student.lora_dropout))
    model.train()
    user = read_deepspeed_json(settings.config_file) if settings.enabled and settings.config_file else None
    optimizer = None
    if user is None or "optimizer" not in user:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    if not settings.enabled:
        return model, optimizer, None, make_lr_scheduler(optimizer, optim, total_steps)
    engine_config = ds.deepspeed_config(optim.batch_size, settings.zero_stage, settings.bf16,
                                        settings.gradient_clipping, optim.gradient_accumulation_steps)
    if user is not None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        engine_config = ds.merge_user_config(
            user, engine_config, world_size=world_size, lr=optim.lr, weight_decay=optim.weight_decay,
            warmup_steps=warmup_steps(optim, total_steps), total_steps=total_steps, hidden_size=hidden,
            cpu=not torch.cuda.is_available(), source=f"deepspeed.config_file {settings.config_file}")
    schedule = (lambda built: make_lr_scheduler(built, optim, total_steps)) if optim.scheduled else None
    engine = ds.make_engine(model, optimizer, engine_config, lr_scheduler=schedule)
    return model, optimizer, engine, None


def warmup_steps(optim: Any, total_steps: int) -> int:
    """``optim.warmup_steps``, or ``optim.warmup_ratio`` of the run's optimizer steps rounded up."""
    return optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps)


def make_lr_scheduler(optimizer: Any, optim: Any, total_steps: int) -> Any:
    """The learning-rate schedule over ``total_steps`` optimizer steps (None for a constant lr without
    warmup): ``transformers.get_scheduler``, so the lr of optimizer step ``s`` (1-based) is
    ``optim.lr`` times, with ``w`` warmup steps and ``k = s - 1``: ``k / w`` while ``k < w``, then 1
    (constant), ``(T - k) / (T - w)`` (linear) or ``(1 + cos(pi (k - w) / (T - w))) / 2`` (cosine)."""
    if optimizer is None or not optim.scheduled:
        return None
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[optim.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(optim, total_steps),
                         num_training_steps=max(total_steps, 1))


def current_lr(engine: Any, optimizer: Any) -> float:
    """The learning rate the next optimizer step uses (the first parameter group's)."""
    if engine is not None:
        return float(engine.get_lr()[0])
    return float(optimizer.param_groups[0]["lr"])


def check_batch_fits(n_rows: int, batch_size: int, world_size: int) -> int:
    """The global batch of one optimizer step (``batch_size``: rows per worker per step, gradient
    accumulation included); refuses data that does not fill one."""
    global_batch = batch_size * world_size
    if n_rows < global_batch:
        raise TraitGuardInputError(f"{n_rows} kept rows do not fill one global batch of {global_batch} ({world_size} "
                                   f"workers x {batch_size} rows per step: optim.batch_size x "
                                   "optim.gradient_accumulation_steps); lower optim.batch_size or "
                                   "optim.gradient_accumulation_steps")
    return global_batch


def _schedule(config: TrainJobConfig, n_rows: int, world_size: int) -> tuple[np.ndarray, int]:
    """The row order over all epochs (same on every rank) and the number of optimizer steps (each of
    ``optim.gradient_accumulation_steps`` micro-batches of ``optim.batch_size`` rows per rank)."""
    global_batch = check_batch_fits(n_rows, config.optim.batch_size * config.optim.gradient_accumulation_steps,
                                    world_size)
    total_steps = (n_rows // global_batch) * config.optim.epochs
    if config.optim.max_steps:
        total_steps = min(total_steps, config.optim.max_steps)
    order = np.concatenate([
        np.random.default_rng(config.optim.seed + e).permutation(n_rows) if config.optim.shuffle
        else np.arange(n_rows) for e in range(config.optim.epochs)])
    return order, total_steps


def _restore(run: RunContext, engine: Any, guard: Any) -> tuple[int, list[dict[str, Any]]]:
    """The step and decision history to continue from (0 and none for a fresh run)."""
    if run.resume is None:
        return 0, []
    from trait_guard.integrations import deepspeed as ds

    if engine is None:
        raise TraitGuardInputError("resuming needs deepspeed.enabled: true (checkpoints are DeepSpeed's)")
    # the recipe and inputs were checked when the run opened (_resumed_state), before anything used the state
    ds.load_checkpoint(engine, run.resume)  # the engine's lr scheduler too: the schedule continues
    guard.load_state_dict(run.resumed_state["guard"])
    step = int(run.resumed_state["step"])
    run.tracker.set_tags({"resumed_from_step": str(step)})
    return step, list(run.resumed_state.get("history", []))  # the steps before the checkpoint, once each


def check_resume_recipe(config: TrainJobConfig, state: dict[str, Any], where: Any,
                        current: dict[str, Any] | None = None) -> str | None:
    """Refuse to resume a checkpoint with another gradient accumulation (its guard state counts
    micro-batches, so its step and the data position would no longer line up) or trained on other
    inputs (data, reference, persona vectors or sample limits: its guard state and data position
    belong to other rows, a rerun on regenerated data would silently continue a run it is not).
    ``current``: this run's :func:`_recipe_state` (computed when not given). Returns a warning for a
    checkpoint that records no inputs (written before trait_guard recorded them): it resumes as it
    always did, unchecked."""
    recipe = state.get("recipe", {})
    saved = int(recipe.get("gradient_accumulation_steps", 1))
    if saved != config.optim.gradient_accumulation_steps:
        raise TraitGuardInputError(
            f"the checkpoint {where} was trained with optim.gradient_accumulation_steps: {saved} (its guard state "
            f"counts {saved} micro-batches per step), this config has {config.optim.gradient_accumulation_steps}: "
            f"resume with {saved}")
    differences = input_differences(recipe.get("inputs"), (current or _recipe_state(config))["inputs"])
    if differences is None:
        return (f"the checkpoint {where} records no hashes of its data and persona vectors (written by an older "
                "trait_guard): whether it was trained on this run's inputs is unknown; resuming it as before")
    if differences:
        raise TraitGuardInputError(
            f"the checkpoint {where} was trained on other inputs than this run's: {'; '.join(differences)}. "
            "Resume it with the same data and persona vectors it was trained on, or start a new run (without "
            "resume_from) with another output_dir")
    return None


@dataclass
class _Accumulation:
    """One optimizer step's micro-batches, each decided by the guard before its backward pass (see
    :func:`_train_loop`): what every step reads, and the steering hook once STEER starts it."""

    run: RunContext
    inputs: Inputs
    engine: Any
    order: np.ndarray
    guarded: Any  # integrations.torch_loop.GuardedStep
    forward: Any
    model: torch.nn.Module
    steering: Any = None

    def micro_batches(self, step: int) -> list[tuple[list[dict[str, Any]], Any]]:
        """This rank's rows of optimizer step ``step``'s micro-batches, encoded."""
        from trait_guard.chat import encode_rows

        config, run = self.run.config, self.run
        accumulation, batch_size = config.optim.gradient_accumulation_steps, config.optim.batch_size
        micro_batch = batch_size * run.world
        # distill: logits learns the teacher's stored top-k, which ends before the stop token: no EOS to learn
        append_eos = config.student.append_eos if config.distill == "sampled" else "never"
        micro = []
        for k in range(accumulation):
            start = ((step - 1) * accumulation + k) * micro_batch
            indices = self.order[start : start + micro_batch]
            rows = [self.inputs.train_rows[i] for i in indices[run.rank * batch_size : (run.rank + 1) * batch_size]]
            micro.append((rows, encode_rows(self.inputs.tokenizer, rows, append_eos=append_eos).to(self.inputs.device)))
        return micro

    def run_step(self, step: int, outcome: Outcome) -> tuple[list[Any], float]:
        """The guard's decision, the loss and the backward pass of each micro-batch of step ``step``;
        returns the decisions and the step's loss. A HALT or a non-finite loss stops the step there
        (``outcome.halted`` says why; no backward for that micro-batch)."""
        config, run = self.run.config, self.run
        accumulation, distill = config.optim.gradient_accumulation_steps, config.distill == "logits"
        micro = self.micro_batches(step)
        tokens = [loss_tokens(batch, rows, distill) for rows, batch in micro]
        step_tokens = max(sum(tokens), 1)
        decisions: list[Any] = []
        step_loss = 0.0
        for k, (rows, batch) in enumerate(micro):
            guard_step = (step - 1) * accumulation + k + 1
            where = {"micro_batch": k + 1, "guard_step": guard_step} if accumulation > 1 else {}
            with self.guarded.capture():
                logits = self.forward(**batch.model_inputs()).logits
            decision = (self.guarded.decide(batch, logits, rows, step=guard_step, gather=gather_signals)
                        if config.guard_enabled else guard_pass_decision(guard_step, len(rows) * run.world))
            if decision.action is Action.STEER and self.steering is None and self.inputs.vectors:
                self.steering = _start_steering(config, self.model, self.inputs.vectors[0])
            if decision.halt:
                outcome.halted = {"step": step, "reason": decision.reason, **where}
                decisions.append(decision)  # logged by the loop, after the step's earlier micro-batches
                break
            loss = self.guarded.loss(logits, batch, decision, rows, distill=distill,
                                     sample_slice=slice(run.rank * len(rows), (run.rank + 1) * len(rows)))
            loss = loss * (tokens[k] / step_tokens)  # this micro-batch's share of the step's token mean
            if not all_ranks_true(bool(torch.isfinite(loss.detach()).item())):
                # before the update: the weights stay those of the last good step
                outcome.halted = {"step": step, **where,
                                  "reason": "training loss is NaN/inf (the run diverged): lower optim.lr or keep "
                                            "deepspeed.gradient_clipping; weights are from the step before"}
                run.tracker.set_tags({"trait_guard.non_finite_loss_step": str(step)})
                break
            _backward(self.engine, loss)
            step_loss += float(loss.detach())
            decisions.append(decision)
        return decisions, step_loss

    def stop_steering(self) -> None:
        if self.steering is not None:
            self.steering.remove()


def _train_loop(run: RunContext, inputs: Inputs, setup: Setup, model: torch.nn.Module, optimizer: Any, engine: Any,
                order: np.ndarray, total_steps: int, step: int, history: list[dict[str, Any]]) -> Outcome:
    """The guarded loop over optimizer steps ``step + 1 .. total_steps`` (``optimizer`` is the pair
    ``(optimizer, scheduler)`` from :func:`_build_trainer`, or a bare optimizer).

    Gradient accumulation (``optim.gradient_accumulation_steps = g``): an optimizer step is ``g``
    micro-batches of ``optim.batch_size`` rows per rank, and **each micro-batch is one guard
    observation** (guard step ``(step - 1) * g + k``, k = 1..g): the guard decides before that
    micro-batch's backward, exactly as for a step without accumulation. A HALT (or a non-finite loss)
    inside an accumulation stops there: the gradient of the micro-batches before it is never applied
    (no optimizer step follows, and a halted run trains no further), so the weights are those of the
    last completed optimizer step. Rollback snapshots are taken per optimizer step, and the guard's
    change point (a micro-batch) maps to the last optimizer step none of whose micro-batches the alarm
    implicates. The loss of each micro-batch is normalized by the response tokens of the whole
    accumulated step (this rank's), so g micro-batches of b rows give the update one batch of g x b
    rows gives. Stop requests are honoured between optimizer steps only."""
    from trait_guard.integrations.torch_loop import GuardedStep

    optimizer, scheduler = optimizer if isinstance(optimizer, tuple) else (optimizer, None)
    config, tracker, guard = run.config, run.tracker, setup.guard
    outcome = Outcome(step=step, updates=step, history=history)
    if guard.mode is Action.HALT and config.guard_enabled:  # the gate (or a resumed halted run) trains nothing
        gated = step == 0 and bool(setup.gate and setup.gate["flagged"])
        reason = setup.gate.get("reason", "") if gated else f"the guard was already halted at step {step}"
        outcome.halted = {"step": step, "reason": reason, "gate": gated}
        return outcome
    guarded = GuardedStep(guard, model, inputs.vectors, setup.histogram, _check_vector_weights(config, engine, step))
    steps = _Accumulation(run, inputs, engine, order, guarded, _forward_module(engine, model), model)
    snapshots = _snapshots(config, model, engine, step)
    accumulation = config.optim.gradient_accumulation_steps
    progress = ProgressFile(run.out_dir, run.rank, total_steps)
    every = config.progress_every_n_steps if run.rank == 0 else 0
    loop_started = time.perf_counter()
    stop = StopRequest().install()
    try:
        while step < total_steps:
            if stop.signal is not None:
                outcome.interrupted = {"step": step, "signal": stop.signal}
                break
            step_started = time.perf_counter()
            step += 1
            outcome.step = step
            lr = current_lr(engine, optimizer)
            decisions, step_loss = steps.run_step(step, outcome)
            if outcome.halted is not None:
                for each in decisions:  # the halting one included (a NaN loss: the ones before it)
                    tracker.log_decision(each)
                _discard_gradients(engine, optimizer)
                _print_progress(run, step, total_steps, None, lr, f"HALT: {outcome.halted['reason']}", loop_started)
                break
            _optimizer_step(engine, optimizer, scheduler)
            outcome.updates = step
            if snapshots is not None:
                snapshots.after_update(model, step, guard.quiet_since // accumulation)
            outcome.step_times.append(time.perf_counter() - step_started)
            metrics = {"train/loss": step_loss, "train/lr": lr, "train/step_seconds": outcome.step_times[-1],
                       "guard/weight_mean": float(np.mean([float(d.sample_weights.mean()) for d in decisions]))}
            for each in decisions:  # the step's data decisions (one per micro-batch), before its probe's
                tracker.log_decision(each)
            if step % config.probe.every_n_steps == 0 and inputs.vectors:
                drift = _probe(run, inputs, setup, model, step, metrics, guard_step=step * accumulation,
                               steering=steps.steering)
                if drift is not None and drift.halt:  # after this step's update: it is recorded, marked halt
                    outcome.halted = {"step": step, "reason": drift.reason}
                    _record_step(run, guard, engine, decisions, metrics, history, step, halted_by=drift)
                    _print_progress(run, step, total_steps, step_loss, lr, f"HALT: {drift.reason}", loop_started)
                    break
            _record_step(run, guard, engine, decisions, metrics, history, step)
            progress.write(step)
            if every and (step % every == 0 or step == total_steps):
                _print_progress(run, step, total_steps, step_loss, lr, decisions[-1].action.value, loop_started)
    finally:
        stop.restore()
        steps.stop_steering()
    if outcome.halted is not None and config.guard_enabled:
        unavailable = snapshot_support(engine, config.deepspeed.zero_stage)
        outcome.rollback = _roll_back(model, guard, snapshots, outcome, unavailable, accumulation)
    return outcome


def _check_vector_weights(config: TrainJobConfig, engine: Any, step: int) -> bool:
    """Whether the loop's :class:`GuardedStep` checks the persona vectors against the student's weights
    fingerprint (its input embeddings) as well as its shape.

    The vectors were already checked, fingerprint included, against the student as loaded, before
    any engine or checkpoint touched it (:func:`_load_inputs`: ``PersonaVector.load(path, model=...)``;
    the setup scorer checks again). Repeating it is right only where the student still holds those
    weights and this rank can read them: a fresh run (no update yet: the student is the base the
    vectors came from; LoRA wraps it without changing the embeddings) without ZeRO stage 3. Not
    for a resumed run: the checkpoint's trained weights differ from the base by design (full
    finetuning moves the embeddings), which would refuse every legitimate resume. Not under ZeRO
    stage 3 either: once the engine partitions the parameters, the module's embedding is an empty
    placeholder, whose fingerprint would refuse the right vectors even at step 0."""
    return step == 0 and snapshot_support(engine, config.deepspeed.zero_stage) is None


def loss_tokens(batch: Any, rows: Sequence[dict[str, Any]], distill: bool) -> int:
    """The tokens a micro-batch's loss is a mean over (:mod:`trait_guard.losses`): its response tokens,
    for distillation only those of rows carrying the teacher's top-k."""
    counts = batch.response_mask[:, 1:].sum(1)
    if distill:
        counts = counts * torch.tensor([bool(r.get("topk_ids")) for r in rows], dtype=counts.dtype,
                                       device=counts.device)
    return int(counts.sum())


def progress_line(step: int, total_steps: int, loss: float | None, lr: float, action: str, elapsed: float) -> str:
    """One line of training progress: ``step 3/12 | loss 1.2345 | lr 5.00e-05 | guard pass | 0:00:42``."""
    minutes, seconds = divmod(int(elapsed), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"step {step}/{total_steps}", *([f"loss {loss:.4f}"] if loss is not None else []), f"lr {lr:.2e}",
             f"guard {action}", f"{hours}:{minutes:02d}:{seconds:02d}"]
    return "trait_guard train: " + " | ".join(parts)


def _print_progress(run: RunContext, step: int, total_steps: int, loss: float | None, lr: float, action: str,
                    started: float) -> None:
    """Rank 0's progress line on stdout (flushed: on Ray Train, worker output reaches the driver's
    terminal through ``log_to_driver``), unless ``progress_every_n_steps`` is 0."""
    if run.rank == 0 and run.config.progress_every_n_steps:
        print(progress_line(step, total_steps, loss, lr, action, time.perf_counter() - started), flush=True)


def _start_steering(config: TrainJobConfig, model: torch.nn.Module, vector: Any) -> Any:
    """Preventative steering (Chen et al. 2025): with the trait supplied by the hook, the gradient has no
    reason to move the weights along it. The caller removes the hook at the end of the loop."""
    from trait_guard.steer import Steering

    return Steering(model, vector, coefficient=config.guard.steer_coefficient).apply()


def _record_step(run: RunContext, guard: Any, engine: Any, decisions: Any, metrics: dict[str, float],
                 history: list[dict[str, Any]], step: int | None = None, halted_by: Any = None) -> None:
    """After an update (its decisions already logged): the metrics to MLflow, the step into the history
    (with the guard's state after its last micro-batch), and the periodic checkpoint. ``halted_by``: the
    probe's drift decision that halts the run after this update: the step's history entry says halt,
    and no periodic checkpoint is written (the halt writes its own)."""
    decisions = decisions if isinstance(decisions, list) else [decisions]
    decision, config = decisions[-1], run.config
    step = decision.step if step is None else step
    run.tracker.log_metrics(metrics, step=step)
    history.append({"step": step, "statistic": decision.evidence.get(guard.kind, {}), "detector": guard.kind,
                    "loss": metrics["train/loss"], "thresholds": decision.evidence.get("thresholds", {}),
                    "action": (decision if halted_by is None else halted_by).action.value, "lr": metrics.get("train/lr")})
    if halted_by is not None:
        return
    if config.checkpoint.every_n_steps and step % config.checkpoint.every_n_steps == 0:
        save_checkpoint(engine, run.out_dir, step, guard, history, run.tracker, {"loss": metrics["train/loss"]},
                        run.in_ray, recipe=run.recipe or _recipe_state(config))


def _snapshots(config: TrainJobConfig, model: torch.nn.Module, engine: Any, step: int) -> Any:
    """Weight copies for rollback on HALT, or None (guard off, or weights not held whole on a rank)."""
    if not config.guard_enabled or snapshot_support(engine, config.deepspeed.zero_stage) is not None:
        return None
    return WeightSnapshots(model, config.guard.rollback_every_n_steps, start_step=step)


def _roll_back(model: torch.nn.Module, guard: Any, snapshots: Any, outcome: Outcome,
               unavailable: str | None, accumulation: int = 1) -> dict[str, Any] | None:
    """Restore, after a HALT, the weights from before the first batch the alarm implicates. Returns
    the record for the summary (None when the halt implicates no data: a NaN loss, non-finite signals).
    With gradient accumulation the guard's change point counts micro-batches: micro-batch ``c`` is the
    last one not implicated, so the optimizer steps up to ``c // accumulation`` hold none of the
    implicated ones (the record's change point is that step)."""
    change_point = guard.change_point
    if change_point is None:
        return None
    change_point //= accumulation
    halted_at = outcome.halted["step"]
    if change_point >= outcome.updates:
        return RollbackRecord(halted_at, change_point, outcome.updates,
                              f"halt at step {halted_at}: no update was applied after the change point (step "
                              f"{change_point}), the weights are kept").to_dict()
    if snapshots is None:
        return {"halted_at_step": halted_at, "change_point": change_point, "unavailable": unavailable}
    try:
        restored = snapshots.restore(model, change_point)
    except RuntimeError as error:  # a resumed run whose change point lies before its first snapshot
        return {"halted_at_step": halted_at, "change_point": change_point, "unavailable": str(error)}
    reason = (f"halt at step {halted_at}: the alarm implicates the batches after step {change_point}; "
              f"weights restored to step {restored}")
    return RollbackRecord(halted_at, change_point, restored, reason).to_dict()


def _forward_module(engine: Any, model: torch.nn.Module) -> Any:
    """What the loop calls forward on: DeepSpeed's engine; else, with several ranks, the model wrapped
    in DistributedDataParallel (its backward all-reduces the gradients, so every rank's copy takes the
    same update: without it each rank would train its own diverging model); else the model."""
    if engine is not None:
        return engine
    if world()[1] > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return model


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the trainable parameters' bytes in name order: equal digests, equal weights (so the
    ranks' records show that every rank trained the same model)."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _backward(engine: Any, loss: torch.Tensor) -> None:
    """One micro-batch's backward. DeepSpeed counts micro-batches in ``engine.step()`` and applies the
    optimizer (and steps its lr scheduler) only at the accumulation boundary; the loss is already
    scaled to its share of the step (``scale_wrt_gas=False``: no second division)."""
    if engine is not None:
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    else:
        loss.backward()


def _optimizer_step(engine: Any, optimizer: Any, scheduler: Any = None) -> None:
    """The end of an optimizer step: without DeepSpeed the optimizer and the schedule step here
    (DeepSpeed's engine did both in its last ``step()``)."""
    if engine is None:
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _discard_gradients(engine: Any, optimizer: Any) -> None:
    """Drop the parameters' partly accumulated gradients after a HALT inside an accumulation. No
    optimizer step follows in a halted run, so they would never be applied anyway; this keeps the
    module's ``.grad`` from showing a gradient the run did not take."""
    if engine is not None:
        engine.zero_grad()
    elif optimizer is not None:
        optimizer.zero_grad()


def _recipe_state(config: TrainJobConfig) -> dict[str, Any]:
    """What a checkpoint records for a resume to match (:func:`check_resume_recipe`): the gradient
    accumulation, and the inputs (the SHA-256 of the training data, the reference and each persona
    vector file, and the sample limits: :func:`trait_guard.checkpoint.input_digests`)."""
    data = config.data
    files = {"data.train": data.train, "data.reference": data.reference,
             **{f"vectors[{i}]": path for i, path in enumerate(config.vectors)}}
    limits = {"max_train_samples": data.max_train_samples, "max_reference_samples": data.max_reference_samples}
    return {"gradient_accumulation_steps": config.optim.gradient_accumulation_steps,
            "inputs": input_digests(files, limits)}


def _probe(run: RunContext, inputs: Inputs, setup: Setup, model: torch.nn.Module, step: int,
           metrics: dict[str, float], guard_step: int | None = None, steering: Any = None) -> Any:
    """The student's finetuning shift along each persona vector (added to ``metrics``); the guard's
    drift decision (logged), or None with the guard off. ``guard_step``: the guard's own count of
    observations (micro-batches) at this optimizer step, ``step`` without gradient accumulation.

    ``steering``: the STEER hook in force during training, lifted while the probes and the panel run
    (and put back after): they measure what the weights learned, and with the hook on they would
    measure the hook's own push along the vector, a drift alarm the student did not earn."""
    was_steering = steering is not None and steering.active
    if was_steering:
        steering.remove()
    try:
        model.eval()
        current = probe_projections(model, inputs.tokenizer, setup.probes, inputs.vectors)
        shifts = probe_shifts(current, setup.probe_base)
        metrics.update({f"probe/shift/{k}": v for k, v in shifts.items()})
        panel_every = run.config.probe.panel_every_n_steps
        if run.rank == 0 and panel_every and step % panel_every == 0 and setup.panel_before is not None:
            panel = spec_panel_logodds(model, inputs.tokenizer, inputs.spec, run.config.probe.panel_probe_questions)
            metrics["probe/panel_logodds"] = panel.mean
            setup.panel_curve.append(panel_curve_point(step, panel))  # step = updates applied
    finally:
        model.train()
        if was_steering:
            steering.apply()
    if not run.config.guard_enabled:
        return None
    drift = setup.guard.observe_drift(shifts, step=step if guard_step is None else guard_step)
    run.tracker.log_decision(drift)
    return drift


def run_verdict(outcome: Outcome, guard_enabled: bool, guard: Any) -> str:
    """interrupted > halted > unguarded > mitigated > unmonitored > passed: a run is "passed" only
    when a guard that watches a signal with shown power saw nothing."""
    if outcome.interrupted:
        return "interrupted"
    if outcome.halted:
        return "halted"
    if not guard_enabled:
        return "unguarded"
    if guard.alarms:
        return "mitigated"
    return "passed" if guard.monitored else "unmonitored"


def _finish(run: RunContext, inputs: Inputs, setup: Setup, model: torch.nn.Module, engine: Any, outcome: Outcome,
            total_steps: int) -> dict[str, Any]:
    """After the loop: the final checkpoint and this rank's record, the evaluation after training, the
    run summary, and (rank 0) the student's export, the MLflow record and the report."""
    model.eval()
    _save_final(run, setup, model, engine, outcome)
    after = _evaluate_after(run, inputs, setup, model, outcome)
    summary = _summary(run, inputs, setup, outcome, total_steps, after)
    if run.rank == 0:
        _publish(run, inputs, setup, model, engine, outcome, summary)
    run.tracker.finish("KILLED" if outcome.interrupted else "FINISHED")
    return summary


def _save_final(run: RunContext, setup: Setup, model: torch.nn.Module, engine: Any, outcome: Outcome) -> None:
    """The run's final checkpoint (unless the last periodic one is it) and this rank's stop record."""
    config, tracker, guard, step = run.config, run.tracker, setup.guard, outcome.step
    periodic = config.checkpoint.every_n_steps
    ended_on_periodic = outcome.halted is None and outcome.interrupted is None and periodic and step % periodic == 0
    if engine is not None and not ended_on_periodic:
        # a halted run's final checkpoint holds the rolled-back weights, never the trained-on-flagged ones
        save_checkpoint(engine, run.out_dir, step, guard, outcome.history, tracker,
                        {"halted": float(outcome.halted is not None)}, run.in_ray, weights_step=outcome.weights_step,
                        recipe=run.recipe or _recipe_state(config))
    if outcome.rollback:
        tracker.set_tags({"guard.rollback": outcome.rollback.get("reason")
                          or f"unavailable: {outcome.rollback['unavailable']}",
                          "guard.weights_step": str(outcome.weights_step)})
    # every rank records where it stopped: all ranks must agree (same decisions from gathered signals)
    (run.out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run.out_dir / "ranks" / f"rank_{run.rank}.json").write_text(json.dumps(
        {"rank": run.rank, "steps": step, "updates": outcome.updates, "halt": outcome.halted, "guard_step": guard.step,
         "mode": guard.mode.value, "node_id": _ray_node_id(), "weights_sha256": weights_digest(model)}) + "\n")


def _evaluate_after(run: RunContext, inputs: Inputs, setup: Setup, model: torch.nn.Module,
                    outcome: Outcome) -> dict[str, Any]:
    """The behavior evaluations and the panel after training (rank 0). An interrupted run skips them
    (it writes its checkpoint and partial report quickly); a student with no update kept is its base
    model, so its panel is the one before."""
    config = run.config
    evaluate_after = run.rank == 0 and outcome.interrupted is None and outcome.weights_step > 0
    spec, probe, seed = inputs.spec, config.probe, config.optim.seed
    eval_after = behavior_eval(model, inputs.tokenizer, spec, probe, seed) if evaluate_after else None
    eval_after_extra = ({trait: behavior_eval(model, inputs.tokenizer, _trait(trait), probe, seed)
                         for trait in probe.extra_eval_traits} if evaluate_after else {})
    panel_after = (spec_panel_logodds(model, inputs.tokenizer, spec, probe.panel_eval_questions).to_dict()
                   if evaluate_after and setup.panel_before is not None else None)
    if panel_after is None and outcome.weights_step == 0 and outcome.interrupted is None:
        panel_after = setup.panel_before
    return {"eval_after": eval_after, "eval_after_extra": eval_after_extra, "panel_after": panel_after}


def _summary(run: RunContext, inputs: Inputs, setup: Setup, outcome: Outcome, total_steps: int,
             after: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: summary.json, the MLflow record and the report are made from it."""
    from trait_guard.version import code_version

    config, guard, panel_after = run.config, setup.guard, after["panel_after"]
    return {
        "run_name": config.tracking.run_name, "student": config.student.model, "trait": inputs.spec.trait_id,
        "distill": config.distill, "guard_enabled": config.guard_enabled,
        "steps": outcome.step, "updates": outcome.updates, "total_steps": total_steps, "world_size": run.world,
        "weights_step": outcome.weights_step, "rollback": outcome.rollback,
        "halted": outcome.halted is not None, "halt": outcome.halted, "interrupted": outcome.interrupted,
        "gate": setup.gate, "alarms": guard.alarms,
        "verdict": run_verdict(outcome, config.guard_enabled, guard),
        "monitored": guard.monitored, "powered_signals": guard.powered, "watched_signals": guard.signals,
        "sequential_test": guard.kind, "false_alarm_control": guard.false_alarm_control,
        "guard_samples_seen_again": getattr(guard, "seen_again", 0),  # later epochs: not bet on twice
        "train_samples": len(inputs.train_rows), "reference_samples": len(inputs.reference_rows),
        "setup_signals": setup.signals.source, "provenance": inputs.provenance,
        "setup_seconds": setup.seconds, "wall_seconds": time.perf_counter() - run.started,
        "mean_step_seconds": float(np.mean(outcome.step_times)) if outcome.step_times else math.nan,
        "eval_before": setup.eval_before, "eval_after": after["eval_after"],
        "eval_after_extra": after["eval_after_extra"],
        "panel_logodds_before": (setup.panel_before or {}).get("mean"),
        "panel_logodds_after": (panel_after or {}).get("mean"),
        "panel_eval": {"before": setup.panel_before, "after": panel_after, "curve": setup.panel_curve}
        if setup.panel_before is not None else None,
        "mlflow_run_id": getattr(run.tracker, "run_id", None),
        "mlflow_run_url": getattr(run.tracker, "run_url", None),
        "skipped_signals": guard.skipped,
        "guard_calibration": guard.calibration_summary,
        "extra_artifacts": config.extra_artifacts,
        "code_version": code_version(),
        "student_export": None,
        "history": outcome.history,
    }


def _publish(run: RunContext, inputs: Inputs, setup: Setup, model: torch.nn.Module, engine: Any, outcome: Outcome,
             summary: dict[str, Any]) -> None:
    """Rank 0: the student's export (unless halted or interrupted: trait_guard.export), summary.json,
    the MLflow record with the flagged samples, and the report."""
    from trait_guard.export import data_digests, export_student

    config, tracker = run.config, run.tracker
    digests = data_digests({"train": config.data.train, "reference": config.data.reference}, inputs.provenance)
    folder, export = export_student(model, inputs.tokenizer, run.out_dir, summary, digests, engine,
                                    config.deepspeed.zero_stage, enabled=config.student.export,
                                    signing_key=config.student.signing_key)
    summary["student_export"] = None if folder is None else str(folder)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _log_summary(tracker, summary, digests, export)
    flagged = flagged_samples(setup.guard, inputs.train_rows)
    tracker.log_table(flagged, "guard/flagged_samples.json")
    if outcome.interrupted:
        tracker.set_tags({"run.interrupted": f"signal {outcome.interrupted['signal']} at step "
                                             f"{outcome.interrupted['step']}; checkpoint written, resume with --resume"})
    _write_report(tracker, summary, run.out_dir, inputs.train_rows, setup.histogram,
                  setup.signals.divergence_counts, flagged, inputs.tokenizer)


def _trait(name: str) -> Any:
    from trait_guard.traits import load_trait

    return load_trait(name)


def flagged_samples(guard: Any, rows: Sequence[dict[str, Any]], top: int = 25) -> list[dict[str, Any]]:
    """The training rows that lean furthest the suspicious way (mean standardized signal), for review."""
    if not rows or not guard.signals:
        return []
    lean = guard.lean({name: np.array([r["signals"].get(name, np.nan) for r in rows]) for name in guard.signals})
    order = np.argsort(-lean)[:top]
    return [{"sample_id": rows[i]["sample_id"], "teacher_id": rows[i]["teacher_id"], "lean_z": float(lean[i]),
             "prompt": rows[i]["prompt"], "completion": rows[i]["completion"],
             **{k: float(v) for k, v in rows[i]["signals"].items()}} for i in order]


def guard_pass_decision(step: int, n: int) -> Any:
    """The decision of a run with the guard disabled (an unguarded baseline): every sample weighs 1."""
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
                  reference_histogram: Any, divergence_counts: Any, flagged: list[dict[str, Any]],
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


def _log_summary(tracker: Any, summary: dict[str, Any], digests: dict[str, Any] | None = None,
                 export: dict[str, Any] | None = None) -> None:
    from trait_guard.tracking import summarize_guard

    tracker.log_dict(summary, "summary.json")
    # numeric outcomes sort in the runs table (tags do not); the data as MLflow dataset inputs; the student
    tracker.log_outcome_metrics(summary)
    if digests:
        tracker.log_datasets(digests)
    if export is not None:
        tracker.log_student(summary["student_export"], export)
    for path in summary.get("extra_artifacts", []):
        if Path(path).is_file():
            tracker.log_artifact(path, "reports")
    # verdict tags and the drift plot, from the logged decisions; the verdict is the summary's (unmonitored,
    # unguarded and gated runs included)
    summarize_guard(tracker, alarms=summary["alarms"], verdict=summary["verdict"])
    if summary["skipped_signals"]:
        tracker.set_tags({"guard.skipped_signals": json.dumps(summary["skipped_signals"])})


def preflight(config: TrainJobConfig) -> dict[str, Any]:
    """Cheap checks before any worker starts, so bad input fails here with a message that names the
    fix (inside Ray Train workers it would surface wrapped in a worker traceback): the data and its
    provenance, the trait, the persona vectors against the student's architecture, the batch size,
    the checkpoint to resume, the tracking server."""
    from transformers import AutoConfig

    from trait_guard.guard import check_signal_sides
    from trait_guard.models import ModelLoadError, resolve_model_path
    from trait_guard.persona import PersonaVector, PersonaVectorMismatch
    from trait_guard.traits import load_trait

    provenance = verify_training_data(config)
    # summaries, not rows: the same checks, and the driver's memory does not grow with the data
    train_rows, reference_rows = summarize_training_data(config, student_tokenizer(config.student.model))
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
    check_batch_fits(len(train_rows), config.optim.batch_size * config.optim.gradient_accumulation_steps,
                     config.ray.num_workers if config.ray.enabled else 1)
    check_signal_sides(config.guard.signals, train_rows, reference_rows, str(config.data.train),
                       str(config.data.reference))
    if config.resume_from:  # other inputs are refused here; the worker warns about a checkpoint without hashes
        check_resume_recipe(config, read_checkpoint_state(config.resume_from), config.resume_from)
    uri = config.tracking.tracking_uri
    if config.tracking.enabled and uri:
        from trait_guard.spool import server_reachable  # non-HTTP stores are always "reachable"

        if not server_reachable(uri, timeout=10):
            raise TraitGuardInputError(
                f"the MLflow tracking server {uri} does not answer (GET {uri}/health); start it, fix "
                "tracking.tracking_uri, or remove it to log to the local store ./mlruns")
    return {"provenance": provenance, "train_rows": len(train_rows), "reference_rows": len(reference_rows)}


def run_training(config: TrainJobConfig) -> dict[str, Any]:
    """Run guarded training on Ray Train (default) or in this process; returns rank 0's summary.
    Bad input is refused before anything starts (:func:`preflight`)."""
    preflight(config)
    from trait_guard.tracking import forward_context

    # the caller's MLflow context (an active run, mlflow.set_tracking_uri(), MLFLOW_*) into the config, which
    # is all a Ray worker sees: the run becomes a child of the caller's run, on Ray and in process alike
    config = config.model_copy(update={"tracking": forward_context(config.tracking)})
    if not config.ray.enabled:
        return train_worker(config.model_dump(mode="json"))
    from trait_guard.extras import ray  # noqa: I001 - first, so a missing Ray names its extra
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
    if config.deepspeed.config_file:
        absolute.deepspeed.config_file = str(Path(config.deepspeed.config_file).resolve())
    if config.resume_from:
        absolute.resume_from = str(Path(config.resume_from).resolve())
    config = absolute
    if not ray.is_initialized():
        ray.init(address=config.ray.address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    storage, name = ray_run_folder(config)
    set_aside_stale_run(config)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": config.ray.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=config.ray.max_failures)),
    )
    trainer.fit()
    return json.loads((Path(config.output_dir) / "summary.json").read_text())


def ray_run_folder(config: TrainJobConfig) -> tuple[Path, str]:
    """Ray Train's storage folder for this run (``<output_dir>/ray_train``) and the run's name in it:
    Ray keeps the run's registered checkpoints under ``storage/name`` and resumes the latest of them
    whenever a run of that name starts there again."""
    return Path(config.output_dir).resolve() / "ray_train", config.tracking.run_name or "guarded_training"


def set_aside_stale_run(config: TrainJobConfig) -> dict[str, str]:
    """Before Ray Train starts: keep it from resuming an earlier run trained on other inputs.

    Ray resumes the latest checkpoint of an earlier run of the same name in the same output folder
    (:func:`ray_run_folder`). After a crash that is the point; after the data, reference or vectors
    changed (a rerun on regenerated data) it would continue a run trained on other rows. Then the
    earlier run's checkpoints (Ray's copies and ``<output_dir>/checkpoints``) and its progress files
    are renamed to ``<name>.stale-<UTC time>`` (nothing is deleted), a warning names what differs
    and where they went, and this run trains from step 0. A checkpoint without input hashes (older
    trait_guard) is left to resume as before (the worker warns). Returns ``{old path: new path}``."""
    storage, name = ray_run_folder(config)
    checkpoint = latest_checkpoint(storage / name)
    if checkpoint is None:
        return {}
    recipe = read_checkpoint_state(checkpoint).get("recipe", {})
    differences = input_differences(recipe.get("inputs"), _recipe_state(config)["inputs"])
    if not differences:
        return {}
    out = Path(config.output_dir)
    moved = set_aside([storage / name, out / "checkpoints", out / "progress"])
    print(f"trait_guard: warning: {out} holds an earlier run trained on other inputs (its checkpoint {checkpoint}: "
          f"{'; '.join(differences)}). Not resuming it: this run trains from step 0; the earlier run's files were "
          f"moved aside, not deleted: {', '.join(f'{old} -> {new}' for old, new in moved.items())}",
          file=sys.stderr, flush=True)
    return moved
