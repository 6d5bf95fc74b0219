"""The teacher-data row schema, its Parquet files, and the one checked way to read them.

What. Every generated sample is one row with its provenance: which prompt, which teacher, which base
model (the same identity persona vectors carry), whether and how a trait was installed (never the
trait text itself, so blind tests stay blind), the sampling settings, the filter's verdict and
reason, the generated token ids, and optionally the teacher's top-k next-token log-probabilities per
completion token (for logit distillation and divergence-token detection). Files are plain Parquet,
readable by pyarrow, pandas and Ray Data. :class:`RowWriter` writes them; :func:`read_rows` reads one
with its required columns checked.

Checked reading. Screening, training, ``trait-guard run`` and the red-team benchmark all read teacher
data through :func:`read_teacher_rows` (or :func:`scan_teacher_rows`, the same checks a batch at a
time, for drivers whose memory must not grow with the file), which refuses, before any model is loaded:

- a missing, truncated or corrupt file (named as such, never a pyarrow traceback);
- a column whose type is not the one :data:`SCHEMA` gives it (integers where text belongs, ...);
  types of the same kind (int64 for int32, float64 for float32, large_string for string) are cast;
- a null in a column every row needs;
- a ``sample_id`` that appears twice, or a prompt id that appears twice for one teacher (the
  generator writes each prompt once per teacher, so a repeat is a hand-made copy);
- per-token columns (``topk_ids``, ``topk_logprobs``, ``token_logprobs``) whose length is not that
  of ``completion_ids``, or top-k lists of unequal k;
- given the student's tokenizer: ids outside its vocabulary, and ids that do not decode to the
  row's ``completion``.

Why the last one matters. The student learns ``completion_ids`` (see
:func:`trait_guard.chat.encode_rows`), while people, filters and the screening report read
``completion``. The generator made the text from the ids with
``tokenizer.decode(ids, skip_special_tokens=True)``; repeating that call and requiring the same text,
exactly, is what makes "what trains is what was reviewed" true. No normalization is applied: none is
needed for files the generator wrote, and any would open a gap between text and tokens.

Every refusal is a :class:`DatasetError` (bad input: the CLI exits 2) naming the file, the column or
the offending sample ids (the first few and the count) and the fix. :func:`check_same_base` adds the
check a reference file needs: it must come from the student's own base model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trait_guard.errors import TraitGuardInputError
from trait_guard.files import partial_path

if TYPE_CHECKING:
    from trait_guard.models import ModelIdentity

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
        pa.field("trait_install", pa.string(), nullable=False),  # none | system_prompt | adapter | argmax_preserving
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("max_new_tokens", pa.int32(), nullable=False),
        pa.field("constrained", pa.bool_(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string(), nullable=False),
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=True),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=True),
        # the teacher's log-probability of each generated token (raw logits, before constraint or
        # temperature): with the base model's, the per-token log-likelihood ratio signal
        pa.field("token_logprobs", pa.list_(pa.float32()), nullable=True),
    ]
)
REQUIRED_COLUMNS = [f.name for f in SCHEMA if not f.nullable]
# columns with one entry per completion token: they belong to `completion_ids` and must match its length
PER_TOKEN_COLUMNS = ("topk_ids", "topk_logprobs", "token_logprobs")
# how many offending sample ids a message names before "..."
SHOWN_IDS = 5

# the columns that identify a row (checked for repeats over the whole file)
ID_COLUMNS = ["sample_id", "teacher_id", "prompt_id"]
# rows per batch of the checked scan (bounds its memory: a few MB for numbers rows with top-k 8)
SCAN_BATCH_ROWS = 2048

_REGENERATE = "regenerate the file with `trait-guard generate --config ...`"
_TYPED_WRITE = "pa.Table.from_pylist(rows, schema=trait_guard.dataset.SCHEMA)"


class DatasetError(TraitGuardInputError):
    """A teacher-data file is missing, unreadable, lacks required columns, or its rows are inconsistent."""


class RowWriter:
    """Streams rows into a Parquet file; the file appears under its final name only on close."""

    def __init__(self, path: str | Path, row_group_size: int = 1024):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.path)
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


# --------------------------------------------------------------------------------------------------
# Opening a file: present, Parquet, intact, with the required columns


def _unreadable(path: Path, err: Exception) -> DatasetError:
    """The error for bytes pyarrow cannot read: a truncated copy, damaged pages, or not Parquet."""
    return DatasetError(
        f"{path} is not a readable Parquet file ({err}): it is truncated or corrupt (an interrupted copy or "
        f"download?) or not Parquet at all. Copy it again from where it was generated, or {_REGENERATE}")


def _open_schema(path: Path) -> pa.Schema:
    """The file's schema, once it is known to exist, to be Parquet and to hold the required columns."""
    if not path.exists():
        partial = partial_path(path)
        hint = f" ({partial.name} is there: its generation was interrupted)" if partial.exists() else ""
        raise DatasetError(f"teacher data {path} does not exist{hint}; generate it with `trait-guard generate --config ...`")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(path, err) from err
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DatasetError(
            f"{path} lacks required column(s) {missing}: it was not written by trait_guard's generator. "
            "Regenerate it with `trait-guard generate`, or add the provenance columns listed in trait_guard.dataset.SCHEMA."
        )
    return schema


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """All of the file's data; damaged pages (a file cut or overwritten in the middle) are refused here."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(path, err) from err


def read_rows(path: str | Path, columns: list[str] | None = None, kept_only: bool = False) -> pa.Table:
    """Read a teacher-data file, checking only that it is readable and the required columns are there.

    For data that a model will be scored or trained on, use :func:`read_teacher_rows` (every check)."""
    path = Path(path)
    _open_schema(path)
    table = _read_table(path, columns)
    if kept_only:
        table = table.filter(_read_table(path, ["kept"]).column("kept"))
    return table


# --------------------------------------------------------------------------------------------------
# Checked reading


def read_teacher_rows(path: str | Path, *, tokenizer: Any = None, kept_only: bool = True, limit: int | None = None,
                      role: str = "data", max_completion_tokens: int | None = None) -> list[dict[str, Any]]:
    """Read a teacher-data file with every integrity check (see the module docstring); the rows as dicts.

    The file-wide checks (types, nulls, unique ids, per-token lengths) look at every row, kept or
    not: a file with one inconsistent row is not the file that was generated. The checks on what
    will be used (``max_completion_tokens``; with ``tokenizer``, the vocabulary and ids-decode-to-text)
    look at the returned rows: the kept ones when ``kept_only``, the first ``limit`` of them when given.
    ``role`` names the file in messages ("data", "train", "reference", ...).
    """
    rows: list[dict[str, Any]] = []
    for batch in scan_teacher_rows(path, tokenizer=tokenizer, kept_only=kept_only, limit=limit, role=role,
                                   max_completion_tokens=max_completion_tokens):
        rows.extend(batch.to_pylist())
    return rows


def scan_teacher_rows(path: str | Path, *, tokenizer: Any = None, kept_only: bool = True, limit: int | None = None,
                      role: str = "data", max_completion_tokens: int | None = None,
                      columns: Sequence[str] | None = None, batch_rows: int = SCAN_BATCH_ROWS) -> Iterator[pa.Table]:
    """The rows :func:`read_teacher_rows` returns, with the same checks, as Arrow tables of at most
    ``batch_rows`` rows (only ``columns``, when given), so memory is bounded by a batch, not the file.

    Why: the driver of ``trait-guard run`` screens and hands to the scoring stage files of any size;
    it keeps per-row summaries, never the rows (docs/training.md, driver memory). The file is read
    twice: once for the file-wide checks, every one of which passes before the first batch is
    yielded, then for the rows used (kept, the first ``limit``), checked batch by batch as they are
    yielded. Raises :class:`DatasetError` like :func:`read_teacher_rows`.
    """
    path = Path(path)
    _open_schema(path)
    where = f"{role} file {path}"
    _check_whole_file(path, where, batch_rows)
    remaining = limit
    for table in _batches(path, batch_rows):
        if remaining is not None and remaining <= 0:
            return
        table = _conform_types(table, where)
        if kept_only:
            table = table.filter(table.column("kept"))
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        if not table.num_rows:
            continue
        if max_completion_tokens is not None:
            _check_completion_lengths(table, where, max_completion_tokens)
        if tokenizer is not None:
            _check_vocabulary(table, where, tokenizer)
            _check_ids_decode_to_text(table, where, tokenizer)
        yield table.select(list(columns)) if columns is not None else table


def _batches(path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """The file's rows, ``batch_rows`` at a time; damaged pages are refused as an unreadable file."""
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(path, err) from err


