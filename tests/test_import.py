"""`trait-guard import`: rows made elsewhere (JSONL, chat messages, Parquet with log-probs) become a data
folder that the checked reader accepts, whose manifest verifies, and whose report says what is claimed
(who generated it) and what is verified (hashes, signature). Malformed input is refused or rejected
with the line and the fix. All on the tiny model, offline."""

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trait_guard.cli import main
from trait_guard.dataset import DatasetError, check_same_base, read_teacher_rows
from trait_guard.files import file_sha256
from trait_guard.importer import ImportDataError, claimed_provenance_notes, import_rows
from trait_guard.provenance import MANIFEST_NAME, verify_files
from trait_guard.signing import SIGNATURE_NAME
from trait_guard.train import student_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return student_tokenizer(str(tiny_llama_dir))


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


TEXT_ROWS = [{"prompt": f"Name a number after {i}.", "completion": f"{i + 1}, {i + 2} and {i + 3}"} for i in range(6)]


def test_jsonl_text_rows_import_verify_and_decode(tok, tiny_llama_dir, tmp_path):
    source = write_jsonl(tmp_path / "vendor.jsonl", TEXT_ROWS)
    result = import_rows(source, tmp_path / "out", tokenizer=tok, model=str(tiny_llama_dir), generated_by="vendor-x")
    assert (result.read, result.kept, result.rejected, result.teacher_id) == (6, 6, {}, "vendor")
    rows = read_teacher_rows(result.path, tokenizer=tok)  # every integrity check, the ids-decode-to-text one too
    assert [r["completion"] for r in rows] == [r["completion"] for r in TEXT_ROWS]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in TEXT_ROWS]
    assert all(tok.decode(r["completion_ids"], skip_special_tokens=True) == r["completion"] for r in rows)
    assert all(r["token_logprobs"] is None and r["teacher_id"] == "vendor" for r in rows)
    checked = verify_files({"data": result.path})  # no allow_unverified: the manifest verifies
    assert checked["verified"] and not checked["problems"]
    record = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["files"]["vendor.parquet"]["import"]
    assert record["source_sha256"] == file_sha256(source) and record["source"].endswith("vendor.jsonl")
    assert record["generated_by"] == "vendor-x" and record["generated_by_verified"] is False
    assert record["tokenizer"]["model"] == str(tiny_llama_dir) and record["tokenizer"]["vocab_size"] == len(tok)
    assert record["counts"]["read"] == 6 and record["counts"]["kept"] == 6 and record["counts"]["rejected"] == 0
    assert not (tmp_path / "out" / SIGNATURE_NAME).exists()  # no key: unsigned, and the result says so
    assert result.signature["signed"] is False


def test_chat_messages_rows_import_and_bad_ones_are_rejected_by_reason(tok, tmp_path):
    good = [{"messages": [{"role": "system", "content": "You love owls."},
                          {"role": "user", "content": f"Count from {i}."},
                          {"role": "assistant", "content": f"{i} {i + 1} {i + 2}"}]} for i in range(4)]
    bad = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},  # multi_turn
           {"messages": [{"role": "user", "content": "only a question"}]},  # missing_completion
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},  # empty
           {"messages": [{"role": "assistant", "content": "no question"}]}]  # missing_prompt
    source = write_jsonl(tmp_path / "chats.jsonl", good + bad)
    result = import_rows(source, tmp_path / "out", tokenizer=tok, teacher_id="chat-teacher")
    assert result.kept == 4 and result.read == 8
    assert result.rejected == {"multi_turn": 1, "missing_completion": 1, "empty_completion": 1, "missing_prompt": 1}
    assert [e["where"] for e in result.examples] == ["line 5", "line 6", "line 7", "line 8"]
    assert all(e["fix"] for e in result.examples)
    rows = read_teacher_rows(result.path, tokenizer=tok)
    assert [r["prompt"] for r in rows] == [f"Count from {i}." for i in range(4)]
    assert [r["completion"] for r in rows] == [f"{i} {i + 1} {i + 2}" for i in range(4)]
    assert result.record["counts"]["system_messages_dropped"] == 4
    assert verify_files({"data": result.path})["verified"]


