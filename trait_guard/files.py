"""Small file helpers shared by the package: writes that are complete or absent, JSON-safe values.

Every file or folder a reader may open while it is being written (a manifest, a Parquet file, a
cached checkpoint, the MLflow spool) is written under ``<name>.partial`` and renamed when complete,
so a reader (or a crash) never sees half of it. :func:`atomic_write_text` does it for text,
:func:`atomic_path` for writers that need a path (Parquet, ``np.savez``, ``save_pretrained``), and
:func:`partial_path` names the temporary file for writers that stay open (``dataset.RowWriter``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

PARTIAL = ".partial"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file's exact bytes, read in 1 MiB blocks (manifests, signatures, exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_DIGEST_MEMO: dict[tuple[str, int, int, int], str] = {}
_DIGEST_MEMO_SIZE = 1024


def file_sha256_memo(path: str | Path) -> str:
    """:func:`file_sha256`, remembered in this process while the file's inode, size and modification
    time stay the same: one run asks for its input files' digests several times (the signals-cache
    key, the recipe state recorded with each checkpoint, the rerun check), and on multi-GB data each
    ask was a full read. For cache keys and run records only: a check that must see every byte as it
    is now (a manifest, a signature) reads the file with :func:`file_sha256`."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGEST_MEMO:
        if len(_DIGEST_MEMO) >= _DIGEST_MEMO_SIZE:
            _DIGEST_MEMO.clear()
        _DIGEST_MEMO[key] = file_sha256(path)
    return _DIGEST_MEMO[key]


def partial_path(path: str | Path, suffix: str = PARTIAL) -> Path:
    """Where ``path`` is written before its rename: ``<path>.partial`` (``suffix`` after the name)."""
    path = Path(path)
    return path.with_name(path.name + suffix)


@contextmanager
def atomic_path(path: str | Path, suffix: str = PARTIAL) -> Iterator[Path]:
    """Yield the path to write ``path``'s content to (a file or a folder); on a clean exit it is
    renamed to ``path``, replacing what was there. On an exception it stays under its ``.partial``
    name for inspection (the next write replaces it). ``suffix`` must keep an extension a writer
    would otherwise append (``np.savez``: ``".partial.npz"``) or make concurrent writers distinct."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path, suffix)
    yield partial
    if partial.is_dir():
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
    else:
        partial.replace(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via ``<path>.partial`` and a rename."""
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def to_jsonable(value: Any, *, finite: bool = True) -> Any:
    """``value`` as plain JSON values, recursively: mappings to dicts with string keys, tuples and
    sets to lists, enums to their values, pydantic models and dataclasses (their ``to_dict()`` when
    they have one) to dicts, numpy/torch scalars and arrays to Python numbers and lists, anything
    else unknown to its ``str``.

    ``finite=True``: NaN and infinities become None (JSON has no NaN; logged records and reports).
    ``finite=False`` keeps them, for state that must round-trip exactly through Python's ``json``
    (which writes ``NaN``/``Infinity``): the detectors' ``state_dict``.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, finite=finite) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, finite=finite)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, finite=finite) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        value = float(value)  # numpy float64 is a float subclass
        return None if finite and not math.isfinite(value) else value
    if isinstance(value, type):
        return str(value)
    if hasattr(value, "model_dump"):  # pydantic, without importing it here
        return to_jsonable(value.model_dump(mode="json"), finite=finite)
    if dataclasses.is_dataclass(value):
        return to_jsonable(value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value),
                           finite=finite)
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "tolist"):  # numpy, torch tensors
        return to_jsonable(value.tolist(), finite=finite)
    if hasattr(value, "item"):
        return to_jsonable(value.item(), finite=finite)
    return str(value)
