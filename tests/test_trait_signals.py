"""Signals without teacher log-probs (trait_guard.trait_signals): known answers on tiny models.

The tiny random-init models barely read their system prompt (log-prob shifts of ~1e-3 nats), so the
S2 tests use a "sharpened" copy: every non-norm weight times 10, which makes attention and logits
peaked enough that the system prompt moves the next-token distribution (a stand-in for a trained
model, where instructions matter). The model-diff test scales only the (tied) embeddings, so a planted
residual shift changes what the teacher writes.
"""

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from trait_guard.chat import generate_completions
from trait_guard.errors import TraitGuardInputError
from trait_guard.fingerprint import FingerprintScorer, suspicious_direction
from trait_guard.testing import make_tiny_model
from trait_guard.trait_signals import (
    MODEL_DIFF,
    TEACHER_LLR,
    TraitSignalScorer,
    available_signals,
    model_diff_direction,
    teacher_llr,
    trait_llr,
    trait_llr_name,
)
from trait_guard.traits import TraitSpec

N = 64
USERS = [f"List numbers after {i * 37 % 900 + 100}." for i in range(N)]
SPEC = TraitSpec(
    name="t",
    instructions=[{"pos": "You love owls. Owls owls owls!", "neg": "You are plain. Be brief."},
                  {"pos": "Owls are the best. Hoot hoot.", "neg": "Answer the question, nothing else."}],
    extract_questions=["q"], eval_questions=["q"],
)


def _with_pairs(pairs):
    return TraitSpec.model_validate({**SPEC.model_dump(), "instructions": pairs})


def _rows(model, tokenizer, systems=None, seed=0):
    """Rows sampled from ``model`` (temperature 1) with their generated ids; empty completions dropped."""
    completions = generate_completions(model, tokenizer, USERS, systems, max_new_tokens=24, seed=seed)
    return [{"prompt": u, "completion": c.text, "completion_ids": c.token_ids}
            for u, c in zip(USERS, completions, strict=True) if c.token_ids]


def _stderr_diff(a, b):
    return float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


@pytest.fixture(scope="module")
def sharp():
    model, tokenizer = make_tiny_model("llama", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10.0)
    return model, tokenizer


def test_available_signals_by_situation():
    assert available_signals(False, False, False) == ["nll", "entropy", "unigram"]
    assert available_signals(False, False, True, trait_id="animal:owl") == [
        "nll", "entropy", "unigram", "proj:animal:owl", "proj_diff:animal:owl", "trait_llr:animal:owl"]
    assert available_signals(True, False, False) == ["nll", "entropy", "unigram", "divergence", "llr"]
    assert available_signals(False, True, False) == ["nll", "entropy", "unigram", TEACHER_LLR, MODEL_DIFF]
    everything = available_signals(True, True, True)
    assert len(everything) == 10 and "trait_llr:<trait>" in everything
    for name in ("trait_llr:animal:owl", TEACHER_LLR, MODEL_DIFF):
        assert suspicious_direction(name) == "up"


def test_trait_llr_known_values(tiny_llama):
    model, tokenizer = tiny_llama
    rows = [{"prompt": "hi", "completion": "ignored", "completion_ids": tokenizer("ab1", add_special_tokens=False).input_ids},
            {"prompt": "yo", "completion": "xyz"}]
    same = _with_pairs([{"pos": "Same.", "neg": "Same."}])
    assert np.all(trait_llr(model, tokenizer, rows, same, n_pairs=1) == 0.0)
    # completion_ids are read as they are (the text is ignored where ids exist)
    as_text = [{"prompt": "hi", "completion": "ab1"}, rows[1]]
    assert np.allclose(trait_llr(model, tokenizer, rows, SPEC), trait_llr(model, tokenizer, as_text, SPEC), atol=1e-7)
    # n_pairs averages the per-pair ratios
    one = [trait_llr(model, tokenizer, rows, _with_pairs([p.model_dump()]), n_pairs=1) for p in SPEC.instructions]
    assert np.allclose(trait_llr(model, tokenizer, rows, SPEC, n_pairs=2), np.mean(one, axis=0), atol=1e-7)
    # an empty response has no ratio
    assert np.isnan(trait_llr(model, tokenizer, [{"prompt": "hi", "completion_ids": []}], SPEC)[0])
    with pytest.raises(TraitGuardInputError):
        trait_llr(model, tokenizer, rows, SPEC, n_pairs=0)


