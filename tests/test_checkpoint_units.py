"""Unit tests, on small hand-built files and dicts, of the pure parts of checkpointing and of the
pipeline's summary: no model, no Ray, no DeepSpeed, so they run in the fast suite.

trait_guard.checkpoint: where a checkpoint lives (``checkpoint_dir``), reading its state file
(``read_checkpoint_state``), what a run trained on (``input_digests``: SHA-256 of each input file) and
how a resume's inputs differ from a checkpoint's (``input_differences``), which checkpoint a resume
picks (``latest_checkpoint``) and moving a stale run aside without deleting it (``set_aside``).

trait_guard.pipeline: the per-training record of ``run_pipeline``'s summary (``_training_record``,
``_count_actions``), the scoring and placement phrases (``_scored``, ``_placement``) and the text
report (``format_summary``). The expensive end-to-end checks of the same code are in test_pipeline.py,
test_resume_inputs.py and test_faults.py (marked slow / ray / deepspeed).

Known values: SHA-256 of b"abc" is the FIPS 180-2 test vector ba7816bf...; of b"" and b"abcd" the
well-known digests e3b0c442... and 88d4266f... (also what ``sha256sum`` prints)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from trait_guard.checkpoint import (
    CHECKPOINT_STATE,
    checkpoint_dir,
    input_differences,
    input_digests,
    latest_checkpoint,
    read_checkpoint_state,
    set_aside,
)
from trait_guard.config import ScoringSettings
from trait_guard.errors import TraitGuardInputError
from trait_guard.pipeline import _count_actions, _placement, _scored, _training_record, format_summary
from trait_guard.screen import ScreenReport, SignalTest

SHA_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
SHA_ABCD = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
SHA_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _checkpoint(folder, state: dict, mtime_s: float):
    """A folder holding ``trait_guard_state.json`` written (its mtime) at ``mtime_s``."""
    folder.mkdir(parents=True)
    state_file = folder / CHECKPOINT_STATE
    state_file.write_text(json.dumps(state) + "\n", encoding="utf-8")
    os.utime(state_file, (mtime_s, mtime_s))
    return folder


# ----------------------------------------------------------------------------- checkpoint.py


def test_checkpoint_dir_is_step_padded_to_six_digits(tmp_path):
    assert checkpoint_dir(tmp_path, 4) == tmp_path / "checkpoints" / "step_000004"
    assert checkpoint_dir(str(tmp_path), 120) == tmp_path / "checkpoints" / "step_000120"
    assert checkpoint_dir(tmp_path, 1_234_567).name == "step_1234567"  # wider than 6 digits: not cut


def test_read_checkpoint_state_returns_the_json_written(tmp_path):
    state = {"step": 6, "weights_step": 4, "guard": {"mode": "pass", "n": [1, 2]}, "history": [],
             "mlflow_run_id": "abc123", "recipe": {"gradient_accumulation_steps": 2}}
    folder = _checkpoint(tmp_path / "step_000006", state, time.time())
    assert read_checkpoint_state(folder) == state
    assert read_checkpoint_state(str(folder))["weights_step"] == 4


def test_read_checkpoint_state_refuses_a_folder_without_the_state_file(tmp_path):
    engine_only = tmp_path / "step_000002"
    _write(engine_only / "step_2" / "mp_rank_00_model_states.pt", b"engine files only")
    for folder in (engine_only, tmp_path / "does-not-exist"):
        with pytest.raises(TraitGuardInputError, match="not a trait_guard checkpoint") as err:
            read_checkpoint_state(folder)
        assert CHECKPOINT_STATE in str(err.value) and str(folder) in str(err.value)
        assert isinstance(err.value, ValueError)  # callers catching ValueError still catch it


def test_read_checkpoint_state_refuses_a_cut_off_or_foreign_state_file_with_the_fix(tmp_path):
    """A state file cut off mid-write (or edited by hand into something else) is bad input: the error
    names the file and says to resume from an earlier step, instead of a JSONDecodeError traceback."""
    for name, data in (("cut", b'{"step": 6, "weights_step": 4, "gua'), ("list", b"[1, 2]"), ("binary", b"\xff\xfe")):
        target = _write(tmp_path / name / CHECKPOINT_STATE, data)
        with pytest.raises(TraitGuardInputError, match="resume from an earlier step") as err:
            read_checkpoint_state(target.parent)
        assert str(target) in str(err.value)


def test_input_digests_hold_each_file_path_its_sha256_and_the_limits(tmp_path):
    train = _write(tmp_path / "train.parquet", b"abc")
    vector = _write(tmp_path / "owl.safetensors", b"")
    limits = {"max_samples": 64, "max_reference_samples": None}
    digests = input_digests({"data.train": train, "vectors[0]": str(vector)}, limits)
    assert digests == {"files": {"data.train": {"path": str(train), "sha256": SHA_ABC},
                                 "vectors[0]": {"path": str(vector), "sha256": SHA_EMPTY}},
                       "limits": {"max_samples": 64, "max_reference_samples": None}}
    limits["max_samples"] = 1  # a copy: the record does not change with the caller's dict
    assert digests["limits"]["max_samples"] == 64
    json.dumps(digests)  # plain data: it goes into the checkpoint's JSON state


def test_input_differences_is_none_when_the_checkpoint_recorded_no_inputs(tmp_path):
    current = input_digests({"data.train": _write(tmp_path / "t.parquet", b"abc")}, {})
    assert input_differences(None, current) is None  # an older trait_guard checkpoint: nothing to tell
    assert input_differences({}, current) is None


def test_same_bytes_under_another_path_are_no_difference(tmp_path):
    first = _write(tmp_path / "a" / "train.parquet", b"abc")
    saved = input_digests({"data.train": first}, {"max_samples": 8})
    moved = tmp_path / "b" / "renamed.parquet"
    moved.parent.mkdir()
    shutil.copyfile(first, moved)
    assert input_differences(saved, input_digests({"data.train": moved}, {"max_samples": 8})) == []


def test_a_changed_file_is_named_with_both_hashes(tmp_path):
    train = _write(tmp_path / "train.parquet", b"abc")
    saved = input_digests({"data.train": train}, {})
    train.write_bytes(b"abcd")  # regenerated data, same path
    assert input_differences(saved, input_digests({"data.train": train}, {})) == [
        f"data.train {train}: sha256 {SHA_ABC[:12]} in the checkpoint, {SHA_ABCD[:12]} now"]
    # other bytes under another path: the line also names where the checkpoint's file was
    other = _write(tmp_path / "new" / "train.parquet", b"")
    assert input_differences(saved, input_digests({"data.train": other}, {})) == [
        f"data.train {other} (the checkpoint's was {train}): sha256 {SHA_ABC[:12]} in the checkpoint, "
        f"{SHA_EMPTY[:12]} now"]


def test_added_removed_inputs_and_changed_limits_each_get_a_line(tmp_path):
    a = _write(tmp_path / "a.safetensors", b"abc")
    b = _write(tmp_path / "b.safetensors", b"abcd")
    ref = _write(tmp_path / "ref.parquet", b"")
    saved = input_digests({"data.reference": ref, "vectors[0]": a}, {"max_samples": 100, "seed_rows": 5})
    current = input_digests({"data.reference": ref, "vectors[1]": b}, {"max_samples": 200, "max_tokens": 32})
    # this run's inputs first (in its order), then those only the checkpoint had; same for the limits
    assert input_differences(saved, current) == [
        f"vectors[1]: {b} (sha256 {SHA_ABCD[:12]}) is not in the checkpoint's inputs",
        f"vectors[0]: the checkpoint was trained with {a} (sha256 {SHA_ABC[:12]}), this run has none",
        "data.max_samples: 100 in the checkpoint, 200 now",
        "data.max_tokens: None in the checkpoint, 32 now",
        "data.seed_rows: 5 in the checkpoint, None now",
    ]


def test_latest_checkpoint_is_the_last_state_written_and_skips_incomplete_folders(tmp_path):
    now = time.time()
    _checkpoint(tmp_path / "step_000002", {"step": 2}, now - 300)
    newest = _checkpoint(tmp_path / "step_000004", {"step": 4}, now - 100)
    # a checkpoint whose engine files were being written when the run died: no state file yet
    incomplete = tmp_path / "step_000006"
    _write(incomplete / "step_6" / "mp_rank_00_model_states.pt", b"partial")
    _write(tmp_path / "notes.txt", b"not a folder")
    assert latest_checkpoint(tmp_path) == newest
    assert read_checkpoint_state(latest_checkpoint(tmp_path))["step"] == 4
    # it orders by when the state was written (Ray registers checkpoints in report order), not by name
    os.utime(tmp_path / "step_000002" / CHECKPOINT_STATE, (now, now))
    assert latest_checkpoint(str(tmp_path)) == tmp_path / "step_000002"


def test_latest_checkpoint_is_none_without_a_checkpoint_directly_under_the_folder(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    _checkpoint(tmp_path / "run" / "checkpoints" / "step_000002", {"step": 2}, time.time())
    assert latest_checkpoint(tmp_path) is None  # two levels down: not this folder's checkpoint
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == tmp_path / "run" / "checkpoints" / "step_000002"


def test_set_aside_renames_a_stale_run_beside_itself_and_deletes_nothing(tmp_path):
    checkpoints = tmp_path / "out" / "checkpoints"
    _checkpoint(checkpoints / "step_000004", {"step": 4, "mlflow_run_id": "old"}, time.time())
    progress = _write(tmp_path / "out" / "progress", b"step 4 of 10\n")
    before = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = set_aside([checkpoints, progress, tmp_path / "out" / "never-written"])
    after = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    assert set(moved) == {str(checkpoints), str(progress)}  # a missing path is skipped, not an error
    for old, new in moved.items():
        old_path, new_path = Path(old), Path(new)
        assert not old_path.exists() and new_path.exists() and new_path.parent == old_path.parent
        name, stamp = new_path.name.split(".stale-")
        assert name == old_path.name and before <= stamp <= after and len(stamp) == len("20250101T000000Z")
    new_checkpoints = Path(moved[str(checkpoints)])
    assert read_checkpoint_state(new_checkpoints / "step_000004")["mlflow_run_id"] == "old"
    assert Path(moved[str(progress)]).read_bytes() == b"step 4 of 10\n"
    assert set_aside([checkpoints]) == {}  # nothing left there to move


def test_set_aside_never_overwrites_an_earlier_stale_copy(tmp_path):
    run = tmp_path / "run"
    _write(run / "new.txt", b"second run")
    # earlier copies set aside under this second's stamp and the next two (the call takes less)
    start = time.time()
    stamps = [time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start + k)) for k in range(3)]
    for stamp in stamps:
        _write(tmp_path / f"run.stale-{stamp}" / "old.txt", b"first run")
    new = set_aside([run])[str(run)]
    assert new in {str(tmp_path / f"run.stale-{stamp}-2") for stamp in stamps}
    assert (Path(new) / "new.txt").read_bytes() == b"second run"
    for stamp in stamps:
        assert (tmp_path / f"run.stale-{stamp}" / "old.txt").read_bytes() == b"first run"


# ----------------------------------------------------------------------------- pipeline.py


def _screening(flagged: bool, monitored: bool = True) -> ScreenReport:
    signals = [SignalTest("nll", "down", 2.1, 2.4, -0.8, 0.0004, 0.0012, flagged),
               SignalTest("proj:owl", "up", 0.3, 0.1, 0.5, 0.04, 0.08, False)]
    return ScreenReport(n_data=32, n_reference=48, alpha=0.05, correction="holm", flagged=flagged, signals=signals,
                        baselines=[], kinship={"verdict": "kin", "detail": "same base model"}, tokens={},
                        seconds=1.5, monitored=monitored)


def test_count_actions_counts_each_action_and_the_halt():
    history = [{"step": s, "action": a} for s, a in enumerate(["pass", "pass", "mask", "reweight", "pass"], 1)]
    assert _count_actions(history, None) == {"pass": 3, "mask": 1, "reweight": 1}
    assert _count_actions(history, {"step": 6, "reason": "drift", "gate": False}) == {
        "pass": 3, "mask": 1, "reweight": 1, "halt": 1}
    assert _count_actions([], {"step": 0, "reason": "screen flagged", "gate": True}) == {"halt": 1}
    assert _count_actions([], {}) == {}  # an empty halt record is no halt


def test_training_record_keeps_the_screen_verdicts_and_the_training_outcome():
    training = {"steps": 3, "updates": 3, "total_steps": 10, "halted": True,
                "halt": {"step": 3, "reason": "drift alarm", "gate": False}, "verdict": "halted",
                "history": [{"action": "pass"}, {"action": "pass"}, {"action": "mask"}],
                "mlflow_run_id": "r1", "rank": 0, "interrupted": False}
    scoring = {"source": "cache", "train_rows": 32, "reference_rows": 48}
    record = _training_record("owl", _screening(flagged=True), training, scoring)
    assert record["teacher"] == "owl" and record["scoring"] is scoring
    assert record["screen"] == {
        "flagged": True, "monitored": True, "n_data": 32, "n_reference": 48, "kinship": "kin",
        "signals": {"nll": {"p": 0.0004, "p_adj": 0.0012, "flagged": True},
                    "proj:owl": {"p": 0.04, "p_adj": 0.08, "flagged": False}}}
    # the summary's fixed set of training keys: missing ones are None, others (history, rank) dropped
    assert set(record["training"]) == {"steps", "updates", "total_steps", "halted", "halt", "verdict", "gate",
                                       "alarms", "eval_before", "eval_after", "mlflow_run_id", "mlflow_run_url",
                                       "setup_signals"}
    assert record["training"]["halt"] == {"step": 3, "reason": "drift alarm", "gate": False}
    assert record["training"]["gate"] is None and record["training"]["eval_after"] is None
    assert record["decisions"] == {"pass": 2, "mask": 1, "halt": 1}
    json.dumps(record)  # it is written to run_summary.json


def test_scored_and_placement_phrases():
    assert _scored({"source": "cache"}) == "from the signals cache (scored by an earlier run)"
    assert _scored({}) == "from the signals cache (scored by an earlier run)"
    assert _scored({"source": "scoring stage", "rows_scored": 80, "seconds": 12.6, "node_ids": ["n1", "n2"]}) == \
        "80 rows on the scoring stage in 13 s (2 node(s))"
    assert _placement(ScoringSettings()) == "1 CPU each, device auto, dtype auto"
    assert _placement(ScoringSettings(cpus_per_actor=2, gpus_per_actor=0.5, device="cuda", dtype="bfloat16")) == \
        "2 CPU, 0.5 GPU each, device cuda, dtype bfloat16"


def _eval(rate: float, low: float, high: float, logprob: float) -> dict:
    return {"n_questions": 10, "samples_per_question": 5, "pooled_rate": rate, "pooled_ci_low": low,
            "pooled_ci_high": high, "target_logprob": logprob}


def test_format_summary_reports_passed_halted_and_gated_trainings():
    base = {"total_steps": 10, "gate": None, "alarms": [], "mlflow_run_url": "http://mlflow/r",
            "setup_signals": "cache"}
    passed = _training_record(
        "control", _screening(flagged=False),
        {**base, "steps": 10, "updates": 10, "halted": False, "halt": None, "verdict": "passed",
         "eval_before": _eval(0.04, 0.011, 0.135, -4.0), "eval_after": _eval(0.12, 0.056, 0.238, -3.456),
         "mlflow_run_id": "run-passed", "history": [{"action": "pass"}] * 10},
        {"source": "scoring stage", "rows_scored": 80, "seconds": 30.2, "node_ids": ["n1"]})
    halted = _training_record(
        "owl", _screening(flagged=False, monitored=False),
        {**base, "steps": 4, "updates": 3, "halted": True, "halt": {"step": 4, "reason": "drift alarm", "gate": False},
         "verdict": "halted", "eval_before": None, "eval_after": None, "mlflow_run_id": "run-halted",
         "setup_signals": None, "history": [{"action": "pass"}] * 3},
        {"source": "cache"})
    gated = _training_record(
        "owl-b", _screening(flagged=True),
        {**base, "steps": 0, "updates": 0, "halted": True,
         "halt": {"step": 0, "reason": "the screen flagged the data", "gate": True}, "verdict": "halted",
         "eval_before": None, "eval_after": None, "mlflow_run_id": "run-gated", "history": []},
        {"source": "cache"})
    summary = {"trait": "animal:owl", "vector": {"path": "v.safetensors", "layer": 3, "method": "last_prompt",
                                                 "cohens_d": 1.2345},
               "generation": {"control": {"rows": 64, "kept": 60, "reasons": {}},
                              "owl": {"rows": 64, "kept": 58, "reasons": {}}},
               "trainings": [passed, halted, gated], "seconds": {"extract": 12.4, "train": 99.6}}
    lines = format_summary(summary).split("\n")
    assert lines[:4] == ["", "trait_guard run: animal:owl",
                         "  persona vector   layer 3 (last_prompt), held-out d = 1.23",
                         "  teacher data     control: 60/64 kept; owl: 58/64 kept"]
    first = lines[4:13]
    assert first == [
        "  student on 'control'",
        "    screened       32 samples vs 48 reference: clean (kinship: kin)",
        "                   nll p_adj=0.0012, proj:owl p_adj=0.08",
        "    scored         80 rows on the scoring stage in 30 s (1 node(s)); training read cache",
        "    decisions      {'pass': 10}",
        "    verdict        PASSED after 10 steps",
        # 10 questions x 5 samples = 50 answers; rates and interval bounds as percentages
        "    trait before   4.0% of 50 answers (Wilson 95% CI 1.1-13.5%), log p(answer starts with the target) -4.00",
        "    trait after    12.0% of 50 answers (Wilson 95% CI 5.6-23.8%), log p(answer starts with the target) -3.46",
        "    MLflow run     run-passed  (http://mlflow/r)",
    ]
    second, third = lines[13:22], lines[22:31]
    assert second[1] == "    screened       32 samples vs 48 reference: UNMONITORED (kinship: kin)"
    assert second[3] == "    scored         from the signals cache (scored by an earlier run); training read unknown"
    assert second[4] == "    decisions      {'pass': 3, 'halt': 1}"
    assert second[5] == "    verdict        HALTED at step 4 of 10 (3 updates): drift alarm"
    assert second[6:8] == ["    trait before   not measured (no update to measure)",
                           "    trait after    not measured (no update to measure)"]
    assert third[1] == "    screened       32 samples vs 48 reference: FLAGGED (kinship: kin)"
    assert third[2] == "                   nll p_adj=0.0012 *, proj:owl p_adj=0.08"
    assert third[4:6] == ["    decisions      {'halt': 1}",
                          "    verdict        GATED before the first update (0 updates): the screen flagged the data"]
    assert lines[31:] == ["  seconds          extract 12, train 100"]
