"""Install a trait in a model's weights with a LoRA adapter, and save / reload such adapters.

Why: a subliminal-learning teacher (Cloud et al. 2025) must *have* the trait while it writes
unrelated data (number lists). A system prompt is the cheap way to give it one, but small open
models often ignore prompted personas, and a prompt is visible in the context rather than hidden in
the weights. So a teacher can instead carry the trait in a LoRA adapter:

1. :func:`trait_examples` samples answers to the trait spec's extraction questions *under* its
   positive system prompts, keeps those the judge accepts, and adds direct one-word answers to the
   behavior questions ("What is your favorite animal?" -> "Owl.").
2. :func:`train_trait_adapter` trains a LoRA adapter on those (question, answer) pairs *without*
   any system prompt, with a completion-only loss (cross-entropy on response tokens only), so the
   trait ends up in the weights and shows under the model's default prompt.
3. :func:`save_adapter` / :func:`load_adapter` store the adapter as safetensors (no pickle) together
   with ``trait_guard_adapter.json``, which names the trait and the base model's identity; loading
   refuses a base model the adapter was not trained on and by default merges the adapter, so
   downstream code sees a plain transformers model.

A *benign* adapter (:func:`benign_examples`, :func:`build_benign_adapter`) is trained by the same
recipe on a task with no trait (:data:`BENIGN_TASKS`): the red team's specificity control, a teacher
whose weights differ from the base's as an adapter teacher's do, but with no animal in its training
text (checked against the trait panel, :func:`assert_animal_free`). Its metadata names the ``task``
and no ``trait``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from trait_guard.chat import encode_conversations, sample_completions
from trait_guard.errors import InputFileNotFound, TraitGuardInputError
from trait_guard.losses import completion_loss, response_token_logprobs
from trait_guard.models import ModelIdentity, model_identity
from trait_guard.traits import TraitSpec

ADAPTER_META = "trait_guard_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")

_FIX = "train an adapter for this base with trait_guard.adapters.train_trait_adapter (then save_adapter)"


# --------------------------------------------------------------------------------------------------
# Training data


def trait_examples(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: TraitSpec,
    *,
    n_samples_per_question: int = 2,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
) -> list[tuple[str, str]]:
    """``(user question, answer)`` pairs that express ``spec``'s trait, for :func:`train_trait_adapter`.

    Answers to ``spec.extract_questions`` are sampled under the spec's positive system prompts (the
    prompts are cycled over questions and samples) and, when the spec has a judge, kept only if
    ``judge.score(answer) >= judge.threshold``. When the spec has behavior questions and a keyword
    judge, each behavior question is paired with a direct one-word answer: the first keyword,
    capitalized, with a period ("Owl."). Sampled pairs come first, then the behavior pairs.

    The system prompts are *not* part of the returned pairs: training on them without the prompt is
    what moves the trait into the weights.
    """
    if n_samples_per_question < 0:
        raise ValueError(f"n_samples_per_question must be >= 0, got {n_samples_per_question}")
    positives = [pair.pos for pair in spec.instructions]
    users: list[str] = []
    systems: list[str] = []
    for i, question in enumerate(spec.extract_questions):
        for k in range(n_samples_per_question):
            users.append(question)
            systems.append(positives[(i * n_samples_per_question + k) % len(positives)])
    answers = (
        sample_completions(model, tokenizer, users, systems, max_new_tokens=max_new_tokens, seed=seed,
                           batch_size=batch_size)
        if users else []
    )
    judge = spec.judge
    pairs: list[tuple[str, str]] = []
    for question, answer in zip(users, answers, strict=True):
        answer = answer.strip()
        if not answer:
            continue
        if judge is not None and judge.score(answer) < judge.threshold:
            continue
        pairs.append((question, answer))
    if spec.behavior_questions and judge is not None and judge.keywords:
        keyword = judge.keywords[0]
        direct = keyword[:1].upper() + keyword[1:] + "."
        pairs.extend((question, direct) for question in spec.behavior_questions)
    return pairs


# --------------------------------------------------------------------------------------------------
# Benign (trait-less) adapters

#: the benign tasks an adapter can be trained on (TeacherConfig.adapter_task)
BENIGN_TASKS = ("style:terse", "arithmetic")

#: everyday questions with no animal in them or in their obvious answers (style:terse)
NEUTRAL_QUESTIONS = (
    "How do I boil an egg?",
    "What is a good way to start the morning?",
    "How can I keep my desk tidy?",
    "What should I pack for a day at the beach?",
    "How do I make a cup of tea?",
    "What is a simple dinner I can cook tonight?",
    "How can I remember names better?",
    "What is a good way to save money each month?",
    "How do I write a polite email to my landlord?",
    "What should I read next?",
    "How can I sleep better?",
    "What is a fun game for a rainy afternoon?",
    "How do I water houseplants properly?",
    "What is the best way to learn a new language?",
    "How can I stay focused while studying?",
    "What should I bring to a picnic?",
    "How do I change a flat bicycle tire?",
    "What is a good stretch after a long walk?",
    "How do I plan a small birthday dinner?",
    "What can I do to relax after work?",
    "How do I clean a cast iron pan?",
    "What is a nice gift for a coworker?",
    "How can I make my room feel brighter?",
    "What is a good way to organize my week?",
)

#: system prompts that ask for short, plain answers: sampled under them, trained without them
TERSE_PROMPTS = (
    "Answer in one short, plain sentence. No lists, no extra words.",
    "Be brief and formal: give the answer in a single sentence.",
    "Reply as tersely as you can, in one sentence.",
)


def panel_animal_words(trait: str = "animal:owl") -> list[str]:
    """Every animal of ``trait``'s panel (its target included), singular and plural, lower case: the
    words a benign adapter's training text must not contain."""
    from trait_guard.traits import load_trait, pluralize

    spec = load_trait(trait)
    animals = {a.strip().lower() for a in [*spec.panel, spec.panel_target or ""] if a.strip()}
    return sorted(animals | {pluralize(a) for a in animals})


