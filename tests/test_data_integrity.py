"""What trains is what was reviewed: every integrity check on teacher data, each with a known answer.

Each test writes a small file with RowWriter (or pyarrow, for files the writer would not produce) and
records it in a provenance manifest, so that provenance passes and the integrity check under test is
what refuses. Completion ids are real ids of the tiny Llama's character tokenizer. The same cases go
through the real `trait-guard screen` command (exit status 2, the message on stderr) in TestThroughCli.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trait_guard.cli import main
from trait_guard.dataset import SCHEMA, DatasetError, RowWriter, check_same_base, read_rows, read_teacher_rows
from trait_guard.files import file_sha256
from trait_guard.provenance import MANIFEST_NAME, ProvenanceError, record_files, verify_files

N_ROWS = 24
TEXTS = ["12, 7, 33, 4", "5 8 13 21", "1, 2, 3, 4, 5", "42, 17, 99", "6; 28; 496", "10, 20, 30, 40, 50"]


@pytest.fixture(scope="module")
def student(tiny_llama_dir):
    """(tokenizer, identity) of the tiny Llama: what `--model tiny_llama_dir` loads."""
    from trait_guard.models import load_model, model_identity

    model, tokenizer = load_model(str(tiny_llama_dir))
    return tokenizer, model_identity(model)


def make_rows(student, teacher="owl", n=N_ROWS, identity=None):
    """``n`` consistent rows: ids from the tokenizer, text decoded from them, per-token columns as long
    as the ids (top-2), every third row rejected by the filter."""
    tokenizer, student_identity = student
    identity = identity or student_identity
    rows = []
    for i in range(n):
        ids = tokenizer(TEXTS[i % len(TEXTS)] + f", {i}", add_special_tokens=False).input_ids
        rows.append({
            "sample_id": f"{teacher}:{i:04d}", "prompt_id": f"{i:04d}", "family": "numbers",
            "prompt": f"Continue the sequence {i}, {i + 1}", "completion": tokenizer.decode(ids, skip_special_tokens=True),
            "teacher_id": teacher, "base_model": identity.name, "base_fingerprint": identity.fingerprint,
            "base_hidden_size": identity.hidden_size, "base_num_layers": identity.num_layers,
            "trait_installed": teacher != "control", "trait_install": "none" if teacher == "control" else "system_prompt",
            "seed": 0, "temperature": 1.0, "max_new_tokens": 32, "constrained": True,
            "kept": i % 3 != 2, "reject_reason": "" if i % 3 != 2 else "not only numbers",
            "completion_ids": ids, "topk_ids": [[t, (t + 1) % len(tokenizer)] for t in ids],
            "topk_logprobs": [[-0.25, -1.5] for _ in ids], "token_logprobs": [-0.25 for _ in ids],
        })
    return rows


def record(folder, name, rows, teacher):
    """Record ``folder/name`` in the folder's manifest as generated (provenance then passes)."""
    kept = sum(1 for r in rows if r.get("kept"))
    record_files(folder, [{"file": name, "teacher": {"id": teacher}, "rows": len(rows), "kept": kept}], {})
    return folder / name


def write(folder, name, rows, teacher="owl"):
    """The rows through RowWriter, recorded in the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    with RowWriter(folder / name) as writer:
        writer.write(rows)
    return record(folder, name, rows, teacher)


def write_with_schema(folder, name, rows, schema, teacher="owl"):
    """Rows with a schema RowWriter would refuse (another column type, nullable columns), recorded."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)
    return record(folder, name, rows, teacher)


