"""Signed provenance, each case with a known answer, through the real `trait-guard` command (in-process
``cli.main``) on folders written by the real generator (``generate_local`` on the tiny Llama), signed
with keys made by ``trait-guard keys create``. All offline.

Cases (docs/reliability.md): signed by a trusted key passes; unsigned is refused; one byte changed is
refused; a manifest rewritten with fresh hashes is refused; a key not trusted is refused; the override
is accepted and reported; without trusted keys nothing changes but the result says whether it is signed.
"""

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from trait_guard.cli import main
from trait_guard.config import GenerateJobConfig, TrainDataConfig, validate_config
from trait_guard.generation import generate_local
from trait_guard.provenance import MANIFEST_NAME, ProvenanceError, record_files, verify_files
from trait_guard.signing import (
    SIGNATURE_NAME,
    SIGNING_KEY_ENV,
    TRUSTED_KEYS_ENV,
    SignatureError,
    fingerprint,
    load_signing_key,
    verify_folder,
)

ROOT = Path(__file__).resolve().parents[1]
DATA, REFERENCE = "control-b.parquet", "control.parquet"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The generator's key pair and a stranger's, made by `trait-guard keys create`."""
    folder = tmp_path_factory.mktemp("keys")
    assert main(["keys", "create", "--out", str(folder), "--name", "generator"]) == 0
    assert main(["keys", "create", "--out", str(folder), "--name", "stranger"]) == 0
    return folder


def _generate(folder, tiny_llama_dir, signing_key=None):
    config = validate_config({
        "output_dir": str(folder),
        "teachers": [{"id": "control", "model": str(tiny_llama_dir)},
                     {"id": "control-b", "model": str(tiny_llama_dir), "sampling_seed": 5}],
        "generation": {"n_prompts": 16, "chunk_size": 8, "max_new_tokens": 8},
    }, GenerateJobConfig)
    return generate_local(config, progress=False, signing_key=signing_key)


@pytest.fixture(scope="module")
def signed(tiny_llama_dir, keys, tmp_path_factory):
    folder = tmp_path_factory.mktemp("signed")
    report = _generate(folder, tiny_llama_dir, signing_key=str(keys / "generator.key"))
    assert report.signature["signed"] and (folder / SIGNATURE_NAME).is_file()
    return folder


@pytest.fixture(scope="module")
def unsigned(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("unsigned")
    report = _generate(folder, tiny_llama_dir)
    assert report.signature == {"signed": False, "reason": report.signature["reason"]}
    assert not (folder / SIGNATURE_NAME).exists()
    return folder


@pytest.fixture
def copy(signed, tmp_path):
    """A private copy of the signed folder, for a test to tamper with."""
    return Path(shutil.copytree(signed, tmp_path / "data"))


def verify(folder, *trusted, capsys):
    code = main(["verify", str(folder), "--trusted-keys", *map(str, trusted)])
    out = capsys.readouterr()
    return code, out.out + out.err


def screen(folder, tiny_llama_dir, tmp_path, capsys, *extra):
    report = tmp_path / "screen.json"
    code = main(["screen", "--data", str(folder / DATA), "--reference", str(folder / REFERENCE),
                 "--model", str(tiny_llama_dir), "--quiet", "--max-rows", "8", "--json", str(report), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err, (json.loads(report.read_text()) if report.is_file() else None)


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_manifest(folder, name):
    """What someone with write access but no key would do: change the data (here: drop its last row,
    leaving a valid Parquet file), then record fresh hashes in the manifest."""
    import pyarrow.parquet as pq

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    entry = manifest["files"][name]
    table = pq.read_table(folder / name)
    table = table.slice(0, table.num_rows - 1)
    pq.write_table(table, folder / name)
    record_files(folder, [{"file": name, "teacher": entry["teacher"], "rows": table.num_rows,
                           "kept": sum(table.column("kept").to_pylist())}], entry["generation"])


# ----------------------------------------------------------------------------------------------- cases


def test_signed_by_a_trusted_key_passes(signed, keys, tiny_llama_dir, tmp_path, capsys):
    code, out = verify(signed, keys / "generator.pub", capsys=capsys)
    assert code == 0, out
    key_id = fingerprint(load_signing_key(keys / "generator.key").public_key())
    assert "signed by generator" in out and key_id in out and DATA in out and MANIFEST_NAME in out

    code, out, report = screen(signed, tiny_llama_dir, tmp_path, capsys, "--trusted-keys", str(keys / "generator.pub"))
    assert code == 0, out  # two samplings of one model: clean
    assert any(n.startswith("provenance.signed=true: signed by generator with a trusted key") for n in report["notes"])

    result = verify_files({"train": signed / DATA, "reference": signed / REFERENCE}, trusted_keys=[keys])
    assert result["verified"] and result["signed"] and result["signer"] == "generator"
    assert result["key_fingerprint"] == key_id
    assert result["tags"] == {"provenance.signed": "true", "provenance.signature_checked": "true",
                              "provenance.signer": "generator", "provenance.signer_fingerprint": key_id}


def test_unsigned_data_is_refused(unsigned, keys, tiny_llama_dir, tmp_path, capsys):
    code, out = verify(unsigned, keys / "generator.pub", capsys=capsys)
    assert code == 2 and "is not signed" in out and "--signing-key" in out, out
    code, out, _ = screen(unsigned, tiny_llama_dir, tmp_path, capsys, "--trusted-keys", str(keys / "generator.pub"))
    assert code == 2 and "is not signed" in out and "allow_unverified" in out, out


def test_one_byte_changed_is_refused(copy, keys, tiny_llama_dir, tmp_path, capsys):
    flip_one_byte(copy / "summary.json")  # a file only the signature covers
    code, out = verify(copy, keys / "generator.pub", capsys=capsys)
    assert code == 2 and "summary.json changed after signing" in out, out

    flip_one_byte(copy / DATA)
    code, out = verify(copy, keys / "generator.pub", capsys=capsys)
    assert code == 2 and "changed after signing" in out, out
    code, out, _ = screen(copy, tiny_llama_dir, tmp_path, capsys, "--trusted-keys", str(keys / "generator.pub"))
    assert code == 2 and "changed after" in out, out


def test_rewritten_manifest_with_fresh_hashes_is_refused(copy, keys, tiny_llama_dir, tmp_path, capsys):
    rewrite_manifest(copy, DATA)
    # hashes alone are fooled: this is why the signature exists
    assert verify_files({"data": copy / DATA})["signed"] is False
    code, out = verify(copy, keys / "generator.pub", capsys=capsys)
    assert code == 2 and "changed after signing" in out, out
    code, out, _ = screen(copy, tiny_llama_dir, tmp_path, capsys, "--trusted-keys", str(keys / "generator.pub"))
    assert code == 2 and "changed after signing" in out, out


def test_forged_envelope_is_refused(copy, keys, capsys):
    """A rewritten statement (fresh hashes) under the old signature does not verify."""
    envelope = json.loads((copy / SIGNATURE_NAME).read_text())


    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (copy / SIGNATURE_NAME).write_text(json.dumps(envelope))
    code, out = verify(copy, keys / "generator.pub", capsys=capsys)
    assert code == 2 and "not among the trusted keys" in out, out


def test_a_key_not_trusted_is_refused(signed, keys, tiny_llama_dir, tmp_path, capsys):
    code, out = verify(signed, keys / "stranger.pub", capsys=capsys)
    assert code == 2 and "not among the trusted keys" in out and "stranger" in out, out
    code, out, _ = screen(signed, tiny_llama_dir, tmp_path, capsys, "--trusted-keys", str(keys / "stranger.pub"))
    assert code == 2 and "not among the trusted keys" in out, out


def test_a_file_added_after_signing_is_refused(copy, keys, capsys):
    shutil.copy(copy / DATA, copy / "extra.parquet")
    code, out = verify(copy, keys / "generator.pub", capsys=capsys)
    assert code == 2 and "added after signing" in out, out


def test_the_override_is_accepted_and_reported(signed, keys, tiny_llama_dir, tmp_path, capsys):
    code, out, report = screen(signed, tiny_llama_dir, tmp_path, capsys, "--trusted-keys", str(keys / "stranger.pub"),
                               "--allow-unverified")
    assert code == 0, out  # two samplings of one model: clean
    assert "WARNING: UNVERIFIED DATA" in out and "not among the trusted keys" in out
    assert any(n.startswith("UNVERIFIED DATA (provenance.verified=false)") for n in report["notes"])
    assert any(n.startswith("provenance.signed=false (key SHA256:") for n in report["notes"])

    result = verify_files({"train": signed / DATA}, trusted_keys=[keys / "stranger.pub"], allow_unverified=True)
    key_id = fingerprint(load_signing_key(keys / "generator.key").public_key())
    assert result["verified"] is False and result["signed"] is False and result["key_fingerprint"] == key_id
    assert result["tags"]["provenance.signed"] == "false" and len(result["problems"]) == 1


def test_without_trusted_keys_nothing_changes_but_the_result_says_signed(signed, unsigned):
    result = verify_files({"train": unsigned / DATA, "reference": unsigned / REFERENCE})
    assert result["verified"] and result["signed"] is False and result["trusted_keys"] == 0
    result = verify_files({"train": signed / DATA})
    assert result["verified"] and result["signed"] is True
    assert result["signatures"]["train"]["trusted"] is False


def test_trusted_keys_from_the_environment(unsigned, signed, keys, monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys / "generator.pub"))
    with pytest.raises(ProvenanceError, match="is not signed"):
        verify_files({"train": unsigned / DATA})
    assert verify_files({"train": signed / DATA})["signer"] == "generator"
    # PEM text (a Kubernetes Secret or ConfigMap in an env var) works too
    monkeypatch.setenv(TRUSTED_KEYS_ENV, (keys / "generator.pub").read_text())
    assert verify_files({"train": signed / DATA})["signed"] is True


def test_signing_key_from_the_environment(tiny_llama_dir, keys, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SIGNING_KEY_ENV, (keys / "generator.key").read_text())  # as a Secret's env var holds it
    _generate(tmp_path, tiny_llama_dir)
    assert verify_folder(tmp_path, [keys / "generator.pub"])["signer"] == "generator"
    # regenerated without a key: the stale signature is removed, the folder says it is unsigned
    monkeypatch.delenv(SIGNING_KEY_ENV)
    _generate(tmp_path, tiny_llama_dir)
    assert not (tmp_path / SIGNATURE_NAME).exists() and "UNSIGNED" in capsys.readouterr().err


def test_train_refuses_unsigned_data_before_anything_loads(unsigned, keys, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "data": {
        "train": str(unsigned / DATA), "reference": str(unsigned / REFERENCE),
        "trusted_keys": [str(keys / "generator.pub")]}}))
    assert main(["train", "--config", str(config), "--local"]) == 2
    assert "is not signed" in capsys.readouterr().err


def test_bad_keys_are_named(keys, signed, tmp_path, capsys):
    with pytest.raises(SignatureError, match="PRIVATE key"):
        verify_folder(signed, [keys / "generator.key"])
    assert main(["verify", str(signed), "--trusted-keys", str(tmp_path / "missing.pub")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify", str(signed)]) == 2 and "no trusted keys" in capsys.readouterr().err
    assert main(["keys", "create", "--out", str(keys), "--name", "generator"]) == 2  # never overwritten
    assert os.stat(keys / "generator.key").st_mode & 0o077 == 0


def test_trusted_keys_setting_defaults_to_none():
    assert TrainDataConfig(train="a.parquet", reference="b.parquet").trusted_keys == []


# ---------------------------------------------------------------------------- signed student export


def _student_summary(verdict):
    return {"verdict": verdict, "student": "tiny", "trait": "owl", "weights_step": 4, "updates": 4,
            "gate": {"flagged": False, "alpha": 0.01, "flagged_signals": []}, "alarms": [],
            "code_version": {"source_sha256": "c0de"}, "mlflow_run_id": "run-1"}


@pytest.fixture(scope="module")
def student(tiny_llama_dir, signed, keys, tmp_path_factory):
    """A student exported by trait_guard.export and signed with the trainer's key, trained (as its
    attestation says) on the signed folder's data; the data digests are the provenance check's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trait_guard.export import data_digests, export_student

    assert main(["keys", "create", "--out", str(keys), "--name", "trainer"]) == 0
    paths = {"train": signed / DATA, "reference": signed / REFERENCE}
    digests = data_digests(paths, verify_files(paths, trusted_keys=[keys / "generator.pub"]))
    out = tmp_path_factory.mktemp("run")
    folder, record = export_student(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                    AutoTokenizer.from_pretrained(tiny_llama_dir), out, _student_summary("passed"),
                                    digests, signing_key=str(keys / "trainer.key"))
    assert record["signature"]["signed"] and record["signature"]["signer"] == "trainer"
    return folder


