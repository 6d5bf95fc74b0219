"""Statistical fingerprints of teacher data: per-sample signals, aggregated per batch.

Subliminal traits live in model-specific statistics, not in meaning, so trait_guard measures the data
the way the student's base model sees it. One forward pass of the base model (default system prompt,
as a student sees the data) over prompt + completion yields every model-based signal:

* ``nll`` / ``entropy``: mean per-token negative log-likelihood of the completion and mean entropy of
  the next-token distribution. Low values mean "this looks like my own family's output": kinship,
  the precondition for transfer (post-trained models find their own outputs unusually likely).
* ``proj:<trait>``: the completion's response-averaged activation projected on a persona vector at
  its layer (Chen et al. 2025). Data from a trait teacher leans along the trait direction.
* ``divergence``: the fraction of completion tokens where the teacher's top-1 next token (stored in
  the data's top-k log-probs) differs from the base model's top-1 in the student's context *and the
  teacher was sure of it*: its own margin log p_T(top1_T) - log p_T(top1_B) exceeds
  ``divergence_margin`` (near-ties flip with numerics, e.g. left- vs right-padded batches; counting
  them made the base model disagree with itself on 1.5-5% of tokens). Transfer rides on these tokens
  (Schrodi et al. 2025); their positions are also returned as a per-token mask.
* ``llr``: the mean per-token log-likelihood ratio log p_T(y_t) - log p_B(y_t) of the generated
  tokens, from the teacher's stored log-prob of each token it sampled and the base model's: the
  Neyman-Pearson statistic for "written by this teacher rather than by the base model" (its mean is
  KL(T||B) on the teacher's data and about 0 on the base model's own).

Both need teacher log-probs stored with the data (``generation.top_k_logprobs > 0``); text-only data
has neither, and :func:`teacher_signal_coverage` says so before anything is trained.

and, with no model at all:

* ``unigram``: mean surprisal of the completion's tokens under a smoothed token histogram of a
  reference set from the same prompt family (the base model's own generations); a batch-level
  Jensen-Shannon divergence and the list of most over-represented ("entangled") tokens come from
  :class:`TokenHistogram`.

:func:`signals_from_forward` computes the model-based signals from logits and hidden states that
already exist, so a training loop can reuse its own forward pass instead of running a second one.
Memory is independent of dataset size: rows stream through in batches and only per-sample scalars
are kept.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trait_guard.activations import masked_mean, record_activations
from trait_guard.chat import EncodedBatch, encode_rows
from trait_guard.persona import PersonaVector


def signal_name(vector: PersonaVector) -> str:
    return f"proj:{vector.trait}"


#: Signals that have shown power to tell trait-teacher data from the base model's own (docs/detection.md).
#: A guard that watches none of them cannot claim a run passed: its verdict is "unmonitored".
POWERED_SIGNALS = ("divergence", "llr")

#: Signals computed from teacher log-probs stored with the data, and the column each needs.
TEACHER_LOGPROB_SIGNALS = {"divergence": "topk_ids", "llr": "token_logprobs"}

#: Default margin (nats) the teacher must have for its top-1 over the base model's top-1 before a
#: disagreement counts as a divergence token.
DIVERGENCE_MARGIN = 0.1


def teacher_signal_coverage(rows: Sequence[dict[str, Any]] | Any) -> dict[str, int]:
    """How many ``rows`` carry what each teacher-log-prob signal needs (``{"divergence": n, "llr": n}``):
    a non-empty list in its column. ``rows``: dicts, or an Arrow table (counted column by column,
    without a dict per row: the batched reader's summaries)."""
    if hasattr(rows, "column_names"):
        import pyarrow.compute as pc

        def carrying(column: str) -> int:
            if column not in rows.column_names:
                return 0
            non_empty = pc.fill_null(pc.greater(pc.list_value_length(rows.column(column)), 0), False)
            return int(pc.sum(non_empty).as_py() or 0)

        return {name: carrying(column) for name, column in TEACHER_LOGPROB_SIGNALS.items()}
    return {name: sum(1 for r in rows if r.get(column) is not None and len(r[column]) > 0)
            for name, column in TEACHER_LOGPROB_SIGNALS.items()}


# Which way each signal moves when data carries a trait: "up" (larger is suspicious), "down", "both".
SUSPICIOUS_DIRECTIONS: dict[str, str] = {
    "proj:*": "up",  # data leaning toward the trait
    "proj_diff:*": "up",  # per prompt, data leaning further toward the trait than the base model's own answer
    "divergence": "up",  # more tokens where the teacher disagrees with the base model
    "llr": "up",  # tokens the teacher found likelier than the base model does
    "nll": "up",  # less like the base model's own output
    "unigram": "up",  # rarer tokens than the reference's
    "entropy": "both",
    "trait_llr:*": "up",  # tokens the trait-prompted base model finds likelier (trait_guard.trait_signals)
    "teacher_llr": "up",  # tokens the teacher model finds likelier than the base model does
    "model_diff": "up",  # data leaning along the teacher-minus-base direction
}


def suspicious_direction(name: str, overrides: dict[str, str] | None = None) -> str:
    """The direction of ``name`` (glob patterns allowed in the table); "both" when unknown."""
    import fnmatch

    for pattern, direction in {**SUSPICIOUS_DIRECTIONS, **(overrides or {})}.items():
        if fnmatch.fnmatchcase(name, pattern):
            return direction
    return "both"


# --------------------------------------------------------------------------------------------------
# Token histograms (no model needed)


class TokenHistogram:
    """Smoothed unigram distribution of completion tokens; streaming (``update``) and comparable."""

    def __init__(self, vocab_size: int, alpha: float = 0.5):
        self.counts = np.zeros(vocab_size, dtype=np.float64)
        self.alpha = alpha

    def update(self, token_ids: Iterable[Sequence[int]]) -> TokenHistogram:
        for ids in token_ids:
            np.add.at(self.counts, np.asarray(ids, dtype=np.int64), 1.0)
        return self

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def probabilities(self) -> np.ndarray:
        smoothed = self.counts + self.alpha
        return smoothed / smoothed.sum()

    def surprisal(self, token_ids: Sequence[int], exclude_self: bool = False) -> float:
        """Mean ``-log p(token)`` of one sample under this histogram (nats).

        ``exclude_self``: the sample is one of those the histogram counted; leave its own tokens out
        (leave-one-out), so reference samples are not scored in-sample, which would make every other
        dataset look rarer than the reference by construction.
        """
        if len(token_ids) == 0:
            return math.nan
        ids = np.asarray(token_ids, dtype=np.int64)
        counts = self.counts[ids]
        total = self.total
        if exclude_self:
            own = np.bincount(ids, minlength=len(self.counts))
            counts = np.maximum(counts - own[ids], 0)  # never below zero, even for ids it did not count
            total -= len(ids)
        p = (counts + self.alpha) / (total + self.alpha * len(self.counts))
        return float(-np.log(p).mean())

    def js_divergence(self, other: TokenHistogram) -> float:
        """Jensen-Shannon divergence (nats) between the two smoothed distributions, restricted to
        tokens seen in either (so the smoothing mass of the unused vocabulary does not dilute it)."""
        seen = (self.counts + other.counts) > 0
        p = (self.counts[seen] + self.alpha) / (self.counts[seen] + self.alpha).sum()
        q = (other.counts[seen] + other.alpha) / (other.counts[seen] + other.alpha).sum()
        m = 0.5 * (p + q)
        return float(0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum())

    def chi_square(self, other: TokenHistogram) -> tuple[float, float]:
        """Chi-square homogeneity test of the two count vectors over seen tokens: (statistic, p-value)."""
        from scipy.stats import chi2_contingency

        seen = (self.counts + other.counts) > 0
        table = np.stack([self.counts[seen], other.counts[seen]]) + self.alpha
        statistic, p_value, _, _ = chi2_contingency(table, correction=False)
        return float(statistic), float(p_value)

    def overrepresented(self, reference: TokenHistogram, tokenizer: Any = None, top: int = 10,
                        min_count: int = 5) -> list[dict[str, Any]]:
        """Tokens most over-represented here relative to ``reference`` (log ratio of smoothed rates)."""
        p, q = self.probabilities(), reference.probabilities()
        ratio = np.log(p / q)
        candidates = np.where(self.counts >= min_count)[0]
        order = candidates[np.argsort(-ratio[candidates])][:top]
        return [
            {"token_id": int(i), "token": tokenizer.decode([int(i)]) if tokenizer is not None else None,
             "count": int(self.counts[i]), "reference_count": int(reference.counts[i]),
             "log_ratio": float(ratio[i])}
            for i in order
        ]


# --------------------------------------------------------------------------------------------------
# Model-based signals


def completion_token_ids(batch: EncodedBatch) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.response_mask, strict=True)]


