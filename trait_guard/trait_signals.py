"""Signals that need no teacher log-probs stored with the data (issue 15, items 3-5).

The powered signals of :mod:`trait_guard.fingerprint` (``divergence``, ``llr``) read the teacher's
log-probs stored with the data; text-only data (or data from a teacher nobody logged) has none. This
module adds signals that are computed from models instead (docs/persona_vectors.md, "Signals without
teacher log-probs"):

* ``trait_llr:<trait>`` (S2, needs the base model and a trait spec): per sample, the mean over the
  response tokens of ``log p_B(y_t | x, s_pos, y_<t) - log p_B(y_t | x, s_neg, y_<t)``, where ``s_pos``
  / ``s_neg`` are the spec's positive and negative (or the model's default) system instructions,
  averaged over the first ``n_pairs`` instruction pairs. The response tokens are the generated ones
  (``completion_ids``, :func:`trait_guard.chat.encode_rows`) and are identical under both prompts;
  only the system prompt differs. For a prompted-trait teacher this is the Neyman-Pearson statistic;
  its mean is ``KL(pos || neg)``-like on data sampled under ``s_pos`` and ``-KL(neg || pos)``-like on
  data sampled under ``s_neg``.
* ``teacher_llr`` (S3, needs the teacher model): the mean of ``log p_T(y_t | x) - log p_B(y_t | x)``
  over the response, both read from the models (no stored log-probs). On the teacher's own samples
  its mean estimates ``KL(T || B)`` per token (>= 0); it is exactly 0 when the teacher is the base.
* ``model_diff`` (S3, needs the teacher model): a trait-agnostic direction, the unit vector of
  ``mean(teacher residual) - mean(base residual)`` at one layer on neutral text
  (:func:`model_diff_direction`), and per sample the base model's response-averaged activation at that
  layer projected on it.

:func:`available_signals` says which signals can be computed from what the user has (stored
log-probs, the teacher model, a trait spec). :class:`TraitSignalScorer` computes these signals for rows
and plugs into :class:`trait_guard.fingerprint.FingerprintScorer` through its ``extra`` field, so the
screen and the guard see them next to ``nll`` and ``divergence``.

None of these signals has been validated against *measured transfer* yet (issue 15's Spearman goal
on a teacher zoo): they are detectors of "this data came from a trait-shifted model", like ``llr``.

Usage::

    from trait_guard.trait_signals import TraitSignalScorer, model_diff_direction

    direction = model_diff_direction(teacher, base, tokenizer, neutral_rows, layer=16)
    scorer = TraitSignalScorer(base, tokenizer, specs=[load_trait("animal:owl")], teacher=teacher,
                               model_diff=direction)
    signals = scorer.score_table(rows)   # {"trait_llr:animal:owl": ..., "teacher_llr": ..., "model_diff": ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from trait_guard.activations import (
    find_decoder_layers,
    masked_mean,
    normalize_layer_index,
    record_activations,
)
from trait_guard.chat import EncodedBatch, encode_rows
from trait_guard.errors import TraitGuardInputError
from trait_guard.traits import TraitSpec

TRAIT_LLR_PREFIX = "trait_llr:"
TEACHER_LLR = "teacher_llr"
MODEL_DIFF = "model_diff"

Neutral = Literal["neg", "default"]


def trait_llr_name(trait_id: str) -> str:
    """The signal name of S2 for a trait (``trait_llr:animal:owl``)."""
    return TRAIT_LLR_PREFIX + trait_id


# --------------------------------------------------------------------------------------------------
# Which signal needs what (issue 15, item 5)


@dataclass(frozen=True)
class SignalNeeds:
    """What one signal needs beyond the base model and the data text (which every signal has)."""

    name: str
    stored_logprobs: bool = False
    teacher_model: bool = False
    trait_spec: bool = False
    what: str = ""
    shown: str = "not measured on real teachers"  # the power it has shown so far, with where it is written

    def matches(self, signal: str) -> bool:
        """Whether ``signal`` (a computed name, e.g. ``trait_llr:animal:owl``) is this entry."""
        prefix, _, _ = self.name.partition("<trait>")
        return signal == self.name or ("<trait>" in self.name and signal.startswith(prefix))


#: Every per-sample signal trait_guard computes and what it needs. ``<trait>`` is a trait id.
#: ``shown``: measured on SmolLM2-135M owl teachers on CPU, AUROC per sample against the control teacher
#: (docs/detection.md; the signals read from models: benchmarks/results/text_only_signals_cpu.json, its
#: section "Signals without stored teacher log-probs").
SIGNAL_NEEDS: tuple[SignalNeeds, ...] = (
    SignalNeeds("nll", what="mean NLL of the completion under the base model",
                shown="none: AUROC 0.50 on prompted-owl data (a kinship check, not a trait detector)"),
    SignalNeeds("entropy", what="mean next-token entropy of the base model over the completion",
                shown="none: AUROC 0.51 on prompted-owl data"),
    SignalNeeds("unigram", what="token surprisal under a histogram of the base model's own generations",
                shown="none in its tested direction: AUROC 0.52 on prompted-owl data; downward it separates owl-adapter "
                      "data (19/20 datasets below -0.2 effect size) but also 3/6 benign adapters, and a pre-registered "
                      "replication failed (p 0.087): in no gate"),
    SignalNeeds("proj:<trait>", trait_spec=True,
                what="projection on a persona vector extracted from the base model with the spec",
                shown="none: AUROC 0.50 [0.47, 0.54] on prompted-owl data; owl-adapter rows lean away from the owl "
                      "vector (AUROC 0.11 from bags of 16, the untested direction); a gate on proj* gated 0/32 owl "
                      "datasets of 32 rows"),
    SignalNeeds("proj_diff:<trait>", trait_spec=True,
                what="per prompt, the row's projection minus the reference's answers to the same prompt (S1, paired)",
                shown="none: flagged 0/32 prompted-owl and owl-adapter datasets of 32 rows (SmolLM2 clean pool)"),
    SignalNeeds("trait_llr:<trait>", trait_spec=True,
                what="log p_B(y | x, trait prompt) - log p_B(y | x, neutral prompt), per token (S2)",
                shown="none yet: AUROC 0.45-0.51 on owl-adapter data (3 adapters), 0/3 of their datasets "
                      "gated; not flagged on prompted-owl data (48 rows, p_adj 0.39)"),
    SignalNeeds("divergence", stored_logprobs=True,
                what="share of tokens where the teacher's stored top-1 beats the base model's",
                shown="AUROC 0.81 [0.79, 0.83] on prompted-owl data; gated every owl-adapter dataset of 96 rows, "
                      "no control; but also every benign-teacher dataset (a style adapter, a neutral system prompt: "
                      "124/124 of 32 rows): it sees a teacher that differs from the base, not the trait"),
    SignalNeeds("llr", stored_logprobs=True,
                what="stored log p_T(y_t) - log p_B(y_t), per token",
                shown="AUROC 0.84 [0.81, 0.88] on prompted-owl data; like divergence, it flags benign teachers "
                      "too (a neutral system prompt: 62/62 datasets of 32 rows; a style adapter: 12/62)"),
    SignalNeeds(TEACHER_LLR, teacher_model=True,
                what="log p_T(y_t | x) - log p_B(y_t | x) read from the teacher model, per token (S3)",
                shown="AUROC 0.91-0.95 on owl-adapter data (3 adapters); gated 3/3 of their datasets of 96 rows, "
                      "0/3 controls"),
    SignalNeeds(MODEL_DIFF, teacher_model=True,
                what="projection on the teacher-minus-base mean residual direction (S3)",
                shown="weak: AUROC 0.42-0.69 on owl-adapter data (3 adapters), 1/3 of their datasets gated"),
)


def shown_power_note(signals: Sequence[str]) -> str:
    """One line for reports: the power each of ``signals`` (computed names) has shown so far, so that a
    verdict is read with what its signals are known to see (a clean verdict on signals with no shown
    power means little)."""
    parts = []
    for signal in dict.fromkeys(signals):
        needs = next((n for n in SIGNAL_NEEDS if n.matches(signal)), None)
        parts.append(f"{signal}: {needs.shown if needs else 'not measured'}")
    return "power shown so far (SmolLM2 owl teachers, docs/detection.md): " + "; ".join(parts)


def available_signals(has_stored_logprobs: bool, has_teacher_model: bool, has_trait_spec: bool,
                      trait_id: str | None = None) -> list[str]:
    """The signals that can be computed when the user has (or lacks) teacher log-probs stored with the
    data, the teacher model itself, and a trait spec. The base model and the data text are assumed.
    ``trait_id`` fills ``<trait>`` in the trait-specific names."""
    have = {"stored_logprobs": has_stored_logprobs, "teacher_model": has_teacher_model,
            "trait_spec": has_trait_spec}
    names = []
    for needs in SIGNAL_NEEDS:
        if all(have[key] or not getattr(needs, key) for key in have):
            names.append(needs.name.replace("<trait>", trait_id) if trait_id else needs.name)
    return names


def at_hand_note(has_stored_logprobs: bool, has_teacher_model: bool, trait_id: str | None,
                 computed: Sequence[str] = ()) -> str:
    """One line for reports: what is at hand (stored teacher log-probs, the teacher model, a trait
    spec), the signals that makes possible, and which of those signals this screen or gate computed."""
    possible = available_signals(has_stored_logprobs, has_teacher_model, trait_id is not None, trait_id)
    line = (f"signals for what is at hand (stored teacher log-probs: {'yes' if has_stored_logprobs else 'no'}, "
            f"teacher model: {'yes' if has_teacher_model else 'no'}, trait spec: {trait_id or 'no'}): "
            + ", ".join(possible))
    missing = [name for name in possible if computed and name not in computed]
    return line + (f"; not computed here: {', '.join(missing)}" if missing else "")


# --------------------------------------------------------------------------------------------------
# Reading the response under a model


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_same_vocab(teacher: torch.nn.Module, base: torch.nn.Module) -> None:
    vt, vb = teacher.config.vocab_size, base.config.vocab_size
    if vt != vb:
        raise TraitGuardInputError(
            f"the teacher's vocabulary ({vt} tokens) differs from the base model's ({vb}): teacher_llr and "
            "model_diff compare the two models on the same token ids, which needs a shared tokenizer"
        )


@torch.no_grad()
def response_logprob_means(model: torch.nn.Module, batch: EncodedBatch,
                           layers: Sequence[int] = ()) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """Per row, the mean log-prob (float64) of its response tokens under ``model`` on ``batch`` (NaN for
    an empty response), and ``{layer: [batch, hidden]}`` response-averaged residual activations."""
    batch = batch.to(_device(model))
    with record_activations(model, layers) as acts:
        logits = model(**batch.model_inputs()).logits
    n = batch.response_mask[:, 1:].sum(1).double()
    means = (batch.response_logprob_sums(logits) / n.clamp_min(1.0)).cpu().numpy()
    means[(n == 0).cpu().numpy()] = np.nan
    pooled = {i: masked_mean(a[0].float(), batch.response_mask) for i, a in acts.items()}
    return means, pooled


def _systems(spec: TraitSpec, n_pairs: int, neutral: Neutral) -> list[tuple[str, str | None]]:
    if n_pairs < 1:
        raise TraitGuardInputError(f"n_pairs must be at least 1, got {n_pairs}")
    if neutral not in ("neg", "default"):
        raise TraitGuardInputError(f"neutral must be 'neg' or 'default', got {neutral!r}")
    pairs = spec.instructions[:n_pairs]
    return [(p.pos, p.neg if neutral == "neg" else None) for p in pairs]


@torch.no_grad()
def trait_llr(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], spec: TraitSpec, *,
              n_pairs: int = 3, neutral: Neutral = "neg", max_length: int | None = None) -> np.ndarray:
    """S2 per row: mean over response tokens of ``log p(y_t | x, pos) - log p(y_t | x, neutral)`` under
    ``model`` (the base model), averaged over the spec's first ``n_pairs`` instruction pairs.

    ``neutral="neg"`` contrasts each pair's positive instruction with its negative one; ``"default"``
    with the model's default system prompt (what a student sees). Costs ``2 * n_pairs`` forward passes
    (``n_pairs + 1`` with ``"default"``). NaN for rows with an empty response.
    """
    pairs = _systems(spec, n_pairs, neutral)
    cache: dict[str | None, np.ndarray] = {}

    def mean_logprob(system: str | None) -> np.ndarray:
        if system not in cache:
            batch = encode_rows(tokenizer, rows, [system] * len(rows), max_length=max_length)
            cache[system] = response_logprob_means(model, batch)[0]
        return cache[system]

    return np.mean([mean_logprob(pos) - mean_logprob(neg) for pos, neg in pairs], axis=0)


@torch.no_grad()
def teacher_llr(teacher: torch.nn.Module, base: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]],
                *, teacher_system: str | None = None, system: str | None = None,
                max_length: int | None = None) -> np.ndarray:
    """S3 per row: mean over response tokens of ``log p_T(y_t | x) - log p_B(y_t | x)``, both read from the
    models. ``teacher_system`` is the teacher's system prompt (a prompted teacher's instruction; None for
    an adapter/finetuned teacher), ``system`` the base model's (None: the student's view)."""
    _check_same_vocab(teacher, base)
    t, _ = response_logprob_means(teacher, encode_rows(tokenizer, rows, [teacher_system] * len(rows),
                                                       max_length=max_length))
    b, _ = response_logprob_means(base, encode_rows(tokenizer, rows, [system] * len(rows), max_length=max_length))
    return t - b


# --------------------------------------------------------------------------------------------------
# Model-diff direction


@dataclass
class ModelDiffDirection:
    """Unit direction of ``mean(teacher residual) - mean(base residual)`` at hidden-state index ``layer``
    (the index convention of :mod:`trait_guard.activations`)."""

    layer: int
    direction: torch.Tensor  # [hidden], unit norm
    norm: float  # norm of the raw mean difference
    n_samples: int
    positions: str

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Scalar projection of activations ``[..., hidden]`` on the direction."""
        return pooled.float() @ self.direction.to(pooled.device)


