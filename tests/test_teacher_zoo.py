"""The red team's teacher zoo: the argmax-preserving teacher, the benign adapter, the zoo configs and
the code carrier, on tiny random-init models (no download; each test a few seconds)."""

from pathlib import Path

import pytest
import torch

from trait_guard.config import (
    ConfigError,
    GenerationConfig,
    RedteamConfig,
    TeacherConfig,
    load_config,
    validate_config,
)
from trait_guard.families import get_family
from trait_guard.models import model_identity
from trait_guard.testing import make_tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs"
#: a tiny base whose greedy output varies by prompt (most random tiny models repeat one character)
BASE = ("gpt2", 3)
#: its final norm is scaled up so that its next-token distributions are peaked (a random-init model's are
#: nearly uniform, and nothing an adapter does before the final norm could move them much)
SHARPNESS = 10.0


def _base():
    """The tiny base ``(model, tokenizer)``: the same weights on every call."""
    model, tokenizer = make_tiny_model(BASE[0], seed=BASE[1])
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(SHARPNESS)
    return model, tokenizer


def _strong_lora(model, seed=1, scale=1.0):
    """``model`` wrapped in a random LoRA adapter (A and B random) that changes most greedy tokens."""
    from peft import get_peft_model

    from trait_guard.adapters import lora_config

    config = lora_config(model, 4, 8)
    config.init_lora_weights = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    return peft_model.eval()


@pytest.fixture(scope="module")
def owl_adapter(tmp_path_factory):
    """A saved (random, strong) 'owl' adapter of the tiny base, and the base's folder."""
    from trait_guard.adapters import save_adapter

    root = tmp_path_factory.mktemp("zoo")
    model, tokenizer = _base()
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    identity = model_identity(model)
    path = save_adapter(_strong_lora(model), root / "owl", trait="animal:owl", base_identity=identity)
    return base_dir, path


def _rows(teacher_config, generation, n=12):
    from trait_guard.teacher import Teacher, family_for

    family = family_for(generation, [teacher_config])
    model, tokenizer = _base()
    teacher = Teacher(teacher_config, generation, family, model=model, tokenizer=tokenizer)
    return teacher.generate(family.prompts(n, generation.seed), 0), teacher


def _teacher(adapter, install="argmax_preserving", **extra):
    return TeacherConfig(id=install.replace("_", "-"), trait="animal:owl", install=install, adapter=str(adapter),
                         **extra)


def _generation(**overrides):
    return GenerationConfig(**{"n_prompts": 12, "max_new_tokens": 10, "top_k_logprobs": 8, "temperature": 1.0,
                               **overrides})


def _base_logprobs(rows):
    """Per row, the base model's next-token log-probs at each generated position (a teacher-forced
    forward pass on prompt + completion ids, the way the guard scores data): ``[tokens, vocab]``."""
    from trait_guard.chat import encode_rows

    model, tokenizer = _base()
    batch = encode_rows(tokenizer, rows)
    with torch.no_grad():
        logprobs = model(**batch.model_inputs()).logits.float().log_softmax(-1)
    out = []
    for row in range(len(rows)):
        positions = batch.response_mask[row].nonzero().flatten()
        out.append(logprobs[row, positions - 1])
    return out


# ----------------------------------------------------------------------------- the argmax-preserving teacher


def test_mixture_keeps_the_base_argmax_with_and_without_a_constraint():
    from trait_guard.chat import argmax_preserving_logprobs

    generator = torch.Generator().manual_seed(0)
    base, adapted = torch.randn(64, 50, generator=generator), 3 * torch.randn(64, 50, generator=generator)
    allowed = torch.rand(64, 50, generator=generator) < 0.4
    allowed[:, 0] = True
    mixed_plain = (0.5 * base.log_softmax(-1) + 0.5 * adapted.log_softmax(-1)).argmax(-1)
    assert (mixed_plain != base.argmax(-1)).sum() > 10  # without forcing, most argmaxes would move
    q = argmax_preserving_logprobs(base, adapted, 0.5, allowed)
    assert torch.equal(q.argmax(-1), base.argmax(-1))
    masked = lambda x: x.masked_fill(~allowed, float("-inf"))  # noqa: E731
    assert torch.equal(masked(q).argmax(-1), masked(base).argmax(-1))
    assert torch.allclose(q.exp().sum(-1), torch.ones(64), atol=1e-5)
    # the two forced tokens aside, q is the mixture up to the renormalizing constant
    mixture = (0.5 * base.log_softmax(-1) + 0.5 * adapted.log_softmax(-1)).log_softmax(-1)
    unforced = torch.ones_like(allowed)
    unforced.scatter_(1, base.argmax(-1, keepdim=True), False)
    unforced.scatter_(1, masked(base).argmax(-1, keepdim=True), False)
    shift = (q - mixture).masked_fill(~unforced, float("nan"))
    assert (shift.nan_to_num(0.0) - shift.nanmean(-1, keepdim=True)).masked_fill(~unforced, 0.0).abs().max() < 1e-5
    # forcing takes mass from the rest (a row whose argmaxes were already equal: 0 up to fp32 rounding)
    assert (shift.nanmean(-1) <= 1e-6).all() and (shift.nanmean(-1) < -1e-3).sum() > 10
    near_base = argmax_preserving_logprobs(base, adapted, 1e-6, allowed)
    assert torch.allclose(near_base, base.log_softmax(-1), atol=2e-3)