def per_completion_token(mask: torch.Tensor, batch: EncodedBatch) -> list[np.ndarray]:
    """A ``[batch, seq]`` mask cut into one array per row over that row's response tokens, in order."""
    return [mask[i][batch.response_mask[i].bool().to(mask.device)].cpu().numpy() for i in range(mask.shape[0])]


def unigram_surprisal(histogram: TokenHistogram, batch: EncodedBatch, in_reference: bool = False) -> np.ndarray:
    """Per-sample ``unigram`` signal over the batch's response tokens (the generated ids: the tokens
    the histogram counts). ``in_reference``: the rows are among those the histogram counted."""
    return np.array([histogram.surprisal(ids, exclude_self=in_reference) for ids in completion_token_ids(batch)])


@dataclass
class TeacherTokens:
    """What the data stores about the teacher at each generated token of one row: its top-k ids and
    log-probs, and the log-prob of the token it sampled. Any part may be missing (None)."""

    topk_ids: Sequence[Sequence[int]] | None = None
    topk_logprobs: Sequence[Sequence[float]] | None = None
    token_logprobs: Sequence[float] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TeacherTokens | None:
        parts = {k: row.get(k) or None for k in ("topk_ids", "topk_logprobs", "token_logprobs")}
        return cls(**parts) if any(v is not None for v in parts.values()) else None


