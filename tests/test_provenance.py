"""Provenance manifests: written by the generator, checked before training, with an explicit override."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trait_guard.config import GenerateJobConfig, TrainJobConfig, validate_config
from trait_guard.dataset import SCHEMA
from trait_guard.files import file_sha256
from trait_guard.generation import generate_local
from trait_guard.provenance import MANIFEST_NAME, ProvenanceError, record_files, verify_dataset
from trait_guard.train import verify_training_data


@pytest.fixture(scope="module")
def data(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("provenance")
    generate_local(validate_config({
        "output_dir": str(folder),
        "teachers": [{"id": "owl", "model": str(tiny_llama_dir), "trait": "animal:owl", "install": "system_prompt"},
                     {"id": "control", "model": str(tiny_llama_dir)}],
        "generation": {"n_prompts": 16, "chunk_size": 8, "max_new_tokens": 6}}, GenerateJobConfig), progress=False)
    return folder


def _copy(data, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(data, target)
    return target


def _without_manifest(data, tmp_path):
    """owl.parquet alone in a folder: no manifest vouches for it."""
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(data / "owl.parquet", lonely / "owl.parquet")
    return lonely / "owl.parquet"


def _rewrite_and_record(folder, rows):
    """Write owl.parquet with ``rows`` and record it in the manifest (so only the rows are wrong)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "owl.parquet")
    record_files(folder, [{"file": "owl.parquet", "teacher": {"id": "owl"}, "rows": len(rows), "kept": len(rows)}], {})


def test_generator_writes_a_manifest_that_verifies(data):
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"owl.parquet", "control.parquet"}
    owl = manifest["files"]["owl.parquet"]
    assert owl["sha256"] == file_sha256(data / "owl.parquet") and owl["rows"] == 16
    assert owl["teacher"]["install"] == "system_prompt" and owl["generation"]["n_prompts"] == 16
    assert owl["base"]["base_fingerprint"] == manifest["files"]["control.parquet"]["base"]["base_fingerprint"]
    assert verify_dataset(data / "owl.parquet")["teacher"]["id"] == "owl"


def test_changed_file_is_refused(data, tmp_path):
    folder = _copy(data, tmp_path)
    rows = pq.read_table(folder / "control.parquet").to_pylist()
    rows[0]["completion"] = "1, 2, 3"  # one edited sample
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "control.parquet")
    with pytest.raises(ProvenanceError, match="changed after generation.*allow_unverified"):
        verify_dataset(folder / "control.parquet")


def test_missing_or_unlisted_manifest_entries_are_refused(data, tmp_path):
    with pytest.raises(ProvenanceError, match="has no provenance manifest"):
        verify_dataset(_without_manifest(data, tmp_path))
    folder = _copy(data, tmp_path)
    shutil.copy(folder / "owl.parquet", folder / "extra.parquet")
    with pytest.raises(ProvenanceError, match="extra.parquet is not listed"):
        verify_dataset(folder / "extra.parquet")
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ProvenanceError, match="not valid JSON"):
        verify_dataset(folder / "owl.parquet")


def test_rows_without_provenance_are_refused_even_with_a_manifest(data, tmp_path):
    folder = _copy(data, tmp_path)
    rows = pq.read_table(folder / "owl.parquet").to_pylist()
    rows[3]["base_fingerprint"] = ""
    _rewrite_and_record(folder, rows)
    with pytest.raises(ProvenanceError, match="1 row\\(s\\) have no base_fingerprint"):
        verify_dataset(folder / "owl.parquet")
    rows[3]["base_fingerprint"], rows[5]["teacher_id"] = rows[0]["base_fingerprint"], "intruder"
    _rewrite_and_record(folder, rows)
    with pytest.raises(ProvenanceError, match="rows from teacher\\(s\\) \\['intruder'\\]"):
        verify_dataset(folder / "owl.parquet")


def test_training_refuses_unless_overridden(data, tmp_path):
    config = {"data": {"train": str(_without_manifest(data, tmp_path)), "reference": str(data / "control.parquet")}}
    with pytest.raises(ProvenanceError, match="no provenance manifest"):
        verify_training_data(validate_config(config, TrainJobConfig))
    config["data"]["allow_unverified"] = True
    result = verify_training_data(validate_config(config, TrainJobConfig))
    assert not result["verified"] and result["problems"][0].startswith("train: ")
    assert result["sha256"]["reference"] == file_sha256(data / "control.parquet")
    good = {"data": {"train": str(data / "owl.parquet"), "reference": str(data / "control.parquet")}}
    assert verify_training_data(validate_config(good, TrainJobConfig))["verified"]
