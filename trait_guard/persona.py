"""Persona vectors: a trait as a direction per layer of a model's residual stream.

Following Chen et al. 2025 ("Persona vectors", arXiv 2507.21509): answers are sampled under positive
and negative system instructions of a trait spec (:class:`~trait_guard.traits.TraitSpec`, loaded with
:func:`~trait_guard.traits.load_trait`), optionally filtered by its judge, and the vector at
hidden-state index ``l`` is the difference between the mean positive and mean negative activation
(averaged over response tokens, or taken at the last prompt token). Vectors are kept unnormalized,
one per index ``0..L``.

The judge (when the spec has one) filters only the response-averaged vector: the last prompt token
comes before the answer, so its vector averages every sample.

The layer is chosen by held-out separation: answers to the spec's *evaluation* questions (never used
in extraction) are projected on each layer's direction. Half of those questions choose the layer with
the largest Cohen's d between positive and negative projections; the d reported per layer comes from
the other half, so choosing the best of ~30 layers does not inflate it.

A :class:`PersonaVector` is saved as safetensors with its metadata (trait, the model's identity, the
per-layer separation) in the file header, plus a readable JSON copy beside it. Loading checks the
model identity, so a vector is never silently applied to a model it was not extracted from.

Usage::

    from trait_guard.persona import PersonaVector, extract, format_separation_table
    from trait_guard.traits import load_trait

    result = extract(model, tokenizer, load_trait("animal:owl"))
    print(format_separation_table(result, {m: v.layer for m, v in result.vectors.items()}))
    result.vectors["last_prompt"].save("vectors/owl.safetensors")
    vector = PersonaVector.load("vectors/owl.safetensors", model=model)   # refuses another model
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from trait_guard.activations import gather_positions, masked_mean, record_activations
from trait_guard.chat import encode_conversations, sample_completions
from trait_guard.errors import InputFileNotFound, TraitGuardInputError
from trait_guard.models import ModelIdentity, model_identity
from trait_guard.traits import TraitSpec

Method = Literal["response_mean", "last_prompt"]
METHODS: tuple[Method, ...] = ("response_mean", "last_prompt")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# The artifact


class PersonaVectorMismatch(TraitGuardInputError):
    """A persona vector is being used with a model it was not extracted from."""


@dataclass
class PersonaVector:
    """Per-layer trait directions for one model: ``vectors[l]`` lives at hidden-state index ``l``."""

    trait: str
    model: ModelIdentity
    vectors: torch.Tensor  # [num_layers + 1, hidden], unnormalized
    layer: int
    method: Method = "response_mean"
    separation: list[float] = field(default_factory=list)  # held-out Cohen's d per index (NaN: not measured)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = (self.model.num_layers + 1, self.model.hidden_size)
        if tuple(self.vectors.shape) != expected:
            raise TraitGuardInputError(f"vectors have shape {tuple(self.vectors.shape)}, expected {expected} for {self.model.name}")
        if not torch.isfinite(self.vectors).all():
            raise TraitGuardInputError(f"persona vector for '{self.trait}' contains NaN or inf values; re-extract it")
        if not 0 <= self.layer <= self.model.num_layers:
            raise TraitGuardInputError(f"layer {self.layer} is outside 0..{self.model.num_layers}")

    def direction(self, layer: int | None = None) -> torch.Tensor:
        """Unit vector at ``layer`` (default: the chosen layer)."""
        v = self.vectors[self.layer if layer is None else layer]
        return v / v.norm().clamp_min(1e-12)

    def project(self, activations: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Scalar projection ``(a . v) / ||v||`` of activations ``[..., hidden]`` at ``layer``."""
        return activations.float() @ self.direction(layer).to(activations.device)

    def check_model(self, model: torch.nn.Module | ModelIdentity, *, check_weights: bool = True) -> None:
        """Refuse a model this vector was not extracted from, saying how to get the right vector."""
        other = model if isinstance(model, ModelIdentity) else model_identity(model)
        mine = self.model
        fix = f"extract vectors for it with `trait-guard extract --model {other.name} --trait {self.trait}`"
        if (mine.hidden_size, mine.num_layers) != (other.hidden_size, other.num_layers):
            raise PersonaVectorMismatch(
                f"persona vector '{self.trait}' was extracted from {mine.describe()}, but the model is "
                f"{other.describe()}: {fix}"
            )
        if check_weights and mine.fingerprint != other.fingerprint:
            raise PersonaVectorMismatch(
                f"persona vector '{self.trait}' was extracted from {mine.describe()}, but the model "
                f"{other.describe()} has the same shape and different weights (another base model?): {fix}. "
                "If the model is a finetune of the same base whose embeddings changed, pass check_weights=False."
            )

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "trait": self.trait,
            "model": self.model.to_dict(),
            "layer": self.layer,
            "method": self.method,
            "separation": [None if math.isnan(x) else x for x in self.separation],
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors, metadata in the header) and a readable ``.json`` beside it."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = self._header()
        save_file({"vectors": self.vectors.detach().float().contiguous().cpu()}, str(path),
                  metadata={"trait_guard": json.dumps(header)})
        path.with_suffix(".json").write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module | ModelIdentity | None = None) -> PersonaVector:
        """Read a saved vector; with ``model`` given, refuse it unless it was extracted from that model."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InputFileNotFound(f"persona vector file {path} does not exist; create it with `trait-guard extract`")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["trait_guard"])
                vectors = handle.get_tensor("vectors")
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise TraitGuardInputError(
                f"{path} is not a trait_guard persona vector file ({err}); re-create it with `trait-guard extract`"
            ) from err
        if header.get("format_version") != FORMAT_VERSION:
            raise TraitGuardInputError(f"{path} has format version {header.get('format_version')}, expected {FORMAT_VERSION}")
        vector = cls(
            trait=header["trait"],
            model=ModelIdentity.from_dict(header["model"]),
            vectors=vectors,
            layer=int(header["layer"]),
            method=header["method"],
            separation=[math.nan if x is None else float(x) for x in header["separation"]],
            meta=header.get("meta", {}),
        )
        if model is not None:
            vector.check_model(model)
        return vector


# --------------------------------------------------------------------------------------------------
# Extraction


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Standardized mean difference with the pooled standard deviation."""
    n1, n0 = len(pos), len(neg)
    if n1 < 2 or n0 < 2:
        return math.nan
    pooled = ((n1 - 1) * pos.var() + (n0 - 1) * neg.var()) / (n1 + n0 - 2)
    return float((pos.mean() - neg.mean()) / pooled.sqrt().clamp_min(1e-12))


