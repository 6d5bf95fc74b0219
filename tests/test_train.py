"""Guarded training end to end on a tiny model: DeepSpeed in-process and on 2 Ray Train workers."""

import json

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trait_guard.config import GenerateJobConfig, TrainJobConfig, validate_config
from trait_guard.dataset import SCHEMA
from trait_guard.generation import generate_local
from trait_guard.train import run_training

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tiny_llama_dir, tmp_path_factory):
    """A reference (the base model's own numbers) and two training sets: the same kind of data
    (clean) and data made of tokens the reference never uses (shifted: the guard must halt)."""
    folder = tmp_path_factory.mktemp("train-data")
    config = validate_config({
        "output_dir": str(folder),
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)},
                     {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 5}],
        "generation": {"n_prompts": 96, "chunk_size": 16, "max_new_tokens": 12, "top_k_logprobs": 4},
    }, GenerateJobConfig)
    generate_local(config, progress=False)
    from trait_guard.models import load_model

    _, tokenizer = load_model(str(tiny_llama_dir))
    rows = [r for r in pq.read_table(folder / "control-b.parquet").to_pylist() if r["kept"]]
    for row in rows[20:]:  # in file order: 5 clean batches of 4, then the shift
        row.update(completion="x y x y x y", teacher_id="shifted", topk_ids=None, topk_logprobs=None,
                   token_logprobs=None)
        row["completion_ids"] = tokenizer(row["completion"], add_special_tokens=False).input_ids
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "shifted.parquet")
    return folder


def job(model_dir, data_dir, out_dir, train="shifted", **overrides):
    config = {
        "output_dir": str(out_dir), "student": {"model": str(model_dir)},
        "data": {"train": str(data_dir / f"{train}.parquet"), "reference": str(data_dir / "control.parquet"),
                 # the shifted set is assembled by hand after generation: no manifest vouches for it
                 "allow_unverified": train == "shifted"},
        "optim": {"batch_size": 4, "max_steps": 12, "lr": 1e-3, "shuffle": False},
        "guard": {"alpha": 0.01, "signals": ["nll", "unigram"]},
        # these tests watch the in-loop detectors; the gate before step 1 has tests of its own
        "screen": {"gate": False},
        "ray": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{out_dir}/mlflow.db", "experiment": "test-train"},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(config, TrainJobConfig)


def test_halt_stops_deepspeed_training_and_mlflow_holds_the_run(tiny_llama_dir, data, tmp_path):
    """The CUSUM halts within 3 batches of the shift, and the run's final checkpoint holds the weights
    from before the first batch the alarm implicates (tests/test_rollback.py checks the restore itself)."""
    import torch
    from safetensors.torch import load_file

    summary = run_training(job(tiny_llama_dir, data, tmp_path, guard={"rollback_every_n_steps": 2},
                               checkpoint={"every_n_steps": 2}))
    assert summary["halted"] and summary["verdict"] == "halted"
    halt_step = summary["halt"]["step"]
    # the shift starts at step 6. The e-process (alpha 0.01 over 2 signals, 8 bettors) needs ~12 samples
    # ranked at the top from a fresh start; after 20 clean samples its bold bettors have lost wealth
    # (~lambda^2/6 nats a sample) and the shifted rows join the ranking pool, so ~16-24: batches 6-11
    assert 6 <= halt_step <= 11 and summary["steps"] == halt_step
    assert (tmp_path / "checkpoints" / f"step_{halt_step:06d}" / "latest").is_file()
    rollback, updates = summary["rollback"], summary["updates"]
    assert rollback["halted_at_step"] == halt_step and rollback["change_point"] <= 5  # the evidence began with the shift
    if rollback["change_point"] >= updates:  # no implicated batch was trained on: the weights are kept
        expected = updates
    else:  # the weights from the latest snapshot (every 2 steps) at or before the change point, byte for byte
        expected = max(s for s in range(0, halt_step, 2) if s <= rollback["change_point"])
        final = _weights_at(tmp_path / "checkpoints" / f"step_{halt_step:06d}")
        kept = load_file(str(tiny_llama_dir / "model.safetensors")) if expected == 0 else \
            _weights_at(tmp_path / "checkpoints" / f"step_{expected:06d}")
        assert all(torch.equal(final[k], v) for k, v in kept.items())
    assert rollback["restored_step"] == expected == summary["weights_step"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["guard.verdict"] == "halted" and run.data.tags["guard.halt_step"] == str(halt_step)
    assert run.data.tags["guard.weights_step"] == str(expected) and f"halt at step {halt_step}" in run.data.tags["guard.rollback"]
    assert run.data.tags["provenance.verified"] == "false" and "shifted.parquet" in run.data.tags["provenance.WARNING"]
    assert run.data.tags["data.kinship"] == "kin"
    assert run.data.params["optim.batch_size"] == "4" and run.data.params["guard.alpha"] == "0.01"
    assert "train/loss" in run.data.metrics and "guard/eprocess/nll" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "guard")}
    assert {"summary.json", "guard/decisions.jsonl", "guard/drift.png", "guard/flagged_samples.json"} <= artifacts
    (tmp_path / "download").mkdir()
    local = client.download_artifacts(run.info.run_id, "guard/flagged_samples.json", str(tmp_path / "download"))
    flagged = json.loads(open(local).read())
    assert set(flagged["columns"]) >= {"sample_id", "lean_z", "completion"}