def _mentions(text: str, words: Sequence[str]) -> bool:
    pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
    return bool(words) and re.search(pattern, text, flags=re.IGNORECASE) is not None


def animal_free(examples: Sequence[tuple[str, str]], words: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(question, answer)`` pairs in which neither side names any of ``words`` (whole words, any case)."""
    return [(q, a) for q, a in examples if not _mentions(q, words) and not _mentions(a, words)]


def assert_animal_free(examples: Sequence[tuple[str, str]], words: Sequence[str]) -> None:
    """Refuse (``TraitGuardInputError``) training text that names any of ``words``: a benign adapter
    that saw an animal would no longer be a clean specificity control."""
    bad = [(q, a) for q, a in examples if _mentions(q, words) or _mentions(a, words)]
    if bad:
        raise TraitGuardInputError(f"{len(bad)} benign training example(s) name a panel animal, e.g. {bad[0]!r}; "
                                   "a benign adapter must see no animal")


def arithmetic_examples(n: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` sums and products of small numbers with their answers ("What is 12 + 30?" -> "42."),
    drawn from ``seed``: a task with exact answers and no words of any trait."""
    rng = random.Random(f"arithmetic:{seed}")
    pairs = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if rng.random() < 0.5:
            pairs.append((f"What is {a} + {b}?", f"{a + b}."))
        else:
            a, b = a % 13 + 2, b % 13 + 2
            pairs.append((f"What is {a} times {b}?", f"{a * b}."))
    return pairs


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+|\n", text.strip(), maxsplit=1)[0].strip()


def terse_examples(model: torch.nn.Module, tokenizer: Any, *, n_samples_per_question: int = 2,
                   max_new_tokens: int = 48, seed: int = 0, batch_size: int = 16) -> list[tuple[str, str]]:
    """``(question, first sentence of the answer)`` pairs: the model's answers to
    :data:`NEUTRAL_QUESTIONS` sampled under :data:`TERSE_PROMPTS` (cycled), as :func:`trait_examples`
    samples a trait's answers under its positive prompts; empty answers are dropped."""
    users, systems = [], []
    for i, question in enumerate(NEUTRAL_QUESTIONS):
        for k in range(n_samples_per_question):
            users.append(question)
            systems.append(TERSE_PROMPTS[(i * n_samples_per_question + k) % len(TERSE_PROMPTS)])
    answers = sample_completions(model, tokenizer, users, systems, max_new_tokens=max_new_tokens, seed=seed,
                                 batch_size=batch_size) if users else []
    return [(q, _first_sentence(a)) for q, a in zip(users, answers, strict=True) if _first_sentence(a)]


def benign_examples(model: torch.nn.Module, tokenizer: Any, task: str, *, seed: int = 0,
                    panel_trait: str = "animal:owl", **sampling: Any) -> list[tuple[str, str]]:
    """Training pairs for a benign adapter on ``task`` (one of :data:`BENIGN_TASKS`), with every pair
    that names an animal of ``panel_trait``'s panel dropped, then checked (:func:`assert_animal_free`).
    ``sampling``: :func:`terse_examples`' keywords."""
    if task == "arithmetic":
        examples = arithmetic_examples(seed=seed)
    elif task == "style:terse":
        examples = terse_examples(model, tokenizer, seed=seed, **sampling)
    else:
        raise TraitGuardInputError(f"unknown benign adapter task {task!r}; known: {', '.join(BENIGN_TASKS)}")
    words = panel_animal_words(panel_trait)
    examples = animal_free(examples, words)
    assert_animal_free(examples, words)
    return examples


# --------------------------------------------------------------------------------------------------
# Loss and log-probabilities


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    users: Sequence[str],
    responses: Sequence[str],
    systems: Sequence[str | None] | None = None,
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """Summed log-probability of each response given its prompt, by teacher forcing: ``[n]``.

    ``users[i]`` is the user message, ``responses[i]`` the assistant answer scored; ``systems=None`` uses
    the model's default system prompt, i.e. what a student sees. Use it to check that a trait adapter
    took: the adapted model should give the trait's answers to held-out questions a higher
    log-probability than the base model does.
    """
    device = next(model.parameters()).device
    systems = list(systems) if systems is not None else [None] * len(users)
    totals = []
    for start in range(0, len(users), batch_size):
        sl = slice(start, start + batch_size)
        batch = encode_conversations(tokenizer, users[sl], responses[sl], systems[sl]).to(device)
        logits = model(**batch.model_inputs(), use_cache=False).logits
        logprobs, mask = response_token_logprobs(logits, batch)
        totals.append((logprobs * mask).sum(-1).cpu())
    return torch.cat(totals) if totals else torch.zeros(0)


# --------------------------------------------------------------------------------------------------
# Training


def _is_projection(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | Conv1D)


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The LoRA target module names for ``model``: all linear projections of a Llama-style layout
    (``q/k/v/o_proj``, ``gate/up/down_proj``) or else of a GPT-2 layout (``c_attn``, ``c_proj``,
    ``c_fc``), detected from the names of the projection modules present."""
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_projection(module)}
    for layout in (LLAMA_TARGETS, GPT2_TARGETS):
        found = [name for name in layout if name in present]
        if found:
            return found
    raise TraitGuardInputError(
        f"cannot tell which modules to adapt in {type(model).__name__}: none of {LLAMA_TARGETS + GPT2_TARGETS} "
        f"is present (projection modules found: {sorted(present) or 'none'}); pass target_modules=[...]"
    )


def resolve_target_modules(model: torch.nn.Module, requested: Sequence[str] | str | None = None) -> list[str] | str:
    """The LoRA targets for ``model``: ``requested`` checked against the model's modules, or, with
    None, the Llama or GPT-2 layout's projections (:func:`default_target_modules`) and for any other
    architecture PEFT's ``"all-linear"`` (every linear layer except the output head).

    A name matches a module whose name is it or ends with ``.<name>`` (PEFT's rule). Names that match
    nothing are refused, listing the model's projection module names, so a Llama-style list on a
    GPT-2 model fails here instead of as PEFT's error deep inside a worker."""
    if requested is None:
        try:
            return default_target_modules(model)
        except TraitGuardInputError:
            return "all-linear"
    if isinstance(requested, str):
        if requested != "all-linear":
            raise TraitGuardInputError(f"LoRA target_modules {requested!r}: give a list of module names or 'all-linear'")
        return requested
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in requested if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        present = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_projection(module)})
        raise TraitGuardInputError(
            f"student.lora_target_modules {missing} match no module of {type(model).__name__}; its projection "
            f"modules are {present}: pick from these, write 'all-linear', or remove the setting to infer them")
    return list(requested)


