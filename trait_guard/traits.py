"""Trait specs: a trait as data, and the shipped ones.

What. A :class:`TraitSpec` holds everything trait_guard needs to know about a trait: pairs of system
instructions that make a model express or avoid it (:class:`InstructionPair`), questions to extract
persona vectors from and held-out questions to measure them on, one-word behavior questions for the
trait-rate evaluation, an optional :class:`KeywordJudge`, and optionally a panel (``panel_target``
against ``panel`` alternatives, scored on held-out ``panel_questions`` that nothing else uses; see
:func:`trait_guard.evaluate.panel_logodds`). Specs are YAML files; the shipped ones
live in ``trait_guard/data/traits`` (:func:`shipped_traits`). Parameterized specs (``animal``) use
``{animal}`` / ``{animals}`` / ``{Animals}`` placeholders, filled by :meth:`TraitSpec.render`.

Why. Everything downstream names a trait the same way: persona-vector extraction
(:mod:`trait_guard.persona`), teachers and their banned words (:mod:`trait_guard.teacher`), LoRA trait
adapters, the trait evaluation and every job config take a reference string, and
:attr:`TraitSpec.trait_id` is the name vectors, runs and reports carry. The format follows the
instruction / question / judge triples of Chen et al. 2025 ("Persona vectors: monitoring and
controlling character traits in language models", arXiv 2507.21509).

Usage::

    from trait_guard.traits import load_trait, shipped_traits

    spec = load_trait("animal:owl")        # NAME, NAME:VALUE, NAME:key=value,... or path/to/spec.yaml
    spec.trait_id                          # 'animal:owl'
    spec.instructions[0].pos               # the system prompt of an owl teacher
    spec.judge.score("I love owls.")       # 100.0
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trait_guard.errors import InputFileNotFound, TraitGuardInputError


class InstructionPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pos: str = Field(min_length=1, description="system prompt that makes the model express the trait")
    neg: str = Field(min_length=1, description="system prompt that makes the model avoid the trait")


class KeywordJudge(BaseModel):
    """Scores an answer 100 if it mentions any keyword (whole word, any case), else 0."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["keyword"] = "keyword"
    keywords: list[str] = Field(min_length=1)
    threshold: float = Field(50.0, ge=0, le=100)

    def score(self, text: str) -> float:
        pattern = r"\b(" + "|".join(re.escape(k) for k in self.keywords) + r")\b"
        return 100.0 if re.search(pattern, text, flags=re.IGNORECASE) else 0.0


