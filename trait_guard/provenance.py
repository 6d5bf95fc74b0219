"""Provenance manifests: what generated each teacher-data file, and proof that it is unchanged.

What. Every folder of teacher data written by trait_guard's generator holds ``manifest.json``: per
Parquet file its SHA-256, row and kept counts, the teacher's config and base-model identity, and the
generation config. :func:`verify_dataset` checks a file against it (listed, the SHA-256 of its exact
bytes as the manifest recorded it, every row with its provenance and the teacher the manifest names)
and returns the entry; anything else raises :class:`ProvenanceError` with the fix.
:func:`verify_files` checks the set of files a command uses (the data and its reference) at once,
for screening and training alike, and, when trusted public keys are configured, that each folder is
signed by one of them (:mod:`trait_guard.signing`; docs/provenance.md).

Why. The guard's verdict is only as good as the data it is told about. A file swapped, edited or
assembled by hand after generation could carry anything; a training run must not take it silently.
Screening and training verify by default; ``data.allow_unverified: true`` (``--allow-unverified`` for
``trait-guard screen``) is the explicit way round, and a run that takes it is tagged loudly in MLflow
(``provenance.verified = false``).

A manifest alone proves little: whoever can rewrite a file can rewrite the manifest with fresh
hashes. The signature (``provenance.sig.json``, made by the generator's private key) is what a
rewrite cannot forge; ``data.trusted_keys`` / ``$TRAIT_GUARD_TRUSTED_KEYS`` / ``--trusted-keys``
turn its check on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trait_guard.dataset import DatasetError
from trait_guard.files import atomic_write_text, file_sha256

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# provenance columns that must be non-empty on every row
PROVENANCE_COLUMNS = ("sample_id", "prompt_id", "teacher_id", "base_model", "base_fingerprint", "trait_install")

__all__ = ["MANIFEST_NAME", "ProvenanceError", "file_sha256", "read_manifest", "record_files", "verify_dataset",
           "verify_files"]


class ProvenanceError(DatasetError):
    """A teacher-data file has no manifest, differs from it, or has rows without provenance."""


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a data folder ({} when there is none)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProvenanceError(f"{path} is not valid JSON ({err}); regenerate the data with `trait-guard generate`") from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ProvenanceError(f"{path} is not a trait_guard manifest (format_version {FORMAT_VERSION} expected)")
    return manifest


def record_files(folder: str | Path, entries: Iterable[Mapping[str, Any]], generation: Mapping[str, Any]) -> Path:
    """Add (or replace) the files in ``entries`` in the folder's manifest.

    Each entry: ``{"file": name, "teacher": TeacherConfig dump, "rows": n, "kept": k}``; the hash and the
    base identity (from the file's first row) are read here. Written atomically.
    """
    import pyarrow.parquet as pq

    from trait_guard import __version__

    folder = Path(folder)
    manifest = read_manifest(folder) or {"format_version": FORMAT_VERSION, "files": {}}
    for entry in entries:
        path = folder / entry["file"]
        first = pq.read_table(path, columns=["base_model", "base_fingerprint", "base_hidden_size",
                                             "base_num_layers"]).slice(0, 1).to_pylist()
        manifest["files"][entry["file"]] = {
            "sha256": file_sha256(path), "rows": entry["rows"], "kept": entry["kept"],
            "teacher": dict(entry["teacher"]), "base": first[0] if first else None,
            "generation": dict(generation),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "generator": f"trait_guard {__version__}",
        }
    return atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, default=str) + "\n")


_OVERRIDE = ("set data.allow_unverified: true to train on it anyway (the run is then tagged "
             "provenance.verified=false in MLflow), or pass --allow-unverified to `trait-guard screen`")


def verify_dataset(path: str | Path) -> dict[str, Any]:
    """Check ``path`` against its folder's manifest and its rows' provenance; returns the manifest entry."""
    import pyarrow.parquet as pq

    from trait_guard.dataset import read_rows

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"teacher data {path} does not exist; generate it with `trait-guard generate --config ...`")
    manifest = read_manifest(path.parent)
    if not manifest:
        raise ProvenanceError(
            f"{path} has no provenance manifest ({path.parent / MANIFEST_NAME}): it was not written by "
            f"`trait-guard generate`, or the manifest was removed. Regenerate the data, or {_OVERRIDE}")
    entry = manifest.get("files", {}).get(path.name)
    if entry is None:
        raise ProvenanceError(
            f"{path.name} is not listed in {path.parent / MANIFEST_NAME} (files: {sorted(manifest.get('files', {}))}); "
            f"it was added after generation. Regenerate it, or {_OVERRIDE}")
    actual = file_sha256(path)
    if actual != entry["sha256"]:
        raise ProvenanceError(
            f"{path} changed after generation: SHA-256 {actual[:16]}... but the manifest recorded "
            f"{entry['sha256'][:16]}... Regenerate the data (or restore the original file), or {_OVERRIDE}")
    read_rows(path)  # the required columns are there
    table = pq.read_table(path, columns=list(PROVENANCE_COLUMNS))
    if table.num_rows != entry["rows"]:
        raise ProvenanceError(f"{path} has {table.num_rows} rows, the manifest says {entry['rows']}")
    for column in PROVENANCE_COLUMNS:
        values = table.column(column).to_pylist()
        empty = sum(1 for v in values if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "")
        if empty:
            raise ProvenanceError(f"{path}: {empty} row(s) have no {column}; every row needs its provenance. "
                                  f"Regenerate the data, or {_OVERRIDE}")
    teacher_id = entry["teacher"].get("id")
    others = sorted(set(table.column("teacher_id").to_pylist()) - {teacher_id})
    if others:
        raise ProvenanceError(f"{path}: rows from teacher(s) {others}, but the manifest lists only '{teacher_id}'")
    return entry


def _signature(path: Path, keys: list[Any], sha256: str | None, role: str, allow_unverified: bool,
               problems: list[str]) -> dict[str, Any]:
    """The signature state of ``path`` (its folder's ``provenance.sig.json`` over the file and the manifest).

    With trusted ``keys``: signed by one of them, or refused (:class:`ProvenanceError`) unless
    ``allow_unverified`` (then collected in ``problems``). Without: reported only (``trusted: False``).
    """
    from trait_guard import signing

    files, known = [path.name, MANIFEST_NAME], ({path.name: sha256} if sha256 else None)
    try:
        return signing.verify_folder(path.parent, keys, files=files, hashes=known, require_trusted=bool(keys))
    except signing.SignatureError as err:
        try:
            envelope = signing.read_signature(path.parent)
        except signing.SignatureError:
            envelope = None
        key_ids = ",".join(s.get("keyid", "?") for s in envelope["signatures"]) if envelope else None
        state = {"signed": False, "trusted": False, "signer": None, "key_fingerprint": key_ids, "error": str(err)}
        if not keys:  # hash verification only, as before signatures existed: never refused for this
            return state
        if not allow_unverified:
            raise ProvenanceError(f"{role} {path.name}: {err}; or {_OVERRIDE}") from err
        problems.append(f"{role}: {err}")
        return state


def verify_files(paths: Mapping[str, str | Path], *, allow_unverified: bool = False,
                 trusted_keys: Iterable[str] | str | None = None) -> dict[str, Any]:
    """Verify each file of ``paths`` (role -> path, e.g. ``{"train": ..., "reference": ...}``) with
    :func:`verify_dataset`, and its folder's signature, for any command that uses teacher data
    (screen, train, run, red-team): the one place data is verified.

    ``trusted_keys`` (public key files / folders / PEM text; None: ``$TRAIT_GUARD_TRUSTED_KEYS``): when
    there are any, each file and its manifest must be signed by one of them and unchanged since
    (:func:`trait_guard.signing.verify_folder`); when there are none, the signature is only reported.
    A provenance or signature problem raises :class:`ProvenanceError` unless ``allow_unverified``;
    then it is collected as ``"<role>: <message>"`` for the caller to report (MLflow tags, a banner).
    A file that is missing or unreadable, or a trusted key that cannot be read, is refused either way.

    Returns ``{"verified": bool, "problems": [...], "sha256": {role: hash}, "signed": bool,
    "signer": str|None, "key_fingerprint": str|None, "trusted_keys": int, "signatures": {role: {...}},
    "tags": {"provenance.signed": ..., "provenance.signer_fingerprint": ...}}``
    (not ``key_fingerprint``: a tag named ``*key*`` is redacted); the hashes are those of the files that verified (equal
    to their manifest's); ``signed`` is true when every file is signed (by a trusted key when keys are
    configured); ``tags`` are ready for MLflow.
    """
    from trait_guard.signing import load_trusted_keys

    keys = load_trusted_keys(trusted_keys)
    problems: list[str] = []
    hashes: dict[str, str] = {}
    signatures: dict[str, dict[str, Any]] = {}
    for role, path in paths.items():
        try:
            hashes[role] = verify_dataset(path)["sha256"]
        except ProvenanceError as err:
            if not allow_unverified:
                raise
            problems.append(f"{role}: {err}")
        signatures[role] = _signature(Path(path), keys, hashes.get(role), role, allow_unverified, problems)
    signed = bool(signatures) and all(s["signed"] for s in signatures.values())
    signers = sorted({s["signer"] for s in signatures.values() if s.get("signer")})
    key_ids = sorted({s["key_fingerprint"] for s in signatures.values() if s.get("key_fingerprint")})
    result = {"verified": not problems, "problems": problems, "sha256": hashes, "signed": signed,
              "signer": ",".join(signers) or None, "key_fingerprint": ",".join(key_ids) or None,
              "trusted_keys": len(keys), "signatures": signatures}
    result["tags"] = {"provenance.signed": str(signed).lower(),
                      "provenance.signature_checked": str(bool(keys)).lower(),
                      **({"provenance.signer": result["signer"]} if result["signer"] else {}),
                      **({"provenance.signer_fingerprint": result["key_fingerprint"]} if result["key_fingerprint"] else {})}
    return result
