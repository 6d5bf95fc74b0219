import json
import math

import pytest
import torch

from trait_guard.models import model_identity
from trait_guard.persona import (
    PanelScorer,
    PersonaVector,
    PersonaVectorMismatch,
    SteeringCurve,
    SteeringSweep,
    beats_random_directions,
    choose_layer,
    choose_steering_layer,
    cohens_d,
    extract,
    format_separation_table,
    instruction_folds,
    instruction_held_out_separation,
    layer_separation,
    mean_difference,
    random_direction_curves,
    residual_norms,
    steering_curves,
)
from trait_guard.testing import make_tiny_model
from trait_guard.traits import TraitSpec


def test_planted_direction_is_recovered_at_the_planted_layer():
    gen = torch.Generator().manual_seed(0)
    # noise in a difference of means of n/2 vs n/2 unit Gaussians has norm ~sqrt(4 * dim / n) = 0.51
    # for n = 1000, dim = 64, so a planted shift of 1.5 is recovered with cosine ~0.95
    n, layers, dim, planted_layer = 1000, 6, 64, 3
    direction = torch.randn(dim, generator=gen)
    direction /= direction.norm()

    def sample(count):
        acts = torch.randn(count, layers, dim, generator=gen)
        is_pos = torch.arange(count) % 2 == 0
        acts[is_pos, planted_layer] += 1.5 * direction
        return acts, is_pos

    acts, is_pos = sample(n)
    vectors = mean_difference(acts, is_pos)
    cosine = torch.nn.functional.cosine_similarity(vectors[planted_layer], direction, dim=0)
    assert cosine > 0.9
    held_out, held_is_pos = sample(n)
    separation = layer_separation(vectors, held_out, held_is_pos)
    assert math.isnan(separation[0])
    assert choose_layer(separation) == planted_layer
    assert separation[planted_layer] == pytest.approx(1.5, abs=0.25)  # d of a unit-variance shift of 1.5
    assert max(abs(d) for i, d in enumerate(separation[1:], 1) if i != planted_layer) < 0.3


