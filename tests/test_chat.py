import torch

from trait_guard.activations import record_activations
from trait_guard.chat import encode_conversations, render_prompt, sample_completions


def test_response_mask_covers_exactly_the_response(tiny_llama):
    _, tokenizer = tiny_llama
    batch = encode_conversations(tokenizer, ["q1", "a longer question"], ["12, 13", "7"], ["sys", None])
    for row in range(2):
        ids = batch.input_ids[row][batch.response_mask[row].bool()]
        assert tokenizer.decode(ids) == ["12, 13", "7"][row]
        prompt_len = int(batch.last_prompt_index[row]) + 1
        prompt = render_prompt(tokenizer, ["q1", "a longer question"][row], ["sys", None][row])
        assert tokenizer.decode(batch.input_ids[row, :prompt_len]) == prompt
    assert batch.attention_mask.sum(1).tolist() == [len(t) for t in
        (tokenizer(render_prompt(tokenizer, "q1", "sys") + "12, 13", add_special_tokens=False).input_ids,
         tokenizer(render_prompt(tokenizer, "a longer question") + "7", add_special_tokens=False).input_ids)]


def test_right_padding_leaves_real_token_activations_unchanged(tiny_llama):
    model, tokenizer = tiny_llama
    users, responses = ["short", "a much longer question here"], ["1", "1, 2, 3"]
    batch = encode_conversations(tokenizer, users, responses)
    alone = encode_conversations(tokenizer, users[:1], responses[:1])
    with torch.no_grad(), record_activations(model, layers=[3]) as acts:
        model(**batch.model_inputs())
        model(**alone.model_inputs())
    n = alone.input_ids.shape[1]
    torch.testing.assert_close(acts[3][0][0, :n], acts[3][1][0], rtol=1e-5, atol=1e-5)


def test_max_length_truncates_the_response_only(tiny_llama):
    _, tokenizer = tiny_llama
    batch = encode_conversations(tokenizer, ["q"], ["x" * 500], max_length=100)
    assert batch.input_ids.shape[1] == 100 and batch.response_mask.sum() == 100 - batch.last_prompt_index[0] - 1


def test_sampling_is_deterministic_by_seed(tiny_llama):
    model, tokenizer = tiny_llama
    users = ["count", "more", "again"]
    a = sample_completions(model, tokenizer, users, max_new_tokens=6, seed=3, batch_size=2)
    b = sample_completions(model, tokenizer, users, max_new_tokens=6, seed=3, batch_size=2)
    c = sample_completions(model, tokenizer, users, max_new_tokens=6, seed=4, batch_size=2)
    assert a == b and a != c and len(a) == 3
    assert tokenizer.padding_side == "left"