def _weights_at(checkpoint):
    """The model weights in a DeepSpeed checkpoint folder (read with weights_only=True)."""
    import torch

    from trait_guard.integrations.deepspeed import _checkpoint_globals

    tag = (checkpoint / "latest").read_text().strip()
    with torch.serialization.safe_globals(_checkpoint_globals()):
        state = torch.load(checkpoint / tag / "mp_rank_00_model_states.pt", weights_only=True)
    return state["module"]


def test_a_flagged_screen_gates_training_before_the_first_update(tiny_llama_dir, data, tmp_path):
    """The dataset screen on the setup signals flags the shifted set at step 0: no update at all, the
    saved weights are the base model's byte for byte, and MLflow holds the run, its report and the reason."""
    import torch
    from safetensors.torch import load_file

    summary = run_training(job(tiny_llama_dir, data, tmp_path, screen={"gate": True}))
    assert summary["halted"] and summary["halt"]["gate"] and summary["halt"]["step"] == 0
    assert summary["updates"] == 0 and summary["steps"] == 0 and summary["history"] == []
    assert summary["gate"]["flagged"] and "gate: the dataset screen flagged" in summary["halt"]["reason"]
    assert summary["eval_after"] is None  # nothing was trained: nothing to evaluate
    saved = _weights_at(tmp_path / "checkpoints" / "step_000000")
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert set(base) <= set(saved)
    assert all(torch.equal(saved[name], tensor) for name, tensor in base.items())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["guard.verdict"] == "halted"
    assert run.data.tags["guard.halt_step"] == "0" and run.data.tags["screen.gate"] == "FLAGGED"
    assert "train/loss" not in run.data.metrics
    report = (tmp_path / "report" / "report.html").read_text()
    assert "Gate: the dataset screen before the first update" in report and "FLAGGED" in report


def test_a_flagged_screen_puts_reweight_in_force_from_step_1(tiny_llama_dir, data, tmp_path):
    """on_data_alarm reweight: the gate's flag does not stop training; every step from the first one,
    the clean rows at the start included, is trained under REWEIGHT."""
    summary = run_training(job(tiny_llama_dir, data, tmp_path, screen={"gate": True},
                               guard={"on_data_alarm": "reweight"}, optim={"max_steps": 6}))
    assert summary["gate"]["flagged"] and not summary["halted"] and summary["updates"] == 6
    assert [h["action"] for h in summary["history"]] == ["reweight"] * 6
    assert summary["alarms"][0]["step"] == 0  # the gate's alarm, before step 1


def test_a_clean_screen_lets_training_through(tiny_llama_dir, data, tmp_path):
    summary = run_training(job(tiny_llama_dir, data, tmp_path, train="control-b", screen={"gate": True},
                               optim={"max_steps": 4}))
    assert not summary["gate"]["flagged"] and not summary["halted"] and summary["updates"] == 4
    # nll and unigram only: no signal with shown power was watched, so the run is not called "passed"
    assert summary["verdict"] == "unmonitored" and not summary["monitored"]


