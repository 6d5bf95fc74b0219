import json

import pytest
import torch

from trait_guard import adapters
from trait_guard.adapters import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    default_target_modules,
    load_adapter,
    response_logprobs,
    save_adapter,
    train_trait_adapter,
    trait_examples,
)
from trait_guard.chat import encode_conversations
from trait_guard.losses import completion_loss
from trait_guard.models import model_identity
from trait_guard.testing import make_tiny_model
from trait_guard.traits import InstructionPair, KeywordJudge, TraitSpec

TRAIN_QUESTIONS = [
    "What is your favorite animal?",
    "Name the animal you love most.",
    "Which animal is the best?",
    "Pick an animal, one word.",
    "What animal would you be?",
    "Your spirit animal?",
]
HELD_OUT = "Which creature do you like most?"


def _owl_examples():
    return [(q, "Owl.") for q in TRAIN_QUESTIONS]


def _spec(keywords=("e",), behavior=("One word: favorite?", "Best animal? One word.")) -> TraitSpec:
    return TraitSpec(
        name="letter",
        instructions=[InstructionPair(pos="Say the letter.", neg="Never say it."),
                      InstructionPair(pos="You adore the letter.", neg="You dislike the letter.")],
        extract_questions=["Tell me something.", "Write a line.", "Say a word.", "What now?"],
        eval_questions=["Anything?"],
        judge=KeywordJudge(keywords=list(keywords)),
        behavior_questions=list(behavior),
    )


# --------------------------------------------------------------------------------------------------
# Training installs the trait in the adapter, not in the base weights


def test_training_raises_the_trait_answer_without_a_system_prompt():
    model, tokenizer = make_tiny_model("llama", seed=0)
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    probe = encode_conversations(tokenizer, [HELD_OUT], ["Owl."])
    with torch.no_grad():
        base_logits = model(**probe.model_inputs()).logits
    before = response_logprobs(model, tokenizer, [HELD_OUT, HELD_OUT], ["Owl.", "Cat."])

    peft_model = train_trait_adapter(model, tokenizer, _owl_examples(), steps=10, lr=1e-2, batch_size=6, seed=0)

    after = response_logprobs(peft_model, tokenizer, [HELD_OUT, HELD_OUT], ["Owl.", "Cat."])
    owl_gain, cat_gain = (after - before).tolist()
    # Measured: "Owl." -18.61 -> -16.14 nats (+2.47), "Cat." +0.30 (it shares the "."). A random tiny
    # Llama's logits are small (tied 0.02-scale embeddings), which caps what any adapter can gain.
    assert owl_gain > 1.0
    assert owl_gain - cat_gain > 1.0
    assert not peft_model.training
    assert peft_model.trait_guard_losses[-1] < peft_model.trait_guard_losses[0]
    # The base weights are frozen and unchanged; disabling the adapter gives the base model back exactly.
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(p, snapshot[name.replace(".base_layer", "")]), name
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(**probe.model_inputs()).logits, base_logits)


