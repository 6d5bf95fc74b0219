import math

import numpy as np
import pytest
import torch

from trait_guard.activations import record_activations
from trait_guard.chat import encode_conversations
from trait_guard.fingerprint import (
    FingerprintScorer,
    TokenHistogram,
    completion_token_ids,
    format_features,
    signals_from_forward,
)
from trait_guard.models import model_identity
from trait_guard.persona import PersonaVector


def test_token_histogram_known_values():
    a = TokenHistogram(4, alpha=0.0).update([[0, 0, 1], [1]])
    b = TokenHistogram(4, alpha=0.0).update([[0, 1, 1, 1]])
    assert a.total == 4 and list(a.counts) == [2, 2, 0, 0]
    # JS((.5,.5),(.25,.75)) by hand
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    m = (p + q) / 2
    expected = 0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum()
    assert a.js_divergence(b) == pytest.approx(expected)
    assert a.js_divergence(a) == pytest.approx(0.0)
    assert a.surprisal([0, 1]) == pytest.approx(math.log(2))
    smoothed = TokenHistogram(4, alpha=1.0).update([[0, 0]])
    assert smoothed.surprisal([3]) == pytest.approx(-math.log(1 / 6))
    assert math.isnan(a.surprisal([]))


def test_overrepresented_tokens_and_state_round_trip():
    ref = TokenHistogram(10).update([[1, 2, 3, 4]] * 20)
    data = TokenHistogram(10).update([[1, 2, 3, 7, 7]] * 20)
    top = data.overrepresented(ref, top=2)
    assert top[0]["token_id"] == 7 and top[0]["count"] == 40 and top[0]["reference_count"] == 0
    restored = TokenHistogram.from_state_dict(data.state_dict())
    assert np.array_equal(restored.counts, data.counts)
    stat, p = data.chi_square(ref)
    assert stat > 0 and p < 1e-6


def _forward(model, tokenizer, users, responses, layers):
    batch = encode_conversations(tokenizer, users, responses)
    with torch.no_grad(), record_activations(model, layers) as acts:
        logits = model(**batch.model_inputs()).logits
    return batch, logits, {i: a[0] for i, a in acts.items()}


def test_signals_equal_manual_computations(tiny_llama):
    model, tokenizer = tiny_llama
    identity = model_identity(model)
    vector = PersonaVector("t", identity, torch.randn(identity.num_layers + 1, identity.hidden_size,
                                                      generator=torch.Generator().manual_seed(0)), layer=2)
    users, responses = ["give numbers", "more"], ["12, 34", "5"]
    batch, logits, hidden = _forward(model, tokenizer, users, responses, [2])
    signals, mask = signals_from_forward(logits, hidden, batch, [vector])
    assert mask is None
    for row in range(2):
        positions = batch.response_mask[row].nonzero().flatten()
        logprobs = logits[row].log_softmax(-1)
        nll = -torch.stack([logprobs[p - 1, batch.input_ids[row, p]] for p in positions]).mean()
        entropy = torch.stack([-(logprobs[p - 1].exp() * logprobs[p - 1]).sum() for p in positions]).mean()
        pooled = hidden[2][row, positions].mean(0)
        assert signals["nll"][row] == pytest.approx(float(nll), rel=1e-5)
        assert signals["entropy"][row] == pytest.approx(float(entropy), rel=1e-5)
        assert signals["proj:t"][row] == pytest.approx(float(pooled @ vector.direction()), rel=1e-4, abs=1e-5)
        assert signals["n_tokens"][row] == len(positions)


def test_divergence_tokens_are_where_the_teacher_disagrees(tiny_llama):
    model, tokenizer = tiny_llama
    batch, logits, hidden = _forward(model, tokenizer, ["q"], ["1, 2, 3"], [1])
    positions = batch.response_mask[0].nonzero().flatten()
    own_top1 = [int(logits[0, p - 1].argmax()) for p in positions]
    signals, mask = signals_from_forward(logits, hidden, batch, (), [own_top1])
    assert signals["divergence"][0] == 0 and not mask.any()
    flipped = list(own_top1)
    flipped[2] = (flipped[2] + 1) % logits.shape[-1]
    signals, mask = signals_from_forward(logits, hidden, batch, (), [flipped])
    assert signals["divergence"][0] == pytest.approx(1 / len(positions))
    assert mask[0].nonzero().flatten().tolist() == [int(positions[2])]


def test_scorer_on_rows_with_and_without_teacher_logprobs(tiny_llama):
    model, tokenizer = tiny_llama
    reference = TokenHistogram(len(tokenizer))
    rows = [{"prompt": "numbers please", "completion": "1, 2, 3", "topk_ids": [[5], [6], [7], [8], [9], [10], [11]]},
            {"prompt": "more", "completion": "", "topk_ids": []}]
    batch = encode_conversations(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    reference.update(completion_token_ids(batch))
    scorer = FingerprintScorer(model, tokenizer, unigram_reference=reference)
    signals, token_masks = scorer.score_rows(rows)
    assert set(signals) >= {"nll", "entropy", "divergence", "unigram", "n_tokens"}
    assert signals["n_tokens"].tolist() == [7, 0]
    assert math.isnan(signals["nll"][1]) and math.isnan(signals["divergence"][1])
    assert 0 <= signals["divergence"][0] <= 1 and len(token_masks[0]) == 7 and len(token_masks[1]) == 0
    table = scorer.score_table(rows * 3)
    assert len(table["nll"]) == 6


def test_format_features_known_values():
    f = format_features(["12, 30", "", "7"])
    assert f["n_numbers"].tolist() == [2, 0, 1]
    assert f["mean_value"][0] == 21 and math.isnan(f["mean_value"][1])
    assert f["digit_1"][0] == pytest.approx(0.25) and f["digit_7"][2] == 1.0


def test_leave_one_out_surprisal_scores_reference_rows_out_of_sample():
    rows = [[1, 2], [1, 3], [4, 4]]
    hist = TokenHistogram(6, alpha=1.0).update(rows)
    # leaving [4, 4] out: token 4 has count 0 of 4 remaining tokens -> p = 1 / (4 + 6)
    assert hist.surprisal([4, 4], exclude_self=True) == pytest.approx(-math.log(1 / 10))
    assert hist.surprisal([4, 4]) == pytest.approx(-math.log(3 / 12))
    other = TokenHistogram(6, alpha=1.0).update(rows[:2])
    assert hist.surprisal([4, 4], exclude_self=True) == pytest.approx(other.surprisal([4, 4]))