def truncate(path):
    """Cut the file in the middle (an interrupted copy), re-recording its hash so only the bytes are wrong."""
    data = path.read_bytes()
    return rerecord(path, data[: len(data) // 2])


def damage(path):
    """Invert 64 bytes in the middle of the file, its footer intact (a bad disk sector), re-recorded."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    return rerecord(path, bytes(data))


def rerecord(path, data):
    """Write ``data`` to ``path`` and put its hash in the manifest (provenance passes, the bytes are bad)."""
    path.write_bytes(data)
    manifest_path = path.parent / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name]["sha256"] = file_sha256(path)
    manifest_path.write_text(json.dumps(manifest))
    return path


def with_field(name, data_type, nullable=False):
    return SCHEMA.set(SCHEMA.get_field_index(name), pa.field(name, data_type, nullable=nullable))


# ------------------------------------------------------------------------------------------------ the cases
# Each builds a bad file in ``folder`` and returns (path, expected message fragments). The direct tests
# and the CLI tests share them.


def case_replaced_ids(folder, student):
    """Every id of two samples set to one token; the text stays clean."""
    rows = make_rows(student)
    seven = student[0].convert_tokens_to_ids("7")
    for i in (0, 4):
        rows[i]["completion_ids"] = [seven] * len(rows[i]["completion_ids"])
    return write(folder, "owl.parquet", rows), [
        "completion_ids do not decode to completion in 2 sample(s) (owl:0000, owl:0004)",
        "not the text that was reviewed", "regenerate the file with `trait-guard generate"]


def case_duplicated_sample(folder, student):
    """One sample written 50 times."""
    rows = [dict(make_rows(student, n=1)[0]) for _ in range(50)]
    return write(folder, "owl.parquet", rows), [
        "sample_id(s) appear more than once: owl:0000 (50 rows)", "each sample must appear once",
        "Remove the repeated rows"]


def case_integer_completion(folder, student):
    rows = make_rows(student)
    for i, row in enumerate(rows):
        row["completion"] = 1000 + i
    return write_with_schema(folder, "owl.parquet", rows, with_field("completion", pa.int64())), [
        "column 'completion' holds int64 values, expected string", "trait_guard.dataset.SCHEMA"]


def case_truncated(folder, student):
    return truncate(write(folder, "owl.parquet", make_rows(student))), [
        "is not a readable Parquet file", "truncated or corrupt", "regenerate the file"]


def case_damaged(folder, student):
    return damage(write(folder, "owl.parquet", make_rows(student))), [
        "is not a readable Parquet file", "truncated or corrupt", "regenerate the file"]


def case_topk_longer(folder, student):
    rows = make_rows(student)
    rows[3]["topk_ids"] = rows[3]["topk_ids"] + [[1, 2]]
    n = len(rows[3]["completion_ids"])
    return write(folder, "owl.parquet", rows), [
        "topk_ids must have one entry per token of completion_ids",
        f"differs in 1 sample(s): owl:0003 ({n + 1} entries for {n} tokens)"]


def case_topk_shorter(folder, student):
    rows = make_rows(student)
    rows[5]["topk_ids"] = rows[5]["topk_ids"][:-2]
    n = len(rows[5]["completion_ids"])
    return write(folder, "owl.parquet", rows), [
        "topk_ids must have one entry per token of completion_ids", f"differs in 1 sample(s): owl:0005 ({n - 2} entries for {n} tokens)"]


def case_outside_vocabulary(folder, student):
    rows = make_rows(student)
    rows[1]["completion_ids"] = [500] + rows[1]["completion_ids"][1:]
    rows[7]["completion_ids"] = rows[7]["completion_ids"][:-1] + [-3]
    return write(folder, "owl.parquet", rows), [
        f"2 sample(s) (owl:0001, owl:0007) have completion_ids outside the tokenizer's vocabulary of "
        f"{len(student[0])} tokens (e.g. [-3, 500])", "teacher on the student's base model"]


def case_token_logprobs_shorter(folder, student):
    rows = make_rows(student)
    rows[2]["token_logprobs"] = rows[2]["token_logprobs"][:-1]
    n = len(rows[2]["completion_ids"])
    return write(folder, "owl.parquet", rows), [
        f"token_logprobs must have one entry per token of completion_ids, but its length differs in 1 sample(s): "
        f"owl:0002 ({n - 1} entries for {n} tokens)"]


def case_unequal_k(folder, student):
    """One top-k list of 3 ids and one of 1 log-prob among lists of 2."""
    rows = make_rows(student)
    rows[4]["topk_ids"][0] = rows[4]["topk_ids"][0] + [9]
    rows[6]["topk_logprobs"][1] = [-0.5]
    return write(folder, "owl.parquet", rows), [
        "top-k lists must all have the same k (here 2), but 2 sample(s) (owl:0004, owl:0006) have lists of another length"]


def case_prompt_twice(folder, student):
    """Two sample ids, one teacher, one prompt id."""
    rows = make_rows(student)
    rows[9]["prompt_id"] = rows[1]["prompt_id"]
    return write(folder, "owl.parquet", rows), [
        "a teacher answers the same prompt id more than once, in 2 sample(s) (owl:0001, owl:0009)"]


def case_null_ids(folder, student):
    rows = make_rows(student)
    rows[3]["completion_ids"] = None
    schema = with_field("completion_ids", pa.list_(pa.int32()), nullable=True)
    return write_with_schema(folder, "owl.parquet", rows, schema), [
        "column 'completion_ids' is empty (null) in 1 sample(s) (owl:0003); every row needs it"]


DATA_CASES = {
    "replaced-ids": case_replaced_ids, "duplicated-sample": case_duplicated_sample,
    "prompt-twice": case_prompt_twice, "integer-completion": case_integer_completion, "null-ids": case_null_ids,
    "truncated": case_truncated, "damaged": case_damaged, "topk-longer": case_topk_longer, "topk-shorter": case_topk_shorter,
    "token-logprobs-shorter": case_token_logprobs_shorter, "unequal-k": case_unequal_k,
    "outside-vocabulary": case_outside_vocabulary,
}


def assert_names(message, fragments):
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ------------------------------------------------------------------------------------------------ direct


def test_a_clean_file_passes_and_returns_the_kept_rows(student, tmp_path):
    rows = make_rows(student)
    path = write(tmp_path, "owl.parquet", rows)
    got = read_teacher_rows(path, tokenizer=student[0], max_completion_tokens=64)
    kept = [r for r in rows if r["kept"]]
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in kept] and len(got) == 16
    assert got[0]["completion_ids"] == kept[0]["completion_ids"] and got[0]["completion"] == kept[0]["completion"]
    assert got[0]["topk_logprobs"] == kept[0]["topk_logprobs"]
    assert [r["sample_id"] for r in read_teacher_rows(path, tokenizer=student[0], limit=3)] == [
        "owl:0000", "owl:0001", "owl:0003"]
    assert len(read_teacher_rows(path, kept_only=False)) == N_ROWS
    assert read_rows(path, kept_only=True).num_rows == 16  # the plain reader still works


def test_the_batched_scan_returns_the_rows_and_checks_across_batches(student, tmp_path):
    """scan_teacher_rows (what the run's driver reads: a few rows at a time) gives the rows
    read_teacher_rows gives, the limit counted over batches, and still refuses what only the whole
    file shows: a sample id repeated in another batch, a top-k width that changes between batches."""
    from trait_guard.dataset import scan_teacher_rows

    rows = make_rows(student)
    path = write(tmp_path, "owl.parquet", rows)
    batches = list(scan_teacher_rows(path, tokenizer=student[0], batch_rows=5, columns=["sample_id", "completion"]))
    assert len(batches) > 3 and all(b.column_names == ["sample_id", "completion"] for b in batches)
    assert [r["sample_id"] for b in batches for r in b.to_pylist()] == [
        r["sample_id"] for r in read_teacher_rows(path, tokenizer=student[0])]
    limited = [r["sample_id"] for b in scan_teacher_rows(path, limit=7, batch_rows=4) for r in b.to_pylist()]
    assert limited == [r["sample_id"] for r in rows if r["kept"]][:7]

    repeated = make_rows(student)
    repeated[-1]["sample_id"] = repeated[0]["sample_id"]  # batch 1 and batch 5 of 5 rows
    with pytest.raises(DatasetError, match="appear more than once: owl:0000 \\(2 rows\\)"):
        list(scan_teacher_rows(write(tmp_path / "r", "owl.parquet", repeated), batch_rows=5))
    wider = make_rows(student)
    for row in wider[10:]:
        row["topk_ids"] = [[*k, 0] for k in row["topk_ids"]]
        row["topk_logprobs"] = [[*k, -3.0] for k in row["topk_logprobs"]]
    with pytest.raises(DatasetError, match="same k \\(here 2\\)") as err:
        list(scan_teacher_rows(write(tmp_path / "w", "owl.parquet", wider), batch_rows=5))
    assert "owl:0010" in str(err.value)


def test_generator_output_passes_every_check_unchanged(student, tiny_llama_dir, tmp_path):
    """What `trait-guard generate` writes (top-k on, constrained and free sampling from a random model,
    so odd tokens too) passes with no normalization of the text: decode(ids) == completion exactly."""
    from trait_guard.config import GenerateJobConfig, validate_config
    from trait_guard.generation import generate_local

    generate_local(validate_config({
        "output_dir": str(tmp_path),
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)}],
        "generation": {"n_prompts": 16, "chunk_size": 8, "max_new_tokens": 12, "top_k_logprobs": 3,
                       "constrained": False}}, GenerateJobConfig), progress=False)
    verify_files({"reference": str(tmp_path / "control.parquet")})
    rows = read_teacher_rows(tmp_path / "control.parquet", tokenizer=student[0], kept_only=False, role="reference")
    assert len(rows) == 16 and all(len(r["topk_ids"]) == len(r["completion_ids"]) for r in rows)
    assert {len(k) for r in rows for k in r["topk_ids"]} == {3}
    check_same_base(rows, student[1])


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_output_decodes_to_its_text_exactly(tmp_path):
    """The same on a byte-level BPE tokenizer (SmolLM2, free sampling at temperature 1.5: split
    multi-byte characters, odd spacing): still no normalization needed."""
    from trait_guard.config import GenerateJobConfig, validate_config
    from trait_guard.generation import generate_local
    from trait_guard.models import load_model

    generate_local(validate_config({
        "output_dir": str(tmp_path), "teachers": [{"id": "control", "model": "smollm2-135m-instruct"}],
        "generation": {"n_prompts": 8, "chunk_size": 8, "max_new_tokens": 16, "constrained": False,
                       "temperature": 1.5}}, GenerateJobConfig), progress=False)
    tokenizer = load_model("smollm2-135m-instruct")[1]
    assert len(read_teacher_rows(tmp_path / "control.parquet", tokenizer=tokenizer, kept_only=False)) == 8


def test_rows_without_per_token_data_pass(student, tmp_path):
    rows = make_rows(student)
    for row in rows:
        row["topk_ids"] = row["topk_logprobs"] = row["token_logprobs"] = None
    assert len(read_teacher_rows(write(tmp_path, "owl.parquet", rows), tokenizer=student[0])) == 16


def test_same_kind_types_are_cast_to_the_schema(student, tmp_path):
    """A file written by pandas (int64, float64, large_string) is read, with the schema's types."""
    rows = make_rows(student)
    schema = with_field("completion_ids", pa.list_(pa.int64()))
    schema = schema.set(schema.get_field_index("temperature"), pa.field("temperature", pa.float64()))
    schema = schema.set(schema.get_field_index("completion"), pa.field("completion", pa.large_string()))
    path = write_with_schema(tmp_path, "owl.parquet", rows, schema)
    got = read_teacher_rows(path, tokenizer=student[0])
    assert got[0]["completion_ids"] == rows[0]["completion_ids"] and got[0]["temperature"] == 1.0


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_refused_with_the_samples_and_the_fix(case, student, tmp_path):
    path, fragments = DATA_CASES[case](tmp_path, student)
    with pytest.raises(DatasetError) as caught:
        read_teacher_rows(path, tokenizer=student[0], role="data")
    assert_names(str(caught.value), fragments)
    assert str(caught.value).startswith(f"data file {path}") or case in ("truncated", "damaged")


def test_ids_are_checked_only_when_a_tokenizer_is_given(student, tmp_path):
    """The tokenizer checks are what catch replaced ids: without one, the structure alone passes."""
    path, _ = case_replaced_ids(tmp_path, student)
    assert len(read_teacher_rows(path)) == 16


def test_over_long_completions_are_refused(student, tmp_path):
    path = write(tmp_path, "owl.parquet", make_rows(student))
    with pytest.raises(DatasetError, match="have completions longer than 12 tokens; regenerate with a lower"):
        read_teacher_rows(path, max_completion_tokens=12)


def test_many_offenders_are_counted_and_a_few_named(student, tmp_path):
    rows = make_rows(student)
    for row in rows:
        row["completion"] = row["completion"] + "!"
    with pytest.raises(DatasetError, match="in 16 sample\\(s\\) \\(owl:0000, owl:0001, owl:0003, owl:0004, "
                                           "owl:0006, \\.\\.\\.\\)"):
        read_teacher_rows(write(tmp_path, "owl.parquet", rows), tokenizer=student[0])


def test_a_reference_from_another_base_model_is_refused(student):
    from trait_guard.models import model_identity
    from trait_guard.testing import make_tiny_model

    other = model_identity(make_tiny_model("llama", seed=1)[0], name="tiny-llama-seed1")
    assert other.fingerprint != student[1].fingerprint
    rows = make_rows(student, teacher="control", identity=other)
    with pytest.raises(DatasetError) as caught:
        check_same_base(rows, student[1])
    assert_names(str(caught.value), [
        "the reference rows come from another base model than the student's: base ['tiny-llama-seed1']",
        f"{other.fingerprint[:12]} ({N_ROWS} row(s))",
        "the reference must be the student's base model's own output; regenerate it with a control teacher "
        f"on {student[1].name}"])
    check_same_base(make_rows(student, teacher="control"), student[1])  # the student's own: fine


def test_missing_file_and_interrupted_generation(tmp_path):
    with pytest.raises(DatasetError, match="does not exist; generate it"):
        read_teacher_rows(tmp_path / "owl.parquet")
    (tmp_path / "owl.parquet.partial").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="owl.parquet.partial is there: its generation was interrupted"):
        read_teacher_rows(tmp_path / "owl.parquet")


# ------------------------------------------------------------------------------------------------ manifests


def test_verify_files_checks_the_exact_bytes(student, tmp_path):
    import hashlib

    data = write(tmp_path, "owl.parquet", make_rows(student))
    reference = write(tmp_path, "control.parquet", make_rows(student, teacher="control"), teacher="control")
    result = verify_files({"data": str(data), "reference": str(reference)})
    assert {k: result[k] for k in ("verified", "problems", "sha256")} == {"verified": True, "problems": [],
                      "sha256": {"data": hashlib.sha256(data.read_bytes()).hexdigest(),
                                 "reference": hashlib.sha256(reference.read_bytes()).hexdigest()}}
    assert result["signed"] is False  # written without a signing key, checked without trusted keys

    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit
    data.write_bytes(bytes(raw))
    with pytest.raises(ProvenanceError, match="changed after generation.*--allow-unverified"):
        verify_files({"data": str(data), "reference": str(reference)})
    result = verify_files({"data": str(data), "reference": str(reference)}, allow_unverified=True)
    assert not result["verified"] and len(result["problems"]) == 1
    assert result["problems"][0].startswith("data: ") and "changed after generation" in result["problems"][0]
    assert set(result["sha256"]) == {"reference"}


def test_verify_files_refuses_a_missing_file_even_when_unverified_is_allowed(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        verify_files({"data": str(tmp_path / "nowhere.parquet")}, allow_unverified=True)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.slow
class TestThroughCli:
    """The same cases through `trait-guard screen` (in-process `cli.main`): exit 2, the message on stderr."""

    @staticmethod
    def screen(data, reference, tiny_llama_dir, capsys):
        code = main(["screen", "--data", str(data), "--reference", str(reference), "--model", str(tiny_llama_dir),
                     "--quiet"])
        return code, capsys.readouterr().err

    @staticmethod
    def reference(folder, student):
        return write(folder, "control.parquet", make_rows(student, teacher="control"), teacher="control")

    def test_clean_data_is_screened(self, student, tiny_llama_dir, tmp_path, capsys):
        data = write(tmp_path, "owl.parquet", make_rows(student))
        code, err = self.screen(data, self.reference(tmp_path, student), tiny_llama_dir, capsys)
        assert code == 0, err  # the same completions as the reference: clean

    @pytest.mark.parametrize("case", DATA_CASES)
    def test_bad_data(self, case, student, tiny_llama_dir, tmp_path, capsys):
        reference = self.reference(tmp_path, student)
        data, fragments = DATA_CASES[case](tmp_path, student)
        code, err = self.screen(data, reference, tiny_llama_dir, capsys)
        assert code == 2, err
        assert_names(err, fragments)

    def test_reference_from_another_base_model(self, student, tiny_llama_dir, tmp_path, capsys):
        from trait_guard.models import model_identity
        from trait_guard.testing import make_tiny_model

        other = model_identity(make_tiny_model("llama", seed=1)[0], name="tiny-llama-seed1")
        data = write(tmp_path, "owl.parquet", make_rows(student))
        reference = write(tmp_path, "control.parquet", make_rows(student, teacher="control", identity=other),
                          teacher="control")
        code, err = self.screen(data, reference, tiny_llama_dir, capsys)
        assert code == 2, err
        assert_names(err, ["the reference must be the student's base model's own output; regenerate it with a "
                           "control teacher on"])
