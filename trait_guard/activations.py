"""Read a transformer's residual stream with forward hooks that are always removed.

Index convention (the one ``output_hidden_states`` uses, so numbers match the persona-vectors paper):

* hidden-state index ``0`` is the input to the first decoder block (the embedding output);
* index ``l`` for ``1 <= l <= L`` is the output of decoder block ``l - 1``;
* negative indices count from the end, ``-1`` being ``L``.

For ``l < L`` the recorded tensor equals ``model(..., output_hidden_states=True).hidden_states[l]``
exactly. For ``l = L`` transformers reports the output *after the final norm*; this module records the
raw residual stream (the block output before that norm), which is what steering and persona vectors
act on. ``tests/test_activations.py`` pins both facts.

Usage::

    with record_activations(model, layers=[10, 20]) as acts:
        model(**batch)
    acts[20][0]   # [batch, seq, hidden] from the first forward call
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from trait_guard.errors import TraitGuardInputError

# Attribute paths (from the model object) to the list of decoder blocks, by architecture family.
LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi3 (CausalLM wrappers)
    "layers",  # the bare base models of those families
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "h",
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "base_model.model.model.layers",  # PEFT-wrapped Llama family
)


class LayerLookupError(TraitGuardInputError):
    """The decoder blocks could not be found; pass ``layers_path`` explicitly."""


def _get_attr_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The model's list of decoder blocks, found by architecture or by an explicit attribute path."""
    candidates = (layers_path,) if layers_path else LAYER_PATHS
    for path in candidates:
        found = _get_attr_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    if layers_path:
        raise LayerLookupError(f"model {type(model).__name__} has no nn.ModuleList at '{layers_path}'")
    raise LayerLookupError(
        f"could not find the decoder blocks of {type(model).__name__} (tried {', '.join(LAYER_PATHS)}); "
        "pass layers_path='attribute.path.to.blocks'"
    )


def normalize_layer_index(index: int, num_layers: int) -> int:
    """Map a possibly negative hidden-state index into ``0..num_layers``; reject out-of-range ones."""
    total = num_layers + 1
    if not -total <= index < total:
        raise IndexError(
            f"hidden-state index {index} is out of range for a model with {num_layers} blocks "
            f"(valid: 0..{num_layers} or -{total}..-1)"
        )
    return index % total


def _first_tensor(value: object) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers >= 5) or a tuple whose first item is one."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot read hidden states from a block output of type {type(value).__name__}")


@contextmanager
def record_activations(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    *,
    layers_path: str | None = None,
    detach: bool = True,
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record residual-stream activations at hidden-state indices ``layers`` (default: all).

    Yields a dict ``{index: [tensor per forward call]}`` (indices normalized to ``0..L``). The hooks
    are removed when the block exits, also when it raises. With ``detach=False`` the tensors stay in
    the autograd graph, so a training loss can use them without a second forward pass.
    """
    blocks = find_decoder_layers(model, layers_path)
    num_layers = len(blocks)
    indices = range(num_layers + 1) if layers is None else layers
    wanted = sorted({normalize_layer_index(i, num_layers) for i in indices})
    records: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    handles = []

    def keep(index: int, tensor: torch.Tensor) -> None:
        records[index].append(tensor.detach() if detach else tensor)

    try:
        for index in wanted:
            if index == 0:

                def pre_hook(module, args, kwargs, index=index):
                    keep(index, args[0] if args else kwargs["hidden_states"])

                handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def post_hook(module, args, output, index=index):
                    keep(index, _first_tensor(output))

                handles.append(blocks[index - 1].register_forward_hook(post_hook))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1: ``[batch, seq, d]`` x ``[batch, seq]`` -> ``[batch, d]``.

    Rows with an empty mask give zeros (and should be dropped by the caller).
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One position per row: ``[batch, seq, d]`` x ``[batch]`` -> ``[batch, d]``."""
    index = positions.to(hidden.device).long().view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)