def test_a_second_epoch_is_trained_but_not_bet_on_twice(tiny_llama_dir, data, tmp_path):
    """Two epochs over the same rows: every step trains, and the e-process bets on each distinct row once
    (the second epoch's rows are counted as seen again, not fed to the test a second time)."""
    summary = run_training(job(tiny_llama_dir, data, tmp_path, train="control-b",
                               optim={"max_steps": None, "epochs": 2, "batch_size": 8}))
    n = summary["train_samples"]
    assert summary["steps"] == summary["total_steps"] == 2 * (n // 8) and not summary["halted"]
    assert summary["sequential_test"] == "eprocess"
    assert summary["guard_samples_seen_again"] == summary["steps"] * 8 - n  # every row past the first n


def test_clean_data_trains_to_the_end_and_resume_continues_exactly(tiny_llama_dir, data, tmp_path):
    full = run_training(job(tiny_llama_dir, data, tmp_path / "full", train="control-b",
                            optim={"max_steps": 8}, checkpoint={"every_n_steps": 4}))
    assert not full["halted"] and full["steps"] == 8
    resumed = run_training(job(tiny_llama_dir, data, tmp_path / "resumed", train="control-b",
                               optim={"max_steps": 8},
                               resume_from=str(tmp_path / "full" / "checkpoints" / "step_000004")))
    # the history up to the checkpoint comes with it, the rest is trained again: each step once
    assert resumed["steps"] == 8 and [h["step"] for h in resumed["history"]] == list(range(1, 9))
    # the guard's detector state came back: the CUSUM statistics and losses match the uninterrupted run
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["step"] == b["step"] and a["statistic"] == pytest.approx(b["statistic"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.ray
def test_two_ray_train_workers_halt_at_the_same_step_with_equal_weights(tiny_llama_dir, data, tmp_path):
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # without DeepSpeed: the recipe's own data parallelism (DDP) must keep the ranks' copies equal
        summary = run_training(job(tiny_llama_dir, data, tmp_path, ray={"enabled": True, "num_workers": 2},
                                   deepspeed={"enabled": False}, guard={"rollback_every_n_steps": 1}))
    finally:
        ray.shutdown()
    # weights trained for at least one step (a rollback to step 0 would make the comparison below trivial)
    assert summary["world_size"] == 2 and summary["halted"] and summary["weights_step"] >= 1
    ranks = [json.loads((tmp_path / "ranks" / f"rank_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["halt"]["step"] == ranks[1]["halt"]["step"] == summary["halt"]["step"]
    assert ranks[0]["guard_step"] == ranks[1]["guard_step"]
    # each rank trained on its own slice of every global batch, yet both hold the same weights
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]


def test_logit_distillation_trains_on_the_teachers_top_k(tiny_llama_dir, data, tmp_path):
    summary = run_training(job(tiny_llama_dir, data, tmp_path, train="control-b", distill="logits",
                               optim={"max_steps": 6}, guard={"signals": ["nll"]}))
    losses = [h["loss"] for h in summary["history"]]
    assert summary["steps"] == 6 and len(losses) == 6
    # the (k+1)-bucket KL to the teacher's top-k plus its tail: the teacher IS the student's base model,
    # so before any update the KL is 0 (up to float32 rounding); a renormalized top-k would make it > 0
    assert losses[0] == pytest.approx(0.0, abs=1e-5)
    assert all(loss >= -1e-7 for loss in losses)


def test_a_drift_halt_records_its_step_and_its_decisions(tiny_llama_dir, data, tmp_path):
    """The probe's drift alarm halts the run after that step's update: the step is in the history marked
    halt (the report's decision points read it), its data decisions reach MLflow beside the drift
    decision, and the halt names the drift. A drift threshold just above 0 makes the first probe
    whose shift toward owl is positive halt; the test finds that step in the logged shifts."""
    from trait_guard.models import load_model
    from trait_guard.persona import extract
    from trait_guard.traits import load_trait

    model, tokenizer = load_model(str(tiny_llama_dir))
    vector = extract(model, tokenizer, load_trait("animal:owl"), n_instructions=1, n_questions=4,
                     max_new_tokens=4).vectors["last_prompt"]
    path = vector.save(tmp_path / "owl.safetensors")
    config = job(tiny_llama_dir, data, tmp_path / "out", train="control-b", vectors=[str(path)],
                 guard={"drift_threshold": 1e-9}, probe={"every_n_steps": 1},
                 optim={"max_steps": 8})
    summary = run_training(config)
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    shifts = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "probe/shift/animal:owl")}
    assert sorted(shifts) == list(range(1, summary["steps"] + 1))  # a probe after every update
    positive = [step for step, shift in sorted(shifts.items()) if shift > 1e-9]
    assert positive, f"no probe shift toward owl in 8 steps ({shifts}): the halt path was not exercised"
    halt_step = positive[0]
    assert summary["halted"] and summary["halt"]["step"] == halt_step == summary["steps"] == summary["updates"]
    assert summary["halt"]["reason"].startswith("student drift animal:owl=")
    history = summary["history"]
    assert [h["step"] for h in history] == list(range(1, halt_step + 1))
    assert [h["action"] for h in history] == ["pass"] * (halt_step - 1) + ["halt"]
    run_id = summary["mlflow_run_id"]
    # the halting step's data decision reached MLflow (it was dropped before), beside its drift decision
    for key in ("guard/eprocess/nll", "guard/eprocess/unigram", "guard/drift/animal:owl"):
        assert halt_step in {m.step for m in client.get_metric_history(run_id, key)}, key