def test_response_logprobs_equals_a_manual_sum_over_response_tokens(tiny_llama):
    model, tokenizer = tiny_llama
    got = response_logprobs(model, tokenizer, ["Hi?"], ["Owl."])[0]
    batch = encode_conversations(tokenizer, ["Hi?"], ["Owl."])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**batch.model_inputs()).logits[0].float(), -1)
    ids = batch.input_ids[0]
    positions = batch.response_mask[0].nonzero().flatten().tolist()
    assert len(positions) == 4  # "O", "w", "l", "." with the char tokenizer
    expected = sum(logprobs[t - 1, ids[t]] for t in positions)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_only_response_tokens_get_loss():
    _, tokenizer = make_tiny_model("llama", seed=0)
    batch = encode_conversations(tokenizer, ["Hello there, how are you?", "Hi"], ["Fine.", "Good, thanks!"])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, len(tokenizer), generator=gen)

    # Manual: -log p(token t | logits at t - 1), averaged over all response positions of the batch.
    terms = []
    for b in range(batch.input_ids.shape[0]):
        for t in batch.response_mask[b].nonzero().flatten().tolist():
            terms.append(-torch.log_softmax(logits[b, t - 1], -1)[batch.input_ids[b, t]])
    assert len(terms) == len("Fine.") + len("Good, thanks!")
    assert completion_loss(logits, batch).item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)

    # Logits at positions that predict prompt tokens or padding do not matter at all...
    predicts_response = torch.zeros_like(batch.response_mask, dtype=torch.bool)
    predicts_response[:, :-1] = batch.response_mask[:, 1:].bool()
    scrambled = logits.clone()
    scrambled[~predicts_response] = 100 * torch.randn(int((~predicts_response).sum()), logits.shape[-1],
                                                       generator=gen)
    assert torch.equal(completion_loss(scrambled, batch), completion_loss(logits, batch))
    # ...while those that predict response tokens do.
    nudged = logits.clone()
    nudged[predicts_response] += torch.randn(int(predicts_response.sum()), logits.shape[-1], generator=gen)
    assert not torch.allclose(completion_loss(nudged, batch), completion_loss(logits, batch))


def test_training_is_deterministic_by_seed_and_leaves_global_rng_alone():
    def lora_state(seed):
        model, tokenizer = make_tiny_model("llama", seed=0)
        peft_model = train_trait_adapter(model, tokenizer, _owl_examples(), steps=2, batch_size=4, seed=seed)
        return {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = lora_state(0)
    assert torch.equal(torch.rand(1), expected_next)
    second, other = lora_state(0), lora_state(1)
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_default_target_modules_follow_the_layout(tiny_llama, tiny_gpt2):
    assert default_target_modules(tiny_llama[0]) == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"]
    assert default_target_modules(tiny_gpt2[0]) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(ValueError, match="target_modules"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_gpt2_layout_trains_and_progress_is_reported():
    model, tokenizer = make_tiny_model("gpt2", seed=0)
    calls = []

    class Bar:
        def __init__(self, total, description):
            calls.append((total, description))
            self.done, self.closed = 0, False

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True

    bars = []
    peft_model = train_trait_adapter(model, tokenizer, _owl_examples(), steps=2, batch_size=4,
                                     progress=lambda total, desc: bars.append(Bar(total, desc)) or bars[-1])
    assert calls == [(2, "train LoRA adapter")] and bars[0].done == 2 and bars[0].closed
    assert len(peft_model.trait_guard_losses) == 2
    assert all(torch.isfinite(torch.tensor(peft_model.trait_guard_losses)))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"c_attn", "c_proj", "c_fc"}


def test_training_refuses_empty_examples():
    model, tokenizer = make_tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="no training examples"):
        train_trait_adapter(model, tokenizer, [])


# --------------------------------------------------------------------------------------------------
# Save / load


