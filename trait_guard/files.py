"""Small file helpers shared by the package: writes that are complete or absent, JSON-safe values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via ``<path>.partial`` and a rename, so a reader (or a crash) never
    sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def to_jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays as Python values and non-finite floats as None (JSON has
    no NaN), recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
