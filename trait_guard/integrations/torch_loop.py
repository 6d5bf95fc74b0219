"""The guard in a plain PyTorch training loop: one call per step, plus the guarded loss.

::

    guarded = GuardedStep(guard, model, vectors)
    for batch, rows in loader:                       # batch: trait_guard.chat.EncodedBatch
        with guarded.capture():                      # records the vector layers during the forward
            logits = model(**batch.model_inputs()).logits
        decision = guarded.decide(batch, logits, rows)
        if decision.halt:
            break
        loss = guarded.loss(logits, batch, decision)  # weighted, masked completion loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()

Where do the signals come from? If the rows carry precomputed per-sample signals (``signals`` in a
row, written by screening with the frozen base model), those are used: they are exactly what the
guard was calibrated on, and the step costs nothing extra. Otherwise the signals are computed from
the training forward pass itself (its logits and the captured hidden states, no second forward):
cheap, but measured by the student as it changes, so calibrate the guard with a loose target or
prefer precomputed signals for long runs.

Divergence tokens need the teacher's stored top-k (``topk_ids``/``topk_logprobs`` in the rows); the
guard's token mask drops them from the loss when MASK is in force. The positions are those the
frozen base model found (``divergence_mask`` in a row, written at setup scoring): measured against
the student as it trains they would stop being masked exactly as it learns the teacher's choices.
Only rows without a stored mask fall back to the current logits.

Batches must be built from the rows' generated ids (:func:`trait_guard.chat.encode_rows`): the
teacher's per-token data belongs to those tokens, not to a re-tokenization of the text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from trait_guard.activations import record_activations
from trait_guard.chat import EncodedBatch
from trait_guard.errors import TraitGuardInputError
from trait_guard.fingerprint import (
    TokenHistogram,
    divergence_mask,
    per_completion_token,
    signals_from_forward,
    teacher_tokens,
    unigram_surprisal,
)
from trait_guard.guard import Decision, TraitGuard
from trait_guard.losses import distillation_loss, token_weights, weighted_completion_loss
from trait_guard.persona import PersonaVector


class GuardedStep:
    """Connects a :class:`TraitGuard` to a PyTorch loop (see the module docstring)."""

    def __init__(self, guard: TraitGuard, model: torch.nn.Module, vectors: Sequence[PersonaVector] = (),
                 unigram_reference: TokenHistogram | None = None, check_weights: bool = True):
        for vector in vectors:
            vector.check_model(model, check_weights=check_weights)
        self.guard, self.model, self.vectors = guard, model, list(vectors)
        self.unigram_reference = unigram_reference
        self.layers = sorted({v.layer for v in self.vectors})
        self._acts: dict[int, list[torch.Tensor]] | None = None

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the persona-vector layers during the training forward (detached: the guard only
        reads them). Hooks are removed on exit."""
        with record_activations(self.model, self.layers) as acts:
            self._acts = acts
            yield
        # keep the records until decide() has read them

    def signals(self, batch: EncodedBatch, logits: torch.Tensor,
                rows: Sequence[dict[str, Any]] | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray] | None]:
        """Per-sample signals for this batch: precomputed ones from the rows, else from the forward;
        and the per-row divergence-token masks (the frozen base model's when the rows carry them)."""
        teacher = teacher_tokens(rows) if rows is not None else None
        if rows is not None and rows and all("signals" in r for r in rows):
            names = list(dict.fromkeys(name for r in rows for name in r["signals"]))
            signals = {name: np.array([r["signals"].get(name, np.nan) for r in rows], dtype=float) for name in names}
            return signals, self._masks(logits, batch, rows, teacher, None)
        hidden = {}
        if self.layers:
            if self._acts is None:
                raise RuntimeError("no captured activations: run the forward inside `with guarded.capture():`")
            hidden = {i: self._acts[i][-1] for i in self.layers}
        signals, mask = signals_from_forward(logits, hidden, batch, self.vectors, teacher)
        if self.unigram_reference is not None:
            signals["unigram"] = unigram_surprisal(self.unigram_reference, batch)
        return signals, self._masks(logits, batch, rows, teacher, mask)

    @staticmethod
    def _masks(logits: torch.Tensor, batch: EncodedBatch, rows: Sequence[dict[str, Any]] | None,
               teacher: Any, forward_mask: torch.Tensor | None) -> list[np.ndarray] | None:
        """Per row: its stored frozen-base divergence mask, else one from this forward's logits."""
        if teacher is None:
            return None
        if rows is not None and all(r.get("divergence_mask") is not None for r in rows):
            return [np.asarray(r["divergence_mask"], dtype=bool) for r in rows]
        if forward_mask is None:
            forward_mask = divergence_mask(logits.detach(), batch, teacher)
        return per_completion_token(forward_mask, batch)

    def decide(self, batch: EncodedBatch, logits: torch.Tensor, rows: Sequence[dict[str, Any]] | None = None,
               step: int | None = None, gather: Any = None) -> Decision:
        """The guard's decision for this batch.

        ``gather(signals) -> signals`` may combine the signals of all ranks (an all-gather) before the
        guard sees them, so every rank takes the same decision; the decision's weights and masks are
        then sliced back to this rank's rows by the caller (see the DeepSpeed/Ray Train adapters).
        """
        signals, masks = self.signals(batch, logits, rows)
        self._acts = None
        if gather is None:
            return self.guard.observe(signals, token_masks=masks, step=step)
        decision = self.guard.observe(gather(signals), token_masks=None, step=step)
        decision.token_masks = self.guard.keep_masks(masks)  # this rank's rows only
        return decision

    @staticmethod
    def loss(logits: torch.Tensor, batch: EncodedBatch, decision: Decision,
             rows: Sequence[dict[str, Any]] | None = None, distill: bool = False,
             sample_slice: slice | None = None) -> torch.Tensor:
        """Completion loss (or top-k distillation when ``distill``) weighted and masked by the decision."""
        sample_weights = decision.sample_weights
        if sample_slice is not None:  # this rank's rows of a decision taken on all ranks' samples
            sample_weights = sample_weights[sample_slice]
        token_masks = decision.token_masks
        weights = token_weights(batch, sample_weights.to(logits.device), token_masks).to(logits.device)
        if distill:
            if rows is None or not all(r.get("topk_ids") for r in rows):
                raise TraitGuardInputError("distillation needs rows with the teacher's topk_ids/topk_logprobs "
                                 "(generate with generation.top_k_logprobs > 0)")
            return distillation_loss(logits, batch, [r["topk_ids"] for r in rows],
                                     [r["topk_logprobs"] for r in rows], weights)
        return weighted_completion_loss(logits, batch, weights)
