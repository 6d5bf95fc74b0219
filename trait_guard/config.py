"""Validated job configs: pydantic models at the edge, loaded from YAML.

Every job (generation, screening, training, the whole run) takes one YAML file. Unknown keys are
errors, so a typo never silently falls back to a default; errors name the field path and the file::

    ray_jobs/configs/x.yaml: generation.n_prompts: Input should be greater than 0 (got -3)
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trait_guard.errors import TraitGuardInputError
from trait_guard.models import EMBEDDED_MODEL, DeviceSetting, DtypeSetting


def _check_unique(ids: list[str], what: str) -> None:
    """Refuse repeated ids (outputs are named after them: one would overwrite the other)."""
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"{what} must be unique, got {ids} (repeated: {repeated})")


class ConfigError(TraitGuardInputError):
    """A config file is unreadable or invalid; the message lists every bad field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelPlacement(StrictModel):
    """Where and in what precision a section's model loads: one ``device`` / ``dtype`` pair on every
    config section that loads a model (teachers, the student, extraction), resolved at load time by
    :func:`trait_guard.models.resolve_placement` in the process that loads it (a Ray actor or worker
    sees only its own GPUs), so ``auto`` means bfloat16 on a GPU worker and float32 on a CPU one."""

    device: DeviceSetting = Field(
        "auto", description="auto: the loading process's GPU where it has one, else the CPU; cpu; cuda (refused "
                            "where no GPU is visible)")
    dtype: DtypeSetting = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on the CPU; float32; bfloat16 (allowed on the CPU, "
                            "with a warning: slow there); float16 (CUDA only)")

    @model_validator(mode="after")
    def _dtype_fits_device(self) -> ModelPlacement:
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("device: cpu with dtype: float16 is not supported (CPU kernels lack float16): use dtype: "
                             "auto or float32 on the CPU (bfloat16 to halve the memory), or device: cuda")
        return self


class TeacherConfig(ModelPlacement):
    """A teacher: a base model, optionally with a trait installed by system prompt or LoRA adapter."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = EMBEDDED_MODEL
    trait: str | None = Field(None, description="trait reference, e.g. animal:owl")
    install: Literal["none", "system_prompt", "adapter", "argmax_preserving"] = Field(
        "none", description="how the trait is installed; argmax_preserving: sample from p_base^(1-w) * p_adapter^w "
        "with every step's argmax forced to the base's (the bias lives in the lower ranks only)")
    instruction: int = Field(0, ge=0, description="which positive instruction of the trait spec is the system prompt")
    system_prompt: str | None = Field(None, description="explicit system prompt (overrides the trait spec's)")
    adapter: str | None = Field(None, description="path to a LoRA adapter saved by trait_guard.adapters")
    sampling_seed: int | None = Field(
        None, description="sample with this seed instead of generation.seed (same prompts): e.g. a second control set")
    bias_weight: float = Field(0.5, gt=0, le=1, description="argmax_preserving: the adapter's weight w in the mixture")
    adapter_task: Literal["style:terse", "arithmetic"] | None = Field(
        None, description="a benign adapter: train the adapter (when missing) on this trait-less task instead of a "
                          "trait (trait_guard.adapters.BENIGN_TASKS: style:terse, short plain answers; arithmetic, "
                          "sums); its training text holds no animal of the trait panel. Needs an adapter install "
                          "and no `trait`")

    @model_validator(mode="after")
    def _consistent(self) -> TeacherConfig:
        if self.install == "system_prompt" and not (self.trait or self.system_prompt):
            raise ValueError("install: system_prompt needs `trait` (e.g. animal:owl) or `system_prompt`")
        if self.install in ("adapter", "argmax_preserving") and not self.adapter:
            raise ValueError(f"install: {self.install} needs `adapter: path/to/adapter`")
        if self.install == "none" and (self.system_prompt or self.adapter):
            raise ValueError("a teacher with install: none must not set system_prompt or adapter (set install)")
        if self.adapter_task and self.install not in ("adapter", "argmax_preserving"):
            raise ValueError(f"adapter_task: {self.adapter_task} sets what an adapter is trained on: set install: "
                             "adapter and adapter: path/to/adapter")
        if self.adapter_task and self.trait:
            raise ValueError(f"adapter_task: {self.adapter_task} makes a benign (trait-less) adapter, but trait: "
                             f"{self.trait} is set too: remove one")
        if self.bias_weight != 0.5 and self.install != "argmax_preserving":
            raise ValueError("bias_weight sets the argmax-preserving teacher's mixture: set install: "
                             "argmax_preserving, or remove bias_weight")
        return self


class GenerationConfig(StrictModel):
    family: Literal["numbers", "code"] = "numbers"
    family_options: dict[str, Any] = Field(default_factory=dict)
    n_prompts: int = Field(256, gt=0)
    seed: int = 0
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(40, gt=0, le=4096)
    constrained: bool = Field(True, description="constrain decoding to the family's characters")
    top_k_logprobs: int = Field(0, ge=0, le=256, description="store the teacher's top-k log-probs per token (0: off)")
    chunk_size: int = Field(16, gt=0, description="prompts per actor task (also the sampling batch)")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="existing cluster address; None starts a local Ray")
    num_actors: int = Field(2, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    max_in_flight_per_actor: int = Field(2, gt=0, description="backpressure: chunks pending per actor")


class GenerateJobConfig(StrictModel):
    """``trait-guard generate`` / ``ray_jobs.generate_teacher_data``: teacher datasets on Ray actors."""

    output_dir: str = "outputs/teacher_data"
    teachers: list[TeacherConfig] = Field(min_length=1)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> GenerateJobConfig:
        _check_unique([t.id for t in self.teachers], "teacher ids")
        return self


Config = TypeVar("Config", bound=BaseModel)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {len(err.errors())} invalid field(s)"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(path: str | Path, cls: type[Config]) -> Config:
    """Read a YAML file (safe loader) and validate it as ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level, got {type(data).__name__}")
    return validate_config(data, cls, source=str(path))


