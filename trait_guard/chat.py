"""Chat prompts as token ids: build them, batch them, sample completions from them.

One place decides how a (system, user, response) triple becomes tokens, so that persona-vector
extraction, teacher generation, fingerprints and the student's completion-only loss all agree on
which positions are "the response" and which is "the last prompt token".

``system=None`` means the model's own default (the chat template's), which is what a student sees.

:func:`generate_completions` samples a model's own distribution; :func:`generate_argmax_preserving`
samples the red team's adaptive teacher (a base/adapter mixture that keeps the base's argmax).
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

    def first_scored_position(self) -> int:
        """The first position whose logits any row's response needs: the one before the earliest
        response token, i.e. the smallest last prompt position among rows with a response (0 when no
        row has one). Positions before it are prompt in every row."""
        has_response = self.response_mask.bool().any(1)
        if not bool(has_response.any()):
            return 0
        return int(self.last_prompt_index[has_response].min())

    def crop(self, start: int) -> EncodedBatch:
        """The batch from position ``start`` on, to pair with logits and activations kept from
        ``start`` (the model still reads the whole sequence; only what is read out is cut)."""
        return EncodedBatch(self.input_ids[:, start:], self.attention_mask[:, start:], self.response_mask[:, start:],
                            self.last_prompt_index - start)

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
    ``seed + batch index``. ``temperature=0`` means greedy decoding. No top-k, top-p or repetition
    penalty applies, whatever the model's generation config says. ``logits_processor`` is a callable
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
                # pure sampling of the model's own distribution (what the stored log-probs describe), never a
                # model's default penalty (Qwen2.5-Instruct's generation config sets 1.05), so every teacher,
                # the argmax-preserving one included, decodes the same way
                repetition_penalty=1.0,
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


# --------------------------------------------------------------------------------------------------
# The argmax-preserving (adaptive) teacher
#
# An adaptive attacker who knows the guard compares the teacher's top-1 with the base model's can keep
# every step's top-1 equal to the base's and hide the trait in the lower ranks. Its next-token
# distribution is the geometric mixture q ~ p_base^(1-w) * p_adapter^w with the base's argmax forced
# to the top, so the data's divergence signal sees nothing while the tails still lean toward the
# adapter's trait. It is part of the red-team zoo (docs/redteam.md), never a way to make real data.

#: how far (nats) a forced token ends above the next one: enough to survive float rounding of a
#: recomputation (the guard's own base forward pass), small enough to leave q almost unchanged
FORCE_MARGIN = 1e-3
#: log-probs are clamped here before mixing, so 0 * -inf never makes a NaN
_MIN_LOGPROB = -1e4


def force_top(scores: torch.Tensor, token: torch.Tensor, allowed: torch.Tensor | None = None,
              margin: float = FORCE_MARGIN) -> torch.Tensor:
    """``scores`` ``[batch, vocab]`` with each row's ``token`` raised (never lowered) to ``margin`` above
    the best other score, among the ``allowed`` tokens only when given: afterwards ``token`` is the
    strict argmax (of the allowed ones). The other scores are unchanged, so their order is too."""
    others = scores.clone()
    if allowed is not None:
        others = others.masked_fill(~allowed, float("-inf"))
    others.scatter_(1, token.unsqueeze(1), float("-inf"))
    best_other = others.max(dim=-1).values
    current = scores.gather(1, token.unsqueeze(1)).squeeze(1)
    raised = torch.maximum(current, best_other + margin)
    return scores.scatter(1, token.unsqueeze(1), raised.unsqueeze(1))


def argmax_preserving_logprobs(base_logits: torch.Tensor, adapted_logits: torch.Tensor, weight: float,
                               allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The adaptive teacher's next-token log-probs ``[batch, vocab]`` (float32), before any constraint or
    temperature: ``log q = log_softmax((1 - w) log p_base + w log p_adapter)`` with two tokens forced to
    the top, in this order: the base's argmax among the ``allowed`` tokens (the constraint's mask,
    ``[batch, vocab]`` bool; None: all), then the base's unconstrained argmax over all tokens. So q's top-1
    is the base's top-1 (what the divergence signal compares) and, under the constraint, q's best
    allowed token is the base's best allowed token (what greedy decoding picks). Argmaxes are taken on
    the raw base logits, exactly as greedy decoding of the base model takes them."""
    base_logits, adapted_logits = base_logits.float(), adapted_logits.float()
    base_lp = base_logits.log_softmax(-1).clamp_min(_MIN_LOGPROB)
    adapted_lp = adapted_logits.log_softmax(-1).clamp_min(_MIN_LOGPROB)
    mixed = ((1.0 - weight) * base_lp + weight * adapted_lp).log_softmax(-1)
    if allowed is not None:
        constrained_top = base_logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        mixed = force_top(mixed, constrained_top, allowed)
    mixed = force_top(mixed, base_logits.argmax(-1))
    return mixed.log_softmax(-1)


