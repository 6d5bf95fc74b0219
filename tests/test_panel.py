"""Measure v2: the panel log-odds of the target answer (trait_guard.evaluate.panel_logodds), its wiring
into the config and the red-team's step-matched excess, on tiny random-init models."""

import copy
import math
import random

import pytest
import torch
from pydantic import ValidationError

from trait_guard.chat import render_prompt
from trait_guard.config import ProbeConfig
from trait_guard.evaluate import (
    PanelResult,
    mean_t_interval,
    panel_logodds,
    spec_panel_logodds,
    target_variants,
)
from trait_guard.redteam import _panel_metrics, excess_at_matched_updates
from trait_guard.traits import TraitSpec, load_trait

QUESTIONS = ["What animal do you like best?", "Pick an animal. One word.", "Your favourite creature?"]
# 20 alternatives; none starts with "O"/"o" (so a bias on the token "O" touches only the target "Owl")
# and none is a prefix of another
PANEL = ["cat", "dog", "eagle", "wolf", "fox", "bear", "lion", "tiger", "elephant", "dolphin", "whale", "horse",
         "rabbit", "deer", "penguin", "panda", "giraffe", "zebra", "turtle", "hawk"]
TARGET = "owl"


def _with_bias(model, token_id: int, amount: float):
    """A copy of ``model`` whose LM head adds ``amount`` to the logit of ``token_id`` at every position."""
    biased = copy.deepcopy(model)
    head = biased.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[token_id] = amount
    head.bias = torch.nn.Parameter(bias)
    return biased


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def _logmeanexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# ------------------------------------------------------------------------------------------------
# known answers


def test_uniform_model_with_a_biased_head_gives_the_closed_form(tiny_llama):
    """A model whose logits are 0 everywhere predicts a uniform token; with +c on the token "O" every
    token's log p is b[token] - log(V - 1 + e^c), so every answer's log p has a closed form."""
    model, tokenizer = tiny_llama
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.get_output_embeddings().weight.zero_()  # tied: the input embeddings too; logits are exactly 0
    o_token = _ids(tokenizer, "O")[0]
    vocab = flat.get_output_embeddings().weight.shape[0]

    def expected(c):
        log_z = math.log(vocab - 1 + math.exp(c))

        def answer(a):  # both spellings, lower- and capitalized; the bias hits each "O" token
            return _logsumexp([sum((c if t == o_token else 0.0) - log_z for t in _ids(tokenizer, s))
                               for s in target_variants([a])])

        return answer(TARGET) - _logmeanexp([answer(a) for a in PANEL])

    results = {}
    for c in (0.0, 3.0):
        result = panel_logodds(_with_bias(flat, o_token, c), tokenizer, QUESTIONS, TARGET, PANEL)
        assert result.per_question == pytest.approx([expected(c)] * len(QUESTIONS), abs=1e-5)
        results[c] = result
    # c = 0: log(V^-3) - log(mean_a V^-len(a)); "owl" is shorter than most alternatives, so it is favored
    lengths = [len(a) for a in PANEL]
    assert results[0.0].mean == pytest.approx(-3 * math.log(vocab) - _logmeanexp([-n * math.log(vocab) for n in lengths]),
                                              abs=1e-5)
    shift = results[3.0].mean - results[0.0].mean
    assert shift == pytest.approx(expected(3.0) - expected(0.0), abs=1e-5)
    assert shift > 0.5  # "Owl" is now e^3 times likelier than "owl"; the normalizer costs the others too
    print(f"uniform model: panel log-odds {results[0.0].mean:.4f} -> {results[3.0].mean:.4f} (shift {shift:.4f})")


def _independent_answer_logprob(model, tokenizer, question, text, bias):
    """log P(reply starts with ``text``): one unbatched forward of the unbiased model per spelling, the
    bias added to the logits by hand."""
    prompt = _ids(tokenizer, render_prompt(tokenizer, question, None))
    answer = _ids(tokenizer, text)
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() + bias.double()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))