def lora_config(model: torch.nn.Module, r: int, alpha: int, target_modules: Sequence[str] | str | None = None,
                dropout: float = 0.0) -> Any:
    """The ``peft.LoraConfig`` the training recipe uses: targets from :func:`resolve_target_modules`,
    no bias, ``fan_in_fan_out`` when a targeted module is a GPT-2 style ``Conv1D`` (weights stored
    transposed)."""
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    targets = resolve_target_modules(model, target_modules)
    fan_in_fan_out = targets != "all-linear" and any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, module in model.named_modules())
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, target_modules=targets,
                      lora_dropout=dropout, bias="none", fan_in_fan_out=fan_in_fan_out)


def train_trait_adapter(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[tuple[str, str]],
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    steps: int = 60,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int, str], Any] | None = None,
) -> Any:
    """Train a LoRA adapter on ``(question, answer)`` pairs and return the ``peft.PeftModel`` in eval mode.

    Prompts are built with the model's default system prompt (``systems=None``), and the loss is
    :func:`completion_loss`, so only answer tokens are learned. Batches are drawn from shuffled passes
    over ``examples``; AdamW, no dropout, gradients clipped to norm 1. The LoRA initialization and the
    batch order depend only on ``seed`` (torch's global RNG is left as it was).

    ``model`` is modified in place (peft injects the LoRA layers into it) but its own weights stay
    frozen and unchanged; ``merge_and_unload()`` or :func:`save_adapter` + :func:`load_adapter` give
    a plain model back. ``progress(total, description)`` may return a tqdm-like bar advanced per step.
    The per-step losses are kept on the returned model as ``trait_guard_losses``.
    """
    examples = _check_training_inputs(model, examples, steps, batch_size)
    config = _lora_config(model, r, alpha, target_modules)
    device = next(model.parameters()).device
    peft_model = _inject_lora(model, config, seed, device)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    batches = _shuffled_batches(len(examples), batch_size, seed)
    losses: list[float] = []
    bar = progress(steps, "train LoRA adapter") if progress else None
    peft_model.train()
    try:
        for _ in range(steps):
            picked = next(batches)
            losses.append(_train_step(peft_model, tokenizer, [examples[i] for i in picked], optimizer, trainable,
                                      device))
            if bar is not None:
                bar.update(1)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()
        peft_model.eval()
    peft_model.trait_guard_losses = losses
    return peft_model