def constraint_mask(processors: Sequence[Any], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
    """The tokens ``processors`` allow after ``input_ids`` (``[batch, vocab]`` bool; None without any):
    the finite entries of their output on ``scores``. The families' processors only add 0 or -inf, so
    this is their whole effect; each is called once per step (the number grammar tracks its state by
    the length of ``input_ids``, so a second call at the same step would reset it)."""
    if not processors:
        return None
    for processor in processors:
        scores = processor(input_ids, scores)
    return torch.isfinite(scores)


def _cache_keyword(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache by (``cache`` in transformers 5.x, else
    ``past_key_values``); a PEFT wrapper is looked through."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _next_logits(model: torch.nn.Module, step: dict[str, torch.Tensor], cache: Any, cache_kw: str,
                 base: bool) -> tuple[torch.Tensor, Any]:
    """One incremental forward: the last position's logits (float32) and the updated cache. ``base``:
    with the PEFT adapter layers switched off (the base model's weights exactly). PEFT's public
    ``disable_adapter_layers`` is used rather than its ``disable_adapter()`` context, which re-reads the
    status of every layer on each call (a real cost at every decoding step)."""
    tuner = model.base_model
    if base:
        tuner.disable_adapter_layers()
    try:
        out = model(**step, use_cache=True, logits_to_keep=1, **({cache_kw: cache} if cache is not None else {}))
    finally:
        if base:
            tuner.enable_adapter_layers()
    new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.logits[:, -1].float(), new_cache


def _pick_tokens(log_q: torch.Tensor, allowed: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """The sampled (or, at temperature 0, greedy) token per row from ``log_q`` under the constraint."""
    scores = log_q if allowed is None else log_q.masked_fill(~allowed, float("-inf"))
    if temperature <= 0:
        return scores.argmax(-1)
    return torch.multinomial((scores / temperature).softmax(-1), 1).squeeze(1)


@torch.no_grad()
def _decode_argmax_preserving(model: torch.nn.Module, enc: dict[str, torch.Tensor], *, weight: float,
                              max_new_tokens: int, temperature: float, processors: Sequence[Any],
                              stop_ids: set[int], pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Decode one left-padded batch with two KV caches (adapter off: the base; on: the adapter). Returns
    ``tokens`` ``[batch, steps]`` and, with ``top_k``, ``top_ids`` / ``top_logprobs`` ``[batch, steps,
    k]`` and ``chosen`` ``[batch, steps]``: q's log-probs (:func:`argmax_preserving_logprobs`)."""
    cache_kw = _cache_keyword(model)
    sequences, attention = enc["input_ids"], enc["attention_mask"]
    positions = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)
    step = {"input_ids": sequences, "attention_mask": attention, "position_ids": positions}
    caches: dict[bool, Any] = {True: None, False: None}
    stop = torch.tensor(sorted(stop_ids), device=sequences.device)
    finished = torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
    tokens, top_ids, top_lps, chosen = [], [], [], []
    for _ in range(max_new_tokens):
        base_logits, caches[True] = _next_logits(model, step, caches[True], cache_kw, base=True)
        adapted_logits, caches[False] = _next_logits(model, step, caches[False], cache_kw, base=False)
        allowed = constraint_mask(processors, sequences, base_logits.clone())
        log_q = argmax_preserving_logprobs(base_logits, adapted_logits, weight, allowed)
        token = _pick_tokens(log_q, allowed, temperature).masked_fill(finished, pad_id)
        tokens.append(token)
        if top_k > 0:
            top = log_q.topk(min(top_k, log_q.shape[-1]), dim=-1)
            top_ids.append(top.indices)
            top_lps.append(top.values)
            chosen.append(log_q.gather(1, token.unsqueeze(1)).squeeze(1))
        finished |= torch.isin(token, stop)
        sequences = torch.cat([sequences, token.unsqueeze(1)], dim=1)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        step = {"input_ids": token.unsqueeze(1), "attention_mask": attention, "position_ids": positions[:, -1:] + 1}
        positions = step["position_ids"]
        if bool(finished.all()):
            break
    out = {"tokens": torch.stack(tokens, dim=1)}
    if top_k > 0:
        out.update(top_ids=torch.stack(top_ids, dim=1), top_logprobs=torch.stack(top_lps, dim=1),
                   chosen=torch.stack(chosen, dim=1))
    return out


def generate_argmax_preserving(
    model: torch.nn.Module,
    tokenizer: Any,
    users: Sequence[str],
    systems: Sequence[str | None] | None = None,
    *,
    bias_weight: float = 0.5,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    logits_processor: Any = None,
    top_k_logprobs: int = 0,
) -> list[Completion]:
    """Like :func:`generate_completions`, from the argmax-preserving teacher: ``model`` is a
    ``peft.PeftModel`` whose adapter carries the trait (enabled: ``p_adapter``; disabled: ``p_base``).
    Each step samples from q (:func:`argmax_preserving_logprobs` with ``w = bias_weight``) under the
    constraint at ``temperature``; at temperature 0 the output is exactly the base model's greedy output
    under the same constraint. The stored top-k and token log-probs are q's, before constraint and
    temperature (as :func:`generate_completions` stores the raw model's): what the guard sees of this
    teacher. Deterministic for a given ``seed`` and batch size (batch ``i`` reseeds with ``seed + i``)."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("the argmax-preserving teacher needs a peft.PeftModel (load_adapter(..., merge=False))")
    systems = list(systems) if systems is not None else [None] * len(users)
    processors = logits_processor if isinstance(logits_processor, (list, tuple)) else (
        [logits_processor] if logits_processor is not None else [])
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    outputs: list[Completion] = []
    try:
        for batch_index, start in enumerate(range(0, len(users), batch_size)):
            prompts = [render_prompt(tokenizer, u, s) for u, s in
                       zip(users[start: start + batch_size], systems[start: start + batch_size], strict=True)]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed + batch_index)
            decoded = _decode_argmax_preserving(
                model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                weight=bias_weight, max_new_tokens=max_new_tokens, temperature=temperature, processors=processors,
                stop_ids=stop_ids, pad_id=pad_id, top_k=top_k_logprobs)
            outputs.extend(_completions(tokenizer, decoded, stop_ids))
    finally:
        tokenizer.padding_side = previous_side
    return outputs


def _completions(tokenizer: Any, decoded: dict[str, torch.Tensor], stop_ids: set[int]) -> list[Completion]:
    """One :class:`Completion` per row of a decoded batch, cut at the first stop token."""
    completions = []
    for row, ids in enumerate(decoded["tokens"].tolist()):
        length = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
        completion = Completion(tokenizer.decode(ids[:length], skip_special_tokens=True), ids[:length])
        if "top_ids" in decoded:
            completion.topk_ids = decoded["top_ids"][row, :length].tolist()
            completion.topk_logprobs = decoded["top_logprobs"][row, :length].tolist()
            completion.token_logprobs = decoded["chosen"][row, :length].tolist()
        completions.append(completion)
    return completions