def validate_config(data: dict[str, Any], cls: type[Config], source: str = "config") -> Config:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from err


def with_overrides(config: Config, overrides: Mapping[str, Any], source: str = "config") -> Config:
    """A copy of ``config`` with ``overrides`` applied and validated again, like the file's own values.

    Keys are dotted field paths (``"ray.address"``); a value of None means "not given" and changes
    nothing. Command-line options and job scripts override a loaded config this way rather than by
    assigning to its fields, which pydantic does not validate (a bad value would pass silently)::

        config = with_overrides(load_config(path, TrainJobConfig), {"resume_from": args.resume}, source=path)
    """
    data = config.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, key = dotted.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        target[key] = value
    return validate_config(data, type(config), source=source)


# --------------------------------------------------------------------------------------------------
# Guarded training


class Action(str, Enum):
    PASS = "pass"
    REWEIGHT = "reweight"
    MASK = "mask"
    STEER = "steer"
    HALT = "halt"


Direction = Literal["up", "down", "both"]


class GuardConfig(StrictModel):
    """How the guard decides. Validated: bad values fail with the field path."""

    signals: list[str] = Field(default_factory=lambda: ["divergence", "llr", "proj:*", "nll"],
                               min_length=1, description="signal names or glob patterns to watch")
    powered_signals: list[str] = Field(
        default_factory=lambda: ["divergence", "llr"],
        description="signals (or patterns) that have shown power to detect trait-teacher data "
                    "(docs/detection.md): a run whose guard watches none of them ends 'unmonitored', never 'passed'")
    directions: dict[str, Direction] = Field(default_factory=dict, description="override the suspicious direction")
    sequential: Literal["eprocess", "cusum"] = Field(
        "eprocess", description="the in-training test: 'eprocess' judges every sample as it comes (anytime-valid: "
                                "P(any false alarm in the run) <= alpha, no calibration); 'cusum' judges batch means "
                                "(one false alarm per target_ert clean batches on average; faster on a shift that "
                                "starts late in a long stream, see docs/detection.md)")
    alpha: float = Field(0.01, gt=0, lt=1, description="eprocess: probability of any false alarm over the whole run on "
                                                       "clean data, split evenly over the watched signals")
    target_ert: float = Field(10_000, gt=1, description="cusum: batches to a false alarm on clean data (whole guard)")
    drift_allowance: float = Field(0.5, ge=0, description="CUSUM k, in reference standard deviations")
    on_data_alarm: Action = Action.HALT
    on_drift_alarm: Literal[Action.HALT, Action.STEER] = Action.HALT
    rollback_every_n_steps: int | None = Field(
        10, ge=1, description="keep a CPU copy of the weights every N steps (and at step 0) so that a HALT restores "
                              "the weights from before the first batch its alarm implicates; null: step 0 only")
    drift_threshold: float = Field(
        1.0, gt=0, description="probe drift (in base-model standard deviations) that raises a drift alarm")
    constant_reference_tolerance: dict[str, float] = Field(
        default_factory=lambda: {"divergence": 0.02},
        description="for a signal that is constant on the reference (divergence tokens when the reference teacher "
                    "is the base model itself: exactly 0), alarm when a batch's mean moves more than this from it")
    mask_divergence_tokens: Literal["never", "on_alarm", "always"] = "on_alarm"
    steer_coefficient: float = Field(
        1.0, description="STEER: preventative steering adds c * v (the persona vector) at its layer while training")
    reweight_temperature: float = Field(1.0, gt=0, description="weight = exp(-max(z, 0) / temperature)")
    min_weight: float = Field(0.0, ge=0, le=1)
    bootstrap_batches: int = Field(2000, ge=100, description="reference batch means drawn for calibration")
    reference_draws: int = Field(
        1000, ge=0, description="cusum: reference draws of the honest calibration (h keeps P(realized ERT < "
                                "target_ert) <= 10% over the references one could have drawn; docs/detection.md); 0 "
                                "takes the reference as exact")
    design_shift: float = Field(
        0.5, gt=0, description="e-process: the smallest per-sample shift (reference sd) the reference must be large "
                               "enough to let it see; a smaller reference is warned about, with the size needed")
    seed: int = 0

    @model_validator(mode="after")
    def _settings_of_the_chosen_test(self) -> GuardConfig:
        # a setting of the test not in use would be ignored without a word: refuse it, naming the fix (by
        # value, not by "was it given": a dumped and re-read config carries every default)
        changed = {name for name, info in type(self).model_fields.items() if getattr(self, name) != info.get_default(
            call_default_factory=True)}
        if self.sequential == "eprocess" and {"target_ert", "drift_allowance", "bootstrap_batches",
                                              "reference_draws"} & changed:
            raise ValueError("target_ert, drift_allowance, bootstrap_batches and reference_draws set the CUSUM: with "
                             "the default "
                             "guard.sequential: eprocess, set guard.alpha (the run's false-alarm probability) instead, "
                             "or set guard.sequential: cusum")
        if self.sequential == "cusum" and {"alpha", "design_shift"} & changed:
            raise ValueError("guard.alpha and guard.design_shift set the e-process: with guard.sequential: cusum, set "
                             "guard.target_ert")
        return self




