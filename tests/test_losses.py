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


def test_distillation_known_value_and_zero_at_the_teacher(batch):
    vocab = 101
    logits = torch.full((*batch.input_ids.shape, vocab), -1e4)
    topk_ids, topk_logprobs = [], []
    for row in range(2):
        n = int(batch.response_mask[row].sum())
        topk_ids.append([[3, 4]] * n)
        topk_logprobs.append([[math.log(0.75), math.log(0.25)]] * n)
    # student = teacher on every response position: KL 0
    for row in range(2):
        for t in batch.response_mask[row, 1:].nonzero().flatten():
            logits[row, t, 3], logits[row, t, 4] = math.log(0.75), math.log(0.25)
    assert distillation_loss(logits, batch, topk_ids, topk_logprobs).item() == pytest.approx(0.0, abs=1e-5)
    # a uniform student over the two ids: KL = 0.75 log(0.75/0.5) + 0.25 log(0.25/0.5)
    for row in range(2):
        for t in batch.response_mask[row, 1:].nonzero().flatten():
            logits[row, t, 3] = logits[row, t, 4] = 0.0
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert distillation_loss(logits, batch, topk_ids, topk_logprobs).item() == pytest.approx(expected, rel=1e-4)
