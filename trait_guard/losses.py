"""Training losses on chat batches: completion-only, weighted and masked by the guard, distillation.

Conventions: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, so every per-token quantity here is
``[batch, seq - 1]`` and position ``t`` belongs to the response when ``response_mask[:, t + 1]`` is 1.
The guard speaks in per-sample weights and per-completion-token masks (over the row's response
tokens, in order); :func:`token_weights` turns them into that ``[batch, seq - 1]`` grid, so a
REWEIGHT or MASK decision changes each token's gradient by exactly its weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


#: Smallest teacher tail mass: the stored top-k log-probs are float32, so ``1 - sum(top-k probs)`` can
#: come out at or below 0 by rounding when the teacher's top-k hold (almost) all of its mass.
TAIL_FLOOR = 1e-6


def distillation_loss(
    logits: torch.Tensor,
    batch: EncodedBatch,
    topk_ids: Sequence[Sequence[Sequence[int]]],
    topk_logprobs: Sequence[Sequence[Sequence[float]]],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one tail bucket, per response token.

    At each response token the teacher is known only through the k next-token log-probs stored with
    the data. Its distribution is taken as those k probabilities *as stored* plus a (k+1)-th bucket,
    the tail, holding the rest of the mass: ``1 - sum(top-k probs)`` (at least :data:`TAIL_FLOOR`).
    The student is bucketed the same way: its probabilities at the same k ids, and its tail mass
    ``1 - sum`` of them, taken in log space as the logsumexp of its logits over the other ids (stable
    and exact, even where the student's tail is tiny). The loss is the KL between the two
    (k+1)-bucket distributions: >= 0, and 0 exactly when the student matches the teacher on every top-k
    token *and* on the total mass it leaves to the rest of the vocabulary.

    Why not renormalize the teacher over its top-k (what this loss did before issue 12): the KL is then
    0 only when the student puts *all* its mass on those k tokens, so it systematically sharpens the
    student and throws away the tail, which is where token entanglement (the channel subliminal traits
    ride on) lives. The tail bucket keeps the teacher's tail mass without needing the tail's shape
    (which is not stored). No temperature is applied: the probabilities are matched as generated.

    Position ``t`` of row ``i``'s ``topk_ids``/``topk_logprobs`` belongs to the row's ``t``-th response
    token; a list shorter than the response covers only its first tokens (the rest contribute 0 but
    still count), and a row without one is left out. ``weights`` (``[batch, seq - 1]``, e.g.
    :func:`token_weights`) scale each token's KL; the sum is divided by the number of response tokens,
    as in :func:`weighted_completion_loss`.
    """
    response = batch.response_mask[:, 1:].to(logits.device)
    if weights is None:
        weights = response.float()
    weights = weights.to(logits.device)
    total = logits.new_zeros((), dtype=torch.float32)
    count = 0
    for row in range(logits.shape[0]):
        positions = response[row].nonzero().flatten()
        n = min(len(positions), len(topk_ids[row]) if topk_ids[row] is not None else 0)
        if n == 0:
            continue
        positions = positions[:n]
        ids = _per_token_matrix(topk_ids[row][:n], np.int64, row, "topk_ids").to(logits.device)  # [n, k]
        teacher = _per_token_matrix(topk_logprobs[row][:n], np.float32, row, "topk_logprobs").to(logits.device)
        if ids.shape != teacher.shape:
            raise ValueError(f"row {row}: topk_ids {tuple(ids.shape)} and topk_logprobs {tuple(teacher.shape)} "
                             "differ in shape")
        # the top-k buckets: the teacher's probabilities as stored, the student's log-probs at the same
        # ids (from its logits at these positions: logits[:, t] predicts token t + 1)
        teacher_p = teacher.exp()
        student = logits[row, positions].float()  # [n, vocab]
        normalizer = student.logsumexp(-1, keepdim=True)
        student_top = student.gather(-1, ids) - normalizer
        kl = (torch.special.xlogy(teacher_p, teacher_p) - teacher_p * student_top).sum(-1)
        if ids.shape[-1] < student.shape[-1]:  # else the top-k are the whole vocabulary: no tail bucket
            # the tail bucket: the teacher's rest (in float64, where 1 - sum cancels), the student's
            # logsumexp over the ids outside the top-k
            teacher_tail = (1.0 - teacher.double().exp().sum(-1)).clamp_min(TAIL_FLOOR).float()
            student_tail = student.scatter(-1, ids, float("-inf")).logsumexp(-1) - normalizer.squeeze(-1)
            kl = kl + teacher_tail * (teacher_tail.log() - student_tail)
        total = total + (kl * weights[row, positions].to(kl.dtype)).sum()
        count += int(response[row].sum())
    if count == 0:
        raise ValueError("the batch has no response tokens with teacher log-probs to distill")
    return total / count


def _per_token_matrix(values: Any, dtype: Any, row: int, name: str) -> torch.Tensor:
    """A row's per-token top-k lists (lists, or arrays as read from Parquet) as a ``[tokens, k]`` tensor."""
    try:
        matrix = np.asarray([np.asarray(v, dtype=dtype) for v in values], dtype=dtype)
    except ValueError as e:
        raise ValueError(f"row {row}: {name} must hold the same number k of entries at every token ({e})") from e
    if matrix.ndim != 2:
        raise ValueError(f"row {row}: {name} must be a list of per-token lists, got shape {matrix.shape}")
    return torch.from_numpy(matrix)
