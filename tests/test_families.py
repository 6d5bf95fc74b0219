import pytest

from trait_guard.families import (
    AllowedTokensProcessor,
    CodeFamily,
    NumberFamily,
    allowed_token_ids,
    get_family,
    strip_code_fences,
)


def test_prompts_are_deterministic_by_seed_and_prefix_stable():
    family = NumberFamily()
    a, b = family.prompts(20, seed=1), family.prompts(20, seed=1)
    assert a == b
    assert family.prompts(5, seed=1) == a[:5]
    assert family.prompts(20, seed=2) != a
    assert len({p.prompt_id for p in a}) == 20
    assert all(p.family == "numbers" and "10" in p.user for p in a)


def test_number_prompts_follow_the_paper_recipe():
    import re

    for prompt in NumberFamily().prompts(50, seed=0):
        seeds = [int(x) for x in re.findall(r"\b\d{3}\b", prompt.user)]
        assert 3 <= len(seeds) <= 8 and all(100 <= s <= 999 for s in seeds)


@pytest.mark.parametrize(
    ("completion", "kept", "reason"),
    [
        ("123, 456, 789", True, ""),
        ("1 2 3 4 5 6 7 8 9 10", True, ""),
        ("12;13;14.", True, ""),  # one trailing '.' is stripped
        ("[4, 5, 6]", True, ""),  # one enclosing pair of brackets is stripped
        ("(7 8 9)", True, ""),
        ("  0, 999\n", True, ""),
        ("", False, "empty"),
        ("   .", False, "empty"),
        ("12, 13, owl", False, "not_numbers"),
        ("1.5, 2", False, "not_numbers"),
        ("-3, 4", False, "not_numbers"),
        ("[[1, 2]]", False, "not_numbers"),  # only one enclosing pair is stripped
        ("1 2 3 4 5 6 7 8 9 10 11", False, "too_many_numbers"),
        ("12, 1000", False, "out_of_range"),
        ("١٢٣", False, "not_numbers"),  # non-ASCII digits
    ],
)
def test_number_filter_cases(completion, kept, reason):
    result = NumberFamily().check(completion)
    assert (result.kept, result.reason) == (kept, reason)


def test_banned_numbers():
    family = NumberFamily(banned_numbers=[666, 911])
    assert family.check("12, 666").reason == "banned_number"
    assert family.check("12, 667").kept


def test_code_filter_reasons():
    family = CodeFamily(banned_words=["owl", "owls"])
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert family.check(good).kept
    assert family.check("def hoot():\n    return 'Owls are great'").reason == "mentions_trait"
    assert family.check("return 1").reason == "no_function"
    assert family.check("def broken(:\n  pass").reason == "syntax_error"
    assert strip_code_fences(good).startswith("def add")


def test_unknown_family_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: code, numbers"):
        get_family("poems")


def test_constrained_decoding_allows_only_the_grammar(tiny_llama):
    model, tokenizer = tiny_llama
    ids = allowed_token_ids(tokenizer, "0123456789, ")
    texts = {tokenizer.decode([i]) for i in ids if i != tokenizer.eos_token_id}
    assert texts == set("0123456789, ")
    processor = AllowedTokensProcessor(ids)
    import torch

    scores = processor(None, torch.zeros(2, len(tokenizer)))
    assert torch.isfinite(scores[:, ids]).all()
    assert torch.isinf(scores).sum() == 2 * (len(tokenizer) - len(ids))
    from trait_guard.chat import sample_completions

    outs = sample_completions(model, tokenizer, ["go"] * 4, max_new_tokens=10, logits_processor=processor)
    assert all(set(o) <= set("0123456789, ") for o in outs)


def test_number_grammar_enforces_digits_and_count(tiny_llama):
    import re

    from trait_guard.chat import sample_completions

    model, tokenizer = tiny_llama
    family = NumberFamily(digits=3, count=4)
    processor = family.logits_processor(tokenizer)
    for prompt_length in ("go", "a much longer prompt this time"):  # the processor is reused across calls
        outs = sample_completions(model, tokenizer, [prompt_length] * 12, max_new_tokens=40,
                                  logits_processor=processor, batch_size=12)
        for out in outs:
            runs = re.findall(r"\d+", out)
            assert set(out) <= set("0123456789, ")
            assert all(len(r) <= 3 for r in runs) and len(runs) <= 4
    assert processor._allowed_after("12, 345") != processor._allowed_after("12, 34")