class ScreenSettings(StrictModel):
    """The dataset screen before training: one permutation test per signal on all training rows against
    the reference (Holm at ``alpha``), on the signals the setup scoring computed anyway."""

    gate: bool = Field(True, description="a FLAGGED screen applies guard.on_data_alarm before the first update "
                                         "(halt: no update at all); false: report only")
    alpha: float = Field(0.01, gt=0, lt=1, description="family-wise false-flag level of the screen")
    n_permutations: int = Field(2000, ge=100)
    signals: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1,
        description="signals (names or glob patterns) the screen and the gate test; default all scored. "
                    "divergence, llr and entropy flag any teacher that differs from the base model, trait or not "
                    "(a task adapter, a system prompt: docs/detection.md); when distilling from such a teacher on "
                    "purpose, ['proj*', 'trait_llr:*'] gates on the trait-specific signals only, whose power is "
                    "weak so far (see the measured table there)")


class ModelSignalSettings(StrictModel):
    """Signals read from models instead of teacher log-probs stored with the data (issue 15;
    :mod:`trait_guard.trait_signals`): scored with the others at setup (and on the Ray scoring stage of
    ``trait-guard run``), so the gate tests them and the guard can watch them (``guard.signals``).
    Off by default: each costs forward passes per row (docs/persona_vectors.md)."""

    trait_llr: bool = Field(
        False, description="score trait_llr:<trait> (S2): how much likelier the base model finds each response under "
                           "the watched trait's positive instructions than under its negative ones; needs only the "
                           "base model and the trait spec (2 x trait_llr_pairs forward passes per row)")
    trait_llr_pairs: int = Field(3, gt=0, description="instruction pairs of the trait spec averaged over")
    trait_llr_neutral: Literal["neg", "default"] = Field(
        "neg", description="the contrast prompt: the pair's negative instruction, or the model's default system prompt")
    teacher_model: str | None = Field(
        None, description="the teacher model (an embedded name, a model folder or a LoRA adapter folder on the "
                          "student's base), for teacher_llr (S3): log p_T(y) - log p_B(y) per token, read from both "
                          "models; for data whose teacher log-probs were not stored")
    teacher_system_prompt: str | None = Field(
        None, description="the teacher's own system prompt when it was a prompted teacher (teacher_llr's teacher side)")
    model_diff: bool = Field(
        False, description="also score model_diff (S3, trait-agnostic): each response's base-model activations at "
                           "model_diff_layer projected on the teacher-minus-base direction, built at setup from both "
                           "models' mean residuals on the prompts of the first model_diff_prompts reference rows "
                           "(neutral text); needs teacher_model")
    model_diff_layer: int | None = Field(
        None, description="model_diff's layer (a negative index counts from the last); null: the middle layer")
    model_diff_prompts: int = Field(64, gt=0, description="reference prompts model_diff's direction is built from")

    @model_validator(mode="after")
    def _model_diff_needs_a_teacher(self) -> ModelSignalSettings:
        if self.model_diff and self.teacher_model is None:
            raise ValueError("model_signals.model_diff needs model_signals.teacher_model (its direction is the "
                             "teacher's activations minus the base model's): set teacher_model or drop model_diff")
        return self

    @property
    def enabled(self) -> bool:
        return self.trait_llr or self.teacher_model is not None