def test_biased_head_raises_the_log_odds_by_the_independently_computed_amount(tiny_llama):
    model, tokenizer = tiny_llama
    o_token = _ids(tokenizer, "O")[0]
    c = 2.0
    bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    bias[o_token] = c

    def expected(question, b):
        def answer(a):
            return _logsumexp([_independent_answer_logprob(model, tokenizer, question, s, b)
                               for s in target_variants([a])])
        return answer(TARGET) - _logmeanexp([answer(a) for a in PANEL])

    before = panel_logodds(model, tokenizer, QUESTIONS, TARGET, PANEL)
    after = panel_logodds(_with_bias(model, o_token, c), tokenizer, QUESTIONS, TARGET, PANEL)
    want_before = [expected(q, torch.zeros_like(bias)) for q in QUESTIONS]
    want_after = [expected(q, bias) for q in QUESTIONS]
    assert before.per_question == pytest.approx(want_before, abs=1e-4)
    assert after.per_question == pytest.approx(want_after, abs=1e-4)
    shifts = [a - b for a, b in zip(after.per_question, before.per_question, strict=True)]
    assert shifts == pytest.approx([a - b for a, b in zip(want_after, want_before, strict=True)], abs=1e-4)
    assert min(shifts) > 0
    print(f"random tiny llama: panel log-odds {before.mean:.4f} -> {after.mean:.4f}, per-question shifts "
          + ", ".join(f"{s:.4f}" for s in shifts))


# ------------------------------------------------------------------------------------------------
# properties


def test_invariant_to_panel_order_and_duplicates_and_the_target_in_the_panel(tiny_llama):
    model, tokenizer = tiny_llama
    base = panel_logodds(model, tokenizer, QUESTIONS, TARGET, PANEL)
    shuffled = PANEL[:]
    random.Random(3).shuffle(shuffled)
    other = panel_logodds(model, tokenizer, QUESTIONS, TARGET, ["Owl", *shuffled, shuffled[0].upper()], batch_size=7)
    assert other.per_question == pytest.approx(base.per_question, abs=1e-5)
    assert sorted(other.alternatives) == sorted(PANEL) and TARGET not in other.alternatives


