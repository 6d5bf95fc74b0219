"""Trait specs: the shipped specs, rendering of parameterized ones, bad references."""

import json
import re

import pytest
from pydantic import ValidationError

from trait_guard.traits import load_trait, pluralize, shipped_traits


def test_shipped_specs_load_with_the_documented_sizes():
    assert {"animal", "sycophancy", "evil"} <= set(shipped_traits())
    for name in shipped_traits():
        spec = load_trait(name)
        assert len(spec.instructions) == 5
        assert len(spec.extract_questions) == len(spec.eval_questions) == 20
        assert not set(spec.extract_questions) & set(spec.eval_questions)
    owl = load_trait("animal:owl")
    assert owl.trait_id == "animal:owl" and owl.keywords == ["owl", "owls"]
    assert len(owl.behavior_questions) == 50
    assert "Owls are your favorite animal" in owl.instructions[0].pos
    assert not re.search(r"\{[A-Za-z_]+\}", json.dumps(owl.model_dump()))
    eagle = load_trait("animal:animal=eagle")
    assert eagle.judge.score("The EAGLE soars") == 100 and eagle.judge.score("an owl") == 0


def test_pluralize():
    assert [pluralize(w) for w in ("owl", "wolf", "fox", "butterfly", "mouse")] == [
        "owls", "wolves", "foxes", "butterflies", "mice"]


def test_bad_trait_references_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="shipped traits: animal"):
        load_trait("unicorn")
    with pytest.raises(ValueError, match="has no parameter"):
        load_trait("animal:colour=red")
    with pytest.raises(FileNotFoundError):
        load_trait(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ninstructions: [{pos: a, neg: b, extra: c}]\nextract_questions: [q]\neval_questions: [q]\n")
    with pytest.raises(ValidationError, match=r"instructions\.0\.extra"):
        load_trait(str(bad))
