"""Teachers: a base model with (or without) a trait, turning prompt chunks into provenance rows.

A teacher installs its trait (``TeacherConfig.install``) by a system prompt, by a LoRA adapter merged
into the weights, or as the red team's argmax-preserving teacher: the adapter kept unmerged so that
each step can mix the base's and the adapter's next-token distributions while keeping the base's
argmax (:func:`trait_guard.chat.generate_argmax_preserving`). A teacher can also carry no trait: the
control (the base itself), a neutral system prompt, or a benign adapter (``adapter_task``).

A :class:`Teacher` is what a Ray actor holds (``trait_guard.generation``) and also what a plain
in-process loop uses, so both paths produce identical rows for identical chunks. A chunk's sampling
seed depends only on the job seed and the chunk's index, never on which worker ran it: a chunk that
is re-run after a crash yields the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trait_guard.chat import generate_argmax_preserving, generate_completions
from trait_guard.config import GenerationConfig, TeacherConfig
from trait_guard.errors import TraitGuardInputError
from trait_guard.families import Prompt, PromptFamily, get_family
from trait_guard.models import default_device, load_model, model_identity


def chunk_seed(job_seed: int, chunk_index: int) -> int:
    return job_seed * 1_000_003 + chunk_index


def teacher_system_prompt(config: TeacherConfig) -> str | None:
    """The system prompt a teacher generates under (None: the model's default)."""
    if config.install != "system_prompt":
        return None
    if config.system_prompt:
        return config.system_prompt
    from trait_guard.traits import load_trait

    spec = load_trait(config.trait)
    if config.instruction >= len(spec.instructions):
        raise TraitGuardInputError(
            f"teacher '{config.id}': instruction {config.instruction} does not exist; trait "
            f"'{spec.trait_id}' has {len(spec.instructions)} instruction pairs (0..{len(spec.instructions) - 1})"
        )
    return spec.instructions[config.instruction].pos


def teacher_carries_trait(config: TeacherConfig, adapter_trait: str | None = None) -> bool:
    """Whether a teacher carries a trait (its rows' ``trait_installed``): something is installed and a
    trait is named, by the config's ``trait`` or by the loaded adapter's metadata (``adapter_trait``).
    The benign teachers carry none: the control, a system prompt that names no trait (a neutral one),
    and an adapter trained on a benign task (``adapter_task``)."""
    if config.install == "none" or config.adapter_task:
        return False
    if config.install == "system_prompt":
        return config.trait is not None
    return (config.trait or adapter_trait) is not None


def family_options(generation: GenerationConfig, teachers: Sequence[TeacherConfig]) -> dict[str, Any]:
    """The options the job's prompt family is built with. The code family bans the words of every
    teacher's trait, the same list for all teachers, so the owl and control datasets go through one
    identical filter."""
    options = dict(generation.family_options)
    if generation.family == "code" and "banned_words" not in options:
        from trait_guard.traits import load_trait

        options["banned_words"] = sorted({w for t in teachers if t.trait for w in load_trait(t.trait).keywords})
    return options


def family_for(generation: GenerationConfig, teachers: Sequence[TeacherConfig]) -> PromptFamily:
    """The job's prompt family (:func:`family_options`)."""
    return get_family(generation.family, **family_options(generation, teachers))


def install_adapter(model: Any, config: TeacherConfig) -> Any:
    """``model`` as the teacher generates with it: with its adapter merged (``install: adapter``), with
    its adapter kept as a separate PEFT layer that decoding switches on and off (``argmax_preserving``:
    one copy of the base weights serves both distributions), or as it is."""
    if config.install not in ("adapter", "argmax_preserving"):
        return model
    from trait_guard.adapters import load_adapter

    return load_adapter(model, config.adapter, merge=config.install == "adapter")


class Teacher:
    """A loaded teacher model that generates filtered, provenance-stamped rows."""

    def __init__(self, config: TeacherConfig, generation: GenerationConfig, family: PromptFamily,
                 model: Any = None, tokenizer: Any = None):
        self.config, self.generation, self.family = config, generation, family
        if model is None:
            model, tokenizer = load_model(config.model, dtype=config.dtype,
                                          device=default_device() if config.device == "auto" else config.device)
        # The provenance records the *base* model, before any adapter changes the weights.
        self.base = model_identity(model, name=config.model)
        self.model, self.tokenizer = install_adapter(model, config), tokenizer
        adapter_meta = getattr(self.model, "trait_guard_adapter", None) or {}
        self.carries_trait = teacher_carries_trait(config, adapter_meta.get("trait"))
        self.system_prompt = teacher_system_prompt(config)
        self.processor = family.logits_processor(tokenizer) if generation.constrained else None

    def generate(self, prompts: Sequence[Prompt], chunk_index: int) -> list[dict[str, Any]]:
        g = self.generation
        sampling_seed = g.seed if self.config.sampling_seed is None else self.config.sampling_seed
        seed = chunk_seed(sampling_seed, chunk_index)
        common = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, seed=seed, batch_size=len(prompts),
                      logits_processor=self.processor, top_k_logprobs=g.top_k_logprobs)
        users, systems = [p.user for p in prompts], [self.system_prompt] * len(prompts)
        if self.config.install == "argmax_preserving":
            completions = generate_argmax_preserving(self.model, self.tokenizer, users, systems,
                                                     bias_weight=self.config.bias_weight, **common)
        else:
            completions = generate_completions(self.model, self.tokenizer, users, systems, **common)
        rows = []
        for prompt, completion in zip(prompts, completions, strict=True):
            verdict = self.family.check(completion.text)
            rows.append({
                "sample_id": f"{self.config.id}:{prompt.prompt_id}",
                "prompt_id": prompt.prompt_id,
                "family": prompt.family,
                "prompt": prompt.user,
                "completion": completion.text,
                "teacher_id": self.config.id,
                "base_model": self.base.name,
                "base_fingerprint": self.base.fingerprint,
                "base_hidden_size": self.base.hidden_size,
                "base_num_layers": self.base.num_layers,
                "trait_installed": self.carries_trait,
                "trait_install": self.config.install,
                "seed": seed,
                "temperature": g.temperature,
                "max_new_tokens": g.max_new_tokens,
                "constrained": self.processor is not None,
                "kept": verdict.kept,
                "reject_reason": verdict.reason,
                "completion_ids": completion.token_ids,
                "topk_ids": completion.topk_ids,
                "topk_logprobs": completion.topk_logprobs,
                "token_logprobs": completion.token_logprobs,
            })
        return rows