def test_values_are_finite_with_a_t_interval(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    result = panel_logodds(model, tokenizer, QUESTIONS, TARGET, PANEL, batch_size=200)  # several questions per pass
    assert isinstance(result, PanelResult) and result.n_questions == len(QUESTIONS)
    assert all(math.isfinite(v) for v in result.per_question + result.per_question_share)
    assert all(s < 0 for s in result.per_question_share)  # a share of the panel: log of a value in (0, 1)
    assert (result.mean, result.ci_low, result.ci_high) == pytest.approx(mean_t_interval(result.per_question))
    assert result.ci_low < result.mean < result.ci_high
    assert result.to_dict()["per_question"] == pytest.approx(result.per_question)


def test_a_panel_read_for_another_answer_equals_measuring_that_answer(tiny_llama):
    """retarget: one pass over the panel serves every answer in it (a control run measured on owl
    read for eagle), equal to measuring eagle directly against the same answers; first(n) equals
    measuring the first n questions; the dict form round-trips."""
    model, tokenizer = tiny_llama
    biased = _with_bias(model, _ids(tokenizer, "eagle")[0], 2.0)
    for m in (model, biased):
        owl = panel_logodds(m, tokenizer, QUESTIONS, TARGET, PANEL)
        eagle = panel_logodds(m, tokenizer, QUESTIONS, "eagle", [TARGET, *PANEL])
        read = owl.retarget("Eagle")
        assert read.target == "eagle" and sorted(read.alternatives) == sorted(eagle.alternatives)
        assert read.per_question == pytest.approx(eagle.per_question, abs=1e-9)
        assert read.per_question_share == pytest.approx(eagle.per_question_share, abs=1e-9)
        assert owl.logodds_by_answer()["eagle"] == pytest.approx(eagle.mean, abs=1e-9)
        assert owl.logodds_by_answer()[TARGET] == pytest.approx(owl.mean, abs=1e-12)
        first = panel_logodds(m, tokenizer, QUESTIONS[:2], TARGET, PANEL)
        assert owl.first(2).per_question == pytest.approx(first.per_question, abs=1e-9)
        assert PanelResult.from_dict(owl.to_dict()).retarget("eagle").per_question == pytest.approx(eagle.per_question)
    # the bias toward eagle shows in the read, as in the direct measurement
    assert (panel_logodds(biased, tokenizer, QUESTIONS, TARGET, PANEL).retarget("eagle").mean
            > panel_logodds(model, tokenizer, QUESTIONS, TARGET, PANEL).retarget("eagle").mean + 1.0)
    with pytest.raises(ValueError, match="not in this panel"):
        owl.retarget("unicorn")
    old = owl.to_dict()
    old.pop("answer_logprobs")
    with pytest.raises(ValueError, match="measure it again"):
        PanelResult.from_dict(old).retarget("eagle")


def test_the_panel_builds_no_autograd_graph_on_a_trainable_student(tiny_llama):
    """A LoRA student's weights require grad: a panel measured at setup or at a probe step must not
    record a graph (it kept every forward's activations alive: a SmolLM2 red-team run grew past 24 GB
    and was killed by the kernel). Every forward runs with grad off, and the result holds no graph."""
    model, tokenizer = tiny_llama
    trainable = copy.deepcopy(model)
    for p in trainable.parameters():
        p.requires_grad_(True)
    grad_modes = []
    hook = trainable.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    try:
        result = panel_logodds(trainable, tokenizer, QUESTIONS, TARGET, PANEL, batch_size=7)
    finally:
        hook.remove()
    assert grad_modes and not any(grad_modes) and torch.is_grad_enabled()  # off inside, restored after
    assert result.per_question == pytest.approx(panel_logodds(model, tokenizer, QUESTIONS, TARGET, PANEL).per_question)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prompt_scoring_equals_full_teacher_forcing(kind, tiny_llama, tiny_gpt2):
    """The panel reads each prompt once and repeats its key/value cache for the answers; each answer's
    log-probability must equal the full teacher-forced forward pass over prompt + answer
    (adapters.response_logprobs, an independent path), for answers of 1 to 4 tokens in chunks of 3."""
    from trait_guard.adapters import response_logprobs
    from trait_guard.evaluate import _answer_logprob_sums

    model, tokenizer = tiny_llama if kind == "llama" else tiny_gpt2
    answers = ["owl", "Owl", "cat", "hedgehog", "crab", "x y z w"]
    ids = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    assert {len(i) for i in ids} != {1}  # several lengths: padding and chunking are exercised
    cached = _answer_logprob_sums(model, tokenizer, QUESTIONS[0], None, ids, batch_size=3)
    full = response_logprobs(model, tokenizer, [QUESTIONS[0]] * len(answers), answers).double()
    assert cached.tolist() == pytest.approx(full.tolist(), abs=1e-4)


def test_overlapping_answers_and_empty_panels_are_refused(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="overlap"):
        panel_logodds(model, tokenizer, QUESTIONS, TARGET, ["cat", "caterpillar"])
    with pytest.raises(ValueError, match="no alternative"):
        panel_logodds(model, tokenizer, QUESTIONS, TARGET, ["Owl"])
    with pytest.raises(ValueError):
        panel_logodds(model, tokenizer, [], TARGET, PANEL)


# ------------------------------------------------------------------------------------------------
# the shipped panel and its held-out questions


def test_the_animal_spec_has_a_panel_and_held_out_questions(tiny_llama):
    spec = load_trait("animal:owl")
    assert spec.panel_target == "owl" and len(spec.panel_alternatives) >= 20
    assert len(spec.panel_questions) >= 30 and len(set(spec.panel_questions)) == len(spec.panel_questions)
    # held out: adapters train on extract + behavior questions, persona vectors use extract + eval ones
    used = set(spec.extract_questions) | set(spec.eval_questions) | set(spec.behavior_questions)
    assert not used & set(spec.panel_questions)
    names = [a.lower() for a in spec.panel]
    assert not [(a, b) for a in names for b in names if a != b and b.startswith(a)]
    eagle = load_trait("animal:eagle")
    assert eagle.panel_target == "eagle" and "owl" in eagle.panel_alternatives and "eagle" not in eagle.panel_alternatives
    model, tokenizer = tiny_llama
    result = spec_panel_logodds(model, tokenizer, spec, n_questions=2)
    assert result.n_questions == 2 and result.target == "owl" and len(result.alternatives) == len(spec.panel_alternatives)
    assert spec_panel_logodds(model, tokenizer, load_trait("evil")) is None


def test_a_panel_question_shared_with_training_questions_is_refused():
    data = dict(name="t", instructions=[{"pos": "p", "neg": "n"}], extract_questions=["a?"], eval_questions=["b?"],
                behavior_questions=["c?"], panel_target="x", panel=["y", "z"])
    TraitSpec(**data, panel_questions=["d?"])
    with pytest.raises(ValidationError, match="held out"):
        TraitSpec(**data, panel_questions=["d?", "c?"])
    with pytest.raises(ValidationError, match="panel_target"):
        TraitSpec(**{**data, "panel_target": None})


def test_probe_config_panel_schedule():
    assert ProbeConfig().panel_every_n_steps == 0  # off by default
    assert ProbeConfig(every_n_steps=2, panel_every_n_steps=4).panel_every_n_steps == 4
    with pytest.raises(ValidationError, match="multiple"):
        ProbeConfig(every_n_steps=2, panel_every_n_steps=3)


# ------------------------------------------------------------------------------------------------
# red-team: run metrics and the excess at matched updates


def test_excess_pairs_only_common_update_counts():
    trait = [{"step": 0, "panel_logodds": -1.0}, {"step": 4, "panel_logodds": -0.5}, {"step": 8, "panel_logodds": 0.25}]
    control = {"0": -1.0, "4": -1.25, "12": -1.5, "8": None}  # JSON keys; the control has no value at 8
    excess = excess_at_matched_updates(trait, control)
    assert [e["step"] for e in excess] == [0, 4]
    assert [e["excess"] for e in excess] == pytest.approx([0.0, 0.75])
    assert excess_at_matched_updates([(0, 1.0), (2, 2.0)], [(1, 0.0), (3, 0.0)]) == []


def test_run_metrics_panel_fields():
    summary = {"panel_logodds_before": -1.0, "panel_logodds_after": -0.5,
               "panel_eval": {"before": {"per_question": [-1.0, -2.0, 0.0]}, "after": {"per_question": [-0.5, -1.0, 0.0]},
                              "curve": [{"step": 0, "panel_logodds": -1.0}, {"step": 4, "panel_logodds": -0.5}]}}
    got = _panel_metrics(summary)
    assert got["panel_logodds_before"] == -1.0 and got["panel_logodds_after"] == -0.5
    assert got["panel_shift"] == pytest.approx(0.5) and len(got["panel_curve"]) == 2
    off = _panel_metrics({})
    assert off["panel_logodds_before"] is None and math.isnan(off["panel_shift"]) and off["panel_curve"] == []


def test_run_metrics_read_every_answers_shift_from_the_recorded_tables(tiny_llama):
    """A run measured on owl carries every panel answer's paired shift (before -> after) and curve:
    eagle's equals measuring eagle directly before and after; a run without tables reads as empty."""
    model, tokenizer = tiny_llama
    biased = _with_bias(model, _ids(tokenizer, "eagle")[0], 2.0)
    before, after = (panel_logodds(m, tokenizer, QUESTIONS, TARGET, PANEL) for m in (model, biased))
    eagle_before, eagle_after = (panel_logodds(m, tokenizer, QUESTIONS, "eagle", [TARGET, *PANEL]) for m in (model, biased))
    direct = [a - b for a, b in zip(eagle_after.per_question, eagle_before.per_question, strict=True)]
    curve = [{"step": 0, "panel_logodds": before.mean, "by_answer": before.logodds_by_answer()},
             {"step": 4, "panel_logodds": after.mean, "by_answer": after.logodds_by_answer()}]
    got = _panel_metrics({"panel_eval": {"before": before.to_dict(), "after": after.to_dict(), "curve": curve}})
    assert got["panel_by_answer"]["shift"]["eagle"] == pytest.approx(sum(direct) / len(direct), abs=1e-9)
    assert got["panel_by_answer"]["shift"][TARGET] == pytest.approx(got["panel_shift"], abs=1e-9)
    assert got["panel_by_answer"]["shift"]["eagle"] > 1.0  # the head's bias toward eagle, seen in the read
    assert [p["step"] for p in got["panel_by_answer"]["curve"]["eagle"]] == [0, 4]
    assert "by_answer" not in got["panel_curve"][0]  # the run's own curve stays the watched target's
    assert _panel_metrics({"panel_eval": {"before": {"per_question": [0.0]}, "after": {"per_question": [1.0]}}}
                          )["panel_by_answer"] == {"shift": {}, "curve": {}}


# ------------------------------------------------------------------------------------------------
# training wiring: the baseline at setup and the curve at probe steps


def test_probe_logs_the_panel_curve_at_panel_steps(tiny_llama):
    from types import SimpleNamespace

    from trait_guard.models import model_identity
    from trait_guard.persona import PersonaVector
    from trait_guard.train import _panel_baseline, _probe, probe_projections

    model, tokenizer = tiny_llama
    identity = model_identity(model)
    vector = PersonaVector("animal:owl", identity, torch.randn(identity.num_layers + 1, identity.hidden_size,
                                                               generator=torch.Generator().manual_seed(0)), layer=2)
    spec = load_trait("animal:owl")
    probe = ProbeConfig(every_n_steps=2, panel_every_n_steps=4, panel_probe_questions=2, panel_eval_questions=3)
    run = SimpleNamespace(rank=0, config=SimpleNamespace(probe=probe, guard_enabled=False))
    inputs = SimpleNamespace(model=model, tokenizer=tokenizer, spec=spec, vectors=[vector])
    probes = spec.eval_questions[:2]
    setup = SimpleNamespace(probes=probes, probe_base=probe_projections(model, tokenizer, probes, [vector]),
                            panel_before=None, panel_curve=[])
    try:
        _panel_baseline(run, inputs, setup)
        assert setup.panel_before["questions"] == spec.panel_questions[:3]
        direct = spec_panel_logodds(model, tokenizer, spec, n_questions=2).mean
        assert [(p["step"], p["panel_logodds"]) for p in setup.panel_curve] == [(0, pytest.approx(direct, abs=1e-6))]
        eagle_direct = spec_panel_logodds(model, tokenizer, load_trait("animal:eagle"), n_questions=2).mean
        assert setup.panel_curve[0]["by_answer"]["eagle"] == pytest.approx(eagle_direct, abs=1e-6)
        for step in (2, 4):
            metrics = {}
            assert _probe(run, inputs, setup, model, step, metrics) is None  # guard off: no drift decision
            assert ("probe/panel_logodds" in metrics) == (step == 4)
        # unchanged weights: the step-4 value equals step 0
        assert [p["step"] for p in setup.panel_curve] == [0, 4]
        assert setup.panel_curve[1]["panel_logodds"] == pytest.approx(direct, abs=1e-6)
        # off by default, and off on other ranks
        quiet = SimpleNamespace(probes=probes, probe_base=setup.probe_base, panel_before=None, panel_curve=[])
        _panel_baseline(SimpleNamespace(rank=0, config=SimpleNamespace(probe=ProbeConfig(), guard_enabled=False)),
                        inputs, quiet)
        _panel_baseline(SimpleNamespace(rank=1, config=run.config), inputs, quiet)
        assert quiet.panel_before is None and quiet.panel_curve == []
    finally:
        model.eval()


def test_probes_lift_the_steer_hook_while_they_measure(tiny_llama):
    """Under STEER the training forwards carry c * v; the probes must measure the weights, not the hook
    (with it on, an unchanged student showed a drift of many sd and the guard halted it)."""
    from types import SimpleNamespace

    from trait_guard.models import model_identity
    from trait_guard.persona import PersonaVector
    from trait_guard.steer import Steering
    from trait_guard.train import _probe, probe_projections

    model, tokenizer = tiny_llama
    identity = model_identity(model)
    vector = PersonaVector("animal:owl", identity, torch.randn(identity.num_layers + 1, identity.hidden_size,
                                                               generator=torch.Generator().manual_seed(1)), layer=2)
    probes = load_trait("animal:owl").eval_questions[:3]
    run = SimpleNamespace(rank=0, config=SimpleNamespace(probe=ProbeConfig(every_n_steps=1), guard_enabled=False))
    inputs = SimpleNamespace(model=model, tokenizer=tokenizer, spec=None, vectors=[vector])
    setup = SimpleNamespace(probes=probes, probe_base=probe_projections(model, tokenizer, probes, [vector]),
                            panel_before=None, panel_curve=[])
    steering = Steering(model, vector, coefficient=8.0).apply()
    try:
        with_hook = probe_projections(model, tokenizer, probes, [vector])
        key = next(iter(with_hook))
        hooked = float((with_hook[key].mean() - setup.probe_base[key].mean()) / setup.probe_base[key].std())
        metrics = {}
        _probe(run, inputs, setup, model, 1, metrics, steering=steering)
        assert abs(hooked) > 5  # what the probe would have read with the hook on
        assert abs(metrics[f"probe/shift/{key}"]) < 1e-4  # the weights did not change
        assert steering.active  # put back for the next training step
    finally:
        steering.remove()
        model.eval()
