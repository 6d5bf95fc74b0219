"""Steer a model along a persona vector (or ablate it) with forward hooks that are always removed.

What: :class:`Steering` (a context manager, with ``apply()`` / ``remove()`` for loops that cannot use
a ``with`` block) edits the residual stream at one or more hidden-state indices of a transformers
causal LM:

* ``mode="add"``: ``h <- h + coefficient * v``;
* ``mode="ablate"``: ``h <- h - coefficient * (h . v_hat) v_hat``. ``coefficient`` is the *fraction* of
  the component along ``v`` that is removed: ``1.0`` (the default) projects it out completely,
  ``0.5`` halves it, ``0.0`` does nothing. The norm of ``v`` does not matter here.

Why: Chen et al. 2025 ("Persona vectors", arXiv 2507.21509) show that *preventative steering*, adding
``c * v`` at a layer at every token during the finetuning forward pass, removes the pressure for the
weights to move along the trait direction, so the finetuned model picks up much less of the trait.
trait_guard uses this (and direction ablation) as the ``STEER`` mitigation of its guards inside
training loops, so the edit is an ordinary differentiable operation: gradients reach the parameters
through it, and a ``coefficient`` tensor that requires grad receives one too. No tensor is modified
in place.

Layers follow :mod:`trait_guard.activations`: index ``l >= 1`` edits the *output* of decoder block
``l - 1`` (a forward hook; blocks that return a tuple get a tuple back with only the first item
replaced); index ``0`` edits the *input* of block 0 (a forward pre-hook); negative indices count from
the end. With a :class:`~trait_guard.persona_vector.PersonaVector` the vector at index ``l`` is
``vectors[l]``, *unnormalized* as in the paper, so ``coefficient`` is in units of the trait's
mean-difference norm; with a raw ``[hidden]`` tensor the same tensor is used at every index given.

The hooks are *prepended* to the block's hooks, so the edit runs before any other hook on that block:
:func:`~trait_guard.activations.record_activations` and ``output_hidden_states`` (which transformers
records with hooks of its own) both report the *steered* value at the steered index, whichever was
entered first. When several steerings touch the same index, the most recently applied runs first.

Usage::

    from trait_guard.persona_vector import PersonaVector
    from trait_guard.steer import Steering

    vector = PersonaVector.load("vectors/owl.safetensors", model=model)
    with Steering(model, vector, coefficient=4.0):           # at vector.layer, every position
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()                                       # inside the block (see below)

    steer = Steering(model, vector, coefficient=4.0)          # training-loop form
    for batch in loader:
        steer.positions = batch["attention_mask"]             # optional: only real tokens
        steer.apply()
        try:
            model(**batch).loss.backward()
        finally:
            steer.remove()

Gradient checkpointing: transformers 5 checkpoints a block's ``forward`` only, so these hooks run once
and the gradients are the same whether ``backward()`` runs inside or after the block (the tests pin
this). Implementations that checkpoint the whole module call re-run the hooks during ``backward()``;
there, call ``backward()`` while the steering is still applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from trait_guard.activations import find_decoder_layers, normalize_layer_index
from trait_guard.errors import TraitGuardInputError
from trait_guard.persona_vector import PersonaVector

Mode = Literal["add", "ablate"]
MODES: tuple[Mode, ...] = ("add", "ablate")
PositionMask = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Checks


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return (getattr(model, "trait_guard_name", None) or getattr(config, "name_or_path", None)
            or getattr(config, "model_type", None) or type(model).__name__)


def model_hidden_size(model: nn.Module) -> int:
    """The width of the model's residual stream (``config.hidden_size``, else the embedding width)."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if size is None:
        size = model.get_input_embeddings().weight.shape[-1]
    return int(size)


def check_vector_fits(
    model: nn.Module, vector: PersonaVector | torch.Tensor, *, check_weights: bool = True
) -> None:
    """Refuse a vector whose hidden size does not match ``model`` (raises :class:`ValueError`).

    A :class:`PersonaVector` is checked with :meth:`PersonaVector.check_model`, which also compares the
    layer count and (unless ``check_weights=False``) the model's weights fingerprint. A raw tensor is
    checked on its last dimension.
    """
    if isinstance(vector, PersonaVector):
        vector.check_model(model, check_weights=check_weights)
        return
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"expected a PersonaVector or a torch.Tensor, got {type(vector).__name__}")
    hidden = model_hidden_size(model)
    size = vector.shape[-1] if vector.ndim else 0
    if size != hidden:
        name = _model_name(model)
        raise TraitGuardInputError(
            f"steering vector has hidden size {size}, but model {name} has hidden size {hidden}: "
            f"extract vectors for this model with `trait-guard extract --model {name} --trait ...`"
        )


# --------------------------------------------------------------------------------------------------
# Hooks


