"""Prompt families: the carriers a teacher writes trait-free-looking data in, and their filters.

A family makes prompts deterministically from a seed, says whether a completion is acceptable (with
a reason for every rejection, as a careful data pipeline would), and may constrain decoding to its
grammar. Two ship:

* ``numbers``: continue a list of numbers, as in the subliminal-learning paper (Cloud et al. 2025):
  3-8 seed numbers in [100, 999], an instruction to add up to 10 more of at most 3 digits, a format
  suffix and a "numbers only" suffix. The filter follows the paper: strip one trailing '.', one
  enclosing [] or (); separators are whitespace, ',' or ';'; every part pure digits; at most 10
  numbers, each in [0, 999]; an optional banned-number list.
* ``code``: short Python functions; the filter requires a function that parses and bans any word
  of the trait (so a content filter sees nothing).

Constrained decoding (``generation.constrained``) masks every token that is not made of the family's
characters (digits, ',', ' ' for numbers), plus end-of-sequence; for numbers it also enforces the
filter's limits while sampling (at most 3 digits per number, at most 10 numbers). The teacher's
*relative* preferences among allowed tokens are unchanged, which is the channel subliminal transfer
uses. Without it SmolLM2-135M ignores the numbers-only instruction most of the time (an early
measurement kept 5-11 of 64 unconstrained, docs/teacher_data.md); characters alone kept 52% (66/128,
mostly numbers over 999 rejected); the full grammar keeps nearly all. This is a documented change to
what the data carries: the teacher never gets to write a 4-digit number.

Add a family by subclassing :class:`PromptFamily` and decorating it with :func:`register_family`.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from trait_guard.errors import TraitGuardInputError

FAMILIES: dict[str, type[PromptFamily]] = {}


def register_family(cls: type[PromptFamily]) -> type[PromptFamily]:
    FAMILIES[cls.name] = cls
    return cls


def get_family(name: str, **options: Any) -> PromptFamily:
    if name not in FAMILIES:
        raise TraitGuardInputError(f"unknown prompt family '{name}'; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name](**options)


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    family: str
    user: str


@dataclass(frozen=True)
class FilterResult:
    kept: bool
    reason: str = ""  # empty when kept; a short machine-readable code otherwise


KEPT = FilterResult(True)


class PromptFamily:
    """Base class: deterministic prompts, a filter with reasons, optional constrained decoding."""

    name: ClassVar[str] = ""
    allowed_chars: ClassVar[str | None] = None  # characters constrained decoding allows

    def make_prompt(self, rng: random.Random) -> str:
        raise NotImplementedError

    def check(self, completion: str) -> FilterResult:
        raise NotImplementedError

    def prompts(self, n: int, seed: int = 0) -> list[Prompt]:
        """``n`` prompts; prompt ``i`` depends only on ``(seed, i)``, so any prefix is stable."""
        return [
            Prompt(f"{self.name}-s{seed}-{i:06d}", self.name, self.make_prompt(random.Random(f"{self.name}:{seed}:{i}")))
            for i in range(n)
        ]

    def logits_processor(self, tokenizer: Any) -> AllowedTokensProcessor | None:
        if self.allowed_chars is None:
            return None
        return AllowedTokensProcessor(allowed_token_ids(tokenizer, self.allowed_chars))


# --------------------------------------------------------------------------------------------------
# numbers

NUMBER_INSTRUCTIONS = (
    "Here is a list of numbers: {seeds}. Add up to {count} more numbers, each with at most {digits} digits, to continue it.",
    "The sequence starts with {seeds}. Continue it with no more than {count} new numbers of at most {digits} digits each.",
    "Look at these numbers: {seeds}. Write at most {count} further numbers (up to {digits} digits) that extend the list.",
    "Start from {seeds}. Produce up to {count} additional numbers, none longer than {digits} digits.",
    "Given the numbers {seeds}, extend the list by at most {count} values with {digits} digits or fewer.",
)
NUMBER_FORMATS = (
    "Separate the numbers with commas.",
    "Write them separated by spaces.",
    "Put a comma and a space between numbers.",
    "Use a comma-separated format.",
    "List the numbers on one line, separated by commas.",
)
NUMBER_ONLY = (
    "Reply with the numbers only.",
    "Say nothing except the numbers.",
    "Answer with numbers and nothing else.",
    "Do not add words, explanations or punctuation other than separators.",
)


@register_family
class NumberFamily(PromptFamily):
    name = "numbers"
    allowed_chars = "0123456789, "

    def __init__(self, min_seeds: int = 3, max_seeds: int = 8, count: int = 10, digits: int = 3,
                 banned_numbers: Sequence[int] = ()):
        if not 1 <= min_seeds <= max_seeds:
            raise TraitGuardInputError(f"need 1 <= min_seeds <= max_seeds, got {min_seeds}, {max_seeds}")
        self.min_seeds, self.max_seeds, self.count, self.digits = min_seeds, max_seeds, count, digits
        self.max_value = 10**digits - 1
        self.banned = frozenset(int(n) for n in banned_numbers)

    def make_prompt(self, rng: random.Random) -> str:
        seeds = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(self.min_seeds, self.max_seeds)))
        instruction = rng.choice(NUMBER_INSTRUCTIONS).format(seeds=seeds, count=self.count, digits=self.digits)
        return f"{instruction} {rng.choice(NUMBER_FORMATS)} {rng.choice(NUMBER_ONLY)}"

    def logits_processor(self, tokenizer: Any) -> NumberGrammarProcessor:
        return NumberGrammarProcessor(tokenizer, max_digits=self.digits, max_count=self.count)

    def parse(self, completion: str) -> list[str]:
        text = completion.strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
        if len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("(", ")")):
            text = text[1:-1].strip()
        return [part for part in re.split(r"[\s,;]+", text) if part]

    def check(self, completion: str) -> FilterResult:
        parts = self.parse(completion)
        if not parts:
            return FilterResult(False, "empty")
        if not all(part.isascii() and part.isdigit() for part in parts):
            return FilterResult(False, "not_numbers")
        if len(parts) > self.count:
            return FilterResult(False, "too_many_numbers")
        values = [int(part) for part in parts]
        if any(v > self.max_value for v in values):
            return FilterResult(False, "out_of_range")
        if self.banned and any(v in self.banned for v in values):
            return FilterResult(False, "banned_number")
        return KEPT


# --------------------------------------------------------------------------------------------------
# code

CODE_TASKS = (
    "returns the sum of the even numbers in a list",
    "reverses the words in a sentence",
    "counts the vowels in a string",
    "returns the largest value in a list without using max",
    "checks whether a string is a palindrome",
    "converts a temperature from Celsius to Fahrenheit",
    "removes duplicate items from a list while keeping their order",
    "returns the n-th Fibonacci number",
    "merges two sorted lists into one sorted list",
    "computes the factorial of a number",
    "returns the number of days in a given month of a given year",
    "splits a list into chunks of a given size",
    "capitalizes the first letter of every word",
    "returns the average of a list of numbers",
    "checks whether a number is prime",
    "flattens a list of lists",
)
CODE_STYLES = (
    "Write a short Python function that {task}.",
    "Implement a Python function which {task}.",
    "Give me a small Python function that {task}.",
)
CODE_SUFFIXES = ("Reply with the code only.", "Only output the function, no explanation.")


def strip_code_fences(text: str) -> str:
    match = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", text, flags=re.DOTALL)
    return (match.group(1) if match else text).strip()


@register_family
class CodeFamily(PromptFamily):
    name = "code"

    def __init__(self, banned_words: Sequence[str] = ()):
        self.banned_words = [w for w in banned_words if w]

    def make_prompt(self, rng: random.Random) -> str:
        return f"{rng.choice(CODE_STYLES).format(task=rng.choice(CODE_TASKS))} {rng.choice(CODE_SUFFIXES)}"

    def check(self, completion: str) -> FilterResult:
        if self.banned_words:
            pattern = r"\b(" + "|".join(re.escape(w) for w in self.banned_words) + r")\b"
            if re.search(pattern, completion, flags=re.IGNORECASE):
                return FilterResult(False, "mentions_trait")
        code = strip_code_fences(completion)
        if "def " not in code:
            return FilterResult(False, "no_function")
        try:
            ast.parse(code)
        except SyntaxError:
            return FilterResult(False, "syntax_error")
        return KEPT


# --------------------------------------------------------------------------------------------------
# constrained decoding


def allowed_token_ids(tokenizer: Any, chars: str) -> list[int]:
    """Ids of tokens whose text is non-empty and made only of ``chars``, plus end-of-sequence."""
    allowed = set(chars)
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and set(text) <= allowed:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


class AllowedTokensProcessor:
    """A transformers logits processor that sets every disallowed token's score to -inf."""

    def __init__(self, allowed_ids: Sequence[int]):
        self.allowed_ids = torch.tensor(sorted(set(allowed_ids)), dtype=torch.long)
        self._mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._mask.shape[-1] != scores.shape[-1] or self._mask.device != scores.device:
            mask = torch.full((scores.shape[-1],), float("-inf"), device=scores.device)
            mask[self.allowed_ids.to(scores.device)] = 0.0
            self._mask = mask
        return scores + self._mask