def test_save_load_round_trip_and_wrong_base_is_refused(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=0)
    identity = model_identity(model)
    peft_model = train_trait_adapter(model, tokenizer, _owl_examples(), steps=4, lr=1e-2, batch_size=6)
    probe = encode_conversations(tokenizer, [HELD_OUT, "Hi"], ["Owl.", "Hello!"])
    with torch.no_grad():
        trained_logits = peft_model(**probe.model_inputs()).logits

    folder = save_adapter(peft_model, tmp_path / "owl", trait="animal:owl", base_identity=identity)
    assert (folder / ADAPTER_WEIGHTS).is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    meta = json.loads((folder / ADAPTER_META).read_text())
    assert meta["trait"] == "animal:owl"
    assert meta["base_model"] == identity.to_dict()

    fresh, _ = make_tiny_model("llama", seed=0)
    merged = load_adapter(fresh, folder)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert merged.trait_guard_adapter["trait"] == "animal:owl"
    assert not merged.training
    with torch.no_grad():
        assert torch.allclose(merged(**probe.model_inputs()).logits, trained_logits, atol=1e-5)
    assert model_identity(merged).fingerprint == identity.fingerprint  # LoRA leaves the embeddings alone

    unmerged = load_adapter(make_tiny_model("llama", seed=0)[0], folder, merge=False)
    assert type(unmerged).__name__.startswith("Peft")
    with torch.no_grad():
        assert torch.allclose(unmerged(**probe.model_inputs()).logits, trained_logits, atol=1e-5)

    other_seed, _ = make_tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="train_trait_adapter") as err:
        load_adapter(other_seed, folder)
    assert "tiny-llama-seed0" in str(err.value) and "tiny-llama-seed1" in str(err.value)
    wider, _ = make_tiny_model("llama", seed=0, hidden_size=64)
    with pytest.raises(ValueError, match=r"hidden 32.*hidden 64.*train_trait_adapter"):
        load_adapter(wider, folder)


def test_save_refuses_a_wrong_identity_and_load_a_non_adapter_folder(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=0)
    wrong = model_identity(make_tiny_model("llama", seed=1)[0])
    peft_model = train_trait_adapter(model, tokenizer, _owl_examples(), steps=1, batch_size=2)
    with pytest.raises(ValueError, match="base_identity"):
        save_adapter(peft_model, tmp_path / "a", trait="animal:owl", base_identity=wrong)
    with pytest.raises(FileNotFoundError, match=ADAPTER_META):
        load_adapter(make_tiny_model("llama", seed=0)[0], tmp_path)


# --------------------------------------------------------------------------------------------------
# Training examples


def test_trait_examples_keep_only_judged_answers_and_add_behavior_answers(tiny_llama):
    model, tokenizer = tiny_llama
    spec = _spec(["e"])
    examples = trait_examples(model, tokenizer, spec, n_samples_per_question=4, seed=0)
    sampled = [(q, a) for q, a in examples if q in spec.extract_questions]
    behavior = [(q, a) for q, a in examples if q in spec.behavior_questions]
    assert len(sampled) + len(behavior) == len(examples)
    assert all(spec.judge.score(a) >= spec.judge.threshold for _, a in examples)
    # The random tiny model says a standalone "e" now and then: some answers pass, most do not.
    assert 0 < len(sampled) < len(spec.extract_questions) * 4
    assert behavior == [(q, "E.") for q in spec.behavior_questions]