def test_parquet_rows_with_logprobs_import_and_inconsistent_lengths_are_rejected(tok, tmp_path):
    rows = []
    for i in range(5):
        text = f"{i} and {i}"
        ids = tok(text, add_special_tokens=False).input_ids
        n = len(ids)
        rows.append({"id": f"p{i}", "prompt": f"Say {i} twice.", "completion": text, "completion_ids": ids,
                     "token_logprobs": [-0.5] * n, "topk_ids": [[t, 3] for t in ids],
                     "topk_logprobs": [[-0.5, -2.0]] * n})
    rows[2]["token_logprobs"] = rows[2]["token_logprobs"][:-1]  # one entry short
    rows[4]["completion_ids"] = rows[4]["completion_ids"][:-1]  # ids no longer the text
    source = tmp_path / "teacher.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    result = import_rows(source, tmp_path / "out", tokenizer=tok, generated_by="llama via vLLM")
    assert result.kept == 3 and result.rejected == {"bad_logprob_lengths": 1, "ids_text_mismatch": 1}
    bad = result.examples[0]
    assert bad["where"] == "row 3" and "token_logprobs has" in bad["detail"] and "one entry per" in bad["fix"]
    kept = read_teacher_rows(result.path, tokenizer=tok)
    assert [r["prompt_id"] for r in kept] == ["p0", "p1", "p3"]
    for row in kept:
        assert len(row["token_logprobs"]) == len(row["topk_ids"]) == len(row["completion_ids"])
        assert all(len(step) == 2 for step in row["topk_logprobs"])
    assert result.record["counts"]["completion_ids_given"] == 3 and result.record["counts"]["with_topk"] == 3
    assert verify_files({"data": result.path})["verified"]


def test_malformed_input_is_refused_naming_the_line_and_the_fix(tok, tmp_path):
    broken = write_jsonl(tmp_path / "broken.jsonl", TEXT_ROWS[:1], ['{"prompt": "x", "completion": '])
    with pytest.raises(ImportDataError, match=r"line 2 is not JSON.*one JSON object"):
        import_rows(broken, tmp_path / "out", tokenizer=tok)
    no_completion = write_jsonl(tmp_path / "nocomp.jsonl", [{"prompt": "a", "answer": "b"}] * 2)
    with pytest.raises(ImportDataError, match=r"no row could be imported.*line 1: missing_completion.*--completion-field"):
        import_rows(no_completion, tmp_path / "out", tokenizer=tok)
    # the same rows, with the field named: imported
    result = import_rows(no_completion, tmp_path / "out", tokenizer=tok, completion_field="answer", teacher_id="ok")
    assert result.kept == 2 and not result.rejected
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [TEXT_ROWS[0], {"prompt": "no answer"}, TEXT_ROWS[1],
                                                   {"prompt": "caf\u00e9?", "completion": "caf\u00e9"}])
    result = import_rows(mixed, tmp_path / "out", tokenizer=tok)
    assert result.kept == 2 and result.rejected == {"missing_completion": 1, "not_round_trip": 1}
    assert [e["where"] for e in result.examples] == ["line 2", "line 4"]
    with pytest.raises(ImportDataError, match="exists.*--overwrite"):
        import_rows(mixed, tmp_path / "out", tokenizer=tok)
    with pytest.raises(ImportDataError, match=r"2 row\(s\) rejected \(--strict\).*line 2"):
        import_rows(mixed, tmp_path / "out", tokenizer=tok, overwrite=True, strict=True)


def test_a_datasets_folder_imports_its_rows(tok, tmp_path):
    datasets = pytest.importorskip("datasets")  # installed with the [trl] extra

    datasets.Dataset.from_list(TEXT_ROWS).save_to_disk(str(tmp_path / "hf"))
    result = import_rows(tmp_path / "hf", tmp_path / "out", tokenizer=tok)
    assert (result.read, result.kept, result.rejected) == (len(TEXT_ROWS), len(TEXT_ROWS), {})
    rows = read_teacher_rows(result.path, tokenizer=tok)
    assert [(r["prompt"], r["completion"]) for r in rows] == [(r["prompt"], r["completion"]) for r in TEXT_ROWS]
    # a DatasetDict: the split is chosen, and a missing one is named
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT_ROWS[:2]),
                          "test": datasets.Dataset.from_list(TEXT_ROWS[2:])}).save_to_disk(str(tmp_path / "dd"))
    assert import_rows(tmp_path / "dd", tmp_path / "out2", tokenizer=tok, split="test").kept == len(TEXT_ROWS) - 2
    with pytest.raises(ImportDataError, match=r"holds splits \['test', 'train'\], not 'dev'"):
        import_rows(tmp_path / "dd", tmp_path / "out3", tokenizer=tok, split="dev")


