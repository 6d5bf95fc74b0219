import math

import numpy as np
import pytest
import torch

from trait_guard.chat import encode_conversations
from trait_guard.losses import (
    completion_loss,
    distillation_loss,
    token_weights,
    weighted_completion_loss,
)


@pytest.fixture
def batch(tiny_llama):
    _, tokenizer = tiny_llama
    return encode_conversations(tokenizer, ["q one", "q two longer"], ["12, 34", "5 6"])


def logits_for(batch, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch.input_ids.shape, vocab, generator=g).requires_grad_(True)


def test_unit_weights_give_the_completion_loss(batch):
    logits = logits_for(batch)
    weights = token_weights(batch)
    assert torch.equal(weights, batch.response_mask[:, 1:].float())
    assert weighted_completion_loss(logits, batch, weights).item() == pytest.approx(completion_loss(logits, batch).item())


def test_reweight_scales_each_samples_gradient_exactly(batch):
    logits = logits_for(batch)
    plain = torch.autograd.grad(weighted_completion_loss(logits, batch, token_weights(batch)), logits)[0]
    w = torch.tensor([0.25, 1.75])
    weighted = torch.autograd.grad(weighted_completion_loss(logits, batch, token_weights(batch, w)), logits)[0]
    torch.testing.assert_close(weighted[0], 0.25 * plain[0])
    torch.testing.assert_close(weighted[1], 1.75 * plain[1])


def test_masked_tokens_get_exactly_zero_gradient(batch):
    logits = logits_for(batch)
    masks = [np.array([1, 0, 1, 1, 0, 1], dtype=np.float32), np.array([0, 1, 1])]
    weights = token_weights(batch, token_masks=masks)
    grad = torch.autograd.grad(weighted_completion_loss(logits, batch, weights), logits)[0]
    for row, mask in enumerate(masks):
        positions = batch.response_mask[row, 1:].nonzero().flatten()  # logit index predicting each token
        for k, keep in enumerate(mask):
            t = int(positions[k])
            if keep:
                assert grad[row, t].abs().sum() > 0
            else:
                assert torch.equal(grad[row, t], torch.zeros_like(grad[row, t]))
    # prompt positions never get gradient either
    first = int(batch.last_prompt_index[0])
    assert torch.equal(grad[0, : first - 1], torch.zeros_like(grad[0, : first - 1]))


def response_positions(batch, row):
    """The logit positions predicting row ``row``'s response tokens, in order."""
    return batch.response_mask[row, 1:].nonzero().flatten().tolist()


def teacher_topk(teacher_logits, batch, k):
    """Per-row top-k ids and log-probs of ``teacher_logits`` at the response positions, as stored with the data."""
    ids, logprobs = [], []
    for row in range(teacher_logits.shape[0]):
        top = teacher_logits[row, response_positions(batch, row)].float().log_softmax(-1).topk(k, dim=-1)
        ids.append(top.indices.tolist())
        logprobs.append(top.values.tolist())
    return ids, logprobs


def reference_kl(student_logits, ids, logprobs):
    """KL over the k + 1 buckets at one position, from the full softmax in float64 (brute force)."""
    q = torch.softmax(student_logits.detach().double(), -1)
    p = [math.exp(v) for v in logprobs]
    q_top = [float(q[i]) for i in ids]
    p_tail, q_tail = max(1.0 - sum(p), 0.0), 1.0 - sum(q_top)
    return sum(a * math.log(a / b) for a, b in zip(p + [p_tail], q_top + [q_tail], strict=True) if a > 0)


def fixed_topk(batch, ids, probs):
    """The same top-k (``ids``, ``probs``) at every response token of every row."""
    n = [len(response_positions(batch, row)) for row in range(batch.input_ids.shape[0])]
    return [[list(ids)] * m for m in n], [[[math.log(p) for p in probs]] * m for m in n]


def test_distillation_is_zero_when_the_student_is_the_teacher(batch):
    teacher = logits_for(batch, seed=1).detach()
    topk_ids, topk_logprobs = teacher_topk(teacher, batch, k=5)  # 5 of 101: a tail of real mass
    tails = [1 - sum(math.exp(v) for v in lp) for row in topk_logprobs for lp in row]
    assert min(tails) > 0.5
    assert distillation_loss(teacher.clone(), batch, topk_ids, topk_logprobs).item() == pytest.approx(0.0, abs=1e-5)
    other = logits_for(batch, seed=2)
    assert distillation_loss(other, batch, topk_ids, topk_logprobs).item() > 0.1