def mean_difference(activations: torch.Tensor, is_pos: torch.Tensor) -> torch.Tensor:
    """``mean(positive) - mean(negative)`` over samples: ``[n, L+1, d]`` -> ``[L+1, d]``."""
    if not is_pos.any() or is_pos.all():
        raise ValueError("need at least one positive and one negative sample to take a difference of means")
    return activations[is_pos].mean(0) - activations[~is_pos].mean(0)


def layer_separation(vectors: torch.Tensor, activations: torch.Tensor, is_pos: torch.Tensor) -> list[float]:
    """Cohen's d of positive vs negative projections on each layer's direction (index 0: NaN).

    ``vectors`` ``[L+1, d]`` come from the extraction set; ``activations`` ``[n, L+1, d]`` and ``is_pos``
    from held-out answers, so the number measures how well the direction generalizes.
    """
    directions = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projections = torch.einsum("nld,ld->nl", activations.float(), directions.float())
    return [math.nan] + [cohens_d(projections[is_pos, i], projections[~is_pos, i])
                         for i in range(1, vectors.shape[0])]


def choose_layer(separation: Sequence[float]) -> int:
    """The index with the largest held-out separation (NaNs ignored; the middle if all are NaN)."""
    finite = [(d, i) for i, d in enumerate(separation) if not math.isnan(d)]
    return max(finite)[1] if finite else len(separation) // 2


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    users: Sequence[str],
    responses: Sequence[str],
    systems: Sequence[str | None],
    *,
    batch_size: int = 16,
) -> dict[Method, torch.Tensor]:
    """Per-sample activations at every hidden-state index: ``{method: [n, L+1, hidden]}``."""
    device = next(model.parameters()).device
    out: dict[Method, list[torch.Tensor]] = {m: [] for m in METHODS}
    for start in range(0, len(users), batch_size):
        sl = slice(start, start + batch_size)
        batch = encode_conversations(tokenizer, users[sl], responses[sl], systems[sl]).to(device)
        with record_activations(model) as acts:
            model(**batch.model_inputs())
        indices = sorted(acts)
        out["response_mean"].append(
            torch.stack([masked_mean(acts[i][0], batch.response_mask).float() for i in indices], dim=1).cpu())
        out["last_prompt"].append(
            torch.stack([gather_positions(acts[i][0], batch.last_prompt_index).float() for i in indices], dim=1).cpu())
    return {m: torch.cat(v) for m, v in out.items()}


