"""Persona vectors: a trait as a direction per layer of a model's residual stream.

Following Chen et al. 2025 ("Persona vectors", arXiv 2507.21509): answers are sampled under positive
and negative system instructions of a trait spec (:class:`~trait_guard.traits.TraitSpec`, loaded with
:func:`~trait_guard.traits.load_trait`), optionally filtered by its judge, and the vector at
hidden-state index ``l`` is the difference between the mean positive and mean negative activation
(averaged over response tokens, or taken at the last prompt token). Vectors are kept unnormalized,
one per index ``0..L``.

The judge (when the spec has one) filters only the response-averaged vector: the last prompt token
comes before the answer, so its vector averages every sample.

Every layer is checked two ways, and both are kept (:class:`ExtractionResult`):

* Held-out separation. Answers to the spec's *evaluation* questions (never used in extraction) are
  projected on each layer's direction and scored by Cohen's d between positive and negative answers.
  With >= 2 instruction pairs the pairs are held out too (leave-one-pair-out,
  :func:`instruction_held_out_separation`): the direction is fitted on the other pairs, so one that only
  encodes the wording of the system prompts no longer separates. Half of the questions choose the
  separation layer, the other half give the d that is reported (question-held-out ``d`` and
  instruction-held-out ``d_instr``), so choosing the best of ~30 layers does not inflate it.
* The steering effect (causal; as Chen et al. choose their layer). At each candidate layer ``c * v``
  is added (``c`` a fraction of that layer's median residual norm, so it is comparable across layers)
  and the target's panel log-odds is measured on held-out one-word questions (:class:`SteeringSweep`,
  :func:`steering_curves`). The layer used is the one with the largest slope among those whose curve
  rises at every step (:func:`choose_steering_layer`); without one (or without a panel) extraction
  falls back to the separation layer and says so (:class:`LayerChoice`).

A :class:`PersonaVector` is saved as safetensors with its metadata (trait, the model's identity, the
per-layer separation) in the file header, plus a readable JSON copy beside it. Loading checks the
model identity, so a vector is never silently applied to a model it was not extracted from.

Usage::

    from trait_guard.persona import PersonaVector, extract, format_separation_table
    from trait_guard.traits import load_trait

    result = extract(model, tokenizer, load_trait("animal:owl"))      # layer_choice="steering"
    print(format_separation_table(result, {m: v.layer for m, v in result.vectors.items()}))
    print(result.choices["response_mean"].reason)                      # why this layer
    result.curves["response_mean"]                                     # SteeringCurve per swept layer
    result.vectors["response_mean"].save("vectors/owl.safetensors")
    vector = PersonaVector.load("vectors/owl.safetensors", model=model)   # refuses another model
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import torch

from trait_guard.activations import gather_positions, masked_mean, record_activations
from trait_guard.chat import encode_conversations, render_prompt, sample_completions
from trait_guard.errors import TraitGuardInputError
from trait_guard.models import model_identity
from trait_guard.persona_vector import (  # noqa: F401  (re-exported: the artifact's historical home)
    FORMAT_VERSION,
    METHODS,
    Method,
    PersonaVector,
    PersonaVectorMismatch,
)
from trait_guard.steer import Steering
from trait_guard.traits import TraitSpec

# --------------------------------------------------------------------------------------------------
# Separation: how well a direction splits held-out positive and negative answers


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


# --------------------------------------------------------------------------------------------------
# Instruction-held-out separation


def instruction_folds(n_pairs: int) -> list[tuple[list[int], list[int]]]:
    """Leave-one-pair-out folds over instruction pairs ``0..n_pairs-1``: one ``(fit, held_out)`` per pair.

    Why: extraction and the question-held-out measure share the same system prompts, so a direction that
    only encodes "these words are in my system prompt" (lexical leakage) still separates held-out
    *questions*. Fitting on some wordings of the trait and measuring on another checks that the
    direction is the trait, not the wording. Empty when there are fewer than 2 pairs (nothing to fit on).
    """
    if n_pairs < 2:
        return []
    return [([j for j in range(n_pairs) if j != k], [k]) for k in range(n_pairs)]


def instruction_held_out_separation(
    activations: torch.Tensor, is_pos: torch.Tensor, pair: torch.Tensor,
    held_activations: torch.Tensor, held_is_pos: torch.Tensor, held_pair: torch.Tensor,
    n_pairs: int, keep: torch.Tensor | None = None,
) -> list[float]:
    """Per hidden-state index, Cohen's d on instruction pairs the direction never saw.

    For each leave-one-pair-out fold (:func:`instruction_folds`) the vector is the difference of means
    of the extraction answers (``activations`` ``[n, L+1, d]``, ``is_pos``, ``pair`` index per answer;
    only those in ``keep`` when given, e.g. the judge's choice) under the *other* pairs; the held-out
    pair's answers to held-out questions (``held_*``) are projected on it. The d reported is the mean
    over folds (NaN where no fold gives one; all NaN with fewer than 2 pairs).
    """
    per_fold = []
    for fit, held in instruction_folds(n_pairs):
        in_fit = torch.isin(pair, torch.tensor(fit))
        selected = in_fit & keep if keep is not None else in_fit
        if not is_pos[selected].any() or is_pos[selected].all():
            selected = in_fit  # the judge left one side empty in this fold: use all the fit pairs' answers
        vectors = mean_difference(activations[selected], is_pos[selected])
        in_held = torch.isin(held_pair, torch.tensor(held))
        per_fold.append(layer_separation(vectors, held_activations[in_held], held_is_pos[in_held]))
    width = activations.shape[1]
    return [_nanmean([fold[i] for fold in per_fold]) for i in range(width)]


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# --------------------------------------------------------------------------------------------------
# Causal check: does steering along the vector move the trait?


@dataclass(frozen=True)
class SteeringSweep:
    """Settings of the steering-effect measurement that validates (and may choose) the layer.

    At each candidate layer ``l`` the unit direction ``v_l`` is added at every position with coefficient
    ``c * norm_l`` for each ``c`` in ``coefficients``, where ``norm_l`` is the median per-token
    residual-stream norm at ``l`` on the questions' prompts: ``c`` is a fraction of the typical
    activation size, so it means the same at layer 2 and at layer 30 (residual norms grow with depth).
    The effect is the target's panel log-odds (:class:`PanelScorer`) on ``n_questions`` questions that
    extraction never used: the spec's ``behavior_questions`` (default; one-word "favorite animal"
    questions) or its ``panel_questions`` (which the spec reserves for measuring students' transfer,
    so choosing a layer on them spends their held-out status; hence not the default).

    Candidate layers: ``layers`` when given, else every ``layer_stride``-th index ending at the last
    one (stride 3 of 30: 3, 6, ..., 30), plus the layer chosen by separation (so the two choices are
    always compared on measured curves). ``methods`` limits which vectors are swept.

    Random-direction controls (``random_controls`` > 0): a steering effect is only a trait effect if a
    perturbation of the same size in another direction does not move the log-odds as much (on
    SmolLM2-135M a random direction at layer 30 moved them as much as the owl vector did). The layers
    whose vector curve qualifies (monotone, positive slope) are tried by slope, at most
    ``control_layers`` of them: at each, ``random_controls`` random unit directions orthogonal to the
    vector are swept with the same coefficients, scale and questions, and the layer is chosen only if
    the vector's slope exceeds every random direction's absolute slope there.

    Defaults are sized for a CPU: every 3rd layer, 6 questions, the ``response_mean`` vector only (the
    one data projections use), 2 random directions at up to 3 layers. On SmolLM2-135M one (layer, coefficient, question) took 0.8 to 1.2 s on
    one CPU thread of a shared, loaded machine (docs/persona_vectors.md), so the default sweep (~11 layers
    x 4 nonzero coefficients x 6 questions) adds about 4 to 5 minutes to an extraction there; ``layer_choice=
    "separation"`` skips it. ``benchmarks/persona_layers.py`` sweeps both methods.
    """

    coefficients: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5)
    layers: tuple[int, ...] | None = None
    layer_stride: int = 3
    n_questions: int | None = 6
    question_set: Literal["behavior", "panel"] = "behavior"
    min_increasing_fraction: float = 1.0
    methods: tuple[Method, ...] = ("response_mean",)
    random_controls: int = 2
    control_layers: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.random_controls < 0 or self.control_layers < 1:
            raise ValueError(f"random_controls must be >= 0 and control_layers >= 1, got {self.random_controls} "
                             f"and {self.control_layers}")
        if len(set(self.coefficients)) < 3:
            raise ValueError(f"need at least 3 distinct coefficients to judge monotonicity, got {self.coefficients}")
        if self.layer_stride < 1:
            raise ValueError(f"layer_stride must be >= 1, got {self.layer_stride}")
        if not 0 < self.min_increasing_fraction <= 1:
            raise ValueError(f"min_increasing_fraction must be in (0, 1], got {self.min_increasing_fraction}")

    def candidate_layers(self, num_layers: int, also: Sequence[int] = ()) -> list[int]:
        """Hidden-state indices to sweep (index 0, the embedding output, is never one)."""
        base = self.layers if self.layers is not None else range(num_layers, 0, -self.layer_stride)
        return sorted({int(i) for i in (*base, *also) if 1 <= int(i) <= num_layers})

    def questions(self, spec: TraitSpec) -> list[str]:
        """The held-out questions of ``spec`` the effect is measured on (the first ``n_questions``)."""
        pool = spec.behavior_questions if self.question_set == "behavior" else spec.panel_questions
        return list(pool[: self.n_questions])


@dataclass
class SteeringCurve:
    """The target's mean panel log-odds against the steering coefficient at one layer, and its summary."""

    layer: int
    coefficients: list[float]  # sorted ascending
    logodds: list[float]  # mean over questions, one per coefficient
    per_question: list[list[float]]  # [coefficient][question]
    baseline: float  # unsteered mean log-odds
    scale: float  # residual norm at the layer: the vector added is c * scale * unit direction

    @property
    def slope(self) -> float:
        """Least-squares slope of the mean log-odds on ``c`` (nats per unit of ``c``)."""
        return _ls_slope(self.coefficients, self.logodds)

    @property
    def slope_se(self) -> float:
        """Standard error of the slope across questions (per-question slopes; questions vary)."""
        slopes = [_ls_slope(self.coefficients, list(col)) for col in zip(*self.per_question, strict=True)]
        if len(slopes) < 2:
            return math.nan
        mean = sum(slopes) / len(slopes)
        return math.sqrt(sum((s - mean) ** 2 for s in slopes) / (len(slopes) - 1) / len(slopes))

    @property
    def spearman(self) -> float:
        """Spearman's rho between ``c`` and the mean log-odds (1: the curve only goes up; NaN: flat)."""
        rx, ry = _ranks(self.coefficients), _ranks(self.logodds)
        mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
        sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
        sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
        return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan

    @property
    def increasing_fraction(self) -> float:
        """Fraction of consecutive coefficient steps on which the mean log-odds goes up."""
        steps = [b > a for a, b in itertools.pairwise(self.logodds)]
        return sum(steps) / len(steps) if steps else math.nan

    @property
    def effect_at_max(self) -> float:
        """Mean log-odds at the largest coefficient minus the unsteered mean log-odds (nats)."""
        return self.logodds[-1] - self.baseline

    def is_monotone(self, min_increasing_fraction: float = 1.0) -> bool:
        """Whether the curve goes up on at least ``min_increasing_fraction`` of its steps."""
        return math.isfinite(self.increasing_fraction) and self.increasing_fraction >= min_increasing_fraction

    def summary(self) -> dict[str, float]:
        """The numbers a table needs (JSON-safe apart from NaN)."""
        return {"layer": self.layer, "slope": self.slope, "slope_se": self.slope_se, "spearman": self.spearman,
                "increasing_fraction": self.increasing_fraction, "effect_at_max": self.effect_at_max,
                "scale": self.scale}

    def to_dict(self) -> dict[str, Any]:
        """Everything, for logging and plotting (NaN kept; pass through to_jsonable for JSON)."""
        return {**self.summary(), "coefficients": self.coefficients, "logodds": self.logodds,
                "per_question": self.per_question, "baseline": self.baseline}


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _ls_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` on ``x``."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx if sxx > 0 else math.nan


def steering_candidates(curves: Sequence[SteeringCurve], min_increasing_fraction: float = 1.0) -> list[SteeringCurve]:
    """The curves that may choose the layer, largest slope first: monotone (rising on at least
    ``min_increasing_fraction`` of their steps: a large slope from one jump between garbled outputs
    is not a trait direction) with a positive slope."""
    eligible = [c for c in curves
                if c.is_monotone(min_increasing_fraction) and math.isfinite(c.slope) and c.slope > 0]
    return sorted(eligible, key=lambda c: -c.slope)


def beats_random_directions(curve: SteeringCurve, controls: Sequence[SteeringCurve]) -> bool:
    """Whether the vector's slope exceeds every random direction's absolute slope at its layer."""
    slopes = [abs(c.slope) for c in controls if math.isfinite(c.slope)]
    return bool(slopes) and curve.slope > max(slopes)


def choose_steering_layer(curves: Sequence[SteeringCurve], min_increasing_fraction: float = 1.0,
                          controls: dict[int, list[SteeringCurve]] | None = None) -> int | None:
    """The layer whose steering curve has the largest positive slope among the monotone ones
    (:func:`steering_candidates`); with random-direction ``controls`` (per layer), the first such layer
    whose vector beats its controls (:func:`beats_random_directions`; unmeasured layers never do).
    None when no layer qualifies (the caller falls back to separation and says so)."""
    for curve in steering_candidates(curves, min_increasing_fraction):
        if controls is None or beats_random_directions(curve, controls.get(curve.layer, [])):
            return curve.layer
    return None


def random_direction_curves(model: torch.nn.Module, tokenizer: Any, vector: torch.Tensor, layer: int, n: int,
                            coefficients: Sequence[float], scorer: PanelScorer, questions: Sequence[str], *,
                            norms: torch.Tensor, baseline: Sequence[float], seed: int = 0) -> list[SteeringCurve]:
    """Steering curves at ``layer`` of ``n`` random unit directions orthogonal to ``vector[layer]``, with
    the vector's coefficients, scale and questions: what a perturbation of the same size does when it
    does not point along the trait (:class:`SteeringSweep`)."""
    gen = torch.Generator().manual_seed(seed * 1_000 + layer)
    unit = (vector[layer] / vector[layer].norm().clamp_min(1e-12)).float()
    curves = []
    for _ in range(n):
        random = torch.randn(unit.shape[0], generator=gen)
        directions = torch.zeros(vector.shape, dtype=torch.float32)
        directions[layer] = random - (random @ unit) * unit
        curves.extend(steering_curves(model, tokenizer, directions, [layer], coefficients, scorer, questions,
                                      norms=norms, baseline=baseline))
    return curves


class PanelScorer:
    """The target's teacher-forced panel log-odds per question, as :func:`trait_guard.evaluate.panel_logodds`
    defines it (same spellings, same disjointness checks), computed cheaply for many repeats.

    Why a second implementation: a steering sweep evaluates the panel at every (layer, coefficient),
    and ``panel_logodds`` runs the prompt once per spelling (~56 rows per question). Here the prompt
    runs once per question, its key/value cache is shared by every spelling, and only the spellings'
    tokens but the last are fed (their first token is predicted by the prompt's last position), which
    is ~20x fewer token-forwards on SmolLM2. tests/test_persona.py pins equality with ``panel_logodds``.
    """

    def __init__(self, tokenizer: Any, target: str, panel: Sequence[str], *, system: str | None = None,
                 case_variants: bool = True) -> None:
        from trait_guard.evaluate import _answer_spellings, _panel_alternatives

        self.tokenizer = tokenizer
        self.system = system
        self.target = target.strip()
        self.alternatives = _panel_alternatives(self.target, panel)
        spellings = _answer_spellings(tokenizer, [self.target, *self.alternatives], case_variants)
        self.spellings = [ids for answer in spellings for ids in answer]
        self.owner = torch.tensor([i for i, answer in enumerate(spellings) for _ in answer])

    @classmethod
    def for_spec(cls, tokenizer: Any, spec: TraitSpec) -> PanelScorer | None:
        """The scorer of a spec's ``panel_target`` against its ``panel``; None when it has no panel."""
        if not spec.panel or not spec.panel_target:
            return None
        return cls(tokenizer, spec.panel_target, spec.panel)

    @torch.no_grad()
    def logodds(self, model: torch.nn.Module, questions: Sequence[str]) -> list[float]:
        """Per question, ``l(target) - log(mean over alternatives of exp l(a))`` in nats."""
        out = []
        for question in questions:
            per_spelling = self._spelling_logprobs(model, question)
            per_answer = torch.stack([torch.logsumexp(per_spelling[self.owner == i], 0)
                                      for i in range(len(self.alternatives) + 1)])
            log_mean_alt = torch.logsumexp(per_answer[1:], 0) - math.log(len(self.alternatives))
            out.append(float(per_answer[0] - log_mean_alt))
        return out

    def _spelling_logprobs(self, model: torch.nn.Module, question: str) -> torch.Tensor:
        """log P(reply starts with each spelling | question), float64, from one prompt pass (with its
        cache) and one batched pass over the spellings' tokens but the last."""
        device = next(model.parameters()).device
        prompt = self.tokenizer(render_prompt(self.tokenizer, question, self.system), add_special_tokens=False).input_ids
        first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
        scores = torch.log_softmax(first.logits[0, -1].double(), -1)[[s[0] for s in self.spellings]].cpu()
        longer = [i for i, s in enumerate(self.spellings) if len(s) > 1]
        if not longer:
            return scores
        width = max(len(self.spellings[i]) - 1 for i in longer)
        inputs = torch.zeros((len(longer), width), dtype=torch.long)
        mask = torch.zeros((len(longer), len(prompt) + width), dtype=torch.long)
        mask[:, : len(prompt)] = 1
        for row, i in enumerate(longer):
            feed = self.spellings[i][:-1]
            inputs[row, : len(feed)] = torch.tensor(feed)
            mask[row, len(prompt) : len(prompt) + len(feed)] = 1
        cache = first.cache
        cache.batch_repeat_interleave(len(longer))
        positions = (len(prompt) + torch.arange(width)).expand(len(longer), -1)
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       cache=cache, use_cache=True).logits
        logps = torch.log_softmax(logits.double(), -1).cpu()
        for row, i in enumerate(longer):
            rest = self.spellings[i][1:]
            scores[i] += logps[row, torch.arange(len(rest)), torch.tensor(rest)].sum()
        return scores


@torch.no_grad()
def residual_norms(model: torch.nn.Module, tokenizer: Any, questions: Sequence[str],
                   system: str | None = None) -> torch.Tensor:
    """Per hidden-state index ``0..L``, the median per-token residual-stream norm over the questions'
    prompt tokens: the unit that makes steering coefficients comparable across layers. The median,
    not the mean, because a few positions (the first token in Llama-family models) carry norms
    hundreds of times larger than the rest."""
    batch = encode_conversations(tokenizer, list(questions), [""] * len(questions),
                                 [system] * len(questions)).to(next(model.parameters()).device)
    with record_activations(model) as acts:
        model(**batch.model_inputs())
    real = batch.attention_mask.bool()
    return torch.stack([acts[i][0][real].float().norm(dim=-1).median() for i in sorted(acts)]).cpu()


def steering_curves(
    model: torch.nn.Module,
    tokenizer: Any,
    vectors: torch.Tensor,
    layers: Sequence[int],
    coefficients: Sequence[float],
    scorer: PanelScorer,
    questions: Sequence[str],
    *,
    norms: torch.Tensor | None = None,
    baseline: Sequence[float] | None = None,
    progress: Any = None,
) -> list[SteeringCurve]:
    """One :class:`SteeringCurve` per layer: add ``c * norms[l] * v_l / |v_l|`` at every position of
    hidden-state index ``l`` (:class:`trait_guard.steer.Steering`) and score the panel on ``questions``.

    ``vectors`` is ``[L+1, hidden]`` (a :class:`PersonaVector`'s ``vectors``). ``norms`` defaults to
    :func:`residual_norms` on the questions and ``baseline`` (the unsteered per-question log-odds,
    reused for ``c = 0``) to a fresh measurement; pass both to share them between vectors.
    ``progress`` is an optional tqdm-like object advanced once per steered (layer, nonzero coefficient).
    """
    norms = residual_norms(model, tokenizer, questions) if norms is None else norms
    baseline = list(scorer.logodds(model, questions) if baseline is None else baseline)
    cs = sorted(float(c) for c in coefficients)
    curves = []
    for layer in layers:
        direction = (vectors[layer] / vectors[layer].norm().clamp_min(1e-12)).float()
        rows = []
        for c in cs:
            if c == 0:
                rows.append(baseline)
                continue
            with Steering(model, direction, layer=layer, coefficient=c * float(norms[layer])):
                rows.append(scorer.logodds(model, questions))
            if progress is not None:
                progress.update(1)
        curves.append(SteeringCurve(layer=layer, coefficients=cs, logodds=[sum(r) / len(r) for r in rows],
                                    per_question=rows, baseline=sum(baseline) / len(baseline),
                                    scale=float(norms[layer])))
    return curves


# --------------------------------------------------------------------------------------------------
# Extraction


LayerChoiceMode = Literal["steering", "separation"]
LAYER_CHOICES: tuple[LayerChoiceMode, ...] = ("steering", "separation")


@dataclass
class LayerChoice:
    """Which layer a method's vector uses, chosen how, and the two candidates side by side."""

    method: Method
    layer: int  # the layer the PersonaVector carries
    chosen_by: Literal["steering", "separation"]
    separation_layer: int  # argmax of held-out separation (see separation_by)
    separation_by: Literal["instruction", "question"]  # which held-out d chose separation_layer
    steering_layer: int | None  # largest monotone steering slope; None: not measured or no layer qualified
    reason: str  # one sentence: why this layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExtractionResult:
    """Vectors for both methods, the per-layer held-out measures, the layer choices and what the judge kept.

    ``table``: one row per hidden-state index with, per method ``m``, ``d_{m}`` (question-held-out d),
    ``d_instr_{m}`` (instruction-held-out d), ``norm_{m}`` and the steering summary ``slope_{m}``,
    ``slope_se_{m}``, ``spearman_{m}``, ``increasing_{m}``, ``effect_{m}`` (NaN where not measured).
    ``curves``: per method, the full :class:`SteeringCurve` of every swept layer, for logging and plots.
    ``controls``: per method, the random directions' curves at each layer tried (:class:`SteeringSweep`).
    """

    vectors: dict[Method, PersonaVector]
    table: list[dict[str, float]]
    kept: dict[str, int]
    seconds: float
    choices: dict[Method, LayerChoice] = field(default_factory=dict)
    curves: dict[Method, list[SteeringCurve]] = field(default_factory=dict)
    controls: dict[Method, dict[int, list[SteeringCurve]]] = field(default_factory=dict)  # random directions, per layer
    instruction_holdout: str = ""  # how instruction pairs were held out, or why they were not
    steering_note: str = ""  # how the steering effect was measured, or why it was not
    steering_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (vectors as their layer and method; NaN becomes None)."""
        from trait_guard.files import to_jsonable

        return to_jsonable({
            "layers": {m: v.layer for m, v in self.vectors.items()},
            "choices": {m: c.to_dict() for m, c in self.choices.items()},
            "kept": self.kept, "seconds": self.seconds, "steering_seconds": self.steering_seconds,
            "instruction_holdout": self.instruction_holdout, "steering_note": self.steering_note,
            "table": self.table, "curves": {m: [c.to_dict() for c in cs] for m, cs in self.curves.items()},
            "random_controls": {m: {str(layer): [c.summary() for c in cs] for layer, cs in by_layer.items()}
                                for m, by_layer in self.controls.items()},
        })


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
    layer_choice: LayerChoiceMode = "steering",
    steering: SteeringSweep | None = None,
    progress: Callable[[int, str], Any] | None = None,
) -> ExtractionResult:
    """Extract persona vectors for ``spec`` from ``model`` (see the module docstring).

    ``n_instructions`` / ``n_questions`` cap how many instruction pairs and questions are used (for
    quick runs); ``progress(total, description)`` may return a tqdm-like bar that is advanced per answer.
    If a judge keeps fewer than ``min_kept`` positive or negative answers, the unfiltered answers are
    used and ``kept['judge_filter']`` says so (a tiny model may rarely express the trait in words).

    ``layer_choice="steering"`` (default) measures the steering effect (``steering``, default
    :class:`SteeringSweep`) and uses the monotone layer with the largest slope; where that is not
    possible (no panel, no held-out questions, no layer with a monotone effect, method not swept) the
    separation layer is used and :attr:`ExtractionResult.choices` says why. ``"separation"`` skips the
    sweep (no extra forward passes).
    """
    if layer_choice not in LAYER_CHOICES:
        raise ValueError(f"unknown layer_choice {layer_choice!r}; use one of {', '.join(LAYER_CHOICES)}")
    started = time.perf_counter()
    pairs = spec.instructions[:n_instructions]
    extract_q, eval_q = spec.extract_questions[:n_questions], spec.eval_questions[:n_questions]
    sampler = _PairedSampler(model, tokenizer, pairs, samples_per_question=samples_per_question,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             batch_size=batch_size, progress=progress)
    train = sampler.answers(extract_q, "extract: sampling answers", 0)
    keep, kept = _judge_filter(spec, train.responses, train.is_pos, min_kept)
    # The judge looks at the answer, so it can only select response-token activations; the last prompt
    # token comes before the answer and is averaged over every sample.
    keeps: dict[Method, torch.Tensor | None] = {"response_mean": keep, "last_prompt": None}
    raw = {m: mean_difference(train.acts[m][_or_all(keeps[m])], train.is_pos[_or_all(keeps[m])]) for m in METHODS}
    held = sampler.answers(eval_q, "evaluate: sampling held-out answers", 10_000)
    separation = {m: _held_out_separation(m, raw[m], train, keeps[m], held, len(pairs)) for m in METHODS}

    sweep, sweep_started = steering or SteeringSweep(), time.perf_counter()
    swept = _Sweep(note="not measured (layer_choice='separation')")
    if layer_choice == "steering":
        swept = _steering_sweep(model, tokenizer, spec, raw, separation, sweep, progress)
    curves, note = swept.curves, swept.note
    steering_seconds = time.perf_counter() - sweep_started
    choices = {m: _choose(m, separation[m], swept, sweep.min_increasing_fraction) for m in METHODS}
    holdout = _holdout_description(len(pairs))
    meta = _vector_meta(pairs, extract_q, eval_q, samples_per_question, max_new_tokens, temperature, seed, kept,
                        holdout, note)
    identity = model_identity(model)
    vectors = {m: PersonaVector(trait=spec.trait_id, model=identity, vectors=raw[m].float(), layer=choices[m].layer,
                                method=m, separation=separation[m].question,
                                meta=_method_meta(meta, separation[m], choices[m], curves.get(m, []),
                                                  swept.controls.get(m, {})))
               for m in METHODS}
    return ExtractionResult(vectors=vectors, table=_table_rows(raw, separation, curves, identity.num_layers),
                            kept=kept, seconds=time.perf_counter() - started, choices=choices, curves=curves,
                            controls=swept.controls, instruction_holdout=holdout, steering_note=note,
                            steering_seconds=steering_seconds)


def _or_all(keep: torch.Tensor | None) -> slice | torch.Tensor:
    """An index that selects the kept samples, or all of them."""
    return slice(None) if keep is None else keep


@dataclass
class _Answers:
    """Sampled answers of every pair x question x sample, a positive and a negative side by side."""

    responses: list[str]
    is_pos: torch.Tensor  # [n] bool
    acts: dict[Method, torch.Tensor]  # [n, L+1, hidden]
    question: torch.Tensor  # [n] question index
    pair: torch.Tensor  # [n] instruction-pair index


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

    def answers(self, questions: Sequence[str], label: str, seed_offset: int) -> _Answers:
        """Answers for every pair x question x sample, sampled with ``seed + seed_offset``."""
        users, systems, polarity, question_index, pair_index = [], [], [], [], []
        for pi, pair in enumerate(self.pairs):
            for qi, q in enumerate(questions):
                for _ in range(self.samples_per_question):
                    users += [q, q]
                    systems += [pair.pos, pair.neg]
                    polarity += [1, 0]
                    question_index += [qi, qi]
                    pair_index += [pi, pi]
        bar = self.progress(len(users), label) if self.progress else None
        responses = sample_completions(self.model, self.tokenizer, users, systems,
                                       max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                       seed=self.seed + seed_offset, batch_size=self.batch_size, progress=bar)
        if bar is not None and hasattr(bar, "close"):
            bar.close()
        acts = collect_activations(self.model, self.tokenizer, users, responses, systems, batch_size=self.batch_size)
        return _Answers(responses, torch.tensor(polarity, dtype=torch.bool), acts, torch.tensor(question_index),
                        torch.tensor(pair_index))


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


@dataclass
class _Separation:
    """One method's held-out separation: the layer it chooses and the d's that are reported."""

    layer: int
    chosen_by: Literal["instruction", "question"]
    question: list[float]  # question-held-out d per index, on the reporting half of the questions
    instruction: list[float]  # instruction-held-out d per index, reporting half (all NaN: < 2 pairs)


def _held_out_separation(method: Method, vectors: torch.Tensor, train: _Answers, keep: torch.Tensor | None,
                         held: _Answers, n_pairs: int) -> _Separation:
    """Held-out separation of one method's vectors; the layer is chosen on one half of the held-out
    questions and the d's are reported on the other, so the reported d is not inflated by the choice.

    With >= 2 instruction pairs the layer is chosen by the instruction-held-out d (held-out pair AND
    held-out questions); with one pair only questions can be held out, and the choice says so."""
    selects = held.question % 2 == 0
    if selects.all() or not selects.any():
        raise TraitGuardInputError("need at least 2 evaluation questions (one to choose the layer, one to measure it)")

    def question_d(rows: torch.Tensor) -> list[float]:
        return layer_separation(vectors, held.acts[method][rows], held.is_pos[rows])

    def instruction_d(rows: torch.Tensor) -> list[float]:
        return instruction_held_out_separation(train.acts[method], train.is_pos, train.pair, held.acts[method][rows],
                                               held.is_pos[rows], held.pair[rows], n_pairs, keep)

    if n_pairs >= 2:
        return _Separation(choose_layer(instruction_d(selects)), "instruction", question_d(~selects),
                           instruction_d(~selects))
    return _Separation(choose_layer(question_d(selects)), "question", question_d(~selects),
                       [math.nan] * vectors.shape[0])


def _holdout_description(n_pairs: int) -> str:
    """How instruction pairs were held out (or why not), for the result and the vectors' metadata."""
    if n_pairs >= 2:
        return (f"leave-one-pair-out over {n_pairs} instruction pairs: d on the held-out pair's answers to held-out "
                "questions, averaged over folds; the layer is chosen on the even-numbered evaluation questions and "
                "d reported on the odd-numbered ones")
    return ("unavailable: 1 instruction pair, so nothing is left to hold out; the separation layer is chosen by the "
            "question-held-out d (even-numbered evaluation questions; d reported on the odd-numbered ones)")


@dataclass
class _Sweep:
    """What the steering sweep measured: per method its curves and, per layer tried, the random
    directions' curves (empty without controls), and a note on how."""

    curves: dict[Method, list[SteeringCurve]] = field(default_factory=dict)
    controls: dict[Method, dict[int, list[SteeringCurve]]] = field(default_factory=dict)
    note: str = ""


def _steering_sweep(model: torch.nn.Module, tokenizer: Any, spec: TraitSpec, raw: dict[Method, torch.Tensor],
                    separation: dict[Method, _Separation], sweep: SteeringSweep,
                    progress: Callable[[int, str], Any] | None) -> _Sweep:
    """Steering curves of the swept methods' vectors (:func:`steering_curves`), the random-direction
    controls (:func:`_controls`) and a note saying how they were measured; no curves and the reason
    when the spec cannot be measured."""
    scorer = PanelScorer.for_spec(tokenizer, spec)
    questions = sweep.questions(spec)
    if scorer is None:
        return _Sweep(note=f"not measured: trait '{spec.trait_id}' has no panel (panel_target + panel) to score")
    if not questions:
        return _Sweep(note=f"not measured: trait '{spec.trait_id}' has no {sweep.question_set}_questions")
    num_layers = raw["response_mean"].shape[0] - 1
    layers = {m: sweep.candidate_layers(num_layers, also=[separation[m].layer]) for m in sweep.methods}
    norms = residual_norms(model, tokenizer, questions)
    baseline = scorer.logodds(model, questions)
    total = sum(len(ls) for ls in layers.values()) * sum(1 for c in sweep.coefficients if c != 0)
    bar = progress(total, "steering: layer x coefficient") if progress else None
    try:
        curves = {m: steering_curves(model, tokenizer, raw[m], layers[m], sweep.coefficients, scorer, questions,
                                     norms=norms, baseline=baseline, progress=bar) for m in sweep.methods}
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    controls = {m: _controls(model, tokenizer, raw[m], curves[m], sweep, scorer, questions, norms, baseline)
                for m in sweep.methods}
    note = (f"panel log-odds of '{scorer.target}' against {len(scorer.alternatives)} alternatives on "
            f"{len(questions)} {sweep.question_set}_questions (never used in extraction); c in "
            f"{sorted(sweep.coefficients)} x the median residual norm at each layer; monotone = the mean curve "
            f"rises on >= {sweep.min_increasing_fraction:.0%} of its steps")
    if sweep.random_controls:
        note += (f"; the vector must beat {sweep.random_controls} random orthogonal directions of the same size "
                 f"at its layer (up to {sweep.control_layers} layers tried, by slope)")
    return _Sweep(curves, controls if sweep.random_controls else {}, note)


def _controls(model: torch.nn.Module, tokenizer: Any, vector: torch.Tensor, curves: list[SteeringCurve],
              sweep: SteeringSweep, scorer: PanelScorer, questions: Sequence[str], norms: torch.Tensor,
              baseline: Sequence[float]) -> dict[int, list[SteeringCurve]]:
    """Random-direction curves at the qualifying layers, by slope, until one layer's vector beats them
    (at most ``sweep.control_layers`` layers; none without ``sweep.random_controls``)."""
    controls: dict[int, list[SteeringCurve]] = {}
    if not sweep.random_controls:
        return controls
    for curve in steering_candidates(curves, sweep.min_increasing_fraction)[: sweep.control_layers]:
        controls[curve.layer] = random_direction_curves(model, tokenizer, vector, curve.layer, sweep.random_controls,
                                                        sweep.coefficients, scorer, questions, norms=norms,
                                                        baseline=baseline, seed=sweep.seed)
        if beats_random_directions(curve, controls[curve.layer]):
            break
    return controls


def _choose(method: Method, separation: _Separation, swept: _Sweep, min_increasing_fraction: float) -> LayerChoice:
    """The layer a method's vector uses: the steering choice when there is one, else the separation one."""
    base = {"method": method, "separation_layer": separation.layer, "separation_by": separation.chosen_by}
    curves, note = swept.curves.get(method), swept.note
    if curves is None:
        why = "steering not measured for this method" if not note.startswith("not measured") else f"steering {note}"
        return LayerChoice(**base, layer=separation.layer, chosen_by="separation", steering_layer=None,
                           reason=f"largest held-out {separation.chosen_by} separation ({why})")
    controls = swept.controls.get(method) if swept.controls else None
    steering_layer = choose_steering_layer(curves, min_increasing_fraction, controls)
    fallback = f"fell back to the largest held-out {separation.chosen_by} separation"
    if steering_layer is None and controls:
        tried = "; ".join(f"layer {layer}: vector {next(c for c in curves if c.layer == layer).slope:.3g} vs random "
                          + ", ".join(f"{r.slope:+.3g}" for r in randoms) for layer, randoms in controls.items())
        return LayerChoice(**base, layer=separation.layer, chosen_by="separation", steering_layer=None,
                           reason=f"no monotone steering slope beat random directions of the same size ({tried}): "
                                  f"the sweep measured disruption, not the trait; {fallback}")
    if steering_layer is None:
        best = max(curves, key=lambda c: c.slope if math.isfinite(c.slope) else -math.inf)
        return LayerChoice(**base, layer=separation.layer, chosen_by="separation", steering_layer=None,
                           reason=f"no swept layer has a monotone increasing steering effect (best slope "
                                  f"{best.slope:.3g} at layer {best.layer}, rising on {best.increasing_fraction:.0%} "
                                  f"of steps); {fallback}")
    curve = next(c for c in curves if c.layer == steering_layer)
    beaten = (f"; random directions there: {', '.join(f'{r.slope:+.3g}' for r in controls[steering_layer])}"
              if controls else "")
    return LayerChoice(**base, layer=steering_layer, chosen_by="steering", steering_layer=steering_layer,
                       reason=f"largest monotone steering slope: {curve.slope:.3g} +- {curve.slope_se:.2g} nats "
                              f"per unit c, effect at max c {curve.effect_at_max:+.3g} nats{beaten}")


def _vector_meta(pairs: Sequence[Any], extract_q: Sequence[str], eval_q: Sequence[str], samples_per_question: int,
                 max_new_tokens: int, temperature: float, seed: int, kept: dict[str, Any], holdout: str,
                 steering_note: str) -> dict[str, Any]:
    """Metadata shared by both methods' vectors."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_instructions": len(pairs),
        "n_extract_questions": len(extract_q),
        "n_eval_questions": len(eval_q),
        "samples_per_question": samples_per_question,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "kept": kept,
        "instruction_holdout": holdout,
        "steering": steering_note,
    }


def _method_meta(shared: dict[str, Any], separation: _Separation, choice: LayerChoice,
                 curves: list[SteeringCurve], controls: dict[int, list[SteeringCurve]]) -> dict[str, Any]:
    """One method's metadata: the shared part, its layer choice, its instruction-held-out d per index,
    its steering summaries and the random directions' at the layers tried (JSON-safe: NaN becomes None)."""
    from trait_guard.files import to_jsonable

    return to_jsonable({
        **shared,
        "layer_selection": choice.reason,
        "layer_choice": choice.to_dict(),
        "instruction_separation": separation.instruction,
        "steering_curves": [c.summary() | {"logodds": c.logodds} for c in curves],
        "random_direction_slopes": {str(layer): [c.slope for c in cs] for layer, cs in controls.items()},
    })


def _table_rows(raw: dict[Method, torch.Tensor], separation: dict[Method, _Separation],
                curves: dict[Method, list[SteeringCurve]], num_layers: int) -> list[dict[str, float]]:
    """:attr:`ExtractionResult.table`: per hidden-state index, each method's held-out d's, vector norm and
    steering summary (NaN where a layer was not swept)."""
    by_layer = {m: {c.layer: c for c in cs} for m, cs in curves.items()}
    rows = []
    for index in range(num_layers + 1):
        row: dict[str, float] = {"layer": index}
        for m in METHODS:
            curve = by_layer.get(m, {}).get(index)
            row |= {f"d_{m}": separation[m].question[index], f"d_instr_{m}": separation[m].instruction[index],
                    f"norm_{m}": float(raw[m][index].norm()),
                    f"slope_{m}": curve.slope if curve else math.nan,
                    f"slope_se_{m}": curve.slope_se if curve else math.nan,
                    f"spearman_{m}": curve.spearman if curve else math.nan,
                    f"increasing_{m}": curve.increasing_fraction if curve else math.nan,
                    f"effect_{m}": curve.effect_at_max if curve else math.nan}
        rows.append(row)
    return rows


def format_separation_table(result: ExtractionResult, chosen: dict[str, int]) -> str:
    """Per layer and method: question- and instruction-held-out d, steering slope and the fraction of
    rising steps ("-": not measured), marking the chosen layers."""
    def num(x: float, fmt: str = ".2f") -> str:
        return "-" if not math.isfinite(x) else format(x, fmt)

    head = "".join(f"  {'d_q':>6} {'d_instr':>7} {'slope':>7} {'rise':>4}" for _ in METHODS)
    lines = ["        " + "".join(f"  {m:<27}" for m in METHODS), f"{'layer':>5}{head}"]
    for row in result.table:
        layer = int(row["layer"])
        cells = "".join(f"  {num(row[f'd_{m}']):>6} {num(row[f'd_instr_{m}']):>7} {num(row[f'slope_{m}']):>7} "
                        f"{num(row[f'increasing_{m}'], '.0%'):>4}" for m in METHODS)
        marks = "".join(f"  <- chosen ({m})" for m, chosen_layer in chosen.items() if chosen_layer == layer)
        lines.append(f"{layer:>5}{cells}{marks}")
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
