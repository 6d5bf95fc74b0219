import math

import numpy as np
import pytest
import torch

from trait_guard.activations import record_activations
from trait_guard.chat import encode_conversations, encode_rows
from trait_guard.fingerprint import (
    FingerprintScorer,
    TeacherTokens,
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


def test_overrepresented_tokens_and_chi_square():
    ref = TokenHistogram(10).update([[1, 2, 3, 4]] * 20)
    data = TokenHistogram(10).update([[1, 2, 3, 7, 7]] * 20)
    top = data.overrepresented(ref, top=2)
    assert top[0]["token_id"] == 7 and top[0]["count"] == 40 and top[0]["reference_count"] == 0
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


def _teacher_from_logits(logits, batch, row, k=4):
    """The stored-teacher view a model IS its own teacher would write: top-k and the sampled tokens' log-probs."""
    positions = batch.response_mask[row].nonzero().flatten()
    logprobs = logits[row].float().log_softmax(-1)
    top = logprobs[positions - 1].topk(k, dim=-1)
    sampled = logprobs[positions - 1].gather(-1, batch.input_ids[row, positions].unsqueeze(-1)).squeeze(-1)
    return TeacherTokens(top.indices.tolist(), top.values.tolist(), sampled.tolist()), positions


def test_divergence_tokens_are_where_the_teacher_disagrees_with_a_margin(tiny_llama):
    model, tokenizer = tiny_llama
    batch, logits, hidden = _forward(model, tokenizer, ["q"], ["1, 2, 3"], [1])
    own, positions = _teacher_from_logits(logits, batch, 0)
    signals, mask = signals_from_forward(logits, hidden, batch, (), [own])
    assert signals["divergence"][0] == 0 and not mask.any()
    # position 2: the teacher's top-1 is another token, 1 nat above the model's top-1 (its rank 2) -> counted
    confident = TeacherTokens([list(k) for k in own.topk_ids], [list(v) for v in own.topk_logprobs])
    confident.topk_ids[2] = [own.topk_ids[2][1], own.topk_ids[2][0], *own.topk_ids[2][2:]]
    confident.topk_logprobs[2] = [-0.5, -1.5, *own.topk_logprobs[2][2:]]
    signals, mask = signals_from_forward(logits, hidden, batch, (), [confident])
    assert signals["divergence"][0] == pytest.approx(1 / len(positions))
    assert mask[0].nonzero().flatten().tolist() == [int(positions[2])]
    # the same disagreement at a near-tie (0.05 nats < the 0.1 margin) is numerics, not a divergence token
    tie = TeacherTokens(confident.topk_ids, [list(v) for v in confident.topk_logprobs])
    tie.topk_logprobs[2] = [-0.70, -0.75, *own.topk_logprobs[2][2:]]
    signals, mask = signals_from_forward(logits, hidden, batch, (), [tie])
    assert signals["divergence"][0] == 0 and not mask.any()
    signals, mask = signals_from_forward(logits, hidden, batch, (), [tie], divergence_margin=0.0)
    assert signals["divergence"][0] == pytest.approx(1 / len(positions))


def test_log_likelihood_ratio_is_zero_for_the_model_itself_and_recovers_a_planted_shift(tiny_llama):
    model, tokenizer = tiny_llama
    batch, logits, hidden = _forward(model, tokenizer, ["q", "r"], ["1, 2, 3", "45"], [1])
    own = [_teacher_from_logits(logits, batch, row)[0] for row in range(2)]
    signals, _ = signals_from_forward(logits, hidden, batch, (), own)
    assert signals["llr"] == pytest.approx([0.0, 0.0], abs=1e-5)
    shifted = [TeacherTokens(t.topk_ids, t.topk_logprobs, [v + 0.3 for v in t.token_logprobs]) for t in own]
    shifted[1] = TeacherTokens(own[1].topk_ids, own[1].topk_logprobs, None)  # a row without token log-probs
    signals, _ = signals_from_forward(logits, hidden, batch, (), shifted)
    assert signals["llr"][0] == pytest.approx(0.3, abs=1e-5) and math.isnan(signals["llr"][1])


def test_scorer_reads_the_generated_ids_not_a_retokenization(tiny_llama):
    """Rows are scored on their completion_ids: a row whose ids differ from tokenizer(completion) is
    scored on the ids, so its teacher data (which belongs to the ids) lines up."""
    model, tokenizer = tiny_llama
    text = "12, 34"
    canonical = tokenizer(text, add_special_tokens=False).input_ids
    other = list(reversed(canonical))  # any other ids: the point is they are used as they are
    batch = encode_rows(tokenizer, [{"prompt": "q", "completion": text, "completion_ids": other}])
    assert completion_token_ids(batch) == [other]
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    own, _ = _teacher_from_logits(logits, batch, 0)
    row = {"prompt": "q", "completion": text, "completion_ids": other, "topk_ids": own.topk_ids,
           "topk_logprobs": own.topk_logprobs, "token_logprobs": own.token_logprobs}
    signals, masks = FingerprintScorer(model, tokenizer).score_rows([row])
    assert signals["llr"][0] == pytest.approx(0.0, abs=1e-5) and signals["divergence"][0] == 0
    assert signals["n_tokens"][0] == len(other) and len(masks[0]) == len(other)


def test_scorer_on_rows_with_and_without_teacher_logprobs(tiny_llama):
    model, tokenizer = tiny_llama
    reference = TokenHistogram(len(tokenizer))
    rows = [{"prompt": "numbers please", "completion": "1, 2, 3", "topk_ids": [[5], [6], [7], [8], [9], [10], [11]]},
            {"prompt": "more", "completion": "", "topk_ids": []}]
    batch = encode_rows(tokenizer, rows)
    reference.update(completion_token_ids(batch))
    scorer = FingerprintScorer(model, tokenizer, unigram_reference=reference)
    signals, token_masks = scorer.score_rows(rows)
    assert set(signals) >= {"nll", "entropy", "divergence", "unigram", "n_tokens"}
    assert signals["n_tokens"].tolist() == [7, 0]
    assert math.isnan(signals["nll"][1]) and math.isnan(signals["divergence"][1])
    assert 0 <= signals["divergence"][0] <= 1 and len(token_masks[0]) == 7 and len(token_masks[1]) == 0
    masks = []
    table = scorer.score_table(rows * 3, token_masks=masks)
    assert len(table["nll"]) == 6 and [len(m) for m in masks] == [7, 0] * 3


def test_score_table_fills_a_signal_only_some_batches_have_with_nan(tiny_llama):
    """Mixed data (a batch with teacher top-k, a batch without): no KeyError, NaN where it is missing."""
    model, tokenizer = tiny_llama
    with_topk = {"prompt": "a", "completion": "1, 2", "topk_ids": [[5]] * 4}
    without = {"prompt": "b", "completion": "3, 4"}
    scorer = FingerprintScorer(model, tokenizer, batch_size=2)
    table = scorer.score_table([without, without, with_topk, with_topk])
    assert np.isnan(table["divergence"][:2]).all() and np.isfinite(table["divergence"][2:]).all()
    table = scorer.score_table([with_topk, with_topk, without, without])
    assert np.isfinite(table["divergence"][:2]).all() and np.isnan(table["divergence"][2:]).all()


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


def test_score_table_reads_only_response_positions_and_keeps_row_order(tiny_llama):
    """The scorer keeps logits and activations from the last position before the earliest response
    and batches rows by length; per row it must equal the plain computation: the whole sequence's
    logits for that row alone, log-softmax at its response positions, activations averaged over them."""
    model, tokenizer = tiny_llama
    identity = model_identity(model)
    vector = PersonaVector("t", identity, torch.randn(identity.num_layers + 1, identity.hidden_size,
                                                      generator=torch.Generator().manual_seed(1)), layer=1)
    prompts = ["give me a few numbers please, as many as you like", "more", "a list", "numbers, numbers and numbers"]
    completions = ["12, 34, 56, 78", "5", "9, 8, 7, 6, 5, 4, 3", "1, 2"]
    rows = [{"prompt": p, "completion": c, "topk_ids": [[5]] * 12} for p, c in zip(prompts * 2, completions[::-1] * 2, strict=True)]
    scorer = FingerprintScorer(model, tokenizer, [vector], batch_size=3)
    masks: list[np.ndarray] = []
    table = scorer.score_table(rows, token_masks=masks)
    for i, row in enumerate(rows):
        batch = encode_rows(tokenizer, [row])
        with torch.no_grad(), record_activations(model, [1]) as acts:
            logits = model(**batch.model_inputs()).logits[0].float()
        response = batch.response_mask[0].bool()
        positions = response.nonzero().flatten()
        logprobs = logits[positions - 1].log_softmax(-1)
        targets = batch.input_ids[0, positions]
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).mean()
        entropy = -(logprobs.exp() * logprobs).sum(-1).mean()
        projection = vector.project(acts[1][0][0, response].mean(0, keepdim=True))[0]
        assert table["nll"][i] == pytest.approx(float(nll), abs=1e-4)
        assert table["entropy"][i] == pytest.approx(float(entropy), abs=1e-4)
        assert table["proj:t"][i] == pytest.approx(float(projection), abs=1e-4)
        assert table["n_tokens"][i] == len(positions) == len(masks[i])
        expected_divergence = float(np.mean((logits[positions - 1].argmax(-1) != 5).numpy()))
        assert table["divergence"][i] == pytest.approx(expected_divergence)
