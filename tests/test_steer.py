import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trait_guard.activations import find_decoder_layers, record_activations
from trait_guard.models import model_identity
from trait_guard.persona import PersonaVector, PersonaVectorMismatch
from trait_guard.steer import Steering, check_vector_fits
from trait_guard.testing import make_tiny_model

MODELS = ["tiny_llama", "tiny_gpt2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: extra intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(tokenizer):
    tokenizer.padding_side = "right"
    batch = tokenizer(["hello owl 123", "a longer second row, 4 5 6"], return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    return batch


def _record(model, batch, **steer):
    """Activations at every index for one forward pass, steered when ``steer`` is given."""
    with torch.no_grad():
        if steer:
            with Steering(model, **steer), record_activations(model) as acts:
                model(**batch)
        else:
            with record_activations(model) as acts:
                model(**batch)
    return {i: a[0] for i, a in acts.items()}


def _hooks(model):  # transformers >= 5 keeps hooks of its own on the blocks; ours must leave none behind
    return [(set(b._forward_hooks), set(b._forward_pre_hooks)) for b in find_decoder_layers(model)]


def _vector(model, seed=1):
    return torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _persona(model, layer=2, seed=2):
    identity = model_identity(model)
    vectors = torch.randn(identity.num_layers + 1, identity.hidden_size, generator=torch.Generator().manual_seed(seed))
    return PersonaVector(trait="test", model=identity, vectors=vectors, layer=layer)


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("layer", [1, 2, 4])
def test_add_shifts_exactly_the_steered_index(fixture, layer, request):
    model, tokenizer = request.getfixturevalue(fixture)
    batch, v, c = _batch(tokenizer), _vector(model), 2.5
    ref = _record(model, batch)
    out = _record(model, batch, vector=v, layer=layer, coefficient=c)
    torch.testing.assert_close(out[layer], ref[layer] + c * v, rtol=0, atol=1e-6)
    for index in range(layer):
        assert torch.equal(out[index], ref[index]), index
    for index in range(layer + 1, len(ref)):
        assert not torch.allclose(out[index], ref[index]), index


@pytest.mark.parametrize("fixture", MODELS)
def test_steered_value_is_seen_whatever_the_hook_order(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    batch, v = _batch(tokenizer), _vector(model)
    ref = _record(model, batch)
    with torch.no_grad(), record_activations(model, layers=[2]) as acts, Steering(model, v, layer=2):
        hidden = model(**batch, output_hidden_states=True).hidden_states
    expected = ref[2] + v
    torch.testing.assert_close(acts[2][0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden[2], expected, rtol=0, atol=1e-6)  # transformers' own record agrees


@pytest.mark.parametrize("fixture", MODELS)
def test_index_zero_edits_the_input_of_the_first_block(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    batch, v = _batch(tokenizer), _vector(model)
    ref = _record(model, batch)
    out = _record(model, batch, vector=v, layer=0, coefficient=-1.5)
    torch.testing.assert_close(out[0], ref[0] - 1.5 * v, rtol=0, atol=1e-6)
    assert not torch.allclose(out[1], ref[1])
    with torch.no_grad(), Steering(model, v, layer=0, coefficient=-1.5):
        hidden = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[0], ref[0] - 1.5 * v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fixture", MODELS)
def test_ablate_removes_the_component_along_the_vector(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    batch, layer = _batch(tokenizer), 2
    v = 3.0 * _vector(model)  # the norm must not matter
    v_hat = v / v.norm()
    ref = _record(model, batch)[layer]
    assert (ref @ v_hat).abs().max() > 1e-2  # there is something to remove
    out = _record(model, batch, vector=v, layer=layer, mode="ablate")[layer]
    assert (out @ v_hat).abs().max() < 1e-5

    def orthogonal(h):
        return h - (h @ v_hat).unsqueeze(-1) * v_hat

    torch.testing.assert_close(orthogonal(out), orthogonal(ref), rtol=0, atol=1e-5)
    # coefficient is the fraction removed: 0.5 halves the projection
    half = _record(model, batch, vector=v, layer=layer, mode="ablate", coefficient=0.5)[layer]
    torch.testing.assert_close(half @ v_hat, 0.5 * (ref @ v_hat), rtol=0, atol=1e-5)
    torch.testing.assert_close(orthogonal(half), orthogonal(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("as_callable", [False, True])
def test_positions_mask_limits_the_edit(tiny_llama, as_callable):
    model, tokenizer = tiny_llama
    batch, v, layer = _batch(tokenizer), _vector(model), 2
    mask = torch.zeros_like(batch["input_ids"])
    mask[0, 1:4] = 1
    mask[1, -2:] = 1
    seen = []

    def positions(hidden):
        seen.append(tuple(hidden.shape))
        return mask.bool()

    ref = _record(model, batch)[layer]
    out = _record(model, batch, vector=v, layer=layer, coefficient=2.0,
                  positions=positions if as_callable else mask)[layer]
    on = mask.bool()
    torch.testing.assert_close(out[on], ref[on] + 2.0 * v, rtol=0, atol=1e-6)
    assert torch.equal(out[~on], ref[~on])
    if as_callable:
        assert seen == [tuple(ref.shape)]


def test_a_mask_of_the_wrong_shape_is_refused_and_hooks_still_go(tiny_llama):
    model, tokenizer = tiny_llama
    batch, before = _batch(tokenizer), _hooks(model)
    with pytest.raises(ValueError, match=r"positions mask has shape \(2, 3\)"), torch.no_grad():
        with Steering(model, _vector(model), layer=1, positions=torch.ones(2, 3)):
            model(**batch)
    assert _hooks(model) == before


@pytest.mark.parametrize("fixture", MODELS)
def test_hooks_are_removed_and_the_model_is_restored(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    batch, v = _batch(tokenizer), _vector(model)
    with torch.no_grad():
        original = model(**batch).logits
    before = _hooks(model)
    with torch.no_grad(), Steering(model, v, layer=[0, 2, -1], coefficient=5.0) as steer:
        assert steer.active and steer.layers == (0, 2, 4)
        assert _hooks(model) != before
        steered = model(**batch).logits
    assert not steer.active and _hooks(model) == before
    assert not torch.allclose(steered, original)
    with pytest.raises(RuntimeError, match="boom"), Steering(model, v, layer=[1, 3]):
        assert _hooks(model) != before
        raise RuntimeError("boom")
    assert _hooks(model) == before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original)


def test_steering_object_apply_and_remove(tiny_llama):
    model, tokenizer = tiny_llama
    batch, v = _batch(tokenizer), _vector(model)
    ref = _record(model, batch)
    before = _hooks(model)
    steer = Steering(model, v, layer=1, coefficient=1.0)
    assert not steer.active and _hooks(model) == before
    assert steer.apply() is steer and steer.apply() is steer  # idempotent: one hook per index
    assert steer.active
    assert sum(len(f) for f, _ in _hooks(model)) == sum(len(f) for f, _ in before) + 1
    steer.coefficient = 3.0  # read on every forward call
    with torch.no_grad(), record_activations(model, layers=[1]) as acts:
        model(**batch)
    torch.testing.assert_close(acts[1][0], ref[1] + 3.0 * v, rtol=0, atol=1e-6)
    steer.remove()
    steer.remove()
    assert not steer.active and _hooks(model) == before
    with steer:
        assert steer.active
    assert not steer.active and _hooks(model) == before
    assert "layers=[1]" in repr(steer)


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_gradients_flow_through_the_edit(mode):
    model, tokenizer = make_tiny_model("llama", seed=3)  # private: grads must not leak into shared fixtures
    batch = _batch(tokenizer)
    coefficient = torch.tensor(0.7 if mode == "add" else 0.5, requires_grad=True)
    with Steering(model, _vector(model), layer=2, coefficient=coefficient, mode=mode):
        loss = model(**batch).logits.float().pow(2).mean()
        loss.backward()
    assert coefficient.grad is not None and coefficient.grad.abs() > 0
    first = model.model.layers[0].mlp.up_proj.weight.grad  # before the steered index
    last = model.model.layers[3].mlp.up_proj.weight.grad  # after it
    assert first is not None and first.abs().sum() > 0
    assert last is not None and last.abs().sum() > 0


@pytest.mark.parametrize("layer", [0, 2])
def test_gradient_checkpointing_gives_the_same_gradients(layer):
    def grads(checkpointing, backward_inside):
        model, tokenizer = make_tiny_model("llama", seed=3)
        model.train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        coefficient = torch.tensor(0.5, requires_grad=True)
        with Steering(model, _vector(model), layer=layer, coefficient=coefficient, mode="ablate"):
            loss = model(**_batch(tokenizer)).logits.pow(2).mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()] + [coefficient.grad.view(1)])

    reference = grads(False, True)
    torch.testing.assert_close(grads(True, True), reference)
    torch.testing.assert_close(grads(True, False), reference)  # transformers 5: hooks stay outside the checkpoint


def test_persona_vector_steers_at_its_layer_with_its_unnormalized_vector(tiny_llama):
    model, tokenizer = tiny_llama
    batch, pv = _batch(tokenizer), _persona(tiny_llama[0], layer=2)
    ref = _record(model, batch)
    out = _record(model, batch, vector=pv, coefficient=1.5)
    torch.testing.assert_close(out[2], ref[2] + 1.5 * pv.vectors[2], rtol=0, atol=1e-6)
    assert torch.equal(out[1], ref[1])
    # several indices: each gets its own layer's vector
    only_1 = _record(model, batch, vector=pv, layer=1)
    both = _record(model, batch, vector=pv, layer=[1, 3])
    torch.testing.assert_close(both[1], ref[1] + pv.vectors[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(both[3], only_1[3] + pv.vectors[3], rtol=0, atol=1e-6)


def test_vectors_that_do_not_fit_the_model_are_refused(tiny_llama):
    model, _ = tiny_llama
    before = _hooks(model)
    wrong = torch.randn(48)
    message = r"hidden size 48, but model tiny-llama-seed0 has hidden size 32.*trait-guard extract --model tiny-llama"
    with pytest.raises(ValueError, match=message):
        check_vector_fits(model, wrong)
    with pytest.raises(ValueError, match=message), Steering(model, wrong, layer=1):
        pass
    identity = dataclasses.replace(model_identity(model), hidden_size=48)
    pv48 = PersonaVector(trait="test", model=identity, vectors=torch.randn(identity.num_layers + 1, 48), layer=2)
    with pytest.raises(PersonaVectorMismatch, match="hidden 48.*trait-guard extract --model"):
        Steering(model, pv48)
    assert issubclass(PersonaVectorMismatch, ValueError)
    # same shape, other weights: refused unless check_weights=False
    pv = _persona(model)
    other_base = dataclasses.replace(pv, model=dataclasses.replace(pv.model, fingerprint="0" * 16))
    with pytest.raises(PersonaVectorMismatch, match="different weights"):
        check_vector_fits(model, other_base)
    Steering(model, other_base, check_weights=False)
    check_vector_fits(model, pv)
    check_vector_fits(model, _vector(model))
    assert _hooks(model) == before


def test_argument_errors(tiny_llama):
    model, _ = tiny_llama
    v = _vector(model)
    with pytest.raises(ValueError, match="layer is required"):
        Steering(model, v)
    with pytest.raises(ValueError, match="unknown steering mode"):
        Steering(model, v, layer=1, mode="scale")
    with pytest.raises(ValueError, match=r"shape \[hidden\]"):
        Steering(model, torch.randn(5, 32), layer=1)
    with pytest.raises(ValueError, match="zero vector"):
        Steering(model, torch.zeros(32), layer=1, mode="ablate")
    with pytest.raises(IndexError, match="out of range"):
        Steering(model, v, layer=5)
    with pytest.raises(ValueError, match="no layer"):
        Steering(model, v, layer=[])
    with pytest.raises(TypeError, match="PersonaVector or a torch.Tensor"):
        Steering(model, [0.0] * 32, layer=1)
    assert Steering(model, v, layer=[-1, 4, 1]).layers == (1, 4)


class _TupleBlock(nn.Module):
    """A transformers-4 style block: hidden states passed by keyword, a tuple returned."""

    def __init__(self, d):
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, hidden_states, extra=None):
        return (self.linear(hidden_states), "kept")


class _TupleModel(nn.Module):
    def __init__(self, d=8, n=2):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=d)
        self.layers = nn.ModuleList(_TupleBlock(d) for _ in range(n))

    def forward(self, x):
        outputs = []
        for block in self.layers:
            x, tag = block(hidden_states=x)
            outputs.append((x, tag))
        return outputs


def test_tuple_outputs_and_keyword_inputs_keep_their_form():
    torch.manual_seed(0)
    model, x = _TupleModel(), torch.randn(2, 3, 8)
    v = torch.randn(8)
    with torch.no_grad():
        ref = model(x)
        with Steering(model, v, layer=[0, 1]):
            out = model(x)
    assert [tag for _, tag in out] == ["kept", "kept"]
    with torch.no_grad():  # index 0 edits the keyword input of block 0, index 1 its tuple output
        expected = model.layers[0].linear(x + v) + v
    torch.testing.assert_close(out[0][0], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(out[0][0], ref[0][0])


def test_dtype_follows_the_hidden_states():
    model, tokenizer = make_tiny_model("llama", seed=4)
    model.to(torch.bfloat16)
    batch, v = _batch(tokenizer), _vector(model)  # a float32 vector on a bf16 model
    ref = _record(model, batch)
    out = _record(model, batch, vector=v, layer=2, coefficient=2.0)
    assert out[2].dtype == torch.bfloat16
    assert torch.equal(out[2], ref[2] + 2.0 * v.to(torch.bfloat16))
    coefficient = torch.tensor(2.0, requires_grad=True)  # a float32 tensor does not upcast the stream
    with Steering(model, v, layer=2, coefficient=coefficient), record_activations(model, layers=[2]) as acts:
        model(**batch).logits.float().mean().backward()
    assert acts[2][0].dtype == torch.bfloat16 and coefficient.grad is not None