def test_trait_llr_recovers_a_planted_prompt_shift(sharp):
    model, tokenizer = sharp
    pos = [SPEC.instructions[i % 2].pos for i in range(N)]
    neg = [SPEC.instructions[i % 2].neg for i in range(N)]
    trait = trait_llr(model, tokenizer, _rows(model, tokenizer, pos, seed=1), SPEC, n_pairs=2)
    clean_a = trait_llr(model, tokenizer, _rows(model, tokenizer, neg, seed=2), SPEC, n_pairs=2)
    clean_b = trait_llr(model, tokenizer, _rows(model, tokenizer, neg, seed=3), SPEC, n_pairs=2)
    print(f"S2 trait {trait.mean():.4f} clean {clean_a.mean():.4f} / {clean_b.mean():.4f}, se "
          f"{_stderr_diff(trait, clean_a):.4f} / {_stderr_diff(clean_a, clean_b):.4f}, p "
          f"{stats.ttest_ind(trait, clean_a).pvalue:.2g} / {stats.ttest_ind(clean_a, clean_b).pvalue:.2g}")
    # E[LLR] is KL(pos||neg) > 0 on pos-prompted samples and -KL(neg||pos) < 0 on neg-prompted ones
    assert trait.mean() > 0 > clean_a.mean()
    assert trait.mean() - clean_a.mean() > 5 * _stderr_diff(trait, clean_a)
    assert stats.ttest_ind(trait, clean_a).pvalue < 1e-6
    # two clean samples (different seeds) are within noise
    assert abs(clean_a.mean() - clean_b.mean()) < 3 * _stderr_diff(clean_a, clean_b)
    assert stats.ttest_ind(clean_a, clean_b).pvalue > 0.01


def test_teacher_llr_is_zero_for_the_base_and_a_kl_on_teacher_samples(tiny_llama):
    base, tokenizer = tiny_llama
    base_rows = _rows(base, tokenizer, seed=4)
    assert np.abs(teacher_llr(base, base, tokenizer, base_rows)).max() < 1e-5
    assert np.abs(teacher_llr(copy.deepcopy(base), base, tokenizer, base_rows)).max() < 1e-5
    teacher = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    own = teacher_llr(teacher, base, tokenizer, _rows(teacher, tokenizer, seed=4))
    other = teacher_llr(teacher, base, tokenizer, base_rows)
    print(f"S3 teacher_llr on teacher samples {own.mean():.4f} +- {own.std(ddof=1) / len(own) ** 0.5:.4f}, "
          f"on base samples {other.mean():.4f}")
    assert own.mean() > 3 * own.std(ddof=1) / len(own) ** 0.5  # a KL estimate: positive
    assert other.mean() < 0 < own.mean()  # -KL(B||T) on the base model's own samples
    small, _ = make_tiny_model("gpt2", seed=0)
    small.config.vocab_size += 1
    with pytest.raises(TraitGuardInputError, match="vocabulary"):
        teacher_llr(small, base, tokenizer, base_rows)


def _shifted(base, direction, layer, scale):
    """A copy of ``base`` whose residual stream at hidden-state index ``layer`` is moved by scale * direction."""
    teacher = copy.deepcopy(base)

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return output + scale * direction
        return (output[0] + scale * direction, *output[1:])

    teacher.model.layers[layer - 1].register_forward_hook(hook)
    return teacher