def verify_student(folder, keys, capsys, *extra):
    code = main(["verify", str(folder), "--trusted-keys", str(keys / "trainer.pub"), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_signed_student_round_trips(student, signed, keys, tiny_llama_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    code, out = verify_student(student, keys, capsys, "--trained-on", str(signed), "--require-verdict", "passed",
                               "--json", str(tmp_path / "v.json"))
    assert code == 0, out
    assert "signed by trainer" in out and "model.safetensors" in out and "trait_guard_export.json" in out
    assert "verdict passed, screen clean, 4 update(s)" in out
    assert f"train data matches {signed / DATA}" in out and f"reference data matches {signed / REFERENCE}" in out
    result = json.loads((tmp_path / "v.json").read_text())
    attested = result["predicate"]["data"]["train"]
    from trait_guard.files import file_sha256

    assert attested == {"name": "control-b", "sha256": file_sha256(signed / DATA), "verified": True}
    assert result["predicate"]["code_version"] == {"source_sha256": "c0de"}
    # the signature files do not disturb loading: the exported weights come back, equal to the base's
    loaded = AutoModelForCausalLM.from_pretrained(student).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    assert loaded.keys() == base.keys() and all(torch.equal(loaded[k], base[k]) for k in base)


def test_a_student_changed_after_signing_is_refused(student, keys, tmp_path, capsys):
    copy = Path(shutil.copytree(student, tmp_path / "student"))
    flip_one_byte(copy / "model.safetensors")
    code, out = verify_student(copy, keys, capsys)
    assert code == 2 and "model.safetensors changed after signing" in out

    copy2 = Path(shutil.copytree(student, tmp_path / "student2"))
    record = json.loads((copy2 / "trait_guard_export.json").read_text())
    record["verdict"] = "passed"
    record["screen"]["flagged"] = True  # someone edits the unsigned-looking record: it is signed too
    (copy2 / "trait_guard_export.json").write_text(json.dumps(record))
    code, out = verify_student(copy2, keys, capsys)
    assert code == 2 and "trait_guard_export.json changed after signing" in out


def test_a_student_is_checked_against_its_data_verdict_and_key(student, signed, keys, tmp_path, capsys):
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"  # the same data less one row: another dataset
    table = pq.read_table(signed / DATA)
    pq.write_table(table.slice(0, table.num_rows - 1), other)
    code, out = verify_student(student, keys, capsys, "--trained-on", str(other))
    assert code == 2 and "trained on control-b" in out and "none of the 1 Parquet file(s) given" in out
    code, out = verify_student(student, keys, capsys, "--require-verdict", "unguarded")
    assert code == 2 and "attested verdict is 'passed'" in out
    code, out = verify(student, keys / "generator.pub", capsys=capsys)  # signed by the trainer, not the generator
    assert code == 2 and "not among the trusted keys" in out
    # teacher data is not a student: --trained-on and --require-verdict are refused on it (signed and trusted)
    for option in (["--trained-on", str(signed / DATA)], ["--require-verdict", "passed"]):
        code = main(["verify", str(signed), "--trusted-keys", str(keys / "generator.pub"), *option])
        out = capsys.readouterr()
        assert code == 2 and "is signed teacher data, not a student export" in out.out + out.err


def test_an_unsigned_student_says_so(tiny_llama_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trait_guard.export import export_student

    digests = {"train": {"path": "x", "name": "x", "sha256": "a" * 64, "verified": True}}
    folder, record = export_student(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                    AutoTokenizer.from_pretrained(tiny_llama_dir), tmp_path,
                                    _student_summary("passed"), digests)
    assert record["signature"] == {"signed": False, "signer": None, "key_fingerprint": None}
    assert not (folder / SIGNATURE_NAME).exists() and "NOT signed" in caplog.text
    with pytest.raises(SignatureError, match="keys create"):  # a bad key fails before anything is written
        export_student(None, None, tmp_path / "other", _student_summary("passed"), digests,
                       signing_key=str(tmp_path / "missing.key"))
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------ no key material

_SKIP = {".git", ".venv", "node_modules", "__pycache__", "outputs", "mlruns", "test-output", ".pytest_cache",
         ".ruff_cache"}
_PRIVATE = re.compile("-----BEGIN " + "[A-Z0-9 ]*PRIVATE KEY-----")  # split so this file does not match itself


def test_no_private_key_in_the_repository():
    found = []
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if parts & _SKIP or any(p.endswith(".egg-info") for p in parts) or not path.is_file():
            continue
        if path.suffix in {".key", ".pem"} or (path.stat().st_size < 5_000_000
                                              and _PRIVATE.search(path.read_text(errors="ignore"))):
            found.append(str(path.relative_to(ROOT)))
    assert not found, f"private key material in the repository: {found}"
    deploy = " ".join(p.read_text() for p in (ROOT / "deploy").rglob("*") if p.is_file())
    assert not _PRIVATE.search(deploy) and "BEGIN PUBLIC KEY" not in deploy


def test_run_signing_key_signs_the_data_and_the_students():
    """`trait-guard run --signing-key KEY`: the same key goes to generation and to student.signing_key."""
    from trait_guard.cli import _job_config, build_parser
    from trait_guard.config import RunJobConfig

    config_path = str(ROOT / "ray_jobs" / "configs" / "run_cpu.yaml")
    args = build_parser().parse_args(["run", "--config", config_path, "--signing-key", "keys/me.key"])
    config = _job_config(args.config, RunJobConfig, **{"student.signing_key": args.signing_key})
    assert args.signing_key == "keys/me.key" and config.student.signing_key == "keys/me.key"
    assert _job_config(config_path, RunJobConfig, **{"student.signing_key": None}).student.signing_key is None