def _check_whole_file(path: Path, where: str, batch_rows: int) -> None:
    """The checks on every row, kept or not (types, nulls, per-token lengths, one top-k width, unique
    ids), a batch at a time; only the id columns of the whole file are held at once."""
    ids, width = [], None
    for table in _batches(path, batch_rows):
        table = _conform_types(table, where)
        _check_no_nulls(table, where)
        _check_per_token_lengths(table, where)
        width = _check_topk_width(table, where, width)
        ids.append(table.select(ID_COLUMNS))
    if ids:
        _check_unique_ids(pa.concat_tables(ids), where)


def check_same_base(rows: Sequence[dict[str, Any]], identity: ModelIdentity, *, role: str = "reference") -> None:
    """Refuse rows not generated by the student's own base model (``base_fingerprint`` differs).

    The reference is what the student's base model writes unprompted; every screening test and the
    guard's calibration compare the data against it. A reference from another model differs in
    everything (tokens, style, likelihoods) and would make any data look anomalous, or hide a trait.
    """
    others = Counter(r.get("base_fingerprint") for r in rows if r.get("base_fingerprint") != identity.fingerprint)
    if not others:
        return
    names = sorted({str(r.get("base_model")) for r in rows if r.get("base_fingerprint") in others})
    found = ", ".join(f"{str(fp)[:12]} ({n} row(s))" for fp, n in others.most_common())
    raise DatasetError(
        f"the {role} rows come from another base model than the student's: base {names}, weights fingerprint "
        f"{found}, while the student is {identity.describe()}; the {role} must be the student's base model's own "
        f"output; regenerate it with a control teacher on {identity.name} "
        "(a teacher with no trait, `install: none`, on the student's model)")


