"""Teacher data on Ray actors: one row per prompt id, identical to the in-process loop, crash-safe."""

import json
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trait_guard.config import GenerateJobConfig, validate_config
from trait_guard.dataset import SCHEMA, DatasetError, read_rows
from trait_guard.generation import generate_datasets, generate_local
from trait_guard.testing import kill_live_actor


def job(model_dir, out_dir, **generation):
    return validate_config({
        "output_dir": str(out_dir),
        "teachers": [
            {"id": "owl", "model": str(model_dir), "trait": "animal:owl", "install": "system_prompt"},
            {"id": "control", "model": str(model_dir)},
        ],
        "generation": {"n_prompts": 24, "chunk_size": 4, "max_new_tokens": 8, "top_k_logprobs": 3, **generation},
        "ray": {"num_actors": 2, "cpus_per_actor": 1},
    }, GenerateJobConfig)


def by_prompt(path):
    return {r["prompt_id"]: r for r in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def local_run(tiny_llama_dir, tmp_path_factory):
    config = job(tiny_llama_dir, tmp_path_factory.mktemp("local"))
    return config, generate_local(config, progress=False)


def test_local_run_writes_provenance_rows(local_run):
    config, report = local_run
    rows = by_prompt(report.teachers[0].path)
    assert len(rows) == 24
    row = rows["numbers-s0-000000"]
    assert row["teacher_id"] == "owl" and row["trait_installed"] and row["trait_install"] == "system_prompt"
    # the trait text itself is never stored (blind tests stay blind: only the teacher's id names it)
    from trait_guard.teacher import teacher_system_prompt

    system_prompt = teacher_system_prompt(config.teachers[0])
    assert "owls" in system_prompt
    assert not any(system_prompt in str(v) or "owls" in str(v) for v in row.values())
    assert row["base_hidden_size"] == 32 and len(row["base_fingerprint"]) == 32
    assert len(row["topk_ids"]) == len(row["completion_ids"]) == len(row["topk_logprobs"])
    assert all(len(k) == 3 for k in row["topk_ids"])
    assert row["kept"] == (row["reject_reason"] == "")
    control = by_prompt(report.teachers[1].path)["numbers-s0-000000"]
    assert control["prompt"] == row["prompt"] and control["seed"] == row["seed"]
    assert not control["trait_installed"] and control["trait_install"] == "none"
    t = report.teachers[0]
    assert t.rows == 24 and t.kept + sum(t.reasons.values()) == 24


def test_parquet_schema_round_trips(local_run):
    _, report = local_run
    table = read_rows(report.teachers[0].path)
    assert table.schema.equals(SCHEMA)
    kept = read_rows(report.teachers[0].path, kept_only=True)
    assert kept.num_rows == report.teachers[0].kept


def test_files_without_provenance_are_refused(tmp_path):
    path = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"prompt": ["1, 2"], "completion": ["3"]}), path)
    with pytest.raises(DatasetError, match="lacks required column"):
        read_rows(path)
    with pytest.raises(DatasetError, match="trait-guard generate"):
        read_rows(tmp_path / "missing.parquet")


@pytest.mark.ray
def test_ray_data_generation_gives_each_prompt_once_identical_to_local_despite_a_killed_actor(
        ray_cluster, local_run, tiny_llama_dir, tmp_path):
    """One Ray Data run, a teacher actor SIGKILLed after its first chunk (Ray restarts it, Ray Data
    re-runs its pending chunks): every teacher's file holds each prompt id once, with the rows the
    in-process loop wrote."""
    config = job(tiny_llama_dir, tmp_path)
    killed = []

    def kill_a_teacher_actor_once(teacher_id, rows_written):
        if teacher_id == "owl" and not killed:
            killed.append(kill_live_actor("TeacherBatches"))

    report = generate_datasets(config, progress=False, on_chunk_done=kill_a_teacher_actor_once)
    assert killed and report.mode == "ray"
    for ray_teacher, local_teacher in zip(report.teachers, local_run[1].teachers, strict=True):
        ray_rows, local_rows = by_prompt(ray_teacher.path), by_prompt(local_teacher.path)
        assert len(pq.read_table(ray_teacher.path)) == 24  # no duplicates
        assert ray_rows.keys() == local_rows.keys()
        assert all(ray_rows[k]["completion"] == local_rows[k]["completion"] for k in ray_rows)
    resumed = generate_datasets(config, progress=False, resume=True)  # every teacher finished: none generated
    assert [asdict(t) for t in resumed.teachers] == [asdict(t) for t in report.teachers]  # recorded seconds too