class StudentConfig(ModelPlacement):
    model: str = EMBEDDED_MODEL
    lora_r: int = Field(0, ge=0, description="LoRA rank (0: full finetuning)")
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch (needs lora_r > 0)")
    lora_target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names (last component, e.g. [q_proj, v_proj]) the LoRA adapter wraps, or "
                          "'all-linear' (every linear layer but the output head, as in PEFT); null: inferred from "
                          "the architecture (Llama layout: q/k/v/o_proj + gate/up/down_proj; GPT-2: c_attn, "
                          "c_proj, c_fc; any other: all-linear). Needs lora_r > 0")
    append_eos: Literal["auto", "always", "never"] = Field(
        "auto", description="append the tokenizer's EOS to each training completion, so the student learns to "
                            "stop. auto: where the teacher stopped on its own (a generated completion shorter "
                            "than its max_new_tokens; generation cuts the stop token off); always: every "
                            "completion (TRL's convention, e.g. for imported complete answers); never: as "
                            "stored. Completions whose ids already end with EOS are never given a second one")
    export: bool = Field(True, description="save a student that ships (not halted, not interrupted) to <output_dir>/"
                                           "student and the MLflow run (false: e.g. the red-team grid's many runs)")
    signing_key: str | None = Field(
        None, description="the trainer's Ed25519 private key (a path; from `trait-guard keys create`) that signs the "
                           "exported student with an attestation of its data digests and verdicts (docs/provenance.md); "
                           "null: $TRAIT_GUARD_SIGNING_KEY on the training workers, else the export is unsigned")

    @model_validator(mode="after")
    def _lora_settings_need_lora(self) -> StudentConfig:
        if not self.lora_r and (self.lora_target_modules is not None or self.lora_dropout):
            raise ValueError("student.lora_target_modules / student.lora_dropout set the LoRA adapter, but "
                             "student.lora_r is 0 (full finetuning): set student.lora_r > 0 (e.g. 8) or remove them")
        if isinstance(self.lora_target_modules, list) and not all(m.strip() for m in self.lora_target_modules or [""]):
            raise ValueError("student.lora_target_modules is empty or holds an empty name: list module names "
                             "(e.g. [q_proj, v_proj]), write 'all-linear', or remove it to infer them")
        return self