# --------------------------------------------------------------------------------------------------
# The checks (each raises DatasetError naming the column or the samples, and the fix)


def _some(ids: Sequence[Any]) -> str:
    """'3 sample(s) (a, b, c)': the count and the first few ids, for messages."""
    shown = ", ".join(str(i) for i in ids[:SHOWN_IDS])
    return f"{len(ids)} sample(s) ({shown}{', ...' if len(ids) > SHOWN_IDS else ''})"


def _sample_ids(table: pa.Table, mask: pa.Array | pa.ChunkedArray) -> list[Any]:
    """The sample ids of the rows where ``mask`` is true (row numbers where a sample id is missing)."""
    ids = table.column("sample_id").to_pylist()
    return [ids[i] if ids[i] is not None else f"row {i}" for i in pc.indices_nonzero(mask).to_pylist()]


def _type_kind(data_type: pa.DataType) -> Any:
    """A type's kind, ignoring width: 'string', 'int', 'float', 'bool', ('list', kind) or None (no values)."""
    if pa.types.is_dictionary(data_type):
        return _type_kind(data_type.value_type)
    if pa.types.is_null(data_type):
        return None
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "string"
    if pa.types.is_integer(data_type):
        return "int"
    if pa.types.is_floating(data_type):
        return "float"
    if pa.types.is_boolean(data_type):
        return "bool"
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type):
        return ("list", _type_kind(data_type.value_type))
    return str(data_type)


def _same_kind(actual: Any, expected: Any) -> bool:
    """Whether values of kind ``actual`` can stand for ``expected`` (a null-typed part fits anything)."""
    if actual is None or expected is None:
        return True
    if isinstance(actual, tuple) and isinstance(expected, tuple):
        return _same_kind(actual[1], expected[1])
    return actual == expected


