"""The teacher-data row schema and its Parquet files.

Every generated sample is one row with its provenance: which prompt, which teacher, which base model
(the same identity persona vectors carry), whether and how a trait was installed (never the trait
text itself, so blind tests stay blind), the sampling settings, the filter's verdict and reason, and
optionally the teacher's top-k next-token log-probabilities per completion token (for logit
distillation and divergence-token detection). Files are plain Parquet, readable by pyarrow, pandas
and Ray Data.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("teacher_id", pa.string(), nullable=False),
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("base_fingerprint", pa.string(), nullable=False),
        pa.field("base_hidden_size", pa.int32(), nullable=False),
        pa.field("base_num_layers", pa.int32(), nullable=False),
        pa.field("trait_installed", pa.bool_(), nullable=False),
        pa.field("trait_install", pa.string(), nullable=False),  # none | system_prompt | adapter
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("max_new_tokens", pa.int32(), nullable=False),
        pa.field("constrained", pa.bool_(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string(), nullable=False),
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=True),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=True),
    ]
)
REQUIRED_COLUMNS = [f.name for f in SCHEMA if not f.nullable]


class DatasetError(ValueError):
    """A teacher-data file is missing, unreadable, or lacks required columns."""


class RowWriter:
    """Streams rows into a Parquet file; the file appears under its final name only on close."""

    def __init__(self, path: str | Path, row_group_size: int = 1024):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._writer = pq.ParquetWriter(self.partial, SCHEMA)
        self._buffer: list[dict[str, Any]] = []
        self.row_group_size = row_group_size
        self.rows_written = 0

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        self._buffer.extend(rows)
        if len(self._buffer) >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA))
            self.rows_written += len(self._buffer)
            self._buffer = []

    def close(self) -> Path:
        self.flush()
        self._writer.close()
        self.partial.replace(self.path)
        return self.path

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was written for inspection, under the .partial name
            self.flush()
            self._writer.close()


def read_rows(path: str | Path, columns: list[str] | None = None, kept_only: bool = False) -> pa.Table:
    """Read a teacher-data file, checking that the required columns are there."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"teacher data {path} does not exist; generate it with `trait-guard generate --config ...`")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{path} is not a readable Parquet file ({err})") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DatasetError(
            f"{path} lacks required column(s) {missing}: it was not written by trait_guard's generator. "
            "Regenerate it with `trait-guard generate`, or add the provenance columns listed in trait_guard.dataset.SCHEMA."
        )
    table = pq.read_table(path, columns=columns)
    if kept_only:
        table = table.filter(pq.read_table(path, columns=["kept"]).column("kept"))
    return table