def test_cohens_d_known_value():
    assert cohens_d(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(1.0)
    assert math.isnan(cohens_d(torch.tensor([1.0]), torch.tensor([0.0, 1.0])))


@pytest.fixture(scope="module")
def tiny_extraction():
    model, tokenizer = make_tiny_model("llama", seed=0)
    spec = TraitSpec(
        name="tiny",
        instructions=[{"pos": "Talk about owls.", "neg": "Talk about tables."}],
        extract_questions=["hi", "hello", "what now", "tell me"],
        eval_questions=["hey", "yo", "ok then", "and so"],
    )
    return model, extract(model, tokenizer, spec, max_new_tokens=6, batch_size=8)


def test_extraction_on_a_tiny_model(tiny_extraction):
    model, result = tiny_extraction
    vector = result.vectors["response_mean"]
    assert vector.vectors.shape == (5, 32) and 1 <= vector.layer <= 4
    assert result.kept["judge_filter"].startswith("none")
    # the last-prompt-token vector sees the two different system prompts, so it must be non-zero
    assert result.vectors["last_prompt"].vectors[1:].norm() > 0
    assert len(result.table) == 5 and set(result.table[1]) >= {"d_response_mean", "d_last_prompt"}
    # one instruction pair and no panel: both new checks fall back, and the result says so
    assert result.instruction_holdout.startswith("unavailable: 1 instruction pair")
    assert all(math.isnan(row["d_instr_response_mean"]) for row in result.table)
    assert result.curves == {} and "has no panel" in result.steering_note
    for method, choice in result.choices.items():
        assert choice.chosen_by == "separation" and choice.separation_by == "question"
        assert choice.layer == choice.separation_layer == result.vectors[method].layer
        assert "has no panel" in choice.reason


def test_save_load_round_trip_is_exact(tiny_extraction, tmp_path):
    model, result = tiny_extraction
    vector = result.vectors["last_prompt"]
    path = vector.save(tmp_path / "v")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    loaded = PersonaVector.load(path, model=model)
    assert torch.equal(loaded.vectors, vector.vectors)
    assert (loaded.trait, loaded.layer, loaded.method, loaded.model) == (vector.trait, vector.layer, vector.method, vector.model)
    assert loaded.separation[1:] == vector.separation[1:] and math.isnan(loaded.separation[0])
    assert loaded.meta == vector.meta


def test_vector_for_another_model_is_refused(tiny_extraction, tmp_path):
    _, result = tiny_extraction
    path = result.vectors["response_mean"].save(tmp_path / "v.safetensors")
    bigger, _ = make_tiny_model("llama", hidden_size=64)
    with pytest.raises(PersonaVectorMismatch, match=r"hidden 32.*hidden 64.*trait-guard extract --model"):
        PersonaVector.load(path, model=bigger)
    sibling, _ = make_tiny_model("llama", seed=7)
    with pytest.raises(PersonaVectorMismatch, match="different weights"):
        PersonaVector.load(path, model=model_identity(sibling))


def test_corrupted_and_non_finite_vectors_are_refused(tiny_extraction, tmp_path):
    _, result = tiny_extraction
    path = result.vectors["response_mean"].save(tmp_path / "v.safetensors")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not a trait_guard persona vector"):
        PersonaVector.load(path)
    vector = result.vectors["response_mean"]
    with pytest.raises(ValueError, match="NaN or inf"):
        PersonaVector(vector.trait, vector.model, torch.full_like(vector.vectors, math.nan), vector.layer)


# --------------------------------------------------------------------------------------------------
# Instruction-held-out separation


@pytest.mark.parametrize("n_pairs", [1, 2, 3, 5])
def test_instruction_folds_never_put_a_pair_on_both_sides(n_pairs):
    folds = instruction_folds(n_pairs)
    if n_pairs == 1:
        assert folds == []  # nothing to fit on: the caller falls back to questions only
        return
    assert len(folds) == n_pairs
    held_out = []
    for fit, held in folds:
        assert not set(fit) & set(held)
        assert sorted(fit + held) == list(range(n_pairs))
        held_out += held
    assert sorted(held_out) == list(range(n_pairs))  # every pair is held out exactly once


N_PAIRS, DIM = 5, 64


def _answers_with_lexical_and_shared_shifts(basis, n_per_side, gen):
    """Activations ``[n, 3, DIM]`` of N_PAIRS instruction pairs. Index 1: each pair's positive answers are
    shifted by 5 x that pair's OWN unit direction ``basis[pair]`` (what a wording leaks); index 2: every
    pair's positive answers are shifted by 1.5 x one shared direction ``basis[N_PAIRS]`` (the trait)."""
    pair = torch.arange(N_PAIRS).repeat_interleave(2 * n_per_side)
    is_pos = torch.arange(len(pair)) % 2 == 0
    acts = torch.randn(len(pair), 3, DIM, generator=gen)
    acts[is_pos, 1] += 5.0 * basis[pair[is_pos]]
    acts[is_pos, 2] += 1.5 * basis[N_PAIRS]
    return acts, is_pos, pair


def test_instruction_held_out_d_sees_through_wording_that_question_held_out_d_rewards():
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(DIM, N_PAIRS + 1, generator=gen))[0].T  # orthonormal rows
    acts, is_pos, pair = _answers_with_lexical_and_shared_shifts(basis, 200, gen)
    held, held_is_pos, held_pair = _answers_with_lexical_and_shared_shifts(basis, 200, gen)
    # question-held-out (the same pairs on both sides): the mean of five orthogonal shifts of 5 projects
    # each pair's shift to 5 / sqrt(5), so the wording-only index 1 wins
    question_d = layer_separation(mean_difference(acts, is_pos), held, held_is_pos)
    assert question_d[1] == pytest.approx(5 / math.sqrt(5), abs=0.3) and choose_layer(question_d) == 1
    # instruction-held-out: the held-out pair's wording is orthogonal to the other four pairs' vector
    instruction_d = instruction_held_out_separation(acts, is_pos, pair, held, held_is_pos, held_pair, N_PAIRS)
    assert math.isnan(instruction_d[0]) and abs(instruction_d[1]) < 0.3
    assert instruction_d[2] == pytest.approx(1.5, abs=0.3) and choose_layer(instruction_d) == 2
    # fewer than 2 pairs: nothing can be held out, every index is NaN
    assert all(math.isnan(d) for d in instruction_held_out_separation(acts, is_pos, pair, held, held_is_pos,
                                                                      held_pair, 1))


# --------------------------------------------------------------------------------------------------
# Causal check: steering curves and the layer they choose