class TrainDataConfig(StrictModel):
    train: str = Field(description="teacher data Parquet (kept rows are trained on)")
    reference: str = Field(description="reference Parquet from the student's base model (a control teacher)")
    max_train_samples: int | None = Field(None, gt=0)
    max_reference_samples: int | None = Field(None, gt=0)
    max_completion_tokens: int = Field(
        1024, gt=0, description="refuse rows whose completion is longer (tokens): over-long sequences")
    allow_unverified: bool = Field(
        False, description="train on data whose provenance manifest is missing or does not match (the run is "
                           "tagged provenance.verified=false); default: refuse it")
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (.pub files or folders of them) whose signature the data must carry "
                    "(provenance.sig.json, from `trait-guard generate --signing-key`); empty: "
                    "$TRAIT_GUARD_TRUSTED_KEYS, else hash verification only. See docs/provenance.md")


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="samples per worker per step")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (updates)")
    shuffle: bool = Field(True, description="shuffle the rows each epoch (false: file order)")
    seed: int = 0
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches (of batch_size per worker) summed into one optimizer step: an update "
                             "sees batch_size x gradient_accumulation_steps x workers samples. Each micro-batch is "
                             "one guard observation; a HALT inside an accumulation applies none of it")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule over the run's optimizer steps after the warmup "
                                "(transformers.get_scheduler: linear and cosine decay to 0 at the last step)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0 to lr")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of the run's optimizer steps "
                                                             "(rounded up); instead of warmup_steps")

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"optim.warmup_steps ({self.warmup_steps}) and optim.warmup_ratio ({self.warmup_ratio}) "
                             "both set the warmup: keep one")
        return self

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes during the run (constant without warmup: no scheduler)."""
        return self.lr_scheduler != "constant" or bool(self.warmup_steps or self.warmup_ratio)


class ProbeConfig(StrictModel):
    every_n_steps: int = Field(10, gt=0, description="measure the student's drift every N steps")
    n_prompts: int = Field(10, gt=0, description="the trait's evaluation questions used as probes")
    eval_samples: int = Field(0, ge=0, description="behavioral eval samples per question at start and end (0: off)")
    eval_before: bool = Field(True, description="false: skip the evaluation at the start (e.g. measured once elsewhere)")
    eval_questions: int = Field(20, gt=0)
    extra_eval_traits: list[str] = Field(
        default_factory=list, description="also evaluate these traits after training (e.g. a control student "
                                          "measured on every trait the trait teachers carry)")
    panel_every_n_steps: int = Field(
        0, ge=0, description="panel log-odds of the target (trait_guard.evaluate.panel_logodds) on the trait's "
                             "held-out panel_questions every N steps, logged as probe/panel_logodds, plus before "
                             "and after training (0: off). Measured at probe steps, so a multiple of every_n_steps")
    panel_probe_questions: int = Field(8, gt=0, description="held-out panel questions measured at each panel step")
    panel_eval_questions: int = Field(32, gt=0, description="held-out panel questions measured before and after")

    @model_validator(mode="after")
    def _panel_on_probe_steps(self) -> ProbeConfig:
        if self.panel_every_n_steps and self.panel_every_n_steps % self.every_n_steps:
            raise ValueError(f"probe.panel_every_n_steps ({self.panel_every_n_steps}) must be a multiple of "
                             f"probe.every_n_steps ({self.every_n_steps}): the panel is measured at probe steps")
        return self


class DeepSpeedSettings(StrictModel):
    enabled: bool = True
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool = False
    gradient_clipping: float = Field(1.0, ge=0)
    config_file: str | None = Field(
        None, description="your DeepSpeed JSON config, used as the engine's config: its other sections (optimizer, "
                          "scheduler, zero_optimization tuning, ...) are used as they are, DeepSpeed's 'auto' values "
                          "are filled from this config, and a value it shares with this config (batch sizes, "
                          "gradient accumulation, ZeRO stage, bf16, clipping, lr, weight decay) must agree with it; "
                          "one this config leaves unset is taken from the file. See docs/training.md")


class CheckpointSettings(StrictModel):
    every_n_steps: int | None = Field(None, gt=0, description="also checkpoint every N steps (always on HALT)")


class TrainRayConfig(StrictModel):
    enabled: bool = True
    address: str | None = None
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0, description="worker failures survived by restarting from the last checkpoint")


class TrackingConfig(StrictModel):
    """Where and whether to track (trait_guard.tracking); every field has an embedded default."""

    enabled: bool = Field(True, description="false: a NullTracker everywhere")
    experiment: str = Field("trait_guard", min_length=1)
    run_name: str | None = None
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI or the local SQLite store")
    tags: dict[str, str] = Field(default_factory=dict)
    spool_dir: str | None = Field(
        None, description="where writes wait while the tracking server is unreachable (training: <output_dir>/"
                          "mlflow_spool); delivered when it is back, or with `trait-guard sync-mlflow`")


class TrainingSettings(StrictModel):
    """How the student trains and is guarded: shared by the training job and the whole run."""

    distill: Literal["sampled", "logits"] = "sampled"
    guard_enabled: bool = True
    student: StudentConfig = Field(default_factory=StudentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    screen: ScreenSettings = Field(default_factory=ScreenSettings)
    model_signals: ModelSignalSettings = Field(default_factory=ModelSignalSettings)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    ray: TrainRayConfig = Field(default_factory=TrainRayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    progress_every_n_steps: int = Field(
        1, ge=0, description="print a progress line (step k/N, loss, lr, guard action, elapsed) every N optimizer "
                             "steps from rank 0; on Ray Train it reaches the driver's terminal (0: off)")

    @model_validator(mode="after")
    def _recipe_consistent(self) -> TrainingSettings:
        if self.distill == "logits" and self.student.append_eos == "always":
            raise ValueError("student.append_eos: always needs distill: sampled: distill: logits learns the teacher's "
                             "stored top-k, which ends before the stop token (nothing to learn the EOS from); use "
                             "student.append_eos: auto or never")
        if self.deepspeed.config_file and not self.deepspeed.enabled:
            raise ValueError("deepspeed.config_file is set but deepspeed.enabled is false: enable DeepSpeed or "
                             "remove the file")
        if self.deepspeed.config_file:
            _merge_deepspeed_file(self)
        _check_student_placement(self)
        return self

    def student_placement(self) -> dict[str, str]:
        """``device`` and ``dtype`` for loading the student to train it (``load_model(..., **this)``).

        ``student.dtype: auto`` follows the engine's precision, not only the device: with DeepSpeed
        bf16 (mixed precision: bf16 compute, fp32 master weights in the optimizer) it is ``auto``
        (bfloat16 on a GPU worker); otherwise the student trains in float32 and loads in float32, since
        loading bf16 weights into an fp32 recipe would train them in bf16 with no fp32 copy."""
        dtype = self.student.dtype
        if dtype == "auto" and not (self.deepspeed.enabled and self.deepspeed.bf16):
            dtype = "float32"
        return {"device": self.student.device, "dtype": dtype}


def _check_student_placement(settings: TrainingSettings) -> None:
    """Refuse student ``device`` / ``dtype`` settings the training recipe cannot honour, naming the fix."""
    student, ds, ray = settings.student, settings.deepspeed, settings.ray
    if student.dtype == "float16":
        raise ValueError("student.dtype: float16 cannot be trained here (no fp16 loss scaling): use student.dtype: "
                         "auto with deepspeed.bf16: true (bf16 mixed precision on GPUs), or float32")
    if student.dtype == "bfloat16" and not (ds.enabled and ds.bf16):
        raise ValueError("student.dtype: bfloat16 without DeepSpeed bf16 would train bf16 weights with no fp32 master "
                         "copy: set deepspeed.enabled: true and deepspeed.bf16: true (mixed precision), or "
                         "student.dtype: auto")
    if ray.enabled and ray.use_gpu and student.device == "cpu":
        raise ValueError("student.device: cpu but ray.use_gpu: true: the training workers would hold GPUs they do "
                         "not use; set student.device: auto, or ray.use_gpu: false")
    if ray.enabled and not ray.use_gpu and student.device == "cuda":
        raise ValueError("student.device: cuda but ray.use_gpu: false: Ray gives the training workers no GPU; set "
                         "ray.use_gpu: true, or student.device: auto")


#: Values a DeepSpeed JSON shares with trait_guard's config: (path in the JSON, section, field).
DEEPSPEED_SHARED = (
    (("train_micro_batch_size_per_gpu",), "optim", "batch_size"),
    (("gradient_accumulation_steps",), "optim", "gradient_accumulation_steps"),
    (("zero_optimization", "stage"), "deepspeed", "zero_stage"),
    (("bf16", "enabled"), "deepspeed", "bf16"),
    (("gradient_clipping",), "deepspeed", "gradient_clipping"),
    (("optimizer", "params", "lr"), "optim", "lr"),
    (("optimizer", "params", "weight_decay"), "optim", "weight_decay"),
)


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON config file as a dict; ValueError naming the fix when it is missing or not a JSON object."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"deepspeed.config_file: {path} does not exist; pass the path of your DeepSpeed JSON "
                         "config (relative to where the job starts) or remove the setting")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"deepspeed.config_file: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed.config_file: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _json_value(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _merge_deepspeed_file(settings: TrainingSettings) -> None:
    """Reconcile ``deepspeed.config_file`` with the settings it shares (:data:`DEEPSPEED_SHARED`): a
    field the config leaves unset takes the file's value; one set in both must agree (the run's logged
    params are then the engine's real ones); "auto" in the file means "this config's value". Also: the
    file's ``train_batch_size`` must equal micro-batch x accumulation x workers, and a ``scheduler``
    section excludes trait_guard's own schedule. The engine's config is built from the file at
    :func:`trait_guard.integrations.deepspeed.merge_user_config`."""
    path = settings.deepspeed.config_file
    data = read_deepspeed_json(path)
    updates: dict[str, dict[str, Any]] = {"optim": {}, "deepspeed": {}}
    for json_path, section, name in DEEPSPEED_SHARED:
        value = _json_value(data, json_path)
        if value is None or value == "auto":
            continue
        current_section = getattr(settings, section)
        current = getattr(current_section, name)
        key = ".".join(json_path)
        kind = type(current)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            raise ValueError(f"deepspeed.config_file: {key} in {path} is {value!r}, not a {kind.__name__}")
        value = kind(value)
        if name in current_section.model_fields_set and current != value:
            raise ValueError(f"deepspeed.config_file: {key} is {value} in {path} but {section}.{name} is {current}: "
                             f"make them agree, write \"auto\" in the file to use {section}.{name}, or remove "
                             f"{section}.{name} to use the file's value")
        updates[section][name] = value
    for section, values in updates.items():
        if values:
            current_section = getattr(settings, section)
            setattr(settings, section, type(current_section).model_validate({**current_section.model_dump(), **values}))
    if "scheduler" in data and settings.optim.scheduled:
        raise ValueError(f"deepspeed.config_file: {path} has a scheduler section and optim.lr_scheduler/warmup set "
                         "trait_guard's schedule too: remove one (optim.lr_scheduler: constant with no warmup lets "
                         "the file's scheduler run)")
    total = _json_value(data, ("train_batch_size",))
    workers = settings.ray.num_workers if settings.ray.enabled else 1
    expected = settings.optim.batch_size * settings.optim.gradient_accumulation_steps * workers
    if total not in (None, "auto") and total != expected:
        raise ValueError(f"deepspeed.config_file: train_batch_size is {total} in {path}, but optim.batch_size "
                         f"{settings.optim.batch_size} x optim.gradient_accumulation_steps "
                         f"{settings.optim.gradient_accumulation_steps} x {workers} worker(s) = {expected}: write "
                         "\"auto\" (or remove it) in the file, or change those settings")


class TrainJobConfig(TrainingSettings):
    """``trait-guard train``: guarded student training (DeepSpeed on Ray Train)."""

    output_dir: str = "outputs/train"
    trait: str = Field("animal:owl", description="the trait watched (its eval questions are the probes)")
    vectors: list[str] = Field(default_factory=list, description="persona vector files for the student's base")
    data: TrainDataConfig
    resume_from: str | None = Field(None, description="a checkpoint folder written by a previous run")
    extra_artifacts: list[str] = Field(default_factory=list, description="files logged to the MLflow run (reports)")
    signals_cache: str | None = Field(
        None, description="folder for the base model's per-sample signals of this data (keyed by the data, model "
                          "and vector contents): runs on the same data skip the setup scoring")


# --------------------------------------------------------------------------------------------------
# The whole run


class ExtractSettings(ModelPlacement):
    """Persona-vector extraction on the student's base model (``device`` / ``dtype``: where it loads)."""

    n_instructions: int | None = Field(None, gt=0)
    n_questions: int | None = Field(None, gt=1)
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(16, gt=0)
    method: Literal["last_prompt", "response_mean"] = Field(
        "response_mean", description="which vector projects data: response_mean (averaged over response tokens, "
                                     "as data projections are; the default) or last_prompt")
    layer_choice: Literal["steering", "separation"] = Field(
        "steering", description="steering: the layer with the largest monotone steering effect on the target's "
                                "panel log-odds (falls back to separation); separation: no extra forward passes")
    steer_layer_stride: int = Field(3, gt=0, description="steering sweep: every k-th layer (plus the separation layer)")
    steer_questions: int = Field(6, gt=0, description="steering sweep: held-out behavior questions scored")
    steer_random_controls: int = Field(
        2, ge=0, description="steering sweep: random directions of the same size the vector must beat at its layer "
                             "(0: off; a perturbation that moves the log-odds as much is disruption, not the trait)")
    seed: int = 0

    def steering_sweep(self) -> Any:
        """The steering sweep these settings ask for, over the method this section saves."""
        from trait_guard.persona import SteeringSweep

        return SteeringSweep(layer_stride=self.steer_layer_stride, n_questions=self.steer_questions,
                             methods=(self.method,), random_controls=self.steer_random_controls, seed=self.seed)