def test_distillation_known_value_with_the_tail_bucket(batch):
    vocab = 101
    # teacher: 0.5 and 0.25 on ids 3 and 4, tail 0.25; student: uniform over the vocabulary
    topk_ids, topk_logprobs = fixed_topk(batch, [3, 4], [0.5, 0.25])
    logits = torch.zeros((*batch.input_ids.shape, vocab))
    expected = 0.5 * math.log(0.5 * vocab) + 0.25 * math.log(0.25 * vocab) + 0.25 * math.log(0.25 * vocab / 99)
    assert distillation_loss(logits, batch, topk_ids, topk_logprobs).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_renormalized_top_k_is_no_longer_a_minimum(batch):
    # teacher: 0.3 and 0.2 on ids 3 and 4, half its mass in the tail. A student with all its mass on
    # 3 and 4 in the teacher's proportions (0.6, 0.4) had KL 0 when the teacher was renormalized.
    vocab = 101
    topk_ids, topk_logprobs = fixed_topk(batch, [3, 4], [0.3, 0.2])
    logits = torch.full((*batch.input_ids.shape, vocab), -30.0)
    logits[..., 3], logits[..., 4] = math.log(0.6), math.log(0.4)
    q_tail = 99 * math.exp(-30.0) / (1 + 99 * math.exp(-30.0))
    q3, q4 = 0.6 * (1 - q_tail), 0.4 * (1 - q_tail)
    expected = 0.3 * math.log(0.3 / q3) + 0.2 * math.log(0.2 / q4) + 0.5 * math.log(0.5 / q_tail)
    loss = distillation_loss(logits, batch, topk_ids, topk_logprobs).item()
    assert loss == pytest.approx(expected, rel=1e-4) and loss > 10
    # the teacher itself on the top-k, with its tail mass spread over the other ids: 0
    logits[..., 3], logits[..., 4] = math.log(0.3), math.log(0.2)
    logits[..., [i for i in range(vocab) if i not in (3, 4)]] = math.log(0.5 / 99)
    assert distillation_loss(logits, batch, topk_ids, topk_logprobs).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_learns_the_teachers_tail_mass(batch):
    vocab, ids, probs = 101, [3, 4, 5], [0.4, 0.2, 0.1]  # the top-3 hold 70%
    topk_ids, topk_logprobs = fixed_topk(batch, ids, probs)
    student = logits_for(batch, vocab=vocab, seed=3)
    optimizer = torch.optim.Adam([student], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        distillation_loss(student, batch, topk_ids, topk_logprobs).backward()
        optimizer.step()
    for row in range(2):
        q = torch.softmax(student.detach()[row, response_positions(batch, row)], -1)  # [tokens, vocab]
        top = q[:, ids]
        torch.testing.assert_close(1 - top.sum(-1), torch.full((len(q),), 0.3), atol=0.02, rtol=0)
        torch.testing.assert_close(top, torch.tensor([probs] * len(q)), atol=0.02, rtol=0)


def test_distillation_zero_weight_removes_a_row(batch):
    teacher = logits_for(batch, seed=1).detach()
    topk_ids, topk_logprobs = teacher_topk(teacher, batch, k=4)
    student = logits_for(batch, seed=4)
    weights = token_weights(batch, torch.tensor([0.0, 1.0]))
    loss = distillation_loss(student, batch, topk_ids, topk_logprobs, weights)
    grad = torch.autograd.grad(loss, student)[0]
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and grad[1].abs().sum() > 0
    # row 0's student does not matter any more; row 1's tokens are still divided by all response tokens
    other = student.detach().clone()
    other[0] = torch.randn_like(other[0])
    assert distillation_loss(other, batch, topk_ids, topk_logprobs, weights).item() == pytest.approx(loss.item())
    count = int(batch.response_mask.sum())
    row1 = sum(reference_kl(student[1, t], i, lp)
               for t, i, lp in zip(response_positions(batch, 1), topk_ids[1], topk_logprobs[1], strict=True))
    assert loss.item() == pytest.approx(row1 / count, rel=1e-4)
    # a weight scales its tokens' KL exactly
    half = distillation_loss(student, batch, topk_ids, topk_logprobs, token_weights(batch, torch.tensor([0.0, 0.5])))
    assert half.item() == pytest.approx(0.5 * loss.item(), rel=1e-6)


def test_distillation_matches_brute_force_on_ragged_rows_and_short_top_k(batch):
    teacher = logits_for(batch, seed=5).detach()
    topk_ids, topk_logprobs = teacher_topk(teacher, batch, k=6)
    # row 0 has 6 response tokens but top-k for only its first 2; row 1 (3 tokens) has all of them
    topk_ids[0], topk_logprobs[0] = topk_ids[0][:2], topk_logprobs[0][:2]
    assert len(response_positions(batch, 0)) == 6 and len(response_positions(batch, 1)) == 3
    student = logits_for(batch, seed=6)
    masks = [np.array([0, 1], dtype=np.float32), np.array([1, 0.5, 1], dtype=np.float32)]
    weights = token_weights(batch, torch.tensor([2.0, 1.0]), masks)
    expected = 0.0
    for row in range(2):
        for j, (i, lp) in enumerate(zip(topk_ids[row], topk_logprobs[row], strict=True)):
            t = response_positions(batch, row)[j]
            expected += float(weights[row, t]) * reference_kl(student[row, t], i, lp)
    expected /= 9  # every response token counts, with or without top-k
    loss = distillation_loss(student, batch, topk_ids, topk_logprobs, weights)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # positions without top-k get no gradient
    grad = torch.autograd.grad(distillation_loss(student, batch, topk_ids, topk_logprobs), student)[0]
    for t in response_positions(batch, 0)[2:]:
        assert torch.equal(grad[0, t], torch.zeros_like(grad[0, t]))


def test_distillation_when_the_top_k_cover_the_vocabulary(batch):
    vocab = 7
    teacher = logits_for(batch, vocab=vocab, seed=7).detach()
    topk_ids, topk_logprobs = teacher_topk(teacher, batch, k=vocab)  # no tail: nothing to floor
    student = teacher.clone().requires_grad_(True)
    loss = distillation_loss(student, batch, topk_ids, topk_logprobs)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(torch.autograd.grad(loss, student)[0]).all()
    assert distillation_loss(logits_for(batch, vocab=vocab, seed=8), batch, topk_ids, topk_logprobs).item() > 0.01


def test_distillation_rejects_ragged_top_k(batch):
    topk_ids, topk_logprobs = fixed_topk(batch, [3, 4], [0.3, 0.2])
    topk_ids[0] = [[3, 4], [3]] + topk_ids[0][2:]
    with pytest.raises(ValueError, match="same number k"):
        distillation_loss(logits_for(batch), batch, topk_ids, topk_logprobs)