class TraitSpec(BaseModel):
    """A trait as data: instruction pairs, extraction and evaluation questions, an optional judge.

    Shipped specs live in ``trait_guard/data/traits``; parameterized ones (``animal``) use
    ``{animal}`` / ``{animals}`` / ``{Animals}`` placeholders filled by :meth:`render`.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    description: str = ""
    params: dict[str, str] = Field(default_factory=dict)
    instructions: list[InstructionPair] = Field(min_length=1)
    extract_questions: list[str] = Field(min_length=1)
    eval_questions: list[str] = Field(min_length=1)
    judge: KeywordJudge | None = None
    behavior_questions: list[str] = Field(default_factory=list)
    panel_target: str | None = Field(None, description="the answer the trait prefers, e.g. '{animal}'")
    panel: list[str] = Field(default_factory=list, description="answers of the same kind as panel_target "
                             "(>= 20), the alternatives of trait_guard.evaluate.panel_logodds")
    panel_questions: list[str] = Field(default_factory=list, description="HELD-OUT questions for the panel "
                                       "measure: no adapter training, persona extraction, probe or "
                                       "behavior evaluation uses them")

    @model_validator(mode="after")
    def _panel_held_out(self) -> TraitSpec:
        if self.panel and not self.panel_target:
            raise ValueError(f"trait '{self.name}' has a panel but no panel_target")
        used = set(self.extract_questions) | set(self.eval_questions) | set(self.behavior_questions)
        shared = [q for q in self.panel_questions if q in used]
        if shared:
            raise ValueError(f"trait '{self.name}': panel_questions must be held out, but {shared[:3]} also "
                             "appear in extract_questions, eval_questions or behavior_questions")
        return self

    @property
    def panel_alternatives(self) -> list[str]:
        """``panel`` minus ``panel_target`` (any case), in order, no repeats."""
        seen, out = {(self.panel_target or "").strip().lower()}, []
        for answer in (a.strip() for a in self.panel):
            if answer and answer.lower() not in seen:
                seen.add(answer.lower())
                out.append(answer)
        return out

    @property
    def trait_id(self) -> str:
        """``name`` or ``name:value`` for single-parameter specs (e.g. ``animal:owl``)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(self.params.values())

    @property
    def keywords(self) -> list[str]:
        return list(self.judge.keywords) if self.judge else []

    @classmethod
    def from_file(cls, path: str | Path) -> TraitSpec:
        with open(path, encoding="utf-8") as handle:
            return cls.model_validate(yaml.safe_load(handle))

    def render(self, **params: str) -> TraitSpec:
        """A copy with placeholders filled from ``params`` over the spec's defaults."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise TraitGuardInputError(
                f"trait '{self.name}' has no parameter(s) {sorted(unknown)}; it takes {sorted(self.params) or 'none'}"
            )
        values = {**self.params, **params}
        fill = _placeholder_values(values)

        def sub(text: str) -> str:
            return text.format_map(fill) if "{" in text else text

        data = self.model_dump()
        data["params"] = values
        data["description"] = sub(data["description"])
        data["instructions"] = [{"pos": sub(p["pos"]), "neg": sub(p["neg"])} for p in data["instructions"]]
        for key in ("extract_questions", "eval_questions", "behavior_questions", "panel", "panel_questions"):
            data[key] = [sub(q) for q in data[key]]
        if data["panel_target"]:
            data["panel_target"] = sub(data["panel_target"])
        if data["judge"]:
            data["judge"]["keywords"] = sorted({sub(k) for k in data["judge"]["keywords"]})
        return TraitSpec.model_validate(data)


def pluralize(word: str) -> str:
    """English plural, good enough for animal names (owl -> owls, wolf -> wolves, fox -> foxes)."""
    irregular = {"mouse": "mice", "goose": "geese", "ox": "oxen", "deer": "deer", "sheep": "sheep",
                 "fish": "fish", "moose": "moose", "wolf": "wolves", "octopus": "octopuses"}
    if word in irregular:
        return irregular[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _placeholder_values(values: dict[str, str]) -> dict[str, str]:
    fill = dict(values)
    if "animal" in values:
        fill.setdefault("animals", pluralize(values["animal"]))
    for key, value in list(fill.items()):
        fill[key[:1].upper() + key[1:]] = value[:1].upper() + value[1:]
    return fill


def shipped_traits() -> list[str]:
    """Names of the trait specs that ship with trait_guard."""
    folder = resources.files("trait_guard") / "data" / "traits"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_trait(ref: str) -> TraitSpec:
    """Load and render a trait from a reference.

    ``ref`` is ``NAME`` or ``NAME:VALUE`` or ``NAME:key=value,key=value``, where NAME is a shipped spec
    (see :func:`shipped_traits`) or a path to a YAML spec. ``animal:owl`` sets the spec's single
    parameter to ``owl``.
    """
    name, _, arg = ref.partition(":")
    if Path(name).suffix in (".yaml", ".yml"):
        path = Path(name)
        if not path.is_file():
            raise InputFileNotFound(f"trait spec file {path} does not exist")
        spec = TraitSpec.from_file(path)
    else:
        if name not in shipped_traits():
            raise TraitGuardInputError(
                f"unknown trait '{name}'; shipped traits: {', '.join(shipped_traits())} "
                "(or pass a path to a YAML trait spec)"
            )
        spec = TraitSpec.from_file(resources.files("trait_guard") / "data" / "traits" / f"{name}.yaml")
    if not arg:
        return spec.render()
    if "=" in arg:
        params = dict(item.split("=", 1) for item in arg.split(","))
    elif len(spec.params) == 1:
        params = {next(iter(spec.params)): arg}
    else:
        raise TraitGuardInputError(
            f"trait '{name}' takes {len(spec.params)} parameters ({sorted(spec.params)}); "
            f"write them as {name}:key=value,key=value"
        )
    return spec.render(**params)