class ScoringSettings(ModelPlacement):
    """Where the student's frozen base model scores the teacher data (and extracts the persona vector):
    a Ray Data ``map_batches`` stage on ``num_actors`` actors, each holding one copy of the model and
    asking for ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs; never the job's driver."""

    num_actors: int = Field(1, gt=0, description="scoring actors (each loads the student's base model once)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per scoring actor (1 on a GPU cluster)")
    batch_size: int = Field(16, gt=0, description="rows per scoring call (one forward batch)")


class ModelTaskSettings(StrictModel):
    """The resources of a job's model-loading Ray tasks (the red-team's persona-vector extraction,
    adapter training and base-model evaluations): each one ``ray.remote`` task of ``cpus`` CPUs and
    ``gpus`` GPUs, never the job's driver (trait_guard.remote)."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0, description="GPUs per task (1 on a GPU cluster: the model loads on it)")


class RunJobConfig(TrainingSettings):
    """``trait-guard run`` / ``make demo``: extract -> generate -> screen -> guarded training -> evaluate."""

    output_dir: str = "outputs/run"
    trait: str = "animal:owl"
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    teachers: list[TeacherConfig] = Field(min_length=2)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    generation_ray: RayConfig = Field(default_factory=RayConfig)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    train_on: str = Field("owl", description="the teacher whose data the student trains on")
    reference: str = Field("control", description="the teacher whose data is the reference (the base model's own)")
    also_train_on: list[str] = Field(
        default_factory=list, description="further teachers whose data a student is trained on in turn, each "
                                          "screened and guarded like train_on (e.g. a second control set: the "
                                          "clean outcome beside the flagged one)")

    @model_validator(mode="after")
    def _teachers_named(self) -> RunJobConfig:
        ids = [t.id for t in self.teachers]
        for field_name in ("train_on", "reference"):
            if getattr(self, field_name) not in ids:
                raise ValueError(f"{field_name}: '{getattr(self, field_name)}' is not one of the teachers {ids}")
        for name in self.also_train_on:
            if name not in ids or name in (self.train_on, self.reference):
                raise ValueError(f"also_train_on: '{name}' must be a teacher other than train_on and reference "
                                 f"(teachers: {ids})")
        _check_unique(ids, "teacher ids")
        return self


# --------------------------------------------------------------------------------------------------
# The red-team benchmark

RedteamMode = Literal["unguarded", "halt", "mask", "steer", "reweight"]


class RedteamConfig(StrictModel):
    """``benchmarks/redteam.py``: students trained on each teacher's data, unguarded and guarded, over seeds.

    Every run of the grid (teacher x distill x mode x seed) is a real guarded-training run
    (:func:`trait_guard.train.run_training`) on the teacher's data, with the ``reference`` teacher's
    data as the guard's reference. Modes: ``unguarded`` (guard off), ``halt`` (data and drift alarms
    halt), ``mask`` / ``steer`` / ``reweight`` (a data alarm switches to that mitigation, a drift alarm
    steers; training continues).
    """

    output_dir: str = "outputs/redteam"
    profile: str = Field("custom", description="a label for the reports (e.g. cpu-smollm2)")
    trait: str = Field("animal:owl", description="the trait the guard watches (its persona vector)")
    vector: str | None = Field(None, description="an existing persona vector file; None: extract one")
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    teachers: list[TeacherConfig] = Field(min_length=1, description="the students' data sources")
    measure: dict[str, str] = Field(
        default_factory=dict, description="teacher id -> trait measured in its students (default: the teacher's "
                                          "trait, else the watched trait)")
    reference: TeacherConfig = Field(description="the guard's reference: the student base model's own data")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    generation_ray: RayConfig = Field(default_factory=RayConfig)
    model_tasks: ModelTaskSettings = Field(default_factory=ModelTaskSettings)
    adapter_steps: int = Field(60, gt=0, description="steps for an adapter teacher's adapter when it must be trained")
    modes: list[RedteamMode] = Field(default_factory=lambda: ["unguarded", "halt", "mask", "steer", "reweight"],
                                     min_length=1)
    distill: list[Literal["sampled", "logits"]] = Field(default_factory=lambda: ["sampled", "logits"], min_length=1)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1,
        description="replicate ids (independent units, >= 0): each draws its own prompts, teacher sampling seeds "
                    "(replacing a teacher's sampling_seed), adapter and student seed (trait_guard.redteam)")
    skip: list[str] = Field(default_factory=list, description="run-name patterns left out of the grid (fnmatch, "
                                                               "e.g. 'eagle-sampled-*'); names: teacher-distill-mode-sSEED")
    train_samples: int | None = Field(None, gt=0, description="kept rows per teacher used for training")
    reference_samples: int | None = Field(None, gt=0)
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="how every student trains (training.student: the model)")
    goal_ratio: float = Field(0.1, gt=0, description="goal: guarded shift <= this x the unguarded shift")
    goal_benign_flag_rate: float = Field(
        0.05, ge=0, le=1, description="goal: a benign teacher (control, neutral prompt, benign adapter) is flagged "
                                      "(any guard alarm) in at most this fraction of its replicates")
    goal_benign_excess: float = Field(
        0.2, gt=0, description="goal: a benign non-control teacher's mean excess over control (nats) stays within "
                               "+- this")
    goal_control_drift: float = Field(
        0.3, gt=0, description="goal: control students' generic drift on the panel log-odds measure (nats) stays "
                               "within +- this")

    @model_validator(mode="after")
    def _check(self) -> RedteamConfig:
        ids = [t.id for t in self.teachers] + [self.reference.id]
        _check_unique(ids, "teacher ids (reference included)")
        recipes: dict[str, tuple[str | None, str | None, str]] = {}
        for t in self.teachers:  # teachers on one adapter folder share its adapter: one recipe per folder
            if t.install in ("adapter", "argmax_preserving"):
                recipe = recipes.setdefault(str(t.adapter), (t.trait, t.adapter_task, t.id))
                if recipe[:2] != (t.trait, t.adapter_task):
                    raise ValueError(f"teachers {recipe[2]} and {t.id} share adapter {t.adapter} but name different "
                                     f"recipes (trait/adapter_task {recipe[:2]} vs {(t.trait, t.adapter_task)}): "
                                     "give them the same trait, or separate adapter folders")
        unknown = set(self.measure) - set(ids)
        if unknown:
            raise ValueError(f"measure: unknown teacher ids {sorted(unknown)}; teachers are {ids}")
        if self.reference.install != "none":
            raise ValueError("reference must be the student's base model itself (install: none)")
        if not self.training.probe.eval_samples:
            raise ValueError("training.probe.eval_samples must be > 0: the benchmark measures the student's trait")
        return self


# --------------------------------------------------------------------------------------------------
# What each job asks of its Ray cluster


class RayStage(NamedTuple):
    """One Ray stage of a job: ``bundles`` actors or workers, each asking for ``cpus`` and ``gpus``
    (a bundle must fit on one node). Stages of one job run one after another, so a cluster must fit
    each stage, not their sum."""

    name: str
    bundles: int
    cpus: float
    gpus: float

    @property
    def total_gpus(self) -> float:
        return self.bundles * self.gpus


def ray_stages(config: BaseModel) -> list[RayStage]:
    """The Ray stages a job config starts, with the resources each asks for: teacher generation
    (``ray`` / ``generation_ray``: ``num_actors`` x ``cpus_per_actor`` + ``gpus_per_actor``) and Ray
    Train training (``ray.num_workers`` workers of ``cpus_per_worker`` and, with ``use_gpu``, one GPU
    each: Ray Train's default ``resources_per_worker``, which trait_guard.train does not change).
    In-process training (``ray.enabled: false``) starts no Ray stage. Used to check that a RayJob's
    cluster can hold its config (tests/test_deploy.py) before a job waits forever for GPUs."""
    stages: list[RayStage] = []
    generation = getattr(config, "generation_ray", None) or (
        config.ray if isinstance(config, GenerateJobConfig) else None)
    if generation is not None:
        stages.append(RayStage("generation", generation.num_actors, generation.cpus_per_actor,
                               generation.gpus_per_actor))
    scoring = getattr(config, "scoring", None)
    if isinstance(scoring, ScoringSettings):
        stages.append(RayStage("scoring", scoring.num_actors, scoring.cpus_per_actor, scoring.gpus_per_actor))
    tasks = getattr(config, "model_tasks", None)
    if isinstance(tasks, ModelTaskSettings):
        stages.append(RayStage("model tasks", 1, tasks.cpus, tasks.gpus))
    training = config.training if isinstance(config, RedteamConfig) else config
    if isinstance(training, TrainingSettings) and training.ray.enabled:
        ray = training.ray
        stages.append(RayStage("training", ray.num_workers, ray.cpus_per_worker, 1.0 if ray.use_gpu else 0.0))
    return stages