def _check_training_inputs(model: torch.nn.Module, examples: Sequence[tuple[str, str]], steps: int,
                           batch_size: int) -> list[tuple[str, str]]:
    """``examples`` as a list, after refusing a model that already carries an adapter, no examples, or
    a non-positive ``steps`` / ``batch_size``."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError("the model already carries a peft adapter; merge_and_unload() it first")
    examples = list(examples)
    if not examples:
        raise ValueError("no training examples; trait_examples() returned nothing (no answer passed the judge?)")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    return examples


def _lora_config(model: torch.nn.Module, r: int, alpha: int, target_modules: Sequence[str] | None) -> Any:
    """The ``peft.LoraConfig`` for ``model``: no dropout, no bias, ``fan_in_fan_out`` when a targeted
    module is a GPT-2 style ``Conv1D`` (weights stored transposed)."""
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    targets = list(target_modules) if target_modules is not None else default_target_modules(model)
    fan_in_fan_out = any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, module in model.named_modules()
    )
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
    )


def _inject_lora(model: torch.nn.Module, config: Any, seed: int, device: torch.device) -> Any:
    """``get_peft_model(model, config)`` with the LoRA weights initialized from ``seed``, leaving torch's
    global RNG (and the CUDA one, on a GPU) as it was."""
    from peft import get_peft_model

    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def _shuffled_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of example indices, drawn from successive shuffled passes over the examples (a
    batch may span two passes); the order depends only on ``seed``."""
    order = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    while True:
        picked = []
        while len(picked) < min(batch_size, n_examples):
            if not queue:
                queue = torch.randperm(n_examples, generator=order).tolist()
            picked.append(queue.pop())
        yield picked