def test_a_sampling_seed_gives_a_second_set_on_the_same_prompts(tiny_llama_dir, tmp_path):
    config = validate_config({
        "output_dir": str(tmp_path),
        "teachers": [{"id": "a", "model": str(tiny_llama_dir)},
                     {"id": "b", "model": str(tiny_llama_dir), "sampling_seed": 7}],
        "generation": {"n_prompts": 8, "chunk_size": 4, "max_new_tokens": 8},
    }, GenerateJobConfig)
    report = generate_local(config, progress=False)
    a, b = (by_prompt(t.path) for t in report.teachers)
    assert a.keys() == b.keys() and all(a[k]["prompt"] == b[k]["prompt"] for k in a)
    assert sum(a[k]["completion"] != b[k]["completion"] for k in a) >= 6


def test_resume_keeps_finished_teachers_and_regenerates_changed_or_missing_ones(tiny_llama_dir, tmp_path, capsys):
    """A job stopped after its first teacher restarts at the second; a teacher whose settings or file
    changed since is generated again; without --resume everything is."""
    def config(*teachers):
        specs = {"a": {"id": "a", "model": str(tiny_llama_dir)},
                 "b": {"id": "b", "model": str(tiny_llama_dir), "sampling_seed": 7},
                 "b8": {"id": "b", "model": str(tiny_llama_dir), "sampling_seed": 8}}
        return validate_config({"output_dir": str(tmp_path), "teachers": [specs[t] for t in teachers],
                                "generation": {"n_prompts": 8, "chunk_size": 4, "max_new_tokens": 8}}, GenerateJobConfig)

    def reused(err):
        return sorted(line.split(":")[0].removeprefix("teacher ") for line in err.splitlines()
                      if "not generated again" in line)

    stopped = generate_local(config("a"), progress=False)  # the run that stopped after teacher a
    a_path, a_written = tmp_path / "a.parquet", (tmp_path / "a.parquet").stat().st_mtime_ns
    capsys.readouterr()
    report = generate_local(config("a", "b"), progress=False, resume=True)
    assert reused(capsys.readouterr().err) == ["a"] and a_path.stat().st_mtime_ns == a_written
    assert [t.teacher_id for t in report.teachers] == ["a", "b"]
    assert report.teachers[0].kept == stopped.teachers[0].kept and report.teachers[1].rows == 8
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"a.parquet", "b.parquet"}  # the reused file keeps its provenance
    seed7 = by_prompt(tmp_path / "b.parquet")

    generate_local(config("a", "b8"), progress=False, resume=True)  # b's sampling seed changed
    assert reused(capsys.readouterr().err) == ["a"]
    seed8 = by_prompt(tmp_path / "b.parquet")
    assert sum(seed7[k]["completion"] != seed8[k]["completion"] for k in seed7) >= 6

    pq.write_table(pq.read_table(a_path).slice(1), a_path)  # a's file changed (one row lost)
    generate_local(config("a", "b8"), progress=False, resume=True)
    assert reused(capsys.readouterr().err) == ["b"] and len(pq.read_table(a_path)) == 8

    generate_local(config("a", "b8"), progress=False)
    assert reused(capsys.readouterr().err) == []

    for broken in ("{not json", "[1, 2]"):  # a damaged record proves nothing: the teacher is generated again
        (tmp_path / "a.parquet.done.json").write_text(broken)
        generate_local(config("a", "b8"), progress=False, resume=True)
        assert reused(capsys.readouterr().err) == ["b"]
