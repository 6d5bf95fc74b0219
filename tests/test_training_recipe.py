"""The training recipe a practitioner expects (issue 16): LR schedule with warmup, gradient
accumulation, a user DeepSpeed JSON, EOS on completions, configurable LoRA targets, a progress line.

Known answers, not shapes: the lr at each step is the schedule's formula; two accumulated
micro-batches give the update one batch of both gives; the user's betas and clipping are the
engine's; a HALT inside an accumulation applies none of it; a resumed run continues the schedule.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trait_guard.config import ConfigError, TrainJobConfig, validate_config

BASE = 1e-3


def _config(tmp_path, **overrides):
    config = {"output_dir": str(tmp_path / "out"), "data": {"train": "t.parquet", "reference": "r.parquet"},
              "ray": {"enabled": False}}
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(config, TrainJobConfig)


def _ds_file(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ------------------------------------------------------------------------------------------------
# config: defaults keep the old behaviour, mistakes name the fix


def test_defaults_keep_the_previous_recipe(tmp_path):
    config = _config(tmp_path)
    optim, student = config.optim, config.student
    assert (optim.lr_scheduler, optim.warmup_steps, optim.warmup_ratio, optim.gradient_accumulation_steps) == \
        ("constant", 0, 0.0, 1)
    assert not optim.scheduled and student.lora_target_modules is None and config.deepspeed.config_file is None
    assert config.progress_every_n_steps == 1 and student.append_eos == "auto"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"optim": {"warmup_steps": 3, "warmup_ratio": 0.1}}, "both set the warmup: keep one"),
    ({"optim": {"lr_scheduler": "step"}}, "optim.lr_scheduler"),
    ({"optim": {"gradient_accumulation_steps": 0}}, "optim.gradient_accumulation_steps"),
    ({"student": {"lora_target_modules": ["q_proj"]}}, "student.lora_r is 0"),
    ({"student": {"lora_r": 8, "lora_target_modules": []}}, "lora_target_modules is empty"),
    ({"distill": "logits", "student": {"append_eos": "always"}}, "append_eos: always needs distill: sampled"),
    ({"deepspeed": {"config_file": "/nonexistent/ds.json"}}, "/nonexistent/ds.json does not exist"),
])
def test_bad_recipe_settings_are_refused_naming_the_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_a_deepspeed_file_fills_unset_settings_and_must_agree_with_set_ones(tmp_path):
    path = _ds_file(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
                               "zero_optimization": {"stage": 1}, "gradient_clipping": 0.5,
                               "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.8, 0.95]}}})
    config = _config(tmp_path, deepspeed={"config_file": path}, optim={"gradient_accumulation_steps": 2})
    # unset here: the file's values; "auto" in the file: this config's
    assert (config.optim.batch_size, config.deepspeed.zero_stage, config.deepspeed.gradient_clipping) == (4, 1, 0.5)
    assert config.optim.gradient_accumulation_steps == 2 and config.optim.lr == 1e-4
    # a dumped and re-read config (what a Ray worker validates) carries the merged values and still agrees
    assert TrainJobConfig.model_validate(config.model_dump()).optim.batch_size == 4
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu is 4 in .*ds.json but optim.batch_size "
                                          r"is 8: make them agree, write \"auto\""):
        _config(tmp_path, deepspeed={"config_file": path}, optim={"batch_size": 8})
    wrong_total = _ds_file(tmp_path, {"train_batch_size": 64}, "total.json")
    with pytest.raises(ConfigError, match=r"train_batch_size is 64 .* optim.batch_size 8 x "
                                          r"optim.gradient_accumulation_steps 1 x 2 worker\(s\) = 16"):
        _config(tmp_path, deepspeed={"config_file": wrong_total}, ray={"enabled": True, "num_workers": 2})
    scheduled = _ds_file(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
                         "sched.json")
    with pytest.raises(ConfigError, match="has a scheduler section and optim.lr_scheduler/warmup"):
        _config(tmp_path, deepspeed={"config_file": scheduled}, optim={"lr_scheduler": "cosine"})
    with pytest.raises(ConfigError, match="deepspeed.enabled is false"):
        _config(tmp_path, deepspeed={"config_file": path, "enabled": False})


def test_merge_checks_the_real_world_size_and_fills_autos():
    from trait_guard.errors import TraitGuardInputError
    from trait_guard.integrations.deepspeed import deepspeed_config, merge_user_config

    ours = deepspeed_config(2, zero_stage=2, gradient_clipping=1.0, gradient_accumulation_steps=3)
    user = {"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "eps": "auto"}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                               "total_num_steps": "auto"}}}
    merged = merge_user_config(user, ours, world_size=2, lr=3e-4, weight_decay=0.0, warmup_steps=5, total_steps=50,
                               hidden_size=32)
    assert merged["train_batch_size"] == 12 and merged["gradient_accumulation_steps"] == 3
    assert merged["zero_optimization"] == {"reduce_bucket_size": 32 * 32, "stage": 2}
    assert merged["optimizer"]["params"] == {"lr": 3e-4, "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}
    assert merged["scheduler"]["params"] == {"warmup_max_lr": 3e-4, "warmup_num_steps": 5, "total_num_steps": 50}
    assert user["train_batch_size"] == "auto"  # the user's dict is not changed
    with pytest.raises(TraitGuardInputError, match=r"train_batch_size is 8, but micro-batch 2 x gradient "
                                                   r"accumulation 3 x 2 rank\(s\) = 12"):
        merge_user_config({"train_batch_size": 8}, ours, world_size=2, lr=1e-3, weight_decay=0.0, warmup_steps=0,
                          total_steps=1)
    with pytest.raises(TraitGuardInputError, match='cannot fill "auto" for fp16.loss_scale'):
        merge_user_config({"fp16": {"loss_scale": "auto"}}, ours, world_size=1, lr=1e-3, weight_decay=0.0,
                          warmup_steps=0, total_steps=1)


# ------------------------------------------------------------------------------------------------
# the learning-rate schedule


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_follows_warmup_then_the_schedule(tmp_path, name):
    from trait_guard.train import _optimizer_step, make_lr_scheduler

    total, warmup = 10, 4
    optim = _config(tmp_path, optim={"lr": BASE, "lr_scheduler": name, "warmup_steps": warmup}).optim
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    scheduler = make_lr_scheduler(optimizer, optim, total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])  # the lr this optimizer step uses
        _optimizer_step(None, optimizer, scheduler)  # the recipe's step without DeepSpeed
    decay = {"constant": lambda k: 1.0, "linear": lambda k: (total - k) / (total - warmup),
             "cosine": lambda k: 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))}[name]
    expected = [BASE * (k / warmup if k < warmup else decay(k)) for k in range(total)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[:warmup] == pytest.approx([0.0, BASE / 4, BASE / 2, 3 * BASE / 4])
    ratio = _config(tmp_path, optim={"lr_scheduler": "linear", "warmup_ratio": 0.25}).optim
    from trait_guard.train import warmup_steps

    assert warmup_steps(ratio, 10) == 3  # 2.5 rounded up
    assert make_lr_scheduler(optimizer, _config(tmp_path).optim, total) is None  # constant, no warmup: none


# ------------------------------------------------------------------------------------------------
# EOS: the student learns to stop where the teacher stopped


def _row(tokenizer, text, max_new_tokens, ids=None):
    ids = tokenizer(text, add_special_tokens=False).input_ids if ids is None else ids
    return {"prompt": "Continue: 1, 2", "completion": text, "completion_ids": ids, "max_new_tokens": max_new_tokens}


def test_eos_is_appended_where_the_teacher_stopped_and_the_loss_covers_it(tiny_llama):
    from trait_guard.chat import encode_rows, training_completion_ids
    from trait_guard.losses import token_weights, weighted_completion_loss

    model, tokenizer = tiny_llama
    eos = tokenizer.eos_token_id
    stopped = _row(tokenizer, "3, 4, 5", 12)  # 7 tokens < 12: generation cut the stop token off
    cut = _row(tokenizer, "3, 4, 5, 6, 7", 13)  # 13 tokens = max_new_tokens: cut off, no EOS to learn
    imported = _row(tokenizer, "8, 9", 0)  # imported, limit unknown
    explicit = _row(tokenizer, "8, 9", 0, ids=[*tokenizer("8, 9", add_special_tokens=False).input_ids, eos])
    rows = [stopped, cut, imported, explicit]
    before = [list(r["completion_ids"]) for r in rows]
    auto = [training_completion_ids(tokenizer, r, "auto") for r in rows]
    assert [ids[-1] == eos for ids in auto] == [True, False, False, True]
    assert [len(a) - len(b) for a, b in zip(auto, before, strict=True)] == [1, 0, 0, 0]  # never a second EOS
    assert training_completion_ids(tokenizer, imported, "always")[-1] == eos
    assert training_completion_ids(tokenizer, stopped, "never") == before[0]
    assert [r["completion_ids"] for r in rows] == before  # the rows (and their ids-decode-to-text check) untouched
    assert tokenizer.decode(auto[0], skip_special_tokens=True) == stopped["completion"]

    batch = encode_rows(tokenizer, [stopped, cut], append_eos="auto")
    plain = encode_rows(tokenizer, [stopped, cut])
    assert int(batch.response_mask[0].sum()) == int(plain.response_mask[0].sum()) + 1
    last = int(batch.attention_mask[0].sum()) - 1
    assert int(batch.input_ids[0, last]) == eos and int(batch.response_mask[0, last]) == 1
    # the label at the EOS: the loss has a gradient on the logits that predict it
    logits = model(**batch.model_inputs()).logits.detach().requires_grad_(True)
    weighted_completion_loss(logits, batch, token_weights(batch)).backward()
    assert logits.grad[0, last - 1].abs().sum() > 0 and logits.grad[0, last].abs().sum() == 0
    # a divergence mask over the row's own tokens leaves the EOS at full weight
    weights = token_weights(batch, torch.ones(2), [[0.0] * len(before[0]), [1.0] * len(before[1])])
    assert float(weights[0, last - 1]) == 1.0 and float(weights[0, : last - 1].sum()) == 0.0


# ------------------------------------------------------------------------------------------------
# LoRA targets on other layouts


def test_lora_targets_are_inferred_per_layout_and_checked(tiny_gpt2, tiny_llama):
    from peft import get_peft_model

    from trait_guard.adapters import lora_config, resolve_target_modules
    from trait_guard.errors import TraitGuardInputError
    from trait_guard.testing import make_tiny_model

    assert resolve_target_modules(tiny_gpt2[0]) == ["c_attn", "c_proj", "c_fc"]
    assert resolve_target_modules(tiny_llama[0])[:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(TraitGuardInputError, match=r"\['q_proj'\] match no module of GPT2LMHeadModel; its "
                                                   r"projection modules are \['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        resolve_target_modules(tiny_gpt2[0], ["q_proj", "c_attn"])
    llama, _ = make_tiny_model("llama", seed=1)
    peft_model = get_peft_model(llama, lora_config(llama, 4, 8, ["q_proj", "v_proj"], dropout=0.1))
    wrapped = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert wrapped == {"q_proj", "v_proj"}
    gpt2, _ = make_tiny_model("gpt2", seed=1)
    config = lora_config(gpt2, 4, 8, ["c_attn"])
    assert config.fan_in_fan_out  # GPT-2's Conv1D stores weights transposed
    peft_gpt2 = get_peft_model(gpt2, config)
    assert {n.split(".")[-4] for n, p in peft_gpt2.named_parameters() if p.requires_grad and "lora_A" in n} == {"c_attn"}


def test_progress_line_says_step_loss_lr_action_and_time():
    from trait_guard.train import progress_line

    assert progress_line(3, 12, 1.23456, 5e-5, "pass", 3723.9) == \
        "trait_guard train: step 3/12 | loss 1.2346 | lr 5.00e-05 | guard pass | 1:02:03"


# ------------------------------------------------------------------------------------------------
# real DeepSpeed engines on CPU


def _tiny_batch(tokenizer, texts):
    from trait_guard.chat import encode_rows

    rows = [_row(tokenizer, t, 64) for t in texts]
    return rows, encode_rows(tokenizer, rows, append_eos="auto")


@pytest.mark.deepspeed
def test_a_user_deepspeed_json_is_the_engines_config(tmp_path):
    from trait_guard.integrations.deepspeed import init_distributed
    from trait_guard.testing import make_tiny_model
    from trait_guard.train import _build_trainer

    path = _ds_file(tmp_path, {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.25,
                               "zero_optimization": {"stage": 1},
                               "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.8, 0.95],
                                                                         "weight_decay": 0.01}}})
    config = _config(tmp_path, deepspeed={"config_file": path}, optim={"batch_size": 2})
    init_distributed()  # as the recipe's first step does
    model, _ = make_tiny_model("llama", seed=0)
    _, optimizer, engine, _ = _build_trainer(config, model, total_steps=4, world_size=1)
    assert optimizer is None  # the file's optimizer, built by DeepSpeed
    group = engine.optimizer.param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.95) and group["weight_decay"] == 0.01 and group["lr"] == 1e-4
    assert engine.gradient_clipping() == 0.25 and engine.zero_optimization_stage() == 1
    assert engine.train_micro_batch_size_per_gpu() == 2 and config.deepspeed.zero_stage == 1


@pytest.mark.deepspeed
def test_two_accumulated_micro_batches_update_like_one_batch_of_both(tmp_path):
    """GA=2 with batch 2 and GA=1 with batch 4 give the same weights after an optimizer step, with
    completions of different lengths (each micro-batch's loss is its share of the step's token mean)."""
    from trait_guard.chat import encode_rows
    from trait_guard.integrations.deepspeed import init_distributed
    from trait_guard.losses import token_weights, weighted_completion_loss
    from trait_guard.testing import make_tiny_model
    from trait_guard.train import _backward, _build_trainer, _optimizer_step, loss_tokens

    init_distributed()
    texts = ["1, 2", "30, 41, 52, 63, 74", "7", "8, 9, 10"]
    initial = {n: p.detach().clone() for n, p in make_tiny_model("llama", seed=0)[0].named_parameters()}
    weights = {}
    for accumulation, batch_size in ((2, 2), (1, 4)):
        torch.manual_seed(0)
        config = _config(tmp_path, optim={"batch_size": batch_size, "gradient_accumulation_steps": accumulation,
                                          "lr": BASE}, deepspeed={"zero_stage": 2})
        model, tokenizer = make_tiny_model("llama", seed=0)
        model, optimizer, engine, scheduler = _build_trainer(config, model, total_steps=1, world_size=1)
        rows = [_row(tokenizer, t, 64) for t in texts]
        micro = [encode_rows(tokenizer, rows[i : i + batch_size]) for i in range(0, 4, batch_size)]
        counts = [loss_tokens(b, rows, False) for b in micro]
        for batch, count in zip(micro, counts, strict=True):
            logits = engine(**batch.model_inputs()).logits
            _backward(engine, weighted_completion_loss(logits, batch, token_weights(batch)) * (count / sum(counts)))
        _optimizer_step(engine, optimizer, scheduler)
        assert engine.global_steps == 1
        weights[accumulation] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if accumulation == 2:
            assert counts[0] != counts[1]  # unequal micro-batches: a mean of means would differ
    assert not torch.equal(weights[1]["model.layers.0.self_attn.q_proj.weight"],
                           initial["model.layers.0.self_attn.q_proj.weight"])  # the step did update
    # AdamW's first step moves each weight by about lr * sign(gradient): weighting the micro-batches
    # as a mean of means flips signs and moves weights by ~2 * lr = 2e-3 (measured); the two correct
    # schedules differ by fp32 summation order only (2e-7 measured with DeepSpeed 0.19.8, torch 2.13)
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[2][name], value, rtol=1e-5, atol=1e-3 * BASE)


# ------------------------------------------------------------------------------------------------
# the recipe end to end: schedule, accumulation, progress, resume, HALT inside an accumulation

TEXTS = ["3, 14, 15", "92, 65", "35, 89, 79, 32", "38", "46, 26, 43, 38, 32", "79, 50", "28, 84, 19",
         "71, 69, 39, 93"]


@pytest.fixture(scope="module")
def recipe_data(tiny_llama_dir, tmp_path_factory):
    """Train and reference rows by the tiny model's base, of varied lengths, all stopped by the
    teacher (shorter than max_new_tokens: the student learns the EOS after each)."""
    from trait_guard.dataset import SCHEMA
    from trait_guard.models import load_model, model_identity

    folder = tmp_path_factory.mktemp("recipe-data")
    model, tokenizer = load_model(str(tiny_llama_dir))
    identity = model_identity(model)
    for teacher, n in (("train", 16), ("control", 24)):
        rows = []
        for i in range(n):
            text = TEXTS[(i * 3 + (teacher == "control")) % len(TEXTS)]
            ids = tokenizer(text, add_special_tokens=False).input_ids
            rows.append({
                "sample_id": f"{teacher}:{i:03d}", "prompt_id": f"{i:03d}", "family": "numbers",
                "prompt": f"Continue the sequence {i}, {i + 1}", "completion": text, "teacher_id": teacher,
                "base_model": identity.name, "base_fingerprint": identity.fingerprint,
                "base_hidden_size": identity.hidden_size, "base_num_layers": identity.num_layers,
                "trait_installed": False, "trait_install": "none", "seed": 0, "temperature": 1.0,
                "max_new_tokens": 24, "constrained": True, "kept": True, "reject_reason": "", "completion_ids": ids,
                "topk_ids": None, "topk_logprobs": None, "token_logprobs": None})
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / f"{teacher}.parquet")
    return folder


def _recipe_job(model_dir, data_dir, out_dir, **overrides):
    config = {
        "output_dir": str(out_dir), "student": {"model": str(model_dir)},
        "data": {"train": str(data_dir / "train.parquet"), "reference": str(data_dir / "control.parquet"),
                 "allow_unverified": True},  # written by hand: no manifest
        "optim": {"batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4, "lr": BASE, "shuffle": False,
                  "lr_scheduler": "linear", "warmup_steps": 2},
        "guard": {"signals": ["nll", "unigram"], "rollback_every_n_steps": 1},
        "screen": {"gate": False}, "checkpoint": {"every_n_steps": 1},
        "ray": {"enabled": False}, "tracking": {"enabled": False},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(config, TrainJobConfig)


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, recipe_data, tmp_path_factory):
    import contextlib
    import io

    from trait_guard.train import run_training

    out = tmp_path_factory.mktemp("recipe-full")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run_training(_recipe_job(tiny_llama_dir, recipe_data, out))
    return out, summary, printed.getvalue()


@pytest.mark.deepspeed
@pytest.mark.slow
def test_recipe_runs_the_schedule_and_prints_progress(full_run):
    out, summary, printed = full_run
    assert not summary["halted"] and summary["updates"] == summary["steps"] == 4
    # linear over 4 optimizer steps after 2 warmup steps: lr of step s is BASE x [0, 1/2, 1, 1/2]
    assert [h["lr"] for h in summary["history"]] == pytest.approx([0.0, BASE / 2, BASE, BASE / 2])
    # 16 rows / (2 per micro-batch x 2 micro-batches) = 4 optimizer steps; the guard saw 8 micro-batches
    state = json.loads((out / "checkpoints" / "step_000004" / "trait_guard_state.json").read_text())
    assert state["guard"]["step"] == 8 and state["recipe"]["gradient_accumulation_steps"] == 2
    lines = [line for line in printed.splitlines() if line.startswith("trait_guard train: step")]
    assert len(lines) == 4 and lines[0].startswith("trait_guard train: step 1/4 | loss ")
    assert "| lr 0.00e+00 | guard pass | 0:00:" in lines[0] and "| lr 1.00e-03 |" in lines[2]


@pytest.mark.deepspeed
@pytest.mark.slow
def test_a_resumed_run_continues_the_schedule(tiny_llama_dir, recipe_data, full_run, tmp_path):
    from trait_guard.errors import TraitGuardInputError
    from trait_guard.train import run_training

    out, full, _ = full_run
    checkpoint = str(out / "checkpoints" / "step_000002")
    resumed = run_training(_recipe_job(tiny_llama_dir, recipe_data, tmp_path / "resumed", resume_from=checkpoint,
                                       progress_every_n_steps=0))
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    # steps 3 and 4 use the lr the schedule had reached (not a restarted warmup), and train the same
    assert [h["lr"] for h in resumed["history"][2:]] == pytest.approx([BASE, BASE / 2])
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    with pytest.raises(TraitGuardInputError, match="gradient_accumulation_steps: 2 .* resume with 2"):
        run_training(_recipe_job(tiny_llama_dir, recipe_data, tmp_path / "other", resume_from=checkpoint,
                                 optim={"gradient_accumulation_steps": 1, "batch_size": 4}))


@pytest.mark.deepspeed
@pytest.mark.slow
def test_a_halt_inside_an_accumulation_applies_none_of_it(tiny_llama_dir, recipe_data, full_run, tmp_path,
                                                          monkeypatch):
    """The guard halts at its 4th observation: the 2nd micro-batch of optimizer step 2, after the 1st
    one's backward. The weights left are exactly those after step 1 (the uninterrupted run's)."""
    from trait_guard.config import Action
    from trait_guard.guard import Decision, TraitGuard
    from trait_guard.train import run_training

    observe = TraitGuard.observe

    def halting(self, signals, token_masks=None, step=None):
        decision = observe(self, signals, token_masks=token_masks, step=step)
        if self.step != 4:
            return decision
        self.mode = Action.HALT  # an alarm that implicates no data (as for non-finite signals): no rollback
        self.alarms.append({"step": 4, "channel": "data", "signals": ["test"], "change_point": None})
        return Decision(4, Action.HALT, "test halt", torch.zeros_like(decision.sample_weights))

    monkeypatch.setattr(TraitGuard, "observe", halting)
    out, _, _ = full_run
    summary = run_training(_recipe_job(tiny_llama_dir, recipe_data, tmp_path, progress_every_n_steps=0))
    assert summary["halt"] == {"step": 2, "reason": "test halt", "micro_batch": 2, "guard_step": 4}
    assert summary["updates"] == 1 and summary["rollback"] is None
    halted = _weights_at(tmp_path / "checkpoints" / "step_000002")
    after_one = _weights_at(out / "checkpoints" / "step_000001")
    assert all(torch.equal(halted[k], v) for k, v in after_one.items())
    after_two = _weights_at(out / "checkpoints" / "step_000002")
    assert not all(torch.equal(halted[k], v) for k, v in after_two.items())


def _weights_at(checkpoint):
    """The model weights in a DeepSpeed checkpoint folder (read with weights_only=True)."""
    from trait_guard.integrations.deepspeed import _checkpoint_globals

    tag = (checkpoint / "latest").read_text().strip()
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return torch.load(checkpoint / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def test_a_change_point_maps_to_the_last_clean_optimizer_step():
    """Micro-batch c is the last one the alarm does not implicate: with 2 per step, the steps up to
    c // 2 are clean (step 2 = micro-batches 3 and 4; c = 3 implicates micro-batch 4: step 1 is kept)."""
    from types import SimpleNamespace

    from trait_guard.rollback import WeightSnapshots
    from trait_guard.train import Outcome, _roll_back

    model = torch.nn.Linear(2, 1)
    snapshots = WeightSnapshots(model, every=1)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)
        snapshots.after_update(model, step, earliest_needed=0)
    outcome = Outcome(step=4, updates=3, history=[], halted={"step": 4, "reason": "x"})
    record = _roll_back(model, SimpleNamespace(change_point=3), snapshots, outcome, None, accumulation=2)
    assert record["change_point"] == 1 and record["restored_step"] == 1