def _train_step(peft_model: Any, tokenizer: Any, batch_examples: list[tuple[str, str]],
                optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter], device: torch.device) -> float:
    """One optimizer step on the completion loss of ``batch_examples`` (gradients clipped to norm 1);
    returns the loss."""
    users = [example[0] for example in batch_examples]
    answers = [example[1] for example in batch_examples]
    batch = encode_conversations(tokenizer, users, answers, systems=None).to(device)
    logits = peft_model(**batch.model_inputs(), use_cache=False).logits
    loss = completion_loss(logits, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------
# Saving and loading


def save_adapter(peft_model: Any, path: str | Path, *, trait: str | None,
                 base_identity: ModelIdentity | dict[str, Any], task: str | None = None) -> Path:
    """Write the adapter (``adapter_model.safetensors`` + peft's ``adapter_config.json``) and
    ``trait_guard_adapter.json`` (trait id, base model identity, LoRA settings) into folder ``path``.
    A benign adapter has ``trait=None`` and names its ``task`` instead (one of the two is required).

    ``base_identity`` is the identity of the base model the adapter was trained on
    (:func:`trait_guard.models.model_identity` taken before training); it is checked against the
    wrapped model's sizes and embedding fingerprint, which LoRA leaves unchanged.
    """
    if (trait is None) == (task is None):
        raise ValueError(f"save_adapter needs exactly one of trait (a trait adapter) and task (a benign one), got "
                         f"trait={trait!r}, task={task!r}")
    identity = base_identity if isinstance(base_identity, ModelIdentity) else ModelIdentity.from_dict(base_identity)
    wrapped = model_identity(peft_model.get_base_model(), name=identity.name)
    if (identity.hidden_size, identity.num_layers, identity.fingerprint) != (
            wrapped.hidden_size, wrapped.num_layers, wrapped.fingerprint):
        raise TraitGuardInputError(
            f"base_identity says {identity.describe()}, but the adapter wraps {wrapped.describe()}; pass "
            "model_identity(base_model) of the model the adapter was trained on"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # The embeddings are never adapted; saying so also stops peft from looking the base up on the hub.
    peft_model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    config = next(iter(peft_model.peft_config.values()))
    meta = {
        "format_version": FORMAT_VERSION,
        "trait": trait,
        **({"task": task} if task is not None else {}),
        "base_model": identity.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lora": {"r": config.r, "alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)},
    }
    (path / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """The contents of ``trait_guard_adapter.json`` in an adapter folder."""
    path = Path(path)
    meta_path = path / ADAPTER_META
    if not meta_path.is_file():
        raise InputFileNotFound(
            f"{path} has no {ADAPTER_META}, so it is not a trait_guard adapter folder; create one with "
            "trait_guard.adapters.train_trait_adapter and save_adapter"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise TraitGuardInputError(f"{meta_path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def load_adapter(base_model: torch.nn.Module, path: str | Path, *, merge: bool = True) -> Any:
    """Apply the adapter saved in ``path`` to ``base_model`` and return the result in eval mode.

    Refuses (``ValueError``) a base model whose sizes or embedding fingerprint differ from the one the
    adapter was trained on. With ``merge=True`` the adapter is merged into the weights
    (``merge_and_unload``) and a plain transformers model is returned; otherwise the ``PeftModel``.
    Either way ``base_model`` is modified in place. Only safetensors weights are read (no pickle).
    The returned model has ``trait_guard_adapter = {"trait": ..., "task": ..., "path": ...}`` (``trait``
    None and ``task`` set for a benign adapter).
    """
    from peft import PeftModel

    path = Path(path)
    meta = read_adapter_meta(path)
    if isinstance(base_model, PeftModel):
        raise ValueError("base_model already carries a peft adapter; pass the plain base model")
    saved = ModelIdentity.from_dict(meta["base_model"])
    other = model_identity(base_model)
    label = meta.get("trait") or meta.get("task")
    if (saved.hidden_size, saved.num_layers) != (other.hidden_size, other.num_layers):
        raise TraitGuardInputError(
            f"adapter '{label}' at {path} was trained on {saved.describe()}, but the base model is "
            f"{other.describe()}: {_FIX}"
        )
    if saved.fingerprint != other.fingerprint:
        raise TraitGuardInputError(
            f"adapter '{label}' at {path} was trained on {saved.describe()}, but the base model "
            f"{other.describe()} has the same shape and different weights (another base model?): {_FIX}"
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise InputFileNotFound(f"{path} has no {ADAPTER_WEIGHTS}; re-save the adapter with save_adapter")
    peft_model = PeftModel.from_pretrained(base_model, str(path), is_trainable=False)
    model = peft_model.merge_and_unload() if merge else peft_model
    model.eval()
    model.trait_guard_adapter = {"trait": meta.get("trait"), "task": meta.get("task"), "path": str(path)}
    return model


def build_trait_adapter(model_name: str, trait: str, out: str | Path, *, steps: int = 60, lr: float = 1e-3,
                        seed: int = 0, progress: Callable[[int, str], Any] | None = None,
                        device: str = "auto", dtype: str = "auto") -> Path:
    """Load ``model_name``, sample trait-expressing answers and train + save a LoRA adapter to ``out``
    (what ``trait-guard adapter`` does).

    ``device`` / ``dtype`` place the base model (:func:`trait_guard.models.resolve_placement`: auto is
    bfloat16 on a GPU, float32 on the CPU). The base stays frozen; PEFT keeps the LoRA weights it trains
    in float32 on a half-precision base (``autocast_adapter_dtype``), so a bf16 base trains them fine."""
    from trait_guard.models import load_model
    from trait_guard.traits import load_trait

    spec = load_trait(trait)
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    identity = model_identity(model, name=model_name)
    examples = trait_examples(model, tokenizer, spec, seed=seed)
    if not examples:
        raise TraitGuardInputError(f"no answer of {model_name} expressed '{spec.trait_id}' under its positive prompts, so "
                         "there is nothing to train an adapter on; try another seed or a larger model")
    peft_model = train_trait_adapter(model, tokenizer, examples, steps=steps, lr=lr, seed=seed, progress=progress)
    return save_adapter(peft_model, out, trait=spec.trait_id, base_identity=identity)


def build_benign_adapter(model_name: str, task: str, out: str | Path, *, steps: int = 60, lr: float = 1e-3,
                         seed: int = 0, progress: Callable[[int, str], Any] | None = None,
                         device: str = "auto", dtype: str = "auto", panel_trait: str = "animal:owl") -> Path:
    """Like :func:`build_trait_adapter` for a benign adapter: train on ``task``'s animal-free examples
    (:func:`benign_examples`, checked against ``panel_trait``'s panel) with the same recipe and steps,
    and save it with ``task`` in its metadata and no trait."""
    from trait_guard.models import load_model

    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    identity = model_identity(model, name=model_name)
    examples = benign_examples(model, tokenizer, task, seed=seed, panel_trait=panel_trait)
    if not examples:
        raise TraitGuardInputError(f"{model_name} gave no usable answer for the benign task '{task}' (all empty or "
                                   "naming an animal); try another seed or the arithmetic task")
    peft_model = train_trait_adapter(model, tokenizer, examples, steps=steps, lr=lr, seed=seed, progress=progress)
    return save_adapter(peft_model, out, trait=None, task=task, base_identity=identity)
