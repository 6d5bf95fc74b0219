"""The persona vector artifact: per-layer trait directions tied to the model they came from.

What: :class:`PersonaVector` holds one unnormalized direction per hidden-state index ``0..L`` of one
model, the layer chosen for use, and the model's identity (:class:`~trait_guard.models.ModelIdentity`).
It is saved as safetensors with its metadata in the file header, plus a readable JSON copy beside it.

Why a module of its own: the artifact is used everywhere (steering hooks, fingerprints, the guards,
the trainers), while extraction (:mod:`trait_guard.persona`) needs models, sampling and the steering
hooks. Keeping the file format here lets :mod:`trait_guard.steer` use it without importing extraction.
Loading checks the model identity, so a vector is never silently applied to a model it was not
extracted from (:class:`PersonaVectorMismatch` names the fix).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from trait_guard.errors import InputFileNotFound, TraitGuardInputError
from trait_guard.models import ModelIdentity, model_identity

Method = Literal["response_mean", "last_prompt"]
METHODS: tuple[Method, ...] = ("response_mean", "last_prompt")
FORMAT_VERSION = 1


class PersonaVectorMismatch(TraitGuardInputError):
    """A persona vector is being used with a model it was not extracted from."""


@dataclass
class PersonaVector:
    """Per-layer trait directions for one model: ``vectors[l]`` lives at hidden-state index ``l``."""

    trait: str
    model: ModelIdentity
    vectors: torch.Tensor  # [num_layers + 1, hidden], unnormalized
    layer: int
    method: Method = "response_mean"
    separation: list[float] = field(default_factory=list)  # held-out Cohen's d per index (NaN: not measured)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = (self.model.num_layers + 1, self.model.hidden_size)
        if tuple(self.vectors.shape) != expected:
            raise TraitGuardInputError(f"vectors have shape {tuple(self.vectors.shape)}, expected {expected} for {self.model.name}")
        if not torch.isfinite(self.vectors).all():
            raise TraitGuardInputError(f"persona vector for '{self.trait}' contains NaN or inf values; re-extract it")
        if not 0 <= self.layer <= self.model.num_layers:
            raise TraitGuardInputError(f"layer {self.layer} is outside 0..{self.model.num_layers}")

    def direction(self, layer: int | None = None) -> torch.Tensor:
        """Unit vector at ``layer`` (default: the chosen layer)."""
        v = self.vectors[self.layer if layer is None else layer]
        return v / v.norm().clamp_min(1e-12)

    def project(self, activations: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Scalar projection ``(a . v) / ||v||`` of activations ``[..., hidden]`` at ``layer``."""
        return activations.float() @ self.direction(layer).to(activations.device)

    def check_model(self, model: torch.nn.Module | ModelIdentity, *, check_weights: bool = True) -> None:
        """Refuse a model this vector was not extracted from, saying how to get the right vector."""
        other = model if isinstance(model, ModelIdentity) else model_identity(model)
        mine = self.model
        fix = f"extract vectors for it with `trait-guard extract --model {other.name} --trait {self.trait}`"
        if (mine.hidden_size, mine.num_layers) != (other.hidden_size, other.num_layers):
            raise PersonaVectorMismatch(
                f"persona vector '{self.trait}' was extracted from {mine.describe()}, but the model is "
                f"{other.describe()}: {fix}"
            )
        if check_weights and mine.fingerprint != other.fingerprint:
            raise PersonaVectorMismatch(
                f"persona vector '{self.trait}' was extracted from {mine.describe()}, but the model "
                f"{other.describe()} has the same shape and different weights (another base model?): {fix}. "
                "If the model is a finetune of the same base whose embeddings changed, pass check_weights=False."
            )

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "trait": self.trait,
            "model": self.model.to_dict(),
            "layer": self.layer,
            "method": self.method,
            "separation": [None if math.isnan(x) else x for x in self.separation],
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors, metadata in the header) and a readable ``.json`` beside it."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = self._header()
        save_file({"vectors": self.vectors.detach().float().contiguous().cpu()}, str(path),
                  metadata={"trait_guard": json.dumps(header)})
        path.with_suffix(".json").write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module | ModelIdentity | None = None) -> PersonaVector:
        """Read a saved vector; with ``model`` given, refuse it unless it was extracted from that model."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InputFileNotFound(f"persona vector file {path} does not exist; create it with `trait-guard extract`")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["trait_guard"])
                vectors = handle.get_tensor("vectors")
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise TraitGuardInputError(
                f"{path} is not a trait_guard persona vector file ({err}); re-create it with `trait-guard extract`"
            ) from err
        if header.get("format_version") != FORMAT_VERSION:
            raise TraitGuardInputError(f"{path} has format version {header.get('format_version')}, expected {FORMAT_VERSION}")
        vector = cls(
            trait=header["trait"],
            model=ModelIdentity.from_dict(header["model"]),
            vectors=vectors,
            layer=int(header["layer"]),
            method=header["method"],
            separation=[math.nan if x is None else float(x) for x in header["separation"]],
            meta=header.get("meta", {}),
        )
        if model is not None:
            vector.check_model(model)
        return vector
