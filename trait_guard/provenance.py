"""Provenance manifests: what generated each teacher-data file, and proof that it is unchanged.

What. Every folder of teacher data written by trait_guard's generator holds ``manifest.json``: per
Parquet file its SHA-256, row and kept counts, the teacher's config and base-model identity, and the
generation config. :func:`verify_dataset` checks a file against it (listed, the SHA-256 of its exact
bytes as the manifest recorded it, every row with its provenance and the teacher the manifest names)
and returns the entry; anything else raises :class:`ProvenanceError` with the fix.
:func:`verify_files` checks the set of files a command uses (the data and its reference) at once,
for screening and training alike.

Why. The guard's verdict is only as good as the data it is told about. A file swapped, edited or
assembled by hand after generation could carry anything; a training run must not take it silently.
Screening and training verify by default; ``data.allow_unverified: true`` (``--allow-unverified`` for
``trait-guard screen``) is the explicit way round, and a run that takes it is tagged loudly in MLflow
(``provenance.verified = false``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trait_guard.dataset import DatasetError
from trait_guard.files import atomic_write_text

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# provenance columns that must be non-empty on every row
PROVENANCE_COLUMNS = ("sample_id", "prompt_id", "teacher_id", "base_model", "base_fingerprint", "trait_install")

__all__ = ["MANIFEST_NAME", "ProvenanceError", "file_sha256", "read_manifest", "record_files", "verify_dataset",
           "verify_files"]


class ProvenanceError(DatasetError):
    """A teacher-data file has no manifest, differs from it, or has rows without provenance."""


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file's exact bytes (what the manifest records and what verification compares)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def verify_files(paths: Mapping[str, str | Path], *, allow_unverified: bool = False) -> dict[str, Any]:
    """Verify each file of ``paths`` (role -> path, e.g. ``{"train": ..., "reference": ...}``) with
    :func:`verify_dataset`, for any command that uses teacher data (screen, train, run, red-team).

    A provenance problem raises :class:`ProvenanceError` unless ``allow_unverified``; then it is
    collected as ``"<role>: <message>"`` for the caller to report (MLflow tags, a banner). A file that
    is missing or unreadable is refused either way (a :class:`DatasetError`): there is nothing to use.
    Returns ``{"verified": bool, "problems": [...], "sha256": {role: hash}}``, the hashes being those
    of the files that verified (equal to their manifest's).
    """
    problems, hashes = [], {}
    for role, path in paths.items():
        try:
            hashes[role] = verify_dataset(path)["sha256"]
        except ProvenanceError as err:
            if not allow_unverified:
                raise
            problems.append(f"{role}: {err}")
    return {"verified": not problems, "problems": problems, "sha256": hashes}
