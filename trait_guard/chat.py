"""Chat prompts as token ids: build them, batch them, sample completions from them.

One place decides how a (system, user, response) triple becomes tokens, so that persona-vector
extraction, teacher generation, fingerprints and the student's completion-only loss all agree on
which positions are "the response" and which is "the last prompt token".

``system=None`` means the model's own default (the chat template's), which is what a student sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def render_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The chat-formatted prompt text, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class EncodedBatch:
    """Right-padded token ids with the masks every consumer needs.

    Right padding keeps each row's positions starting at 0, so activations of the real tokens are
    exactly those of the unpadded sequence (causal attention never looks at the pads that follow).
    """

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    response_mask: torch.Tensor  # [batch, seq], 1 on response tokens
    last_prompt_index: torch.Tensor  # [batch], position of the last prompt token

    def to(self, device: str | torch.device) -> EncodedBatch:
        return EncodedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                      self.response_mask, self.last_prompt_index)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def response_logprob_sums(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row, the sum (float64) of the teacher-forced log-probabilities of its response tokens,
        from ``logits`` of a forward pass on this batch. Only the response positions are normalized
        (no [batch, seq, vocab] log-softmax is held)."""
        predicted = self.response_mask[:, 1:].bool()  # the token at t+1 is predicted by the logits at t
        n = predicted.shape[0]
        rows = torch.arange(n, device=predicted.device).unsqueeze(1).expand_as(predicted)[predicted]
        token_logits = logits[:, :-1][predicted].float()
        tokens = self.input_ids[:, 1:][predicted]
        token_logps = torch.log_softmax(token_logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        per_row = torch.zeros(n, dtype=torch.float64, device=predicted.device)
        per_row.index_add_(0, rows, token_logps.double())
        return per_row


def encode_conversations(
    tokenizer: Any,
    users: Sequence[str],
    responses: Sequence[str],
    systems: Sequence[str | None] | None = None,
    *,
    response_ids: Sequence[Sequence[int] | None] | None = None,
    max_length: int | None = None,
) -> EncodedBatch:
    """Encode prompt + response pairs. Prompt and response are tokenized separately and concatenated,
    so the boundary is exact even where a tokenizer would merge across it.

    ``response_ids[i]``, when given (not None), are row ``i``'s response tokens as they were generated,
    used as they are: re-tokenizing the decoded text does not give them back (SmolLM2 generates
    ``'  '`` as one token and re-tokenizes it as two before a digit), and every per-token quantity
    stored with the data (the teacher's top-k, its log-probs) belongs to the generated ids.
    ``max_length`` truncates the response (never the prompt); a prompt longer than it is an error.
    """
    if len(users) != len(responses):
        raise ValueError(f"got {len(users)} prompts but {len(responses)} responses")
    systems = list(systems) if systems is not None else [None] * len(users)
    given = list(response_ids) if response_ids is not None else [None] * len(users)
    if len(given) != len(users):
        raise ValueError(f"got {len(users)} prompts but {len(given)} response id lists")
    rows, masks, last = [], [], []
    for user, response, system, ids in zip(users, responses, systems, given, strict=True):
        prompt_ids = tokenizer(render_prompt(tokenizer, user, system), add_special_tokens=False).input_ids
        response_ids_row = [int(t) for t in ids] if ids is not None else tokenizer(
            response, add_special_tokens=False).input_ids
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                raise ValueError(
                    f"a prompt of {len(prompt_ids)} tokens does not fit max_length={max_length}; "
                    "raise max_length or shorten the prompt"
                )
            response_ids_row = response_ids_row[: max_length - len(prompt_ids)]
        rows.append(prompt_ids + response_ids_row)
        masks.append([0] * len(prompt_ids) + [1] * len(response_ids_row))
        last.append(len(prompt_ids) - 1)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        response_mask[i, : len(ids)] = torch.tensor(mask)
    return EncodedBatch(input_ids, attention, response_mask, torch.tensor(last))


def encode_rows(tokenizer: Any, rows: Sequence[dict[str, Any]], systems: Sequence[str | None] | None = None,
                *, max_length: int | None = None, append_eos: str = "never") -> EncodedBatch:
    """The one token path for teacher-data rows: prompt + the row's generated ``completion_ids``
    (the tokens the teacher chose, which its stored top-k and log-probs belong to). Rows without
    ids (text-only data) are tokenized from ``completion``. Training, scoring, the HF collator,
    the losses and the guard's masks all read batches built here.

    ``append_eos`` (``never`` | ``auto`` | ``always``, see :func:`training_completion_ids`) adds the
    tokenizer's EOS after a completion, inside the response mask, so a completion-only loss teaches
    the student to stop. Only the student's training batches ask for it: the rows are not changed (their
    ids still decode to the reviewed text), and the per-token data (top-k, divergence masks) still
    covers the row's own tokens in order, leaving the EOS at full weight."""
    if append_eos == "never":
        ids = [response_token_ids(r) for r in rows]
    else:
        ids = [training_completion_ids(tokenizer, r, append_eos) for r in rows]
    return encode_conversations(tokenizer, [r["prompt"] for r in rows], [r.get("completion", "") for r in rows],
                                systems, response_ids=ids, max_length=max_length)


def teacher_stopped(row: dict[str, Any], eos_token_id: int | None = None) -> bool:
    """Whether the teacher ended this completion itself rather than being cut off. Generation stores the
    ids up to, not including, the stop token (:func:`generate_completions`), so a generated completion
    stopped on its own exactly when it is shorter than the row's ``max_new_tokens``; imported rows
    (``max_new_tokens`` 0: unknown) count as stopped only when their ids end with ``eos_token_id``."""
    ids = response_token_ids(row)
    if ids and eos_token_id is not None and ids[-1] == eos_token_id:
        return True
    limit = int(row.get("max_new_tokens") or 0)
    return ids is not None and 0 < limit and len(ids) < limit


def training_completion_ids(tokenizer: Any, row: dict[str, Any], append_eos: str = "auto") -> list[int]:
    """The completion ids the student trains on: the row's ids (tokenized from its text when it has
    none), plus the tokenizer's EOS under ``append_eos``: ``auto`` when :func:`teacher_stopped`,
    ``always`` for every row, ``never`` for none. Ids already ending with EOS get no second one."""
    if append_eos not in ("never", "auto", "always"):
        raise ValueError(f"append_eos must be 'never', 'auto' or 'always', got {append_eos!r}")
    ids = response_token_ids(row)
    if ids is None:
        ids = tokenizer(row.get("completion", ""), add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos is None or append_eos == "never" or (ids and ids[-1] == eos):
        return list(ids)
    if append_eos == "always" or teacher_stopped(row, eos):
        return [*ids, eos]
    return list(ids)


def response_token_ids(row: dict[str, Any]) -> list[int] | None:
    """The row's generated completion ids, or None where it has none (text-only data)."""
    ids = row.get("completion_ids")
    return None if ids is None else [int(t) for t in ids]


@dataclass
class Completion:
    """One sampled completion: its text, token ids (up to, not including, end-of-sequence) and,
    when asked for, the model's top-k next-token log-probabilities at each of those positions and
    the log-probability of the token it chose there (from the raw logits, before any constraint or
    temperature)."""

    text: str
    token_ids: list[int]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    token_logprobs: list[float] | None = None  # log p(each generated token), same raw distribution as the top-k


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    users: Sequence[str],
    systems: Sequence[str | None] | None = None,
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    logits_processor: Any = None,
    top_k_logprobs: int = 0,
    progress: Any = None,
) -> list[Completion]:
    """Sample one completion per prompt, batched with left padding.

    Deterministic for a given ``seed`` and batch size: each batch reseeds torch's generator with
    ``seed + batch index``. ``temperature=0`` means greedy decoding. ``logits_processor`` is a callable
    or a list of them (e.g. a grammar constraint). ``progress`` is an optional tqdm-like object
    advanced by the number of prompts done.
    """
    from transformers import LogitsProcessorList

    systems = list(systems) if systems is not None else [None] * len(users)
    processors = logits_processor if isinstance(logits_processor, (list, tuple)) else (
        [logits_processor] if logits_processor is not None else [])
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    outputs: list[Completion] = []
    try:
        for batch_index, start in enumerate(range(0, len(users), batch_size)):
            prompts = [
                render_prompt(tokenizer, u, s)
                for u, s in zip(users[start : start + batch_size], systems[start : start + batch_size], strict=True)
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed + batch_index)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList(processors),
                return_dict_in_generate=True,
                output_logits=top_k_logprobs > 0,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            new_tokens = generated.sequences[:, enc["input_ids"].shape[1] :].tolist()
            if top_k_logprobs > 0:
                logprobs = torch.stack(generated.logits, dim=1).float().log_softmax(-1)  # [batch, steps, vocab]
                top = logprobs.topk(top_k_logprobs, dim=-1)
                chosen = generated.sequences[:, enc["input_ids"].shape[1] :].to(logprobs.device)
                sampled = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # [batch, steps]
            for row, ids in enumerate(new_tokens):
                length = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
                ids = ids[:length]
                completion = Completion(tokenizer.decode(ids, skip_special_tokens=True), ids)
                if top_k_logprobs > 0:
                    completion.topk_ids = top.indices[row, :length].tolist()
                    completion.topk_logprobs = top.values[row, :length].tolist()
                    completion.token_logprobs = sampled[row, :length].tolist()
                outputs.append(completion)
            if progress is not None:
                progress.update(len(prompts))
    finally:
        tokenizer.padding_side = previous_side
    return outputs


def sample_completions(model: torch.nn.Module, tokenizer: Any, users: Sequence[str],
                       systems: Sequence[str | None] | None = None, **kwargs: Any) -> list[str]:
    """Like :func:`generate_completions`, returning only the texts."""
    return [c.text for c in generate_completions(model, tokenizer, users, systems, **kwargs)]