def _curve(layer, logodds, coefficients=(-2.0, -1.0, 0.0, 1.0, 2.0)):
    """A synthetic curve; its per-question rows are the mean curve plus and minus 0.1."""
    per_question = [[y - 0.1, y + 0.1] for y in logodds]
    return SteeringCurve(layer=layer, coefficients=list(coefficients), logodds=list(logodds),
                         per_question=per_question, baseline=logodds[2], scale=1.0)


def test_curve_summary_known_values():
    curve = _curve(4, [2 * c + 1 for c in (-2.0, -1.0, 0.0, 1.0, 2.0)])
    assert curve.slope == pytest.approx(2.0)
    assert curve.slope_se == pytest.approx(0.0, abs=1e-12)  # both questions have slope 2
    assert curve.spearman == pytest.approx(1.0) and curve.increasing_fraction == 1.0
    # with a tie: ranks 1, 4, 2.5, 2.5, 5 against 1-5, so rho = 6.5 / sqrt(10 * 9.5)
    assert _curve(4, [0.0, 2.0, 1.0, 1.0, 3.0]).spearman == pytest.approx(6.5 / math.sqrt(95))
    assert math.isnan(_curve(4, [1.0] * 5).spearman)
    assert curve.effect_at_max == pytest.approx(4.0)  # 5 at c = 2 minus the unsteered 1
    dip = _curve(5, [0.0, 1.0, 0.5, 2.0, 3.0])
    assert dip.increasing_fraction == 0.75 and not dip.is_monotone() and dip.is_monotone(0.75)


def test_steering_layer_is_the_monotone_one_with_the_largest_slope():
    curves = [
        _curve(3, [-1.0, -0.5, 0.0, 0.5, 1.0]),  # monotone, slope 0.5
        _curve(5, [-2.0, -1.0, 0.0, 1.0, 2.0]),  # monotone, slope 1: the answer
        _curve(7, [-9.0, 3.0, 0.0, 8.0, 9.0]),  # slope ~3.9 but dips once: refused
        _curve(9, [2.0, 1.0, 0.0, -1.0, -2.0]),  # monotone decreasing: steering moves the trait the wrong way
    ]
    assert choose_steering_layer(curves) == 5
    assert choose_steering_layer(curves, min_increasing_fraction=0.75) == 7  # when one dip is tolerated
    assert choose_steering_layer([curves[2], curves[3]]) is None  # no layer qualifies: the caller falls back
    assert choose_steering_layer([_curve(2, [0.0] * 5)]) is None  # flat is not an effect


PANEL = ["owl", "cat", "dog", "bear", "lion", "tiger", "whale", "horse", "zebra", "mouse"]
STEER_QUESTIONS = ["What animal?", "Pick one animal please.", "Your favourite animal, one word."]


def test_panel_scorer_equals_panel_logodds_also_under_steering(tiny_llama):
    from trait_guard.evaluate import panel_logodds
    from trait_guard.steer import Steering

    model, tokenizer = tiny_llama
    scorer = PanelScorer(tokenizer, "owl", PANEL)
    expected = panel_logodds(model, tokenizer, STEER_QUESTIONS, "owl", PANEL).per_question
    assert scorer.logodds(model, STEER_QUESTIONS) == pytest.approx(expected, abs=1e-5)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with Steering(model, direction, layer=2, coefficient=0.5):
        steered = panel_logodds(model, tokenizer, STEER_QUESTIONS, "owl", PANEL).per_question
        assert scorer.logodds(model, STEER_QUESTIONS) == pytest.approx(steered, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(steered, expected, strict=True)) > 1e-3  # the steering did something


def _first_token_direction(model, tokenizer, target, alternatives):
    """Unembedding rows of the target's first tokens (both cases) minus the alternatives' mean."""
    unembed = model.get_output_embeddings().weight.detach()

    def first_ids(word):
        return [tokenizer(w, add_special_tokens=False).input_ids[0] for w in (word.lower(), word.capitalize())]

    alternative_ids = [i for w in alternatives for i in first_ids(w)]
    return unembed[first_ids(target)].mean(0) - unembed[alternative_ids].mean(0)


# Alternatives that share no letter with "owl": steering at every position boosts the target's first
# token everywhere, which would also raise an alternative that contains it ("dog", "horse")
CLEAN_PANEL = ["owl", "cat", "bee", "ant", "yak", "emu", "pig", "ram", "hen", "gnu", "tiger", "zebra", "shark",
               "crab", "deer"]