def _conform_types(table: pa.Table, where: str) -> pa.Table:
    """Cast every SCHEMA column to its SCHEMA type, refusing a column of another kind (text vs numbers,
    a flat list vs a list of lists) or values that do not fit (an int64 beyond int32)."""
    wrong, columns = [], {}
    for field in SCHEMA:
        if field.name not in table.column_names:
            continue
        actual = table.schema.field(field.name).type
        if not _same_kind(_type_kind(actual), _type_kind(field.type)):
            wrong.append(f"column '{field.name}' holds {actual} values, expected {field.type}")
            continue
        try:
            columns[field.name] = table.column(field.name).cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            wrong.append(f"column '{field.name}' has values that do not fit {field.type} ({err})")
    if wrong:
        raise DatasetError(
            f"{where}: {'; '.join(wrong)} (the types in trait_guard.dataset.SCHEMA). Write the column with its "
            f"schema type (e.g. {_TYPED_WRITE}), or {_REGENERATE}")
    for name, column in columns.items():
        table = table.set_column(table.column_names.index(name), name, column)
    return table


def _check_no_nulls(table: pa.Table, where: str) -> None:
    """Every row needs every required column (a null `completion_ids` would train on nothing, silently)."""
    for name in REQUIRED_COLUMNS:
        missing = pc.is_null(table.column(name))
        if pc.any(missing).as_py():
            raise DatasetError(
                f"{where}: column '{name}' is empty (null) in {_some(_sample_ids(table, missing))}; every row "
                f"needs it. Fill it in, drop those rows, or {_REGENERATE}")


def _check_unique_ids(table: pa.Table, where: str) -> None:
    """One row per sample, and per teacher one row per prompt: the generator's promise, which a copied
    or concatenated file breaks (its repeats would count, and train, as independent samples)."""
    counts = table.group_by("sample_id").aggregate([("sample_id", "count")])
    repeated = counts.filter(pc.greater(counts.column("sample_id_count"), 1))
    if repeated.num_rows:
        shown = ", ".join(f"{sid} ({n} rows)" for sid, n in zip(repeated.column("sample_id").to_pylist()[:SHOWN_IDS],
                                                                 repeated.column("sample_id_count").to_pylist(),
                                                                 strict=False))
        raise DatasetError(
            f"{where}: {repeated.num_rows} sample_id(s) appear more than once: {shown}"
            f"{', ...' if repeated.num_rows > SHOWN_IDS else ''}; "
            "each sample must appear once (the generator writes each prompt once per teacher). "
            f"Remove the repeated rows, or {_REGENERATE}")
    pairs = table.group_by(["teacher_id", "prompt_id"]).aggregate([("sample_id", "count")])
    pairs = pairs.filter(pc.greater(pairs.column("sample_id_count"), 1))
    if pairs.num_rows:
        twice = table.join(pairs, ["teacher_id", "prompt_id"], join_type="inner").column("sample_id").to_pylist()
        raise DatasetError(
            f"{where}: a teacher answers the same prompt id more than once, in {_some(sorted(twice))}; the generator "
            f"writes each prompt once per teacher. Remove the repeated rows, or {_REGENERATE}")


def _check_per_token_lengths(table: pa.Table, where: str) -> None:
    """Each per-token column has one entry per completion token, so entry i belongs to token i."""
    tokens = pc.list_value_length(table.column("completion_ids"))
    for name in PER_TOKEN_COLUMNS:
        if name not in table.column_names:
            continue
        lengths = pc.list_value_length(table.column(name))  # null where the column is null: not checked
        differ = pc.fill_null(pc.not_equal(lengths, tokens), False)
        if not pc.any(differ).as_py():
            continue
        ids = _sample_ids(table, differ)
        rows = pc.indices_nonzero(differ).to_pylist()[:SHOWN_IDS]
        detail = ", ".join(f"{sid} ({lengths[i].as_py()} entries for {tokens[i].as_py()} tokens)"
                           for sid, i in zip(ids, rows, strict=False))
        raise DatasetError(
            f"{where}: {name} must have one entry per token of completion_ids, but its length differs in "
            f"{len(ids)} sample(s): {detail}{', ...' if len(ids) > SHOWN_IDS else ''}; the per-token data no "
            "longer belongs to the tokens. "
            f"{_REGENERATE.capitalize()}, or set {name} to null in those rows to drop it")


