import pytest
import torch

from trait_guard.activations import (
    LayerLookupError,
    find_decoder_layers,
    gather_positions,
    masked_mean,
    normalize_layer_index,
    record_activations,
)


def _batch(tokenizer):
    tokenizer.padding_side = "right"
    batch = tokenizer(["hello owl 123", "a longer second row, 4 5 6"], return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    return batch


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_hooked_activations_equal_output_hidden_states(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    batch = _batch(tokenizer)
    num_layers = len(find_decoder_layers(model))
    with torch.no_grad(), record_activations(model) as acts:
        reference = model(**batch, output_hidden_states=True).hidden_states
    assert sorted(acts) == list(range(num_layers + 1))
    for index in range(num_layers):  # 0..L-1: identical, bit for bit
        assert torch.equal(acts[index][0], reference[index]), index
    # index L: transformers reports it after the final norm; we record the raw block output
    final_norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    assert not torch.equal(acts[num_layers][0], reference[num_layers])
    torch.testing.assert_close(final_norm(acts[num_layers][0]), reference[num_layers])


def test_hooks_are_removed_after_an_exception(tiny_llama):
    model, tokenizer = tiny_llama
    blocks = find_decoder_layers(model)

    def hooks():  # transformers >= 5 keeps hooks of its own on the blocks; ours must add none
        return [(set(b._forward_hooks), set(b._forward_pre_hooks)) for b in blocks]

    before = hooks()
    with pytest.raises(RuntimeError, match="boom"), record_activations(model, layers=[0, 2, -1]):
        assert hooks() != before
        raise RuntimeError("boom")
    assert hooks() == before


def test_one_record_per_forward_call_and_negative_indices(tiny_llama):
    model, tokenizer = tiny_llama
    batch = _batch(tokenizer)
    with torch.no_grad(), record_activations(model, layers=[-1, 1]) as acts:
        model(**batch)
        model(**batch)
    assert sorted(acts) == [1, 4]
    assert len(acts[4]) == 2 and torch.equal(acts[4][0], acts[4][1])


def test_layer_index_bounds():
    assert normalize_layer_index(-1, 30) == 30
    assert normalize_layer_index(-31, 30) == 0
    with pytest.raises(IndexError, match="valid: 0..30"):
        normalize_layer_index(31, 30)


def test_layer_lookup_override_and_error(tiny_llama):
    model, _ = tiny_llama
    assert find_decoder_layers(model, "model.layers") is model.model.layers
    with pytest.raises(LayerLookupError, match="layers_path"):
        find_decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(LayerLookupError, match="no nn.ModuleList at 'model.nope'"):
        find_decoder_layers(model, "model.nope")


def test_activations_keep_the_graph_when_asked(tiny_llama):
    model, tokenizer = tiny_llama
    with record_activations(model, layers=[2], detach=False) as acts:
        model(**_batch(tokenizer))
    assert acts[2][0].requires_grad
    acts[2][0].sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_position_reductions_have_known_values():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(masked_mean(hidden, mask), torch.tensor([[3.0, 4.0], [6.0, 7.0]]))
    torch.testing.assert_close(gather_positions(hidden, torch.tensor([2, 0])), torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