def test_steering_along_a_planted_direction_moves_the_log_odds_monotonically(tiny_llama):
    model, tokenizer = tiny_llama
    last = model.config.num_hidden_layers
    planted = _first_token_direction(model, tokenizer, "owl", CLEAN_PANEL[1:])
    scorer = PanelScorer(tokenizer, "owl", CLEAN_PANEL)
    norms = residual_norms(model, tokenizer, STEER_QUESTIONS)
    baseline = scorer.logodds(model, STEER_QUESTIONS)

    def curve(direction, coefficients=(-1.0, -0.5, 0.0, 0.5, 1.0)):
        vectors = torch.zeros(last + 1, 32)
        vectors[last] = direction
        return steering_curves(model, tokenizer, vectors, [last], coefficients, scorer, STEER_QUESTIONS,
                               norms=norms, baseline=baseline)[0]

    planted_curve = curve(planted)
    assert planted_curve.is_monotone() and planted_curve.spearman == pytest.approx(1.0)
    assert planted_curve.slope > 0.2 and planted_curve.effect_at_max > 0.1
    assert planted_curve.scale == pytest.approx(float(norms[last]))  # c is in units of the residual norm
    assert choose_steering_layer([planted_curve]) == last
    gen = torch.Generator().manual_seed(5)
    orthogonal_slopes = []
    for _ in range(8):
        random = torch.randn(32, generator=gen)
        orthogonal = random - (random @ planted) / (planted @ planted) * planted
        orthogonal_slopes.append(curve(orthogonal, (-1.0, 0.0, 1.0)).slope)
    rms = math.sqrt(sum(s * s for s in orthogonal_slopes) / len(orthogonal_slopes))
    assert planted_curve.slope > 3 * rms, (planted_curve.slope, orthogonal_slopes)


@pytest.fixture(scope="module")
def tiny_steered_extraction():
    model, tokenizer = make_tiny_model("llama", seed=0)
    spec = TraitSpec(
        name="tiny",
        instructions=[{"pos": "Talk about owls.", "neg": "Talk about tables."},
                      {"pos": "You love owls.", "neg": "You love chairs."}],
        extract_questions=["hi", "hello", "what now", "tell me"],
        eval_questions=["hey", "yo", "ok then", "and so"],
        behavior_questions=STEER_QUESTIONS,
        panel_target="owl", panel=CLEAN_PANEL, panel_questions=["Which animal is best?"],
    )
    sweep = SteeringSweep(coefficients=(-1.0, 0.0, 1.0), n_questions=2, layer_stride=1,
                          methods=("response_mean", "last_prompt"))
    return model, tokenizer, spec, extract(model, tokenizer, spec, max_new_tokens=4, batch_size=8, steering=sweep)


def test_extraction_chooses_by_steering_and_keeps_the_curves(tiny_steered_extraction, tmp_path):
    model, _, _, result = tiny_steered_extraction
    assert result.instruction_holdout.startswith("leave-one-pair-out over 2 instruction pairs")
    for method in ("response_mean", "last_prompt"):
        curves, choice = result.curves[method], result.choices[method]
        assert [c.layer for c in curves] == [1, 2, 3, 4] and all(len(c.logodds) == 3 for c in curves)
        assert choice.separation_by == "instruction"
        assert choice.steering_layer == choose_steering_layer(curves, controls=result.controls.get(method))
        expected = choice.steering_layer if choice.steering_layer is not None else choice.separation_layer
        assert choice.layer == expected == result.vectors[method].layer
        assert choice.chosen_by == ("steering" if choice.steering_layer is not None else "separation")
        assert math.isnan(result.table[0][f"slope_{method}"])
        assert [row[f"slope_{method}"] for row in result.table[1:]] == pytest.approx([c.slope for c in curves])
        assert any(math.isfinite(row[f"d_instr_{method}"]) for row in result.table[1:])
    loaded = PersonaVector.load(result.vectors["response_mean"].save(tmp_path / "v"), model=model)
    assert loaded.meta["layer_choice"]["layer"] == loaded.layer and len(loaded.meta["steering_curves"]) == 4
    assert "d_instr" in format_separation_table(result, {m: v.layer for m, v in result.vectors.items()})
    json.dumps(result.to_dict(), allow_nan=False)  # JSON-safe for benchmark files and trackers


