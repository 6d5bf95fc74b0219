"""The Ray-job entry points (ray_jobs/*.py) run for real on the tiny model: each script's ``main(argv)``
is what ``ray job submit -- python -m ray_jobs.<script>`` executes on a cluster, so a broken argument,
a lost option or a wrong report there breaks every submitted job while the library and the CLI stay green.

- screen_teacher_data: with ``--num-gpus 0`` it runs `trait-guard screen` in this process; the exit
  status (0 clean, 3 flagged, 2 bad input) and the ``--json`` report hold the verdict on a clean and a
  shifted set (the data of tests/test_screen.py).
- guarded_training (`trait-guard train`): a TrainJobConfig YAML (in-process, no DeepSpeed, no Ray)
  trains a few steps; summary.json holds the steps and the verdict, a gated run exits 4 (the Ray job
  fails) unless --allow-halt, bad input exits 2 with the message, and ``--resume`` reaches
  run_training (with DeepSpeed, marked slow, a real checkpoint is continued).
- generate_teacher_data (`trait-guard generate`): generation always runs on Ray Data (GenerateJobConfig has no Ray-off switch),
  so its test starts a local Ray and is marked ``ray``.
"""

from __future__ import annotations

import json

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_screen
import yaml

from ray_jobs import generate_teacher_data, guarded_training, screen_teacher_data
from trait_guard.dataset import SCHEMA

# tests/test_screen.py's sets on the tiny model: a reference (digits 0-6), a clean set like it, and a
# shifted set leaning on 7 (a token the reference never uses)
sets = test_screen.sets


@pytest.fixture(scope="module")
def parquets(sets, tmp_path_factory):
    """The three sets as teacher-data Parquet files (no manifest: the jobs need --allow-unverified)."""
    _, _, reference, same, shifted = sets
    folder = tmp_path_factory.mktemp("ray-jobs-data")
    paths = {}
    for name, rows in {"ref": reference, "same": same, "shifted": shifted}.items():
        paths[name] = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), paths[name])
    return paths


# --------------------------------------------------------------------------------------------------
# screen_teacher_data


def screen_args(parquets, tiny_llama_dir, data, report):
    return ["--data", str(data), "--reference", str(parquets["ref"]), "--model", str(tiny_llama_dir),
            "--quiet", "--allow-unverified", "--json", str(report)]