def teacher_tokens(rows: Sequence[dict[str, Any]]) -> list[TeacherTokens | None] | None:
    """Per row, its stored teacher data; None when no row has any."""
    teacher = [TeacherTokens.from_row(r) for r in rows]
    return teacher if any(t is not None for t in teacher) else None


def divergence_mask(logits: torch.Tensor, batch: EncodedBatch, teacher: Sequence[TeacherTokens | None],
                    margin: float = DIVERGENCE_MARGIN) -> torch.Tensor:
    """``[batch, seq]`` mask of completion positions where the teacher's top-1 differs from the model's
    (top-1 of ``logits`` at the previous position) by more than ``margin`` nats of the teacher's own
    log-probs. Where the model's top-1 is outside the teacher's stored top-k, the k-th log-prob bounds
    its log-prob from above, so the margin used is a lower bound (conservative). Rows without the
    teacher's top-k: zeros."""
    mask = torch.zeros_like(batch.response_mask, dtype=torch.bool)
    model_top1 = logits[:, :-1].argmax(-1).cpu()  # prediction for position t+1 made at t
    for row, tokens in enumerate(teacher):
        if tokens is None or not tokens.topk_ids:
            continue
        positions = batch.response_mask[row].nonzero().flatten().cpu()
        n = min(len(positions), len(tokens.topk_ids))
        if n == 0:
            continue
        positions = positions[:n]
        ids = torch.as_tensor([list(k) for k in tokens.topk_ids[:n]])
        predicted = model_top1[row, positions - 1]
        disagree = predicted != ids[:, 0]
        if tokens.topk_logprobs and margin > 0:
            logprobs = torch.as_tensor([list(k) for k in tokens.topk_logprobs[:n]], dtype=torch.float32)
            at_model_top1 = ids == predicted.unsqueeze(1)
            teacher_lp_of_model_top1 = torch.where(at_model_top1.any(1), (logprobs * at_model_top1).sum(1),
                                                   logprobs[:, -1])
            disagree &= (logprobs[:, 0] - teacher_lp_of_model_top1) > margin
        mask[row, positions.to(mask.device)] = disagree.to(mask.device)
    return mask


def log_likelihood_ratio(token_logprobs: torch.Tensor, batch: EncodedBatch,
                         teacher: Sequence[TeacherTokens | None]) -> np.ndarray:
    """Per row, the mean of log p_T(y_t) - log p_B(y_t) over its generated tokens (NaN without the
    teacher's token log-probs). ``token_logprobs`` ``[batch, seq - 1]``: the model's log-prob of each
    next token (position ``t`` predicts token ``t + 1``)."""
    out = np.full(len(teacher), np.nan)
    for row, tokens in enumerate(teacher):
        if tokens is None or not tokens.token_logprobs:
            continue
        positions = batch.response_mask[row].nonzero().flatten().to(token_logprobs.device)
        n = min(len(positions), len(tokens.token_logprobs))
        if n == 0:
            continue
        base = token_logprobs[row, positions[:n] - 1].double().cpu().numpy()
        out[row] = float(np.mean(np.asarray(tokens.token_logprobs[:n], dtype=np.float64) - base))
    return out