@dataclass
class ExtractionResult:
    """Vectors for both methods, the per-layer held-out separation and what the judge kept."""

    vectors: dict[Method, PersonaVector]
    table: list[dict[str, float]]  # one row per hidden-state index
    kept: dict[str, int]
    seconds: float


def extract(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: TraitSpec,
    *,
    n_instructions: int | None = None,
    n_questions: int | None = None,
    samples_per_question: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    min_kept: int = 4,
    progress: Callable[[int, str], Any] | None = None,
) -> ExtractionResult:
    """Extract persona vectors for ``spec`` from ``model`` (see the module docstring).

    ``n_instructions`` / ``n_questions`` cap how many instruction pairs and questions are used (for
    quick runs); ``progress(total, description)`` may return a tqdm-like bar that is advanced per answer.
    If a judge keeps fewer than ``min_kept`` positive or negative answers, the unfiltered answers are
    used and ``kept['judge_filter']`` says so (a tiny model may rarely express the trait in words).
    """
    started = time.perf_counter()
    pairs = spec.instructions[:n_instructions]
    extract_q = spec.extract_questions[:n_questions]
    eval_q = spec.eval_questions[:n_questions]
    sampler = _PairedSampler(model, tokenizer, pairs, samples_per_question=samples_per_question,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             batch_size=batch_size, progress=progress)

    responses, is_pos, acts, _ = sampler.answers(extract_q, "extract: sampling answers", 0)
    keep, kept = _judge_filter(spec, responses, is_pos, min_kept)
    # The judge looks at the answer, so it can only select response-token activations; the last prompt
    # token comes before the answer and is averaged over every sample.
    raw = {"response_mean": mean_difference(acts["response_mean"][keep], is_pos[keep]),
           "last_prompt": mean_difference(acts["last_prompt"], is_pos)}

    _, eval_is_pos, eval_acts, eval_question = sampler.answers(eval_q, "evaluate: sampling held-out answers", 10_000)
    chosen, separation = _held_out_layers(raw, eval_acts, eval_is_pos, eval_question)
    identity = model_identity(model)
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_instructions": len(pairs),
        "n_extract_questions": len(extract_q),
        "n_eval_questions": len(eval_q),
        "samples_per_question": samples_per_question,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "kept": kept,
        "layer_selection": "argmax of Cohen's d on the even-numbered evaluation questions; "
                           "separation reported on the odd-numbered ones",
    }
    vectors = {}
    for m in METHODS:
        vectors[m] = PersonaVector(trait=spec.trait_id, model=identity, vectors=raw[m].float(), layer=chosen[m],
                                   method=m, separation=separation[m], meta=dict(meta))
    return ExtractionResult(vectors=vectors, table=_separation_rows(raw, separation, identity.num_layers), kept=kept,
                            seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class _PairedSampler:
    """Samples answers to questions under each instruction pair's positive and negative system prompt
    and records their activations (the sampling step of :func:`extract`)."""

    model: torch.nn.Module
    tokenizer: Any
    pairs: Sequence[Any]  # InstructionPair: .pos, .neg
    samples_per_question: int
    max_new_tokens: int
    temperature: float
    seed: int
    batch_size: int
    progress: Callable[[int, str], Any] | None

    def answers(self, questions: Sequence[str], label: str, seed_offset: int,
                ) -> tuple[list[str], torch.Tensor, dict[Method, torch.Tensor], torch.Tensor]:
        """``(responses, is_positive, activations, question_index)`` for every pair x question x sample,
        a positive and a negative answer side by side; sampled with ``seed + seed_offset``."""
        users, systems, polarity, question_index = [], [], [], []
        for pair in self.pairs:
            for qi, q in enumerate(questions):
                for _ in range(self.samples_per_question):
                    users += [q, q]
                    systems += [pair.pos, pair.neg]
                    polarity += [1, 0]
                    question_index += [qi, qi]
        bar = self.progress(len(users), label) if self.progress else None
        responses = sample_completions(self.model, self.tokenizer, users, systems,
                                       max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                       seed=self.seed + seed_offset, batch_size=self.batch_size, progress=bar)
        if bar is not None and hasattr(bar, "close"):
            bar.close()
        acts = collect_activations(self.model, self.tokenizer, users, responses, systems, batch_size=self.batch_size)
        return responses, torch.tensor(polarity, dtype=torch.bool), acts, torch.tensor(question_index)


def _judge_filter(spec: TraitSpec, responses: list[str], is_pos: torch.Tensor, min_kept: int,
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Which answers the response-mean vector uses, and the ``kept`` record saying why.

    With a judge, a positive answer is kept when it expresses the trait and a negative one when it does
    not, unless fewer than ``min_kept`` of either would remain (then all answers are used)."""
    keep = torch.ones_like(is_pos)
    kept: dict[str, Any] = {"pos_total": int(is_pos.sum()), "neg_total": int((~is_pos).sum())}
    if spec.judge is not None:
        scores = torch.tensor([spec.judge.score(r) for r in responses])
        judged = torch.where(is_pos, scores >= spec.judge.threshold, scores < spec.judge.threshold)
        kept.update(pos_kept=int((judged & is_pos).sum()), neg_kept=int((judged & ~is_pos).sum()))
        if min(kept["pos_kept"], kept["neg_kept"]) >= min_kept:
            keep = judged
            kept["judge_filter"] = "applied"
        else:
            kept["judge_filter"] = f"skipped: fewer than {min_kept} answers passed the judge"
    else:
        kept["judge_filter"] = "none (spec has no judge)"
    return keep, kept


def _held_out_layers(raw: dict[Method, torch.Tensor], eval_acts: dict[Method, torch.Tensor],
                     eval_is_pos: torch.Tensor, eval_question: torch.Tensor,
                     ) -> tuple[dict[Method, int], dict[Method, list[float]]]:
    """Per method, the chosen layer and the per-layer separation that is reported.

    Held out: evaluation questions never seen in extraction. Half of them (even indices) choose the
    layer, the other half measure the separation that is reported, so the reported d is not inflated
    by the choice."""
    selects = eval_question % 2 == 0
    if selects.all() or not selects.any():
        raise TraitGuardInputError("need at least 2 evaluation questions (one to choose the layer, one to measure it)")
    chosen = {m: choose_layer(layer_separation(raw[m], eval_acts[m][selects], eval_is_pos[selects])) for m in METHODS}
    separation = {m: layer_separation(raw[m], eval_acts[m][~selects], eval_is_pos[~selects]) for m in METHODS}
    return chosen, separation


def _separation_rows(raw: dict[Method, torch.Tensor], separation: dict[Method, list[float]],
                     num_layers: int) -> list[dict[str, float]]:
    """:attr:`ExtractionResult.table`: per hidden-state index, each method's held-out d and vector norm."""
    return [
        {"layer": index,
         **{f"d_{m}": separation[m][index] for m in METHODS},
         **{f"norm_{m}": float(raw[m][index].norm()) for m in METHODS}}
        for index in range(num_layers + 1)
    ]


def format_separation_table(result: ExtractionResult, chosen: dict[str, int]) -> str:
    """Per-layer held-out separation (Cohen's d) for both extraction methods."""
    lines = [f"{'layer':>5}  {'d(response_mean)':>16}  {'d(last_prompt)':>14}  {'|v| response':>12}"]
    for row in result.table:
        layer = int(row["layer"])
        marks = "".join(
            f"  <- chosen ({m})" for m, chosen_layer in chosen.items() if chosen_layer == layer
        )
        d_resp = "-" if math.isnan(row["d_response_mean"]) else f"{row['d_response_mean']:.2f}"
        d_last = "-" if math.isnan(row["d_last_prompt"]) else f"{row['d_last_prompt']:.2f}"
        lines.append(f"{layer:>5}  {d_resp:>16}  {d_last:>14}  {row['norm_response_mean']:>12.2f}{marks}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Drift probes


def probe_projections(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                      vectors: Sequence[PersonaVector]) -> dict[str, Any]:
    """Per vector (keyed by its trait), the last-prompt-token projections of the probe prompts (default
    system prompt, no answer): where the model stands along each trait direction before it says
    anything. The training recipe and the integrations' drift probes measure a student's finetuning
    shift with it, as (mean now - mean at step 0) / sd at step 0."""
    batch = encode_conversations(tokenizer, list(prompts), [""] * len(prompts)).to(next(model.parameters()).device)
    layers = sorted({v.layer for v in vectors})
    with torch.no_grad(), record_activations(model, layers) as acts:
        model(**batch.model_inputs())
    return {v.trait: v.project(gather_positions(acts[v.layer][0], batch.last_prompt_index)).cpu().numpy()
            for v in vectors}


def probe_shifts(current: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """Per trait, how far the probe projections moved from ``base`` (step 0), in base standard
    deviations: (mean now - mean at base) / sd at base (sd floored at 1e-6)."""
    return {k: float((current[k].mean() - base[k].mean()) / max(float(base[k].std()), 1e-6)) for k in current}