def test_screen_job_passes_clean_data_with_exit_0(parquets, tiny_llama_dir, tmp_path, capsys):
    report_path = tmp_path / "clean.json"
    code = screen_teacher_data.main(["--num-gpus", "0", *screen_args(parquets, tiny_llama_dir, parquets["same"],
                                                                     report_path)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    report = json.loads(report_path.read_text())
    assert report["n_data"] == report["n_reference"] == 60
    assert not report["flagged"] and not any(t["flagged"] for t in report["signals"])
    assert {"nll", "unigram"} <= {t["name"] for t in report["signals"]}
    # no teacher log-probs in this data: the clean verdict rests on no signal with shown power, and says so
    assert not report["monitored"] and "VERDICT: UNMONITORED" in out.out
    assert report["kinship"]["verdict"] == "kin"
    assert any("UNVERIFIED DATA" in note for note in report["notes"])


def test_screen_job_flags_shifted_data_with_exit_3(parquets, tiny_llama_dir, tmp_path, capsys):
    report_path = tmp_path / "shifted.json"
    # no --num-gpus: the default (0) scores in this process too
    code = screen_teacher_data.main(screen_args(parquets, tiny_llama_dir, parquets["shifted"], report_path))
    out = capsys.readouterr()
    assert code == 3, out.out + out.err
    assert "VERDICT: FLAGGED" in out.out
    report = json.loads(report_path.read_text())
    assert report["flagged"]
    flagged = {t["name"]: t for t in report["signals"] if t["flagged"]}
    assert "unigram" in flagged and flagged["unigram"]["adjusted_p"] < report["alpha"] == 0.01
    assert report["tokens"]["overrepresented"][0]["token"] == "7"


def test_screen_job_refuses_bad_input_with_exit_2(parquets, tiny_llama_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere.parquet"
    report_path = tmp_path / "r.json"
    code = screen_teacher_data.main(["--num-gpus", "0", *screen_args(parquets, tiny_llama_dir, missing, report_path)])
    err = capsys.readouterr().err
    assert code == 2 and "trait-guard screen: error:" in err and "nowhere.parquet" in err
    assert not report_path.exists()
    # data no manifest vouches for is refused unless --allow-unverified says so (as training refuses it)
    args = [a for a in screen_args(parquets, tiny_llama_dir, parquets["same"], report_path) if a != "--allow-unverified"]
    assert screen_teacher_data.main(["--num-gpus", "0", *args]) == 2
    assert "--allow-unverified" in capsys.readouterr().err and not report_path.exists()


def test_the_gpu_screen_task_sends_its_report_back(parquets, tiny_llama_dir, tmp_path, capsys):
    """With --num-gpus the screen runs in a Ray task on a GPU node, where a --json file would stay: the
    task's function returns the exit status and the report's text for the driver to write. Here it runs
    in this process (no GPU to schedule on), on the shifted set."""
    args = screen_args(parquets, tiny_llama_dir, parquets["shifted"], tmp_path / "unused.json")
    command = [screen_teacher_data.COMMAND, *args[: args.index("--json")]]
    code, report = screen_teacher_data._screen_on_a_worker(command, True)
    assert code == 3 and json.loads(report)["flagged"] and not (tmp_path / "unused.json").exists()
    assert screen_teacher_data._screen_on_a_worker(command, False) == (3, None)
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------
# guarded_training


def train_config(tmp_path, tiny_llama_dir, parquets, train, **extra):
    """A TrainJobConfig YAML: 3 steps of 4 rows on the tiny model, in this process (no Ray, no DeepSpeed)."""
    path = tmp_path / f"{train}.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / train), "student": {"model": str(tiny_llama_dir)},
        "data": {"train": str(parquets[train]), "reference": str(parquets["ref"]), "allow_unverified": True},
        "guard": {"signals": ["nll", "unigram"]}, "optim": {"batch_size": 4, "max_steps": 3},
        "screen": {"n_permutations": 500}, "progress_every_n_steps": 0,
        "deepspeed": {"enabled": False}, "ray": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test-ray-jobs"},
        **extra}))
    return path


def saved_summary(tmp_path, name):
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_training_job_trains_clean_data_and_says_so(parquets, tiny_llama_dir, tmp_path, capsys):
    config = train_config(tmp_path, tiny_llama_dir, parquets, "same")
    assert guarded_training.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    summary = saved_summary(tmp_path, "same")
    assert summary["steps"] == summary["updates"] == summary["total_steps"] == 3 == len(summary["history"])
    assert not summary["halted"] and summary["halt"] is None and not summary["gate"]["flagged"]
    # nll and unigram only: no signal with shown power was watched, so the run is not "passed"
    assert summary["verdict"] == "unmonitored" and not summary["monitored"]
    assert "guarded training UNMONITORED after 3 of 3 steps" in out and summary["mlflow_run_id"] in out
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["guard.verdict"] == "unmonitored"


def test_a_gated_training_job_fails_with_exit_4_unless_allowed(parquets, tiny_llama_dir, tmp_path, capsys):
    """The shifted set is flagged by the screen before step 1: no update, verdict halted, and the job
    exits 4 (Ray marks the job FAILED: a halted student is not fit to ship); --allow-halt exits 0."""
    config = train_config(tmp_path, tiny_llama_dir, parquets, "shifted")
    assert guarded_training.main(["--config", str(config)]) == 4
    captured = capsys.readouterr()
    assert "GATED before the first update" in captured.out and "exit status 4" in captured.err
    summary = saved_summary(tmp_path, "shifted")
    assert summary["halted"] and summary["verdict"] == "halted"
    assert summary["halt"]["gate"] and summary["halt"]["step"] == 0
    assert summary["steps"] == summary["updates"] == 0 and summary["gate"]["flagged"]
    assert guarded_training.main(["--config", str(config), "--allow-halt"]) == 0