def signals_from_forward(
    logits: torch.Tensor,
    hidden: dict[int, torch.Tensor],
    batch: EncodedBatch,
    vectors: Sequence[PersonaVector] = (),
    teacher: Sequence[TeacherTokens | None] | None = None,
    divergence_margin: float = DIVERGENCE_MARGIN,
) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
    """Per-sample model-based signals from an existing forward pass.

    ``logits`` ``[batch, seq, vocab]`` and ``hidden`` ``{layer: [batch, seq, d]}`` come from the model
    on ``batch`` (right-padded, with a response mask). ``teacher``: per row, the stored teacher data
    (:func:`teacher_tokens`), for ``divergence`` and ``llr``. Returns ``({signal: [batch] array},
    divergence token mask or None)``.
    """
    with torch.no_grad():
        logits = logits.detach()
        targets = batch.input_ids[:, 1:].to(logits.device)
        predicted = batch.response_mask[:, 1:].to(logits.device).bool()  # logits at t predict token t + 1
        # normalize only the response positions: a [batch, seq, vocab] log-softmax costs as much as the
        # forward's last layer on CPU, and the prompt's positions are most of the sequence
        logprobs = logits[:, :-1][predicted].float().log_softmax(-1)
        token_nll = torch.zeros(predicted.shape, device=logits.device)
        token_nll[predicted] = -logprobs.gather(-1, targets[predicted].unsqueeze(-1)).squeeze(-1)
        token_entropy = torch.zeros(predicted.shape, device=logits.device)
        token_entropy[predicted] = -(logprobs.exp() * logprobs).sum(-1)
        n_tokens = predicted.sum(1).float()
        denom = n_tokens.clamp_min(1.0)
        signals = {
            "nll": (token_nll.sum(1) / denom).cpu().numpy(),
            "entropy": (token_entropy.sum(1) / denom).cpu().numpy(),
            "n_tokens": n_tokens.cpu().numpy(),
        }
        empty = (n_tokens == 0).cpu().numpy()
        for vector in vectors:
            pooled = masked_mean(hidden[vector.layer].detach().float(), batch.response_mask.to(logits.device))
            signals[signal_name(vector)] = vector.project(pooled).cpu().numpy()
        mask = None
        if teacher is not None:
            if any(t is not None and t.topk_ids for t in teacher):
                mask = divergence_mask(logits, batch, teacher, divergence_margin)
                counted = torch.tensor([min(int(n), len(t.topk_ids)) if t is not None and t.topk_ids else 0
                                        for n, t in zip(n_tokens.tolist(), teacher, strict=True)])
                rate = mask.sum(1).float().cpu() / counted.clamp_min(1)
                rate[counted == 0] = math.nan
                signals["divergence"] = rate.numpy()
            if any(t is not None and t.token_logprobs for t in teacher):
                signals["llr"] = log_likelihood_ratio(-token_nll, batch, teacher)
        for name in signals:
            if name != "n_tokens":
                signals[name] = np.where(empty, np.nan, signals[name])
    return signals, mask


def approximate_length(row: dict[str, Any]) -> int:
    """A cheap stand-in for a row's token count, to batch rows of similar length: the prompt's
    characters (about 4 per token) and the completion's ids (or characters)."""
    completion = row.get("completion_ids")
    completion_length = len(completion) if completion is not None else len(row.get("completion") or "") // 4
    return len(row.get("prompt") or "") // 4 + completion_length


