"""Tiny random-init causal LMs with a character tokenizer, for tests and quick benchmarks.

They need no download and build in milliseconds, yet they are real transformers models (Llama and
GPT-2 layouts) with a real fast tokenizer and a ChatML chat template, so every code path that runs on
SmolLM2 or Qwen also runs on them. :func:`save_tiny_model` writes one to a folder that
:func:`trait_guard.models.load_model` (and a Ray actor on another process) can load by path.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import torch

from trait_guard.models import prepare_tokenizer

SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_char_tokenizer() -> Any:
    """A fast tokenizer with one token per printable ASCII character plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return prepare_tokenizer(tokenizer)


def make_tiny_model(
    kind: Literal["llama", "gpt2"] = "llama",
    *,
    hidden_size: int = 32,
    num_layers: int = 4,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any]:
    """A random-init ``(model, tokenizer)`` pair in eval mode; deterministic for a given seed."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = make_char_tokenizer()
    vocab_size = len(tokenizer)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use 'llama' or 'gpt2'")
    config.name_or_path = f"tiny-{kind}-seed{seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.trait_guard_name = config.name_or_path
    return model, tokenizer


def save_tiny_model(path: str | Path, kind: Literal["llama", "gpt2"] = "llama", **kwargs: Any) -> Path:
    """Build a tiny model and save it (weights + tokenizer) to ``path``; returns the path."""
    model, tokenizer = make_tiny_model(kind, **kwargs)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def kill_live_actor(class_fragment: str) -> int:
    """SIGKILL one live Ray actor process on this machine whose class name contains ``class_fragment``
    (its process title, e.g. ``ray::MapWorker(MapBatches(TeacherBatches))``): a crash as the OS would
    deliver it, for fault tests. Returns the killed pid."""
    import os
    import signal

    import psutil

    for process in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::") and class_fragment in title and "IDLE" not in title:
            os.kill(process.info["pid"], signal.SIGKILL)
            return process.info["pid"]
    raise RuntimeError(f"no live Ray actor process with '{class_fragment}' in its title")


def write_teacher_file(path: str | Path, rows: list[dict[str, Any]], *, teacher_id: str,
                       identity: Any = None) -> Path:
    """Write ``rows`` (at least ``prompt``, ``completion``, ``completion_ids``; any other schema column
    kept) as a teacher-data Parquet file, the provenance columns filled in: for tests and benchmarks
    that need a file the checked reader accepts. ``identity``: the base model's
    :class:`~trait_guard.models.ModelIdentity` (default: none recorded)."""
    from trait_guard.dataset import RowWriter

    base = {"base_model": identity.name if identity else "test", "base_fingerprint": identity.fingerprint if identity else "",
            "base_hidden_size": identity.hidden_size if identity else 0,
            "base_num_layers": identity.num_layers if identity else 0}
    with RowWriter(path) as writer:
        writer.write({"sample_id": f"{teacher_id}:{i:06d}", "prompt_id": f"p{i:06d}", "family": "numbers",
                      "teacher_id": teacher_id, **base, "trait_installed": False, "trait_install": "none", "seed": 0,
                      "temperature": 1.0, "max_new_tokens": 64, "constrained": True, "kept": True, "reject_reason": "",
                      "topk_ids": None, "topk_logprobs": None, "token_logprobs": None, **row}
                     for i, row in enumerate(rows))
    return Path(path)