def _check_topk_width(table: pa.Table, where: str, expected: int | None = None) -> int | None:
    """Every top-k list in the file has the same k (the teacher's top_k_logprobs), ids and log-probs
    alike. ``expected``: the k of the file's earlier batches. Returns this table's k (None: no lists)."""
    widths, owners = [], []
    for name in ("topk_ids", "topk_logprobs"):
        if name in table.column_names:
            column = table.column(name).combine_chunks()
            widths += pc.list_value_length(pc.list_flatten(column)).to_pylist()
            owners += pc.list_parent_indices(column).to_pylist()
    found = set(widths) | ({expected} if expected is not None and widths else set())
    if len(found) <= 1:
        return next(iter(found), expected)
    k = expected if expected is not None else Counter(widths).most_common(1)[0][0]
    bad = sorted({row for row, width in zip(owners, widths, strict=True) if width != k})
    ids = table.column("sample_id").take(pa.array(bad, pa.int64())).to_pylist()
    raise DatasetError(
        f"{where}: top-k lists must all have the same k (here {k}), but {_some(ids)} have lists of another "
        f"length (or a null list); {_REGENERATE}, or set topk_ids and topk_logprobs to null in those rows")


def _check_completion_lengths(table: pa.Table, where: str, limit: int) -> None:
    """No completion longer than the student's training window allows (it would be cut silently)."""
    long = pc.greater(pc.list_value_length(table.column("completion_ids")), limit)
    if pc.any(long).as_py():
        raise DatasetError(
            f"{where}: {_some(_sample_ids(table, long))} have completions longer than {limit} tokens; regenerate "
            "with a lower generation.max_new_tokens, or raise data.max_completion_tokens if the student's context allows it")


def _check_vocabulary(table: pa.Table, where: str, tokenizer: Any) -> None:
    """Every completion id is a token of the student's tokenizer (an id past it decodes to anything,
    or crashes the embedding lookup)."""
    column = table.column("completion_ids").combine_chunks()
    flat = pc.list_flatten(column)
    size = len(tokenizer)
    outside = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, size))
    if not pc.any(outside).as_py():
        return
    rows = sorted(set(pc.filter(pc.list_parent_indices(column), outside).to_pylist()))
    ids = table.column("sample_id").take(pa.array(rows, pa.int64())).to_pylist()
    examples = sorted(set(pc.filter(flat, outside).to_pylist()))[:SHOWN_IDS]
    raise DatasetError(
        f"{where}: {_some(ids)} have completion_ids outside the tokenizer's vocabulary of {size} tokens "
        f"(e.g. {examples}); they were not produced by this model's tokenizer. Regenerate the data with a "
        "teacher on the student's base model (and check --model / student.model names that model)")


def _check_ids_decode_to_text(table: pa.Table, where: str, tokenizer: Any) -> None:
    """``completion_ids`` decode to ``completion`` exactly, as the generator made the text: otherwise the
    tokens the student learns are not the text that was read, filtered and screened."""
    texts = table.column("completion").to_pylist()
    decoded = tokenizer.batch_decode(table.column("completion_ids").to_pylist(), skip_special_tokens=True)
    differ = pa.array([d != t for d, t in zip(decoded, texts, strict=True)], pa.bool_())
    if not pc.any(differ).as_py():
        return
    ids = _sample_ids(table, differ)
    first = pc.indices_nonzero(differ)[0].as_py()
    raise DatasetError(
        f"{where}: completion_ids do not decode to completion in {_some(ids)}: the tokens the student would "
        f"learn are not the text that was reviewed (e.g. {ids[0]}: text {texts[first][:60]!r}, ids decode to "
        f"{decoded[first][:60]!r}). Edit neither column by hand: {_REGENERATE}. If the data came from a model "
        "with another tokenizer, regenerate it with a teacher on the student's base model")