@dataclass
class FingerprintScorer:
    """Scores teacher-data rows under a model (normally the student's base model).

    ``vectors`` are persona vectors for that model (checked on construction); ``unigram_reference``
    is a :class:`TokenHistogram` of a reference set from the same prompt family.
    """

    model: torch.nn.Module
    tokenizer: Any
    vectors: Sequence[PersonaVector] = ()
    unigram_reference: TokenHistogram | None = None
    batch_size: int = 32
    system: str | None = None  # None: the model's default prompt, as a student sees the data
    divergence_margin: float = DIVERGENCE_MARGIN
    extra: Sequence[Any] = ()  # more scorers, each with score_rows(rows) -> {signal: array} (trait_signals)
    layers: list[int] = field(init=False)

    def __post_init__(self) -> None:
        for vector in self.vectors:
            vector.check_model(self.model)
        self.layers = sorted({v.layer for v in self.vectors})
        self.device = next(self.model.parameters()).device
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _keep(self, n_positions: int) -> dict[str, int]:
        """The forward's ``logits_to_keep`` (transformers' causal LMs: the last n positions' logits only)."""
        return {"logits_to_keep": n_positions} if self._keeps_logits else {}

    @torch.no_grad()
    def score_rows(self, rows: Sequence[dict[str, Any]], in_reference: bool = False,
                   divergence_counts: Counter | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """Signals for a list of rows (dicts with prompt, completion_ids or completion, and optionally
        the teacher's topk_ids/topk_logprobs/token_logprobs), read on the generated ids (chat.encode_rows).

        ``in_reference``: the rows are among those ``unigram_reference`` counted (scored leave-one-out).
        ``divergence_counts``: a Counter that receives the token ids found at divergence positions.

        Returns per-sample signals and, per row, a boolean array over completion tokens marking the
        divergence tokens (empty where the row has no teacher top-k).
        """
        full = encode_rows(self.tokenizer, rows, [self.system] * len(rows)).to(self.device)
        # every signal reads the response positions only: the logits (the vocabulary-sized last layer)
        # and the activations are kept from the last position before the earliest response on
        start = full.first_scored_position()
        kept = full.input_ids.shape[1] - start
        with record_activations(self.model, self.layers) as acts:
            logits = self.model(**full.model_inputs(), **self._keep(kept)).logits
        logits = logits[:, -kept:]  # a model without logits_to_keep returns every position
        batch = full.crop(start)
        signals, mask = signals_from_forward(logits, {i: a[0][:, start:] for i, a in acts.items()}, batch,
                                             self.vectors, teacher_tokens(rows), self.divergence_margin)
        if self.unigram_reference is not None:
            signals["unigram"] = unigram_surprisal(self.unigram_reference, batch, in_reference)
        for scorer in self.extra:
            signals.update(scorer.score_rows(rows))
        token_masks = per_completion_token(mask, batch) if mask is not None else [np.zeros(0, bool)] * len(rows)
        if divergence_counts is not None and mask is not None:
            for ids, row_mask in zip(completion_token_ids(batch), token_masks, strict=True):
                divergence_counts.update(np.asarray(ids)[row_mask].tolist())
        return signals, token_masks

    def score_table(self, rows: Sequence[dict[str, Any]], progress: Any = None, in_reference: bool = False,
                    divergence_counts: Counter | None = None,
                    token_masks: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Signals for many rows, in batches; ``progress`` is an optional tqdm-like bar.

        A signal only some batches have (rows with and without teacher log-probs) is NaN where missing.
        ``token_masks``: a list that receives each row's divergence-token mask (the frozen model's: what
        MASK drops from the loss), in row order.
        """
        # batches of rows of similar length (less padding), results put back in row order
        order = sorted(range(len(rows)), key=lambda i: approximate_length(rows[i]))
        parts: list[tuple[int, dict[str, np.ndarray]]] = []
        masks_sorted: list[np.ndarray] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = [rows[i] for i in order[start : start + self.batch_size]]
            signals, masks = self.score_rows(chunk, in_reference=in_reference, divergence_counts=divergence_counts)
            parts.append((len(chunk), signals))
            masks_sorted.extend(masks)
            if progress is not None:
                progress.update(len(chunk))
        back = np.argsort(np.asarray(order, dtype=np.int64), kind="stable")
        if token_masks is not None:
            token_masks.extend(masks_sorted[i] for i in back)
        names = list(dict.fromkeys(name for _, p in parts for name in p))
        return {name: np.concatenate([p[name] if name in p else np.full(n, np.nan) for n, p in parts])[back]
                for name in names}


def format_features(completions: Sequence[str]) -> dict[str, np.ndarray]:
    """Format and value statistics (the baseline every signal must beat): number count, mean value,
    character length, and the share of each leading digit."""
    import re

    counts, means, lengths, digit_share = [], [], [], []
    for text in completions:
        numbers = [int(x) for x in re.findall(r"\d+", text)]
        counts.append(len(numbers))
        means.append(np.mean(numbers) if numbers else np.nan)
        lengths.append(len(text))
        digits = "".join(re.findall(r"\d", text))
        digit_share.append([digits.count(str(d)) / len(digits) if digits else np.nan for d in range(10)])
    share = np.array(digit_share, dtype=float).reshape(-1, 10)
    features = {"n_numbers": np.array(counts, float), "mean_value": np.array(means, float),
                "length": np.array(lengths, float)}
    features.update({f"digit_{d}": share[:, d] for d in range(10)})
    return features


def divergence_token_table(counts: Counter, tokenizer: Any = None, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` most frequent divergence tokens: id, decoded text, count and share of all."""
    total = sum(counts.values())
    return [{"token_id": int(i), "token": tokenizer.decode([int(i)]) if tokenizer is not None else None,
             "count": int(n), "share": n / total} for i, n in counts.most_common(top)]