def test_separation_choice_skips_the_sweep(tiny_steered_extraction):
    model, tokenizer, spec, _ = tiny_steered_extraction
    result = extract(model, tokenizer, spec, max_new_tokens=4, batch_size=8, layer_choice="separation")
    assert result.curves == {} and result.steering_note.startswith("not measured")
    assert all(c.chosen_by == "separation" and c.steering_layer is None for c in result.choices.values())
    with pytest.raises(ValueError, match="layer_choice"):
        extract(model, tokenizer, spec, layer_choice="steer")


def test_sweep_candidate_layers_and_settings():
    assert SteeringSweep(layer_stride=3).candidate_layers(30) == list(range(3, 31, 3))  # ends at the last index
    assert SteeringSweep(layer_stride=3).candidate_layers(30, also=[16]) == sorted([*range(3, 31, 3), 16])
    assert SteeringSweep(layers=(0, 5, 99)).candidate_layers(30) == [5]  # never index 0 or past the last
    with pytest.raises(ValueError, match="3 distinct coefficients"):
        SteeringSweep(coefficients=(0.0, 1.0))


def test_default_sweep_measures_the_response_mean_vector_only(tiny_steered_extraction):
    model, tokenizer, spec, _ = tiny_steered_extraction
    result = extract(model, tokenizer, spec, max_new_tokens=4, batch_size=8)
    assert list(result.curves) == ["response_mean"]
    separation_layer = result.choices["response_mean"].separation_layer
    assert [c.layer for c in result.curves["response_mean"]] == sorted({1, 4, separation_layer})
    last_prompt = result.choices["last_prompt"]
    assert last_prompt.chosen_by == "separation" and "not measured for this method" in last_prompt.reason


def _sloped(layer, slope, rising=True):
    logodds = [slope * c for c in (-1.0, 0.0, 1.0)] if rising else [0.0, slope, 0.0]
    return SteeringCurve(layer=layer, coefficients=[-1.0, 0.0, 1.0], logodds=logodds,
                         per_question=[[v] for v in logodds], baseline=0.0, scale=1.0)


def test_a_layer_is_chosen_by_steering_only_where_the_vector_beats_random_directions():
    """Layer 3 has the steepest vector curve, but a random direction there moves the log-odds more
    (disruption): layer 2, whose vector beats its random directions, is chosen; a layer whose controls
    were not measured never is; without controls the steepest monotone layer wins as before."""
    curves = [_sloped(1, 0.5), _sloped(2, 1.0), _sloped(3, 2.0), _sloped(4, 5.0, rising=False)]
    controls = {3: [_sloped(3, 0.4), _sloped(3, -2.5)], 2: [_sloped(2, 0.3), _sloped(2, -0.2)]}
    assert choose_steering_layer(curves) == 3
    assert choose_steering_layer(curves, controls=controls) == 2
    assert choose_steering_layer(curves, controls={3: controls[3]}) is None
    assert not beats_random_directions(curves[1], [])  # nothing measured: no evidence


def test_a_planted_direction_beats_random_directions_of_the_same_size(tiny_llama):
    """At the last layer the planted owl direction (unembedding rows) raises the log-odds more than
    each of 4 random orthogonal directions steered with the same coefficients and scale moves them."""
    model, tokenizer = tiny_llama
    last = model.config.num_hidden_layers
    scorer = PanelScorer(tokenizer, "owl", CLEAN_PANEL)
    norms = residual_norms(model, tokenizer, STEER_QUESTIONS)
    baseline = scorer.logodds(model, STEER_QUESTIONS)
    vectors = torch.zeros(last + 1, 32)
    vectors[last] = _first_token_direction(model, tokenizer, "owl", CLEAN_PANEL[1:])
    planted = steering_curves(model, tokenizer, vectors, [last], (-1.0, 0.0, 1.0), scorer, STEER_QUESTIONS,
                              norms=norms, baseline=baseline)[0]
    randoms = random_direction_curves(model, tokenizer, vectors, last, 4, (-1.0, 0.0, 1.0), scorer, STEER_QUESTIONS,
                                      norms=norms, baseline=baseline, seed=0)
    assert len(randoms) == 4 and all(r.layer == last and r.scale == planted.scale for r in randoms)
    assert beats_random_directions(planted, randoms), (planted.slope, [r.slope for r in randoms])
    again = random_direction_curves(model, tokenizer, vectors, last, 4, (-1.0, 0.0, 1.0), scorer, STEER_QUESTIONS,
                                    norms=norms, baseline=baseline, seed=0)
    assert [r.slope for r in again] == [r.slope for r in randoms]  # seeded: a rerun measures the same controls