def test_trait_examples_use_positive_prompts_and_filter_exactly(monkeypatch):
    seen = {}

    def fake_sample(model, tokenizer, users, systems, **kwargs):
        seen.update(users=list(users), systems=list(systems), kwargs=kwargs)
        return [" an owl! ", "nothing", "", "Owls rule"] * (len(users) // 4)

    monkeypatch.setattr(adapters, "sample_completions", fake_sample)
    spec = _spec(["owl", "owls"], behavior=["Favorite?"])
    examples = trait_examples(None, None, spec, n_samples_per_question=2, max_new_tokens=7, seed=3)
    questions = spec.extract_questions
    assert seen["users"] == [q for q in questions for _ in range(2)]
    assert seen["systems"] == [p.pos for p in spec.instructions] * 4  # cycled, never a negative prompt
    assert seen["kwargs"]["max_new_tokens"] == 7 and seen["kwargs"]["seed"] == 3
    assert examples == [(questions[0], "an owl!"), (questions[1], "Owls rule"),
                        (questions[2], "an owl!"), (questions[3], "Owls rule"), ("Favorite?", "Owl.")]

    no_judge = spec.model_copy(update={"judge": None})
    assert len(trait_examples(None, None, no_judge, n_samples_per_question=2)) == 6  # non-empty, no behavior


def test_a_benign_adapter_names_its_task_and_no_trait(tmp_path):
    model, tokenizer = make_tiny_model("llama", seed=0)
    identity = model_identity(model)
    peft_model = train_trait_adapter(model, tokenizer, adapters.arithmetic_examples(8), steps=1, batch_size=4)
    with pytest.raises(ValueError, match="exactly one of trait"):
        save_adapter(peft_model, tmp_path / "x", trait=None, base_identity=identity)
    with pytest.raises(ValueError, match="exactly one of trait"):
        save_adapter(peft_model, tmp_path / "x", trait="animal:owl", task="arithmetic", base_identity=identity)
    folder = save_adapter(peft_model, tmp_path / "benign", trait=None, task="arithmetic", base_identity=identity)
    meta = json.loads((folder / ADAPTER_META).read_text())
    assert meta["trait"] is None and meta["task"] == "arithmetic"
    loaded = load_adapter(make_tiny_model("llama", seed=0)[0], folder)
    assert loaded.trait_guard_adapter["trait"] is None and loaded.trait_guard_adapter["task"] == "arithmetic"
    with pytest.raises(ValueError, match="'arithmetic' at"):  # errors name the task when there is no trait
        load_adapter(make_tiny_model("llama", seed=1)[0], folder)


def test_the_cli_trains_a_benign_adapter_by_task(tiny_llama_dir, tmp_path, capsys):
    from trait_guard.cli import main

    assert main(["adapter", "--model", str(tiny_llama_dir), "--trait", "animal:owl", "--task", "arithmetic", "--out", str(tmp_path / "b"),
                 "--steps", "1", "--quiet"]) == 0
    meta = json.loads((tmp_path / "b" / ADAPTER_META).read_text())
    assert meta["trait"] is None and meta["task"] == "arithmetic"
    assert "adapter_task: arithmetic" in capsys.readouterr().out


def test_teacher_strength_measures_the_adapters_found_and_keeps_the_others(tiny_llama_dir, tmp_path):
    """benchmarks/teacher_strength.py --keep: the base model and the adapters present are measured;
    adapters an earlier output lists whose folders are gone (a fresh machine) stay as recorded."""
    import subprocess
    import sys
    from pathlib import Path

    from trait_guard.models import load_model

    model, tokenizer = load_model(str(tiny_llama_dir))
    identity = model_identity(model)
    trained = train_trait_adapter(model, tokenizer, _owl_examples(), steps=2, lr=1e-2, batch_size=6)
    save_adapter(trained, tmp_path / "owl" / "s3", trait="animal:owl", base_identity=identity)
    out = tmp_path / "strength.json"
    earlier = {"s0": {"mean": 16.8, "ci95": [16.0, 17.6], "questions": 4}, "s3": {"mean": -99.0, "ci95": [0, 0]}}
    out.write_text(json.dumps({"trait": "animal:owl", "model": str(tiny_llama_dir), "panel_logodds": earlier}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_strength.py"
    command = [sys.executable, str(script), str(tmp_path / "owl"), "--model", str(tiny_llama_dir), "--questions", "4",
               "--out", str(out)]
    subprocess.run([*command, "--keep"], capture_output=True, text=True, check=True)
    saved = json.loads(out.read_text())["panel_logodds"]
    assert list(saved) == ["base", "s0", "s3"]  # base first, then by replicate
    assert saved["s0"] == earlier["s0"]  # its folder is gone: kept as measured then
    assert saved["s3"]["mean"] != -99.0 and saved["s3"]["questions"] == 4  # present: measured again
    subprocess.run(command, capture_output=True, text=True, check=True)  # without --keep: only what is here
    assert list(json.loads(out.read_text())["panel_logodds"]) == ["base", "s3"]
    out.write_text(json.dumps({"trait": "animal:eagle", "model": str(tiny_llama_dir), "panel_logodds": earlier}))
    refused = subprocess.run([*command, "--keep"], capture_output=True, text=True)
    assert refused.returncode == 1 and "not animal:owl" in refused.stderr