def test_training_job_forwards_resume_and_refuses_bad_input_with_exit_2(parquets, tiny_llama_dir, tmp_path, capsys):
    """--resume reaches run_training: a folder that is no checkpoint is refused before anything trains,
    exit 2 with the message (as `trait-guard train`), never a traceback."""
    config = train_config(tmp_path, tiny_llama_dir, parquets, "same")
    nowhere = tmp_path / "no-checkpoint"
    assert guarded_training.main(["--config", str(config), "--resume", str(nowhere)]) == 2
    err = capsys.readouterr().err
    assert "trait-guard train: error:" in err and "no-checkpoint has no" in err and "not a trait_guard checkpoint" in err
    assert not (tmp_path / "same").exists()
    # without --resume, the config's own resume_from stands
    in_file = train_config(tmp_path, tiny_llama_dir, parquets, "same", resume_from=str(tmp_path / "from-yaml"))
    assert guarded_training.main(["--config", str(in_file)]) == 2
    assert "from-yaml has no " in capsys.readouterr().err
    # a malformed config: exit 2 naming the field
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "optim": {"batch_size": 0}}))
    assert guarded_training.main(["--config", str(bad)]) == 2
    assert "batch_size" in capsys.readouterr().err


@pytest.mark.deepspeed
@pytest.mark.slow
def test_training_job_resumes_a_checkpoint(parquets, tiny_llama_dir, tmp_path, capsys):
    """--resume with a real checkpoint (resuming needs DeepSpeed's): the job continues the first run's
    MLflow run from step 2 and trains to step 4 once, with the same losses as the uninterrupted run."""
    first = train_config(tmp_path, tiny_llama_dir, parquets, "same", deepspeed={"enabled": True},
                         optim={"batch_size": 4, "max_steps": 4, "shuffle": False}, checkpoint={"every_n_steps": 2})
    assert guarded_training.main(["--config", str(first)]) == 0
    full = saved_summary(tmp_path, "same")
    assert full["steps"] == 4 and not full["halted"]
    checkpoint = tmp_path / "same" / "checkpoints" / "step_000002"
    resumed_config = yaml.safe_load(first.read_text())
    resumed_config["output_dir"] = str(tmp_path / "resumed")
    second = tmp_path / "resumed.yaml"
    second.write_text(yaml.safe_dump(resumed_config))
    assert guarded_training.main(["--config", str(second), "--resume", str(checkpoint)]) == 0
    resumed = saved_summary(tmp_path, "resumed")
    assert resumed["steps"] == 4 and resumed["mlflow_run_id"] == full["mlflow_run_id"]
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(resumed["mlflow_run_id"])
    assert run.data.tags["resumed_from_step"] == "2"
    history = {name: json.loads((tmp_path / name / "summary.json").read_text())["history"]
               for name in ("same", "resumed")}
    assert [h["step"] for h in history["resumed"]] == [1, 2, 3, 4]
    for a, b in zip(history["same"], history["resumed"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


# --------------------------------------------------------------------------------------------------
# generate_teacher_data


@pytest.mark.ray
@pytest.mark.slow
def test_generation_job_writes_each_teacher_and_resume_keeps_it(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    """Generation has no Ray-off switch: this runs on the module's local Ray (2 CPUs, one actor)."""
    out_dir = tmp_path / "teacher_data"
    config = tmp_path / "generate.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out_dir), "teachers": [{"id": "control", "model": str(tiny_llama_dir)}],
        "generation": {"n_prompts": 8, "chunk_size": 4, "max_new_tokens": 6},
        "ray": {"num_actors": 1, "cpus_per_actor": 1}}))
    assert generate_teacher_data.main(["--config", str(config), "--quiet"]) == 0
    assert "UNSIGNED" in capsys.readouterr().out  # no --signing-key: said, not hidden
    report = json.loads((out_dir / "summary.json").read_text())
    assert report["mode"] == "ray" and report["n_prompts"] == 8 and not report["signature"]["signed"]
    (teacher,) = report["teachers"]
    assert teacher["teacher_id"] == "control" and teacher["rows"] == 8 and 0 <= teacher["kept"] <= 8
    table = pq.read_table(out_dir / "control.parquet")
    assert table.num_rows == 8 and len(set(table.column("prompt_id").to_pylist())) == 8
    assert (out_dir / "summary.json").is_file() and (out_dir / "manifest.json").is_file()
    before = (out_dir / "control.parquet").read_bytes()
    # --resume: the finished teacher is kept, not generated again
    assert generate_teacher_data.main(["--config", str(config), "--resume"]) == 0
    assert "finished for these settings (resume)" in capsys.readouterr().err
    assert json.loads((out_dir / "summary.json").read_text())["teachers"][0]["rows"] == 8
    assert (out_dir / "control.parquet").read_bytes() == before