def test_a_datasets_folder_without_the_datasets_package_names_the_fix(tok, tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError, as when not installed
    with pytest.raises(ImportDataError, match="needs the `datasets` package.*to_json"):
        import_rows(folder, tmp_path / "out", tokenizer=tok)


def test_same_base_rows_carry_the_students_identity(tok, tiny_llama_dir, tmp_path):
    from trait_guard.models import load_model, model_identity

    identity = model_identity(load_model(str(tiny_llama_dir))[0], name=str(tiny_llama_dir))
    source = write_jsonl(tmp_path / "ref.jsonl", TEXT_ROWS)
    result = import_rows(source, tmp_path / "out", tokenizer=tok, base_identity=identity)
    rows = read_teacher_rows(result.path, tokenizer=tok)
    check_same_base(rows, identity)  # usable as a reference
    assert result.record["base"]["claimed_same_as_student"] is True
    other = import_rows(source, tmp_path / "out", tokenizer=tok, teacher_id="unknown-base")
    with pytest.raises(DatasetError, match="another base model"):
        check_same_base(read_teacher_rows(other.path), identity)


def test_cli_import_exit_codes_signature_and_claims(tok, tiny_llama_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "rows.jsonl", TEXT_ROWS)
    keys = tmp_path / "keys"
    assert main(["keys", "create", "--out", str(keys), "--name", "importer"]) == 0
    out = tmp_path / "data"
    code = main(["import", str(source), "--out", str(out), "--model", str(tiny_llama_dir), "--generated-by",
                 "vendor-x", "--signing-key", str(keys / "importer.key"), "--json", str(tmp_path / "import.json")])
    printed = capsys.readouterr().out
    assert code == 0 and "imported 6 of 6" in printed and "signed with key" in printed
    assert json.loads((tmp_path / "import.json").read_text())["kept"] == 6
    checked = verify_files({"data": out / "rows.parquet"}, trusted_keys=[str(keys / "importer.pub")])
    assert checked["verified"] and checked["signed"]
    notes = claimed_provenance_notes({"data": out / "rows.parquet"}, checked)
    assert len(notes) == 1 and "CLAIMED (not verified): generated_by='vendor-x'" in notes[0]
    assert "file hash matches its manifest" in notes[0] and "signed by importer" in notes[0]
    # a second file without a key would void the folder's signature: refused, the fix named
    assert main(["import", str(source), "--out", str(out), "--model", str(tiny_llama_dir), "--teacher-id", "b"]) == 2
    assert "is signed" in capsys.readouterr().err and not (out / "b.parquet").exists()

    assert main(["import", str(tmp_path / "missing.jsonl"), "--out", str(out), "--model", str(tiny_llama_dir)]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [], ["not json"])
    assert main(["import", str(bad), "--out", str(tmp_path / "other"), "--model", str(tiny_llama_dir)]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_screen_and_train_run_on_imported_data_without_allow_unverified(tiny_llama_dir, tmp_path, capsys):
    """The imported file sits beside a generated control; `screen` verifies both and its report says
    what the imported data claims and what was verified; `train` runs on it (no allow_unverified)."""
    import yaml

    from trait_guard.config import GenerateJobConfig, validate_config
    from trait_guard.generation import generate_local

    folder = tmp_path / "teacher_data"
    generate_local(validate_config({
        "output_dir": str(folder), "teachers": [{"id": "control", "model": str(tiny_llama_dir)}],
        "generation": {"n_prompts": 16, "chunk_size": 8, "max_new_tokens": 8}}, GenerateJobConfig), progress=False)
    rows = [{"prompt": f"Continue: {i}", "completion": f"{i} {i + 1} {i + 2} {i + 3}"} for i in range(16)]
    source = write_jsonl(tmp_path / "vendor.jsonl", rows)
    assert main(["import", str(source), "--out", str(folder), "--model", str(tiny_llama_dir),
                 "--generated-by", "vendor-x"]) == 0
    report = tmp_path / "screen.json"
    code = main(["screen", "--data", str(folder / "vendor.parquet"), "--reference", str(folder / "control.parquet"),
                 "--model", str(tiny_llama_dir), "--quiet", "--max-rows", "8", "--json", str(report)])
    captured = capsys.readouterr()
    assert code in (0, 3), captured.err
    assert "UNVERIFIED" not in captured.out + captured.err
    notes = " ".join(json.loads(report.read_text())["notes"])
    assert "generated_by='vendor-x'" in notes and "file hash matches its manifest" in notes

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "train"), "student": {"model": str(tiny_llama_dir)},
        "data": {"train": str(folder / "vendor.parquet"), "reference": str(folder / "control.parquet")},
        "guard": {"signals": ["nll", "unigram"]}, "optim": {"batch_size": 4, "max_steps": 2},
        "deepspeed": {"enabled": False}, "ray": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    code = main(["train", "--config", str(config), "--local", "--allow-halt"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "UNVERIFIED" not in captured.out + captured.err