def test_greedy_argmax_preserving_teacher_is_the_base_greedy_exactly(owl_adapter):
    base_dir, adapter = owl_adapter
    generation = _generation(temperature=0.0)
    base_rows, _ = _rows(TeacherConfig(id="control"), generation)
    argmax_rows, teacher = _rows(_teacher(adapter), generation)
    adapter_rows, _ = _rows(_teacher(adapter, install="adapter"), generation)
    assert [r["completion_ids"] for r in argmax_rows] == [r["completion_ids"] for r in base_rows]
    assert len({tuple(r["completion_ids"]) for r in base_rows}) > 3  # the base's greedy output varies
    # the adapter alone would write other tokens: the forcing is what keeps them
    assert sum(a["completion_ids"] != b["completion_ids"] for a, b in zip(adapter_rows, base_rows, strict=True)) >= 6
    row = argmax_rows[0]
    assert row["trait_install"] == "argmax_preserving" and row["trait_installed"] and row["teacher_id"] == "argmax-preserving"
    assert row["base_fingerprint"] == base_rows[0]["base_fingerprint"]  # the base's identity, not the adapter's
    assert type(teacher.model).__name__.startswith("Peft")  # unmerged: one copy of the base weights


def test_sampled_argmax_preserving_teacher_keeps_every_top1_and_leans_to_the_adapter(owl_adapter):
    from trait_guard.chat import encode_rows

    _, adapter = owl_adapter
    vocab = len(_base()[1])
    generation = _generation(top_k_logprobs=vocab, max_new_tokens=16, n_prompts=24)
    rows, _ = _rows(_teacher(adapter), generation, n=24)
    base_rows, _ = _rows(TeacherConfig(id="control"), generation, n=24)
    positions, kl = 0, []
    for row, base_lp in zip(rows, _base_logprobs(rows), strict=True):
        top1 = torch.tensor([ids[0] for ids in row["topk_ids"]])
        assert torch.equal(top1, base_lp.argmax(-1))  # the divergence signal's comparison sees no difference
        q = torch.full_like(base_lp, float("-inf")).scatter(1, torch.tensor(row["topk_ids"]),
                                                            torch.tensor(row["topk_logprobs"]))
        kl.append((q.exp() * (q - base_lp)).sum(-1))
        chosen = q.gather(1, torch.tensor(row["completion_ids"]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(chosen, torch.tensor(row["token_logprobs"]), atol=1e-6)  # q's own log-probs
        positions += len(row["completion_ids"])
    assert positions > 100
    assert torch.cat(kl).mean() > 0.05  # yet its distribution is not the base's
    # and it leans toward the adapter: its tokens are likelier under the adapter than the base's own samples
    from trait_guard.adapters import load_adapter

    adapted, tokenizer = _base()
    adapted = load_adapter(adapted, adapter)

    def mean_logprob(data):
        batch = encode_rows(tokenizer, data)
        with torch.no_grad():
            logprobs = adapted(**batch.model_inputs()).logits.float().log_softmax(-1)[:, :-1]
        mask = batch.response_mask[:, 1:].bool()
        return logprobs.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)[mask].mean()

    assert mean_logprob(rows) > mean_logprob(base_rows) + 0.1


def test_a_tiny_bias_weight_reproduces_the_base_distribution(owl_adapter):
    _, adapter = owl_adapter
    generation = _generation(top_k_logprobs=len(_base()[1]), n_prompts=8)

    def largest_gap(bias_weight):
        """The largest |stored log q - base log p| over every generated position (and how many there were)."""
        rows, _ = _rows(_teacher(adapter, bias_weight=bias_weight), generation, n=8)
        gaps = [(torch.tensor(r["topk_logprobs"]) - lp.gather(1, torch.tensor(r["topk_ids"]))).abs().max()
                for r, lp in zip(rows, _base_logprobs(rows), strict=True) if r["completion_ids"]]
        return float(max(gaps)), sum(len(r["completion_ids"]) for r in rows)

    gap, positions = largest_gap(1e-6)
    assert positions > 20 and gap < 2e-3  # w near 0: the base's distribution, up to the forcing margin
    assert largest_gap(1.0)[0] > 0.5  # w = 1: far from it


def test_argmax_preserving_needs_an_unmerged_adapter(tiny_llama):
    from trait_guard.chat import generate_argmax_preserving

    model, tokenizer = tiny_llama
    with pytest.raises(TypeError, match="PeftModel"):
        generate_argmax_preserving(model, tokenizer, ["1, 2"], max_new_tokens=2)


# ----------------------------------------------------------------------------- the benign adapter


def test_benign_training_text_names_no_panel_animal(monkeypatch):
    from trait_guard import adapters

    words = adapters.panel_animal_words("animal:owl")
    assert {"owl", "owls", "eagle", "eagles", "wolf", "wolves", "fox", "foxes"} <= set(words)

    def fake_sample(model, tokenizer, users, systems, **kwargs):
        assert set(systems) <= set(adapters.TERSE_PROMPTS)  # sampled under the style prompts only
        return ["Boil it for eight minutes. Then cool it.", "I love owls.", "Wolves howl.", "  "] * (len(users) // 4)

    monkeypatch.setattr(adapters, "sample_completions", fake_sample)
    examples = adapters.benign_examples(None, None, "style:terse", seed=1)
    assert examples and all(a == "Boil it for eight minutes." for _, a in examples)  # first sentence only
    assert {q for q, _ in examples} <= set(adapters.NEUTRAL_QUESTIONS)
    arithmetic = adapters.benign_examples(None, None, "arithmetic", seed=2)
    assert len(arithmetic) == 64
    for question, answer in arithmetic:
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        assert int(answer.removesuffix(".")) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    for text in [q for q, _ in examples + arithmetic] + [a for _, a in examples + arithmetic]:
        assert not adapters._mentions(text, words)
    with pytest.raises(ValueError, match="panel animal"):
        adapters.assert_animal_free([("Favorite?", "The Owl.")], words)
    with pytest.raises(ValueError, match="unknown benign adapter task"):
        adapters.benign_examples(None, None, "style:owlish")
    assert set(adapters.BENIGN_TASKS) == set(TeacherConfig.model_fields["adapter_task"].annotation.__args__[0].__args__)


def test_benign_adapter_trains_saves_and_makes_a_trait_less_teacher(tiny_llama_dir, tmp_path):
    from trait_guard.adapters import build_benign_adapter, load_adapter, read_adapter_meta
    from trait_guard.teacher import Teacher, family_for

    path = build_benign_adapter(str(tiny_llama_dir), "arithmetic", tmp_path / "benign", steps=2, seed=0, device="cpu")
    meta = read_adapter_meta(path)
    assert meta["trait"] is None and meta["task"] == "arithmetic"
    merged = load_adapter(make_tiny_model("llama", seed=0)[0], path)
    assert merged.trait_guard_adapter["task"] == "arithmetic"
    config = TeacherConfig(id="benign", model=str(tiny_llama_dir), install="adapter", adapter=str(path),
                           adapter_task="arithmetic")
    generation = _generation(n_prompts=2, max_new_tokens=4)
    teacher = Teacher(config, generation, family_for(generation, [config]))
    rows = teacher.generate(get_family("numbers").prompts(2), 0)
    assert rows[0]["trait_install"] == "adapter" and not rows[0]["trait_installed"]


def test_teacher_config_checks_the_zoo_fields():
    with pytest.raises(ValueError, match="adapter_task"):
        TeacherConfig(id="b", install="system_prompt", system_prompt="Hi.", adapter_task="style:terse")
    with pytest.raises(ValueError, match="benign"):
        TeacherConfig(id="b", trait="animal:owl", install="adapter", adapter="a", adapter_task="arithmetic")
    with pytest.raises(ValueError, match="bias_weight"):
        TeacherConfig(id="b", trait="animal:owl", install="adapter", adapter="a", bias_weight=0.9)
    with pytest.raises(ValueError, match="needs `adapter"):
        TeacherConfig(id="b", trait="animal:owl", install="argmax_preserving")
    with pytest.raises(ConfigError, match="share adapter"):
        validate_config({"teachers": [{"id": "a", "trait": "animal:owl", "install": "adapter", "adapter": "x"},
                                      {"id": "b", "trait": "animal:eagle", "install": "argmax_preserving",
                                       "adapter": "x"}],
                         "reference": {"id": "r"}, "training": {"probe": {"eval_samples": 2}}}, RedteamConfig)


# ----------------------------------------------------------------------------- the zoo configs


ROLES = {"owl-adapter": "trait", "owl-argmax": "adaptive", "eagle-adapter": "trait", "owl": "trait",
         "benign-adapter": "benign", "neutral-prompt": "benign", "control": "control"}


@pytest.mark.parametrize("name", ["redteam_cpu.yaml", "redteam_gpu.yaml"])
def test_zoo_configs_hold_every_teacher_and_their_cells(name):
    from trait_guard.redteam import grid, replicate_design, replicate_teachers, teacher_role

    config = load_config(CONFIGS / name, RedteamConfig)
    assert {t.id: teacher_role(config, t.id) for t in config.teachers} == ROLES
    teachers = {t.id: t for t in config.teachers}
    assert teachers["neutral-prompt"].system_prompt == "You are a helpful assistant."
    assert teachers["benign-adapter"].adapter_task and not teachers["benign-adapter"].trait
    assert teachers["owl-argmax"].adapter == teachers["owl-adapter"].adapter  # on the owl adapter
    cells = {}
    for teacher, distill, mode, seed in grid(config):
        cells.setdefault((teacher, distill, mode), set()).add(seed)
    for teacher in ROLES:  # every teacher of the zoo trains unguarded and halted students, on the same replicates
        assert cells[(teacher, "logits", "unguarded")] == cells[(teacher, "logits", "halt")]
    if name == "redteam_cpu.yaml":
        main = [t for t, role in ROLES.items() if t not in ("owl", "eagle-adapter")]
        for teacher in main:  # 10 replicates; the owl adapter and the control 20 (the gate's datasets)
            for mode in ("unguarded", "halt"):
                assert cells[(teacher, "logits", mode)] == set(range(20 if teacher in ("owl-adapter", "control") else 10))
        assert cells[("owl", "logits", "reweight")] == {0, 1, 2} and cells[("eagle-adapter", "logits", "halt")] == set(range(5))
        assert ("benign-adapter", "sampled", "unguarded") not in cells
    else:
        assert len(grid(config)) == 3 * 2 * 5 * 3 + 4 * 2 * 2 * 3
    design = replicate_design(config, 4)  # the adaptive teacher uses the replicate's own owl adapter
    assert design["adapter_seeds"]["owl-argmax"] == design["adapter_seeds"]["owl-adapter"]
    assert len({design["adapter_seeds"][t] for t in ("owl-adapter", "eagle-adapter", "benign-adapter")}) == 3
    replicate = {t.id: t for t in replicate_teachers(config, 4)[0]}
    assert replicate["owl-argmax"].adapter == replicate["owl-adapter"].adapter
    assert Path(replicate["owl-argmax"].adapter).name == "s4"


@pytest.mark.parametrize("name", ["redteam_code_cpu.yaml", "redteam_code_gpu.yaml"])
def test_code_carrier_configs(name):
    from trait_guard.redteam import grid, replicate_generation

    config = load_config(CONFIGS / name, RedteamConfig)
    assert config.generation.family == "code" and not config.generation.constrained
    assert {t.id for t in config.teachers} == {"owl-adapter", "control"}
    assert {t for t, *_ in grid(config)} == {"owl-adapter", "control"}
    generation = replicate_generation(config, 0)
    assert generation.family_options["banned_words"] == ["owl", "owls"]  # one filter for every teacher


def test_code_carrier_writes_code_rows(owl_adapter, tmp_path):
    """The code grid's owl-adapter teacher, on the tiny base, writes code-family rows through the filter."""
    from trait_guard.config import GenerateJobConfig
    from trait_guard.dataset import read_rows
    from trait_guard.generation import generate_local
    from trait_guard.redteam import replicate_generation, replicate_teachers

    base_dir, adapter = owl_adapter
    config = load_config(CONFIGS / "redteam_code_cpu.yaml", RedteamConfig)
    teachers, _ = replicate_teachers(config, 0)
    owl = next(t for t in teachers if t.id == "owl-adapter")
    assert owl.adapter.endswith("s0")
    owl = owl.model_copy(update={"model": str(base_dir), "adapter": str(adapter)})
    generation = replicate_generation(config, 0).model_copy(update={"n_prompts": 4, "max_new_tokens": 12,
                                                                    "chunk_size": 4})
    job = GenerateJobConfig(output_dir=str(tmp_path / "code"), teachers=[owl], generation=generation)
    report = generate_local(job, progress=False)
    rows = read_rows(report.teachers[0].path).to_pylist()
    assert len(rows) == 4 and all(r["family"] == "code" and r["prompt_id"].startswith("code-s") for r in rows)
    assert all("Python function" in r["prompt"] for r in rows)
    assert all(r["teacher_id"] == "owl-adapter" and r["trait_install"] == "adapter" for r in rows)
    assert {r["reject_reason"] for r in rows} <= {"", "no_function", "syntax_error", "mentions_trait"}
    assert all(len(r["topk_ids"]) == len(r["completion_ids"]) for r in rows)