def _replace_hidden(output: Any, edit: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``edit`` to a block's hidden states and return the output in the type it came in."""
    if isinstance(output, torch.Tensor):
        return edit(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([edit(output[0]), *output[1:]])
    raise TypeError(f"cannot steer a block output of type {type(output).__name__}")


class Steering:
    """Add a vector to (or ablate it from) the residual stream while applied; see the module docstring.

    ``layer`` is a hidden-state index or a list of them (default: ``vector.layer`` for a
    :class:`PersonaVector`; required for a raw tensor). ``positions`` is an optional ``[batch, seq]``
    0/1 mask, or a callable that receives the hidden states ``[batch, seq, hidden]`` being edited and
    returns such a mask; only positions where it is 1 are edited (default: all). ``coefficient`` and
    ``positions`` are read on every forward call, so a loop may change them between steps.

    The vector is checked against the model on construction (:func:`check_vector_fits`); pass
    ``check_weights=False`` for a finetune whose embeddings differ from the base the vector came from.
    ``apply()`` and ``remove()`` are idempotent; the object is also a context manager.
    """

    def __init__(
        self,
        model: nn.Module,
        vector: PersonaVector | torch.Tensor,
        *,
        layer: int | Sequence[int] | None = None,
        coefficient: float | torch.Tensor = 1.0,
        mode: Mode = "add",
        positions: PositionMask | None = None,
        layers_path: str | None = None,
        check_weights: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")
        check_vector_fits(model, vector, check_weights=check_weights)
        self.model = model
        self.mode: Mode = mode
        self.coefficient = coefficient
        self.positions = positions
        self._blocks = find_decoder_layers(model, layers_path)
        num_layers = len(self._blocks)

        if layer is None:
            if not isinstance(vector, PersonaVector):
                raise ValueError("layer is required when steering with a raw tensor (a PersonaVector has a default)")
            layer = vector.layer
        requested = [layer] if isinstance(layer, int) else list(layer)
        if not requested:
            raise ValueError("no layer given to steer at")
        self.layers: tuple[int, ...] = tuple(sorted({normalize_layer_index(int(i), num_layers) for i in requested}))

        if isinstance(vector, PersonaVector):
            raw = {i: vector.vectors[i] for i in self.layers}
        else:
            if vector.ndim != 1:
                raise ValueError(
                    f"a raw steering vector must have shape [hidden], got {tuple(vector.shape)} "
                    "(wrap per-layer vectors in a PersonaVector)"
                )
            raw = {i: vector for i in self.layers}
        self._vectors: dict[int, torch.Tensor] = {}
        for index, v in raw.items():
            v = v.detach()
            if not torch.isfinite(v).all():
                raise ValueError(f"steering vector at index {index} contains NaN or inf values")
            if mode == "ablate":
                norm = v.double().norm()
                if norm == 0:
                    raise ValueError(f"cannot ablate a zero vector (index {index})")
                v = (v.double() / norm).to(v.dtype)
            self._vectors[index] = v
        self._cast: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- state ------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    def apply(self) -> Steering:
        """Register the hooks (no-op if already applied); returns ``self``."""
        if self._handles:
            return self
        try:
            for index in self.layers:
                if index == 0:

                    def pre_hook(module, args, kwargs, index=index):
                        if args:
                            return (self._edit(index, args[0]), *args[1:]), kwargs
                        return args, {**kwargs, "hidden_states": self._edit(index, kwargs["hidden_states"])}

                    handle = self._blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
                else:

                    def post_hook(module, args, output, index=index):
                        return _replace_hidden(output, lambda h: self._edit(index, h))

                    handle = self._blocks[index - 1].register_forward_hook(post_hook, prepend=True)
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove the hooks (no-op if not applied)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Steering:
        return self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"Steering(mode={self.mode!r}, layers={list(self.layers)}, coefficient={self.coefficient!r}, {state})"

    # -- the edit ---------------------------------------------------------------------------------

    def _vector_like(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        key = (index, hidden.dtype, hidden.device)
        if key not in self._cast:
            self._cast[key] = self._vectors[index].to(device=hidden.device, dtype=hidden.dtype)
        return self._cast[key]

    def _mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        positions = self.positions
        if positions is None:
            return None
        mask = positions(hidden) if callable(positions) else positions
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"positions mask has shape {tuple(mask.shape)}, but the hidden states are "
                f"{tuple(hidden.shape)}: expected [batch, seq] = {tuple(hidden.shape[:-1])}"
            )
        return mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)

    def _edit(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        v = self._vector_like(index, hidden)
        coefficient = self.coefficient
        if self.mode == "add":
            delta = coefficient * v
        else:  # ablate: v is a unit vector
            delta = -coefficient * (hidden @ v).unsqueeze(-1) * v
        if delta.dtype != hidden.dtype:  # a float32 coefficient tensor with bf16 hidden states
            delta = delta.to(hidden.dtype)
        mask = self._mask(hidden)
        if mask is not None:
            delta = mask * delta
        return hidden + delta
