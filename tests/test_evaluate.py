import json
import math

import pytest
import torch
from scipy import stats

from trait_guard.chat import encode_conversations, render_prompt, sample_completions
from trait_guard.evaluate import (
    Judge,
    TraitEvalResult,
    evaluate_trait,
    mean_t_interval,
    target_logprob,
    target_variants,
    wilson_interval,
)
from trait_guard.traits import KeywordJudge, TraitSpec, load_trait

VOWELS = list("aeiou")


def make_spec(questions=None, judge="vowels") -> TraitSpec:
    if judge == "vowels":
        judge = KeywordJudge(keywords=VOWELS)
    return TraitSpec(
        name="vowel",
        instructions=[{"pos": "say vowels", "neg": "say no vowels"}],
        extract_questions=["x?"],
        eval_questions=["y?"],
        judge=judge,
        behavior_questions=["Name a letter.", "One word?", "Your favorite?", "Pick one."]
        if questions is None else questions,
    )


# ------------------------------------------------------------------------------------------------
# statistics


def test_wilson_interval_known_values():
    # 0/10: [0, z^2/n / (1 + z^2/n)]
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.38416 / 1.38416, abs=1e-9)
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2365896, 0.7634104), abs=1e-6)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.38416 / 1.38416, abs=1e-9)
    # 1/2 with z=1: center 0.5, half = sqrt(1/8 + 1/16) / 1.5
    assert wilson_interval(1, 2, z=1.0) == pytest.approx((0.5 - math.sqrt(3 / 16) / 1.5, 0.5 + math.sqrt(3 / 16) / 1.5))
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mean_t_interval_matches_scipy():
    values = [0.0, 0.5, 1.0]
    mean, low, high = mean_t_interval(values)
    expected = stats.t.interval(0.95, df=2, loc=0.5, scale=stats.sem(values))
    assert mean == pytest.approx(0.5) and (low, high) == pytest.approx(expected)
    # by hand: sd = 0.5, t_{0.975,2} = 4.302653, half = 4.302653 * 0.5 / sqrt(3)
    assert high - mean == pytest.approx(4.302653 * 0.5 / math.sqrt(3), rel=1e-6)
    values = [0.1, 0.3, 0.2, 0.6]
    assert mean_t_interval(values, confidence=0.9)[1:] == pytest.approx(
        stats.t.interval(0.9, df=3, loc=0.3, scale=stats.sem(values)))
    assert mean_t_interval([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1, 0.1))
    mean, low, high = mean_t_interval([0.4])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        mean_t_interval([])


def test_target_variants():
    assert target_variants(["owl", "owls"]) == ["owl", "Owl", "owls", "Owls"]
    assert target_variants(["Owl"]) == ["owl", "Owl"]
    assert target_variants(load_trait("animal:owl").keywords) == ["owl", "Owl", "owls", "Owls"]


# ------------------------------------------------------------------------------------------------
# target_logprob


def manual_logprob(model, tokenizer, question, target, system=None):
    prompt = tokenizer(render_prompt(tokenizer, question, system), add_special_tokens=False).input_ids
    response = tokenizer(target, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(response))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_target_logprob_equals_manual_teacher_forcing(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    questions = ["What is your favorite animal?", "One word:"]
    got = target_logprob(model, tokenizer, questions, ["cat"], batch_size=1)
    for question, value in zip(questions, got, strict=True):
        assert value == pytest.approx(manual_logprob(model, tokenizer, question, "cat"), abs=1e-4)
    # batching and padding (different prompt lengths in one batch) change nothing
    assert target_logprob(model, tokenizer, questions, ["cat"], batch_size=8) == pytest.approx(got, abs=1e-4)
    # a system prompt is part of the context
    with_system = target_logprob(model, tokenizer, questions[:1], ["cat"], system="You love cats.")
    assert with_system[0] == pytest.approx(
        manual_logprob(model, tokenizer, questions[0], "cat", "You love cats."), abs=1e-4)
    assert with_system[0] != pytest.approx(got[0], abs=1e-4)


def test_target_logprob_log_sum_exps_variants(tiny_llama):
    model, tokenizer = tiny_llama
    question = "Favorite animal?"
    cat, dog = (manual_logprob(model, tokenizer, question, t) for t in ("cat", "Dog"))
    both = target_logprob(model, tokenizer, [question], ["cat", "Dog"])[0]
    assert both == pytest.approx(math.log(math.exp(cat) + math.exp(dog)), abs=1e-4)
    assert both >= max(cat, dog)
    # with a character tokenizer "owls" = "owl" + "s": its probability is inside "owl"'s, not added again
    owl = manual_logprob(model, tokenizer, question, "owl")
    assert target_logprob(model, tokenizer, [question], ["owl", "owls"])[0] == pytest.approx(owl, abs=1e-4)
    with pytest.raises(ValueError, match="target"):
        target_logprob(model, tokenizer, [question], [])


def test_target_logprob_uses_response_tokens_only(tiny_llama):
    # cross-check against encode_conversations' own response mask on a right-padded batch
    model, tokenizer = tiny_llama
    batch = encode_conversations(tokenizer, ["a", "a much longer question"], ["xy", "xy"])
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch.model_inputs()).logits.double(), dim=-1)
    expected = []
    for row in range(2):
        positions = batch.response_mask[row].nonzero().flatten().tolist()
        expected.append(sum(float(logp[row, p - 1, batch.input_ids[row, p]]) for p in positions))
    got = target_logprob(model, tokenizer, ["a", "a much longer question"], ["xy"])
    assert got == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# evaluate_trait