def test_model_diff_recovers_a_planted_direction(tiny_llama):
    base, tokenizer = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    with torch.no_grad():  # embeddings (tied with the unembedding) x10: a planted shift of norm 1 moves the logits
        base.get_input_embeddings().weight.mul_(10.0)
    # plant the direction of the embedding of "7": the teacher writes more 7s (16% of tokens against 0.3%)
    planted = base.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("7")].detach().clone()
    planted = planted / planted.norm()
    teacher = _shifted(base, planted, layer=2, scale=1.0)
    neutral = _rows(base, tokenizer, seed=7)
    cosines = {}
    for layer in (2, 3, 4):  # at the planted layer, and after the blocks that follow it
        direction = model_diff_direction(teacher, base, tokenizer, neutral[:32], layer=layer)
        cosines[layer] = float(direction.direction @ planted)
    assert cosines[2] > 0.999 and min(cosines.values()) > 0.9
    direction = model_diff_direction(teacher, base, tokenizer, neutral[:32], layer=2)
    assert direction.norm == pytest.approx(1.0, rel=1e-4) and direction.n_samples == 32
    scorer = TraitSignalScorer(base, tokenizer, model_diff=direction, batch_size=16)
    shifted_data = scorer.score_table(_rows(teacher, tokenizer, seed=8))[MODEL_DIFF]
    base_data = scorer.score_table(neutral[32:])[MODEL_DIFF]
    print(f"model_diff cos {cosines}, projection teacher data {shifted_data.mean():.4f} base data {base_data.mean():.4f} "
          f"se {_stderr_diff(shifted_data, base_data):.4f}")
    assert shifted_data.mean() - base_data.mean() > 3 * _stderr_diff(shifted_data, base_data)


def test_scorer_plugs_into_the_fingerprint_scorer(tiny_llama):
    base, tokenizer = tiny_llama
    teacher = _shifted(base, torch.ones(base.config.hidden_size) / base.config.hidden_size ** 0.5, 1, 1.0)
    rows = _rows(base, tokenizer, seed=9)[:10]
    direction = model_diff_direction(teacher, base, tokenizer, rows, layer=3, positions="prompt")
    extra = TraitSignalScorer(base, tokenizer, specs=[SPEC], n_pairs=2, teacher=teacher, model_diff=direction)
    signals = FingerprintScorer(base, tokenizer, batch_size=4, extra=[extra]).score_table(rows)
    assert {"nll", trait_llr_name("t"), TEACHER_LLR, MODEL_DIFF} <= set(signals)
    assert np.allclose(signals[trait_llr_name("t")], trait_llr(base, tokenizer, rows, SPEC, n_pairs=2), atol=1e-6)
    assert np.allclose(signals[TEACHER_LLR], teacher_llr(teacher, base, tokenizer, rows), atol=1e-6)
    assert np.all(np.isfinite(signals[MODEL_DIFF]))


def test_the_power_note_says_what_each_tested_signal_has_shown():
    from trait_guard.screen import screen_signals
    from trait_guard.trait_signals import SIGNAL_NEEDS, shown_power_note

    note = shown_power_note(["divergence", "proj:animal:owl", "trait_llr:animal:eagle", "proj_diff:animal:owl"])
    assert "divergence: AUROC 0.81" in note and "proj:animal:owl: none: AUROC 0.50" in note
    assert "trait_llr:animal:eagle: none yet" in note and "proj_diff:animal:owl: none: flagged 0/32" in note
    assert shown_power_note(["proj_diffx"]).endswith("proj_diffx: not measured")
    assert all(n.shown for n in SIGNAL_NEEDS)
    rng = np.random.default_rng(0)
    _, _, notes = screen_signals({"nll": rng.normal(0, 1, 40)}, {"nll": rng.normal(0, 1, 60)}, alpha=0.01,
                                 n_permutations=200)
    assert notes[-1] == shown_power_note(["nll"])  # the screen and the gate carry it
