"""trait_guard.files: atomic writes (files and folders) and the one JSON-safe conversion."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from trait_guard.files import atomic_path, atomic_write_text, partial_path, to_jsonable


def test_atomic_path_file_folder_and_failure(tmp_path):
    target = tmp_path / "sub" / "x.npz"
    with atomic_path(target, suffix=".partial.npz") as partial:
        assert partial == partial_path(target, ".partial.npz") and partial.parent.is_dir()
        np.savez(partial, a=np.arange(3))
    assert np.load(target)["a"].tolist() == [0, 1, 2] and not partial.exists()

    folder = tmp_path / "model"
    for content in ("old", "new"):  # a folder replaces the folder that was there
        with atomic_path(folder, suffix=".partial-1") as partial:
            partial.mkdir()
            (partial / "weights.txt").write_text(content)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model")] == ["model"]
    assert (folder / "weights.txt").read_text() == "new"

    atomic_write_text(tmp_path / "m.json", "{}")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.json") as partial:
            partial.write_text("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "m.json").read_text() == "{}"  # the old content, untouched
    assert partial_path(tmp_path / "m.json").read_text() == "half"  # kept for inspection


class Color(enum.Enum):
    RED = "red"


class Settings(BaseModel):
    lr: float = 0.1


@dataclass
class Point:
    x: float


def test_to_jsonable_types_and_nan_policy():
    value = {"enum": Color.RED, "model": Settings(), "point": Point(math.nan), "set": {3},
             "tensor": torch.tensor([1.5, 2.0]), "scalar": np.int64(4), "nan": np.float64("nan"),
             "inf": [math.inf], "other": object}
    out = to_jsonable(value)
    assert out == {"enum": "red", "model": {"lr": 0.1}, "point": {"x": None}, "set": [3],
                   "tensor": [1.5, 2.0], "scalar": 4, "nan": None, "inf": [None], "other": str(object)}
    json.dumps(out, allow_nan=False)
    kept = to_jsonable({"nan": np.float64("nan"), "inf": (math.inf,)}, finite=False)  # exact state round trips
    assert math.isnan(kept["nan"]) and kept["inf"] == [math.inf] and type(kept["nan"]) is float


def test_the_digest_memo_reads_a_file_once_and_sees_a_change(tmp_path, monkeypatch):
    """file_sha256_memo: a second ask for an unchanged file reads nothing; a file rewritten with other
    bytes of the same size (another modification time) gets its new digest."""
    import hashlib
    import os

    from trait_guard import files

    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 100)
    reads = []
    real = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda p: reads.append(p) or real(p))
    first = files.file_sha256_memo(path)
    assert first == hashlib.sha256(b"a" * 100).hexdigest() and files.file_sha256_memo(str(path)) == first
    assert len(reads) == 1
    stat = path.stat()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert files.file_sha256_memo(path) == hashlib.sha256(b"b" * 100).hexdigest() and len(reads) == 2
