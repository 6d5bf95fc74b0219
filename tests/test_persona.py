import math

import pytest
import torch

from trait_guard.models import model_identity
from trait_guard.persona import (
    PersonaVector,
    PersonaVectorMismatch,
    choose_layer,
    cohens_d,
    extract,
    layer_separation,
    mean_difference,
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