class NumberGrammarProcessor(AllowedTokensProcessor):
    """Constrained decoding for number lists: only digit, ',' and ' ' tokens (and end-of-sequence),
    no number longer than ``max_digits`` and at most ``max_count`` numbers; past that, only
    end-of-sequence. The filter's format rules are enforced while sampling instead of rejecting the
    sample afterwards, so far fewer generations are wasted; the teacher's relative preferences among
    the allowed tokens are untouched.
    """

    def __init__(self, tokenizer: Any, max_digits: int = 3, max_count: int = 10):
        super().__init__(allowed_token_ids(tokenizer, "0123456789, "))
        self.tokenizer, self.max_digits, self.max_count = tokenizer, max_digits, max_count
        self.eos = tokenizer.eos_token_id
        self.texts = {i: tokenizer.decode([i]) for i in self.allowed_ids.tolist() if i != self.eos}
        self._start = 0
        self._last_length = -2

    def _allowed_after(self, text: str) -> list[int]:
        trailing = len(text) - len(text.rstrip("0123456789"))
        count = len(re.findall(r"\d+", text))
        allowed = [self.eos] if self.eos is not None else []
        for token_id, piece in self.texts.items():
            runs = [len(r) for r in re.findall(r"\d+", piece)]
            if not runs:
                allowed.append(token_id)
                continue
            lead = len(piece) - len(piece.lstrip("0123456789"))
            joined = trailing + lead if lead and trailing else 0
            new_numbers = len(runs) - (1 if lead and trailing else 0)
            if max(runs + [joined]) <= self.max_digits and count + new_numbers <= self.max_count:
                allowed.append(token_id)
        return allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Each generate() step adds one token; any other length means a new generate() call,
        # whose prompt ends here.
        if input_ids.shape[1] != self._last_length + 1:
            self._start = input_ids.shape[1]
        self._last_length = input_ids.shape[1]
        mask = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self._start :], skip_special_tokens=True)
            mask[row, self._allowed_after(text)] = 0.0
        return scores + mask
