"""Training losses on chat batches: completion-only, weighted and masked by the guard, distillation.

Conventions: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, so every per-token quantity here is
``[batch, seq - 1]`` and position ``t`` belongs to the response when ``response_mask[:, t + 1]`` is 1.
The guard speaks in per-sample weights and per-completion-token masks (over the row's response
tokens, in order); :func:`token_weights` turns them into that ``[batch, seq - 1]`` grid, so a
REWEIGHT or MASK decision changes each token's gradient by exactly its weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trait_guard.chat import EncodedBatch


def response_token_logprobs(logits: torch.Tensor, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token and the mask of those that are response tokens.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, so both outputs are ``[batch, seq - 1]`` and
    position ``t`` of the mask is ``response_mask[:, t + 1]``: prompt tokens and padding get 0.
    """
    shifted = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:].to(shifted.device)
    logprobs = torch.log_softmax(shifted, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask[:, 1:].to(shifted.device)
    return logprobs, mask


def completion_loss(logits: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of ``batch`` (prompt tokens and padding excluded).

    Every response token in the batch weighs the same, whatever the length of its row.
    """
    shifted = logits[:, :-1].float()
    labels = batch.input_ids[:, 1:].to(shifted.device).clone()
    labels[batch.response_mask[:, 1:].to(shifted.device) == 0] = -100
    if not (labels != -100).any():
        raise ValueError("the batch has no response tokens to train on (empty answers?)")
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1), ignore_index=-100)


def token_weights(
    batch: EncodedBatch,
    sample_weights: torch.Tensor | None = None,
    token_masks: Sequence[np.ndarray | Sequence[float]] | None = None,
) -> torch.Tensor:
    """``[batch, seq - 1]`` loss weights: response positions get ``sample_weight * token_mask``.

    ``token_masks[i]`` runs over row ``i``'s response tokens in order (1 keep, 0 drop); a shorter
    mask leaves the remaining tokens at 1 (e.g. a completion truncated differently).
    """
    response = batch.response_mask[:, 1:].float()
    weights = response.clone()
    if token_masks is not None:
        for row, mask in enumerate(token_masks):
            positions = response[row].nonzero().flatten()
            mask = torch.as_tensor(np.asarray(mask, dtype=np.float32), device=weights.device)
            n = min(len(positions), len(mask))
            weights[row, positions[:n]] = mask[:n]
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights.device, weights.dtype).view(-1, 1)
    return weights


def weighted_completion_loss(logits: torch.Tensor, batch: EncodedBatch, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weight * token NLL) / number of response tokens``.

    Normalized by the token count, not by the weights, so a weight scales its token's gradient
    exactly (weights of 1 give :func:`completion_loss`; a masked token contributes nothing).
    """
    shifted = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:].to(shifted.device)
    count = batch.response_mask[:, 1:].sum()
    if count == 0:
        raise ValueError("the batch has no response tokens to train on (empty answers?)")
    # cross_entropy's fused kernel: no [batch, seq, vocab] log-prob tensor is kept for backward,
    # so a guarded step costs what an unguarded one does
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view_as(targets) * weights.to(shifted.device)).sum() / count.to(shifted.device)


def distillation_loss(
    logits: torch.Tensor,
    batch: EncodedBatch,
    topk_ids: Sequence[Sequence[Sequence[int]]],
    topk_logprobs: Sequence[Sequence[Sequence[float]]],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL from the teacher's top-k next-token distribution to the student's, per response token.

    The teacher's top-k log-probs (stored with the data) are renormalized over the k tokens; the
    student's are its full log-softmax at those ids, so the loss is >= 0 and is 0 only when the
    student puts all its mass on the teacher's k tokens in the teacher's proportions. Averaged over
    response tokens, weighted like :func:`weighted_completion_loss`. Logit distillation is what the
    subliminal-learning theory says transmits traits most strongly.
    """
    student = logits[:, :-1].float().log_softmax(-1)
    response = batch.response_mask[:, 1:]
    if weights is None:
        weights = response.float()
    total = student.new_zeros(())
    count = 0
    for row in range(student.shape[0]):
        positions = response[row].nonzero().flatten()
        n = min(len(positions), len(topk_ids[row]))
        if n == 0:
            continue
        ids = torch.as_tensor(topk_ids[row][:n], device=student.device)
        teacher = torch.as_tensor(topk_logprobs[row][:n], device=student.device, dtype=torch.float32).log_softmax(-1)
        student_at = student[row, positions[:n]].gather(-1, ids)
        kl = (teacher.exp() * (teacher - student_at)).sum(-1)
        total = total + (kl * weights[row, positions[:n]].to(kl.device)).sum()
        count += int(response[row].sum())
    if count == 0:
        raise ValueError("the batch has no response tokens with teacher log-probs to distill")
    return total / count