@torch.no_grad()
def model_diff_direction(teacher: torch.nn.Module, base: torch.nn.Module, tokenizer: Any,
                         rows: Sequence[dict[str, Any]], layer: int | None = None, *,
                         positions: Literal["response", "prompt"] = "response", system: str | None = None,
                         batch_size: int = 32, max_length: int | None = None) -> ModelDiffDirection:
    """The teacher-minus-base direction at ``layer`` (default: the middle of the network).

    ``rows`` are neutral text (prompt and completion/completion_ids, e.g. the base model's own
    generations for neutral prompts); both models read exactly the same tokens with system prompt
    ``system`` (None: the default). ``positions="response"`` averages the residual over each row's
    response tokens (the position type :class:`TraitSignalScorer` projects), ``"prompt"`` over its
    prompt tokens (rows need no completion then). Per-row means are averaged over rows.
    """
    _check_same_vocab(teacher, base)
    if teacher.config.hidden_size != base.config.hidden_size:
        raise TraitGuardInputError("model_diff needs a teacher and base model with the same hidden size")
    if positions not in ("response", "prompt"):
        raise TraitGuardInputError(f"positions must be 'response' or 'prompt', got {positions!r}")
    num_layers = len(find_decoder_layers(base))
    layer = normalize_layer_index(num_layers // 2 if layer is None else layer, num_layers)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = encode_rows(tokenizer, chunk, [system] * len(chunk), max_length=max_length)
        mask = batch.response_mask if positions == "response" else batch.attention_mask - batch.response_mask
        keep = mask.sum(1) > 0
        for key, model in (("teacher", teacher), ("base", base)):
            b = batch.to(_device(model))
            with record_activations(model, [layer]) as acts:
                model(**b.model_inputs())
            pooled = masked_mean(acts[layer][0].float(), mask.to(b.input_ids.device))[keep.to(b.input_ids.device)]
            sums[key] = sums.get(key, 0) + pooled.double().sum(0).cpu()
        n += int(keep.sum())
    if n == 0:
        raise TraitGuardInputError(f"model_diff_direction got no rows with {positions} tokens")
    diff = (sums["teacher"] - sums["base"]) / n
    norm = float(diff.norm())
    if norm == 0.0:
        raise TraitGuardInputError("the teacher's activations equal the base model's: there is no model-diff direction")
    return ModelDiffDirection(layer, (diff / norm).float(), norm, n, positions)


# --------------------------------------------------------------------------------------------------
# Scorer


@dataclass
class TraitSignalScorer:
    """Computes ``trait_llr:<trait>`` (per spec in ``specs``), ``teacher_llr`` (when ``teacher`` is
    given) and ``model_diff`` (when ``model_diff`` is given) for rows.

    ``base`` is the student's base model; ``system`` the system prompt the student sees the data with
    (None: default), used for the base side of ``teacher_llr`` and for ``model_diff``.
    ``teacher_system`` is the teacher's own system prompt (for a prompted teacher). Pass an instance in
    :class:`~trait_guard.fingerprint.FingerprintScorer`'s ``extra`` to get these signals with the others.
    """

    base: torch.nn.Module
    tokenizer: Any
    specs: Sequence[TraitSpec] = ()
    n_pairs: int = 3
    neutral: Neutral = "neg"
    teacher: torch.nn.Module | None = None
    teacher_system: str | None = None
    model_diff: ModelDiffDirection | None = None
    system: str | None = None
    batch_size: int = 32
    max_length: int | None = None

    def __post_init__(self) -> None:
        for spec in self.specs:
            _systems(spec, self.n_pairs, self.neutral)  # validates the settings early
        if self.teacher is not None:
            _check_same_vocab(self.teacher, self.base)

    @property
    def names(self) -> list[str]:
        names = [trait_llr_name(s.trait_id) for s in self.specs]
        if self.teacher is not None:
            names.append(TEACHER_LLR)
        if self.model_diff is not None:
            names.append(MODEL_DIFF)
        return names

    @torch.no_grad()
    def score_rows(self, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Per-sample signals for one batch of rows (the generated ``completion_ids`` are read as they are)."""
        signals: dict[str, np.ndarray] = {}
        for spec in self.specs:
            signals[trait_llr_name(spec.trait_id)] = trait_llr(
                self.base, self.tokenizer, rows, spec, n_pairs=self.n_pairs, neutral=self.neutral,
                max_length=self.max_length)
        if self.teacher is None and self.model_diff is None:
            return signals
        layers = [self.model_diff.layer] if self.model_diff is not None else []
        batch = encode_rows(self.tokenizer, rows, [self.system] * len(rows), max_length=self.max_length)
        base_lp, pooled = response_logprob_means(self.base, batch, layers)
        if self.teacher is not None:
            teacher_batch = encode_rows(self.tokenizer, rows, [self.teacher_system] * len(rows),
                                        max_length=self.max_length)
            signals[TEACHER_LLR] = response_logprob_means(self.teacher, teacher_batch)[0] - base_lp
        if self.model_diff is not None:
            projection = self.model_diff.project(pooled[self.model_diff.layer]).cpu().numpy().astype(np.float64)
            signals[MODEL_DIFF] = np.where(np.isnan(base_lp), np.nan, projection)
        return signals

    def score_table(self, rows: Sequence[dict[str, Any]], progress: Any = None) -> dict[str, np.ndarray]:
        """Signals for many rows, in batches of ``batch_size``."""
        parts = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            parts.append(self.score_rows(chunk))
            if progress is not None:
                progress.update(len(chunk))
        return {name: np.concatenate([p[name] for p in parts]) for name in self.names} if parts else {
            name: np.zeros(0) for name in self.names}


# --------------------------------------------------------------------------------------------------
# From a training config (the gate and the guard)


def load_teacher(teacher_model: str, base_name: str, *, device: Any = "cpu", dtype: Any = "float32") -> torch.nn.Module:
    """The teacher model ``teacher_llr`` reads: a trait_guard adapter folder is merged into a fresh copy
    of the student's base model ``base_name`` (its identity is checked by :func:`trait_guard.adapters.load_adapter`);
    anything else (an embedded name, a model folder) loads as a model of its own."""
    from pathlib import Path

    from trait_guard.adapters import ADAPTER_META, load_adapter
    from trait_guard.models import load_model

    if (Path(teacher_model) / ADAPTER_META).is_file():
        base, _ = load_model(base_name, device=device, dtype=dtype)
        return load_adapter(base, teacher_model)
    return load_model(teacher_model, device=device, dtype=dtype)[0]


def scorer_from_settings(settings: Any, base: torch.nn.Module, tokenizer: Any, *, base_name: str,
                         spec: TraitSpec | None, batch_size: int = 32, device: Any = "cpu",
                         dtype: Any = "float32", neutral_prompts: Sequence[str] | None = None,
                         ) -> TraitSignalScorer | None:
    """The :class:`TraitSignalScorer` a training config's ``model_signals``
    (:class:`trait_guard.config.ModelSignalSettings`) asks for, or None when it asks for none.
    ``spec`` is the watched trait's (``trait_llr``); ``base_name`` the student's base model (an adapter
    teacher is applied to a copy of it). ``neutral_prompts``: the reference rows' prompts, in row order,
    that ``model_diff``'s direction is built from (its first ``model_diff_prompts``; prompt positions,
    so the direction never reads a response the signal later scores)."""
    if not settings.enabled:
        return None
    if settings.trait_llr and spec is None:
        raise TraitGuardInputError("model_signals.trait_llr needs the watched trait's spec (the config's `trait`)")
    if settings.model_diff and not neutral_prompts:
        raise TraitGuardInputError("model_signals.model_diff needs neutral prompts to build its direction (the "
                                   "reference rows' prompts); the reference has none")
    teacher = (load_teacher(settings.teacher_model, base_name, device=device, dtype=dtype)
               if settings.teacher_model else None)
    direction = None
    if settings.model_diff:
        rows = [{"prompt": prompt, "completion": ""} for prompt in list(neutral_prompts)[: settings.model_diff_prompts]]
        direction = model_diff_direction(teacher, base, tokenizer, rows, settings.model_diff_layer,
                                         positions="prompt", batch_size=batch_size)
    return TraitSignalScorer(base, tokenizer, specs=[spec] if settings.trait_llr else [],
                             n_pairs=settings.trait_llr_pairs, neutral=settings.trait_llr_neutral, teacher=teacher,
                             teacher_system=settings.teacher_system_prompt, model_diff=direction,
                             batch_size=batch_size)


def settings_key(settings: Any) -> str:
    """What the signals of ``model_signals`` depend on, for the setup-signals cache key: the settings
    and, for a teacher on disk, the SHA-256 of its files (a retrained adapter at the same path is a new
    key). Empty when no model signal is asked for (earlier cache files stay valid)."""
    import hashlib
    import json
    from pathlib import Path

    from trait_guard.files import file_sha256_memo

    if not settings.enabled:
        return ""
    digest = hashlib.sha256(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode())
    teacher = Path(settings.teacher_model) if settings.teacher_model else None
    if teacher is not None and teacher.exists():
        files = sorted(p for p in (teacher.rglob("*") if teacher.is_dir() else [teacher]) if p.is_file())
        for path in files:
            digest.update(f"{path.relative_to(teacher) if teacher.is_dir() else path.name}:{file_sha256_memo(path)}".encode())
    return digest.hexdigest()