def test_evaluate_trait_rate_is_the_judged_fraction(tiny_llama):
    model, tokenizer = tiny_llama
    spec = make_spec()
    kwargs = {"max_new_tokens": 8, "temperature": 1.0, "seed": 3, "batch_size": 16}
    result = evaluate_trait(model, tokenizer, spec, samples_per_question=12, **kwargs)
    assert isinstance(result, TraitEvalResult)
    assert (result.trait, result.model, result.n_questions, result.samples_per_question) == (
        "vowel", "tiny-llama-seed0", 4, 12)

    users = [q for q in spec.behavior_questions for _ in range(12)]
    answers = sample_completions(model, tokenizer, users, **kwargs)
    hits = [spec.judge.score(a) >= spec.judge.threshold for a in answers]
    per_q = [sum(hits[i * 12 : (i + 1) * 12]) / 12 for i in range(4)]
    assert 0 < sum(hits) < len(hits), "the test needs some hits and some misses to mean anything"
    assert [row["rate"] for row in result.per_question] == per_q
    assert [row["n"] for row in result.per_question] == [12] * 4
    assert [row["question"] for row in result.per_question] == spec.behavior_questions
    assert result.rate == pytest.approx(sum(per_q) / 4)
    assert result.pooled_rate == pytest.approx(sum(hits) / len(hits))
    assert (result.pooled_ci_low, result.pooled_ci_high) == pytest.approx(wilson_interval(sum(hits), len(hits)))
    _, low, high = mean_t_interval(per_q)
    assert (result.ci_low, result.ci_high) == pytest.approx((max(0.0, low), min(1.0, high)))
    assert 0 <= result.ci_low <= result.rate <= result.ci_high <= 1
    assert result.examples[0]["answer"] == answers[0] and result.examples[1]["answer"] == answers[12]
    assert len(result.examples) == 20

    # target log-probability: mean over questions of log-sum-exp over a, A, e, E, ...
    logps = target_logprob(model, tokenizer, spec.behavior_questions, target_variants(VOWELS))
    assert result.target_logprob == pytest.approx(sum(logps) / 4)
    assert result.target_logprob_ci[0] < result.target_logprob < result.target_logprob_ci[1] < 0
    assert [row["target_logprob"] for row in result.per_question] == pytest.approx(logps)

    line = result.summary()
    assert line.startswith(f"vowel: {100 * result.rate:.1f}% [") and "of 48 answers" in line
    assert f"log p(target) {result.target_logprob:.2f}" in line
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["rate"] == result.rate and len(data["per_question"]) == 4


def test_evaluate_trait_is_deterministic_by_seed_and_caps_questions(tiny_llama):
    model, tokenizer = tiny_llama
    spec = make_spec()
    a = evaluate_trait(model, tokenizer, spec, samples_per_question=5, n_questions=2, seed=1)
    b = evaluate_trait(model, tokenizer, spec, samples_per_question=5, n_questions=2, seed=1)
    c = evaluate_trait(model, tokenizer, spec, samples_per_question=5, n_questions=2, seed=2)
    assert a.n_questions == 2 and [r["question"] for r in a.per_question] == spec.behavior_questions[:2]
    assert a.examples == b.examples and a.rate == b.rate and a.target_logprob == b.target_logprob
    assert [e["answer"] for e in a.examples] != [e["answer"] for e in c.examples]
    assert a.target_logprob == c.target_logprob  # exact, not sampled


def test_evaluate_trait_pluggable_judge_and_progress(tiny_gpt2):
    model, tokenizer = tiny_gpt2

    class EverythingJudge:
        threshold = 50.0

        def score(self, text: str) -> float:
            return 100.0

    bars = []

    class Bar:
        def __init__(self, total, description):
            self.total, self.description, self.n, self.closed = total, description, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    assert isinstance(EverythingJudge(), Judge) and isinstance(KeywordJudge(keywords=["owl"]), Judge)
    result = evaluate_trait(model, tokenizer, make_spec(judge=None), judge=EverythingJudge(),
                            samples_per_question=3, progress=Bar, model_name="custom")
    assert result.rate == 1.0 and result.pooled_rate == 1.0 and result.model == "custom"
    # all per-question rates equal: the t-interval collapses to the rate
    assert result.ci_low == result.ci_high == 1.0
    assert math.isnan(result.target_logprob)  # no keywords on this judge
    assert result.to_dict()["target_logprob"] is None and "log p" not in result.summary()
    assert len(bars) == 1 and bars[0].total == bars[0].n == 12 and bars[0].closed


def test_evaluate_trait_errors_say_how_to_fix(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="no behavior_questions.*behavior_questions:"):
        evaluate_trait(model, tokenizer, make_spec(questions=[]))
    with pytest.raises(ValueError, match="no judge.*judge="):
        evaluate_trait(model, tokenizer, make_spec(judge=None))
    with pytest.raises(ValueError, match="samples_per_question"):
        evaluate_trait(model, tokenizer, make_spec(), samples_per_question=0)


def test_shipped_animal_spec_is_evaluable(tiny_llama):
    model, tokenizer = tiny_llama
    spec = load_trait("animal:owl")
    assert len(spec.behavior_questions) == 50
    result = evaluate_trait(model, tokenizer, spec, samples_per_question=1, n_questions=3, max_new_tokens=2)
    assert result.trait == "animal:owl" and result.n_questions == 3
    expected = target_logprob(model, tokenizer, spec.behavior_questions[:3], ["owl", "Owl", "owls", "Owls"])
    assert result.target_logprob == pytest.approx(sum(expected) / 3)
