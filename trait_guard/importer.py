"""Bring your own data: import prompt/completion rows made elsewhere as a verified trait_guard folder.

What. :func:`import_rows` reads rows from a JSONL file, a Parquet file, or a local Hugging Face
``datasets`` folder (``Dataset.save_to_disk``), each row either ``{"prompt", "completion"}`` or a chat
``{"messages": [...]}`` (the last message, the assistant's, is the completion; one user message
before it is the prompt; system messages are allowed and not stored, as for generated data, where
the student trains without the teacher's system prompt). Optional per-token columns are kept when
they belong to the tokens: ``completion_ids`` (the teacher's token ids, which must be the student
tokenizer's and decode to the completion), ``token_logprobs``, ``topk_ids``, ``topk_logprobs`` (one
entry per completion token, top-k lists of one k). Rows are tokenized once, here, with the student's
tokenizer; the folder written is what ``trait-guard generate`` writes: ``<teacher_id>.parquet`` in
:data:`trait_guard.dataset.SCHEMA`, recorded in ``manifest.json`` (so ``screen`` and training verify it
without ``allow_unverified``), signed when a signing key is given.

What is recorded, and what it proves. The manifest entry's ``import`` record holds the source path,
the source's SHA-256 (a folder: a hash over its files' names and hashes), ``generated_by`` (a CLAIM
made by whoever imports: nothing here can check it), the importing tokenizer's identity (and the
model's, with ``same_base``), and the counts: rows read, kept, rejected by reason with the first few
locations. What verification later proves is that the files are the ones imported (hashes) and, with
a signature, who imported them; :func:`claimed_provenance_notes` says which is which in a report.

Rejected rows (not written; counted by reason, each with its line/row and the fix):
``missing_prompt``, ``missing_completion``, ``empty_completion``, ``multi_turn``,
``bad_completion_ids``, ``ids_text_mismatch``, ``not_round_trip`` (the tokenizer does not give the
text back), ``bad_logprob_lengths``, ``bad_logprob_values``, ``duplicate_id``. Input that is not rows
at all (a line that is not JSON, an unreadable file, no rows kept) is refused with
:class:`ImportDataError` naming the line and the fix.

Usage::

    result = import_rows("rows.jsonl", "outputs/imported", tokenizer=tok, generated_by="gpt-4o via API")
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trait_guard.dataset import PER_TOKEN_COLUMNS, DatasetError, RowWriter
from trait_guard.errors import InputFileNotFound

__all__ = ["IMPORT_FORMATS", "ImportResult", "ImportDataError", "claimed_provenance_notes", "import_rows",
           "read_hf_folder", "read_jsonl", "read_parquet", "read_source", "source_sha256", "tokenizer_identity"]

IMPORT_FORMATS = ("jsonl", "parquet", "hf")
# rejected rows whose location and detail the record keeps (the counts are complete)
SHOWN_REJECTED = 20
UNKNOWN = "unknown"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIX = {
    "missing_prompt": "give each row a non-empty prompt (or a user message before the assistant's)",
    "missing_completion": "give each row a completion (or end its messages with an assistant message); "
                          "name another field with --completion-field",
    "empty_completion": "drop rows whose completion is empty: there is nothing to train on",
    "multi_turn": "keep one user message (and optional system messages) before the last assistant message; "
                  "the schema stores one prompt",
    "bad_completion_ids": "completion_ids must be token ids of the student's tokenizer; drop the column to "
                          "tokenize the text instead",
    "ids_text_mismatch": "completion_ids must decode to the completion exactly; drop completion_ids to "
                         "tokenize the text, or import with the tokenizer that made them (--model)",
    "not_round_trip": "the student's tokenizer does not give this text back (unknown characters or "
                      "normalization); fix the text, or use the tokenizer the data was made for (--model)",
    "bad_logprob_lengths": "per-token columns need one entry per completion token (and top-k lists one k); "
                           "drop those columns from the row, or export them with completion_ids",
    "bad_logprob_values": "log-probs must be finite numbers and top-k ids the student tokenizer's; drop those "
                          "columns from the row",
    "duplicate_id": "give each row its own prompt_id (or id), or drop the column to number rows",
}


class ImportDataError(DatasetError):
    """The input cannot be imported as rows (not found, not JSON/Parquet, no usable rows); exit 2."""


@dataclass
class ImportResult:
    """What :func:`import_rows` wrote and what it read: the Parquet path and the manifest's import record."""

    path: str
    folder: str
    teacher_id: str
    read: int
    kept: int
    rejected: dict[str, int]
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first rejected rows: where, why, fix
    record: dict[str, Any] = field(default_factory=dict)  # the manifest entry's "import" record
    signature: dict[str, Any] = field(default_factory=lambda: {"signed": False})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A short human summary (counts and the first rejected rows)."""
        lines = [f"imported {self.kept} of {self.read} row(s) as teacher '{self.teacher_id}' -> {self.path}"]
        for reason, n in sorted(self.rejected.items()):
            lines.append(f"  rejected {n} row(s): {reason} ({_FIX.get(reason, '')})")
        for example in self.examples[:5]:
            lines.append(f"    {example['where']}: {example['reason']}: {example['detail']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Readers: each yields (where, row) with where = "line N" / "row N", N counted from 1


def detect_format(source: Path) -> str:
    """'jsonl', 'parquet' or 'hf' (a folder) from the path; anything else is refused with the formats."""
    if source.is_dir():
        return "hf"
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ImportDataError(f"{source}: unknown format {suffix or '(no extension)'!r}; import a .jsonl file (one JSON "
                       "object per line), a .parquet file, or a folder saved with datasets' save_to_disk")


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """One JSON object per line (blank lines skipped). A line that is not a JSON object refuses the
    whole file, naming the line: a broken export is not a set of rows to pick from."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ImportDataError(f"{path} line {number} is not UTF-8 text ({err.reason} at byte {err.start}); "
                                      "export the rows as UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ImportDataError(
                    f"{path} line {number} is not JSON ({err.msg} at column {err.colno}): {line.strip()[:80]!r}. "
                    "Each line must be one JSON object, e.g. {\"prompt\": \"...\", \"completion\": \"...\"}; "
                    "fix or remove that line (a .json array? write one object per line)") from err
            if not isinstance(row, dict):
                raise ImportDataError(f"{path} line {number} is a JSON {type(row).__name__}, not an object; each line "
                                   "must be one object, e.g. {\"prompt\": \"...\", \"completion\": \"...\"}")
            yield f"line {number}", row


def read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every row of a Parquet file, as dicts; an unreadable file is refused (never a pyarrow traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ImportDataError(f"{path} is not a readable Parquet file ({err}); copy it again, or export the rows "
                           "as JSONL") from err
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


def read_hf_folder(path: Path, split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a local Hugging Face ``datasets`` folder (``save_to_disk``); a DatasetDict needs ``split``
    (default 'train'). Needs the ``datasets`` package; without it the error says how to do without."""
    try:
        import datasets
    except ImportError as err:
        raise ImportDataError(
            f"{path} is a folder: importing a Hugging Face datasets folder needs the `datasets` package, which is "
            "not installed. Install it (pip install datasets), or export the rows where it is installed: "
            "datasets.load_from_disk(folder).to_json('rows.jsonl') (or .to_parquet('rows.parquet')) and import "
            "that file") from err
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ImportDataError(f"{path} is not a datasets folder saved with save_to_disk ({err}); import a .jsonl or "
                           ".parquet file instead") from err
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise ImportDataError(f"{path} holds splits {sorted(loaded)}, not '{name}'; choose one with --split")
        loaded = loaded[name]
    for number, row in enumerate(loaded, start=1):
        yield f"row {number}", dict(row)


def read_source(source: Path, split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of ``source`` with the reader its format needs (see :func:`detect_format`)."""
    kind = detect_format(source)
    if kind == "jsonl":
        return read_jsonl(source)
    if kind == "parquet":
        return read_parquet(source)
    return read_hf_folder(source, split)


def source_sha256(source: Path) -> str:
    """The SHA-256 of a file's bytes; of a folder, over each file's relative name and SHA-256 (sorted)."""
    from trait_guard.files import file_sha256

    if source.is_file():
        return file_sha256(source)
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(source).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any, model: str) -> dict[str, Any]:
    """What names the importing tokenizer: the --model it came from, its class, size and a hash of its
    vocabulary (two tokenizers with the same hash map text to the same ids)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"model": model, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "vocab_sha256": digest}


# --------------------------------------------------------------------------------------------------
# One source row -> a SCHEMA row, or a rejection


class _Rejected(Exception):
    """A row that cannot be imported: ``reason`` (a key of _FIX) and what exactly is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _text(value: Any) -> str | None:
    """A non-empty string, or None."""
    return value if isinstance(value, str) and value.strip() else None


def _content(message: Mapping[str, Any]) -> Any:
    """A message's text: its ``content`` string, or the joined text parts of an OpenAI-style content list."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


def prompt_and_completion(row: Mapping[str, Any], prompt_field: str = "prompt",
                          completion_field: str = "completion") -> tuple[str, Any, int]:
    """``(prompt, completion or None, system messages)`` from a prompt/completion row or a chat
    ``messages`` row (the last message the assistant's; before it optional system messages and
    exactly one user message). Raises :class:`_Rejected`."""
    messages = row.get("messages")
    if row.get(prompt_field) is None and messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise _Rejected("missing_prompt", "messages is not a list of {role, content} objects")
        if not messages or messages[-1].get("role") != "assistant":
            raise _Rejected("missing_completion", "the last message is not the assistant's")
        before = messages[:-1]
        systems = [m for m in before if m.get("role") == "system"]
        users = [m for m in before if m.get("role") == "user"]
        if len(users) + len(systems) != len(before) or len(users) > 1:
            raise _Rejected("multi_turn", f"{len(before)} message(s) before the last assistant message "
                                          f"(roles {[m.get('role') for m in before]}): only one user turn fits")
        prompt = _text(_content(users[0])) if users else None
        if prompt is None:
            raise _Rejected("missing_prompt", "no user message with text before the assistant's")
        return prompt, _content(messages[-1]), len(systems)
    prompt = _text(row.get(prompt_field))
    if prompt is None:
        raise _Rejected("missing_prompt", f"no '{prompt_field}' text (fields: {sorted(row)})")
    return prompt, row.get(completion_field), 0


def _int_list(value: Any, name: str, reason: str = "bad_completion_ids") -> list[int]:
    """A list of ints (numpy arrays and tuples too), else a rejection for ``reason``."""
    try:
        values = list(value)
    except TypeError:
        raise _Rejected(reason, f"{name} is not a list") from None
    if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in values):
        raise _Rejected(reason, f"{name} holds non-integers")
    return [int(v) for v in values]


def completion_tokens(tokenizer: Any, completion: Any, ids: Any) -> tuple[str, list[int], bool]:
    """``(text, ids, ids_given)``: the given ids checked against the text (decoding them as
    :func:`trait_guard.dataset.read_teacher_rows` does), or the text tokenized with the student's
    tokenizer and required to decode back to itself. Raises :class:`_Rejected`."""
    if completion is not None and not isinstance(completion, str):
        raise _Rejected("missing_completion", f"completion is a {type(completion).__name__}, not text")
    if ids is not None:
        ids = _int_list(ids, "completion_ids")
        outside = [t for t in ids if not 0 <= t < len(tokenizer)]
        if outside:
            raise _Rejected("bad_completion_ids", f"ids {outside[:5]} are outside the tokenizer's "
                                                  f"{len(tokenizer)} tokens")
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if completion is None:
            completion = decoded
        elif decoded != completion:
            raise _Rejected("ids_text_mismatch", f"completion_ids decode to {decoded[:40]!r}, the text is "
                                                 f"{completion[:40]!r}")
    if completion is None:
        raise _Rejected("missing_completion", "no completion text and no completion_ids")
    if not completion.strip():
        raise _Rejected("empty_completion", "the completion is empty")
    if ids is not None:
        return completion, ids, True
    tokens = tokenizer(completion, add_special_tokens=False).input_ids
    decoded = tokenizer.decode(tokens, skip_special_tokens=True)
    if decoded != completion:
        raise _Rejected("not_round_trip", f"the text {completion[:40]!r} tokenizes to ids that decode to "
                                          f"{decoded[:40]!r}")
    return completion, list(tokens), False


def _floats(value: Any, name: str) -> list[float]:
    """Finite numbers, else a rejection."""
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise _Rejected("bad_logprob_values", f"{name} holds values that are not numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise _Rejected("bad_logprob_values", f"{name} holds non-finite values")
    return values


def per_token_columns(row: Mapping[str, Any], n_tokens: int, tokenizer_size: int,
                      k: int | None) -> dict[str, Any]:
    """The row's optional ``token_logprobs``/``topk_ids``/``topk_logprobs``, checked: one entry per
    completion token, top-k ids and log-probs together with one ``k`` (the file's, when ``k`` is known),
    finite values, ids in the vocabulary. Missing ones are None. Raises :class:`_Rejected`."""
    out: dict[str, Any] = {name: None for name in PER_TOKEN_COLUMNS}
    given = {name: row.get(name) for name in PER_TOKEN_COLUMNS if row.get(name) is not None}
    for name, value in given.items():
        if not hasattr(value, "__len__") or isinstance(value, str):
            raise _Rejected("bad_logprob_values", f"{name} is not a list")
        if len(value) != n_tokens:
            raise _Rejected("bad_logprob_lengths", f"{name} has {len(value)} entries for {n_tokens} completion "
                                                   "token(s)")
    if "token_logprobs" in given:
        out["token_logprobs"] = _floats(given["token_logprobs"], "token_logprobs")
    if ("topk_ids" in given) != ("topk_logprobs" in given):
        raise _Rejected("bad_logprob_lengths", "topk_ids and topk_logprobs come together (one is missing)")
    if "topk_ids" in given:
        ids = [_int_list(step, "topk_ids", "bad_logprob_values") for step in given["topk_ids"]]
        logprobs = [_floats(step, "topk_logprobs") for step in given["topk_logprobs"]]
        widths = {len(step) for step in ids} | {len(step) for step in logprobs}
        if len(widths) > 1 or (k is not None and widths and widths != {k}):
            raise _Rejected("bad_logprob_lengths", f"top-k lists of lengths {sorted(widths)}"
                                                   + (f"; the file's k is {k}" if k is not None else ""))
        if any(not 0 <= t < tokenizer_size for step in ids for t in step):
            raise _Rejected("bad_logprob_values", "topk_ids outside the tokenizer's vocabulary")
        out["topk_ids"], out["topk_logprobs"] = ids, logprobs
    return out


def _number(row: Mapping[str, Any], name: str, default: Any, kind: type) -> Any:
    """The row's numeric ``name`` when it is one (a generation setting the source recorded), else ``default``."""
    value = row.get(name)
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def schema_row(row: Mapping[str, Any], index: int, teacher_id: str, base: Mapping[str, Any], tokenizer: Any,
               fields: Mapping[str, str], k: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One source row as a :data:`~trait_guard.dataset.SCHEMA` row, and facts for the record
    (``ids_given``, ``system_messages``). Raises :class:`_Rejected`."""
    prompt, completion, systems = prompt_and_completion(row, fields["prompt"], fields["completion"])
    text, ids, ids_given = completion_tokens(tokenizer, completion, row.get("completion_ids"))
    per_token = per_token_columns(row, len(ids), len(tokenizer), k)
    raw_id = row.get("prompt_id", row.get("id"))
    prompt_id = str(raw_id) if raw_id is not None and str(raw_id).strip() else f"{index:06d}"
    family = row.get("family") if isinstance(row.get("family"), str) and row.get("family") else "imported"
    schema = {
        "sample_id": f"{teacher_id}:{prompt_id}", "prompt_id": prompt_id, "family": family, "prompt": prompt,
        "completion": text, "teacher_id": teacher_id, "base_model": base["name"],
        "base_fingerprint": base["fingerprint"], "base_hidden_size": base["hidden_size"],
        "base_num_layers": base["num_layers"], "trait_installed": False, "trait_install": UNKNOWN,
        "seed": _number(row, "seed", -1, int), "temperature": _number(row, "temperature", -1.0, float),
        "max_new_tokens": _number(row, "max_new_tokens", 0, int), "constrained": False, "kept": True,
        "reject_reason": "", "completion_ids": ids, **per_token,
    }
    return schema, {"ids_given": ids_given, "system_messages": systems}


# --------------------------------------------------------------------------------------------------
# The import


def _unknown_base(generated_by: str) -> dict[str, Any]:
    """Row provenance for data from a model trait_guard cannot identify: the claim, no fingerprint."""
    return {"name": f"claimed:{generated_by}", "fingerprint": UNKNOWN, "hidden_size": 0, "num_layers": 0}


def _check_teacher_id(teacher_id: str) -> str:
    if not _ID_PATTERN.match(teacher_id):
        raise ImportDataError(f"teacher id {teacher_id!r} cannot name a data file; pass --teacher-id with letters, "
                           "digits, '.', '_' or '-' (e.g. --teacher-id my-teacher)")
    return teacher_id


def _record_manifest(folder: Path, name: str, teacher_id: str, kept: int, record: dict[str, Any]) -> None:
    """The file's manifest entry (hash, counts, teacher) with the import record beside it."""
    from trait_guard.files import atomic_write_text
    from trait_guard.provenance import MANIFEST_NAME, read_manifest, record_files

    teacher = {"id": teacher_id, "install": UNKNOWN, "generated_by": record["generated_by"], "imported": True}
    record_files(folder, [{"file": name, "teacher": teacher, "rows": kept, "kept": kept}],
                 {"method": "import", "generated_by": record["generated_by"]})
    manifest = read_manifest(folder)
    manifest["files"][name]["import"] = record
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, default=str) + "\n")


def _sign(folder: Path, signing_key: Any) -> dict[str, Any]:
    """Sign the folder with the key, or say that it is unsigned (:func:`import_rows` refuses to add a file to a
    signed folder without a key)."""
    import socket
    import sys

    from trait_guard.signing import SIGNING_KEY_ENV, sign_folder

    if signing_key is not None:
        return sign_folder(folder, signing_key, signer=f"trait-guard import on {socket.gethostname()}")
    print(f"NOTE: {folder} is UNSIGNED (no --signing-key or ${SIGNING_KEY_ENV}); verifiers with trusted keys "
          "will refuse it. See docs/provenance.md", file=sys.stderr)
    return {"signed": False, "reason": f"no signing key (--signing-key or ${SIGNING_KEY_ENV})"}


def import_rows(source: str | Path, out_dir: str | Path, *, tokenizer: Any, model: str = "smollm2-135m-instruct",
                teacher_id: str | None = None, generated_by: str = UNKNOWN, split: str | None = None,
                prompt_field: str = "prompt", completion_field: str = "completion",
                base_identity: Any = None, signing_key: Any = None, overwrite: bool = False,
                strict: bool = False) -> ImportResult:
    """Import the rows of ``source`` (JSONL, Parquet or a ``datasets`` folder) into ``out_dir`` as
    ``<teacher_id>.parquet`` (default id: the source's stem) with its manifest entry; returns what was
    done (see the module docstring for the checks and the record).

    ``tokenizer``: the student's (``model`` names it in the record). ``generated_by``: who made the data,
    recorded as a claim. ``base_identity``: a :class:`~trait_guard.models.ModelIdentity` when the data
    was generated by the student's own base model (e.g. a reference set made elsewhere): the rows then
    carry it, as :func:`~trait_guard.dataset.check_same_base` needs; otherwise the base is unknown.
    ``signing_key`` (a key, path or PEM text; None: ``$TRAIT_GUARD_SIGNING_KEY``) signs the folder.
    ``strict``: refuse the import when any row is rejected. Refuses (:class:`ImportDataError`) a missing
    or malformed source, an existing output file (unless ``overwrite``), and an import that keeps no row.
    """
    from trait_guard.signing import SIGNATURE_NAME, load_signing_key

    source, folder = Path(source), Path(out_dir)
    if not source.exists():
        raise InputFileNotFound(f"{source} does not exist; name a .jsonl or .parquet file of prompt/completion "
                                "rows, or a datasets folder")
    key = load_signing_key(signing_key)  # a bad key fails now, before any work
    teacher_id = _check_teacher_id(teacher_id or source.stem)
    path = folder / f"{teacher_id}.parquet"
    if path.exists() and not overwrite:
        raise ImportDataError(f"{path} exists; choose another --teacher-id or --out, or pass --overwrite to replace it")
    if key is None and (folder / SIGNATURE_NAME).exists():
        raise ImportDataError(f"{folder} is signed ({SIGNATURE_NAME}); adding a file would void its signature. Import "
                              "into another --out, or pass --signing-key to sign the folder again with your key")
    base = base_identity.to_dict() if base_identity is not None else _unknown_base(generated_by)
    fields = {"prompt": prompt_field, "completion": completion_field}
    kept_rows, rejected, examples, seen = [], Counter(), [], set()
    read = ids_given = systems = 0
    k: int | None = None
    for index, (where, row) in enumerate(read_source(source, split)):
        read += 1
        try:
            schema, facts = schema_row(row, index, teacher_id, base, tokenizer, fields, k)
            if schema["prompt_id"] in seen:
                raise _Rejected("duplicate_id", f"prompt id {schema['prompt_id']!r} appeared before")
        except _Rejected as why:
            rejected[why.reason] += 1
            if len(examples) < SHOWN_REJECTED:
                examples.append({"where": where, "reason": why.reason, "detail": why.detail,
                                 "fix": _FIX[why.reason]})
            continue
        seen.add(schema["prompt_id"])
        if schema["topk_ids"]:
            k = len(schema["topk_ids"][0])
        ids_given += facts["ids_given"]
        systems += bool(facts["system_messages"])
        kept_rows.append(schema)
    _refuse_unusable(source, read, kept_rows, rejected, examples, strict)
    with RowWriter(path) as writer:
        writer.write(kept_rows)
    record = {
        "source": str(source.resolve()), "source_format": detect_format(source), "source_sha256": source_sha256(source),
        "generated_by": generated_by, "generated_by_verified": False,
        "tokenizer": tokenizer_identity(tokenizer, model),
        "base": {"claimed_same_as_student": base_identity is not None, **base},
        "counts": {"read": read, "kept": len(kept_rows), "rejected": sum(rejected.values()),
                   "rejected_by_reason": dict(rejected), "completion_ids_given": ids_given,
                   "completion_ids_tokenized": len(kept_rows) - ids_given,
                   "with_token_logprobs": sum(r["token_logprobs"] is not None for r in kept_rows),
                   "with_topk": sum(r["topk_ids"] is not None for r in kept_rows),
                   "system_messages_dropped": systems},
        "rejected_examples": examples,
    }
    _record_manifest(folder, path.name, teacher_id, len(kept_rows), record)
    return ImportResult(str(path), str(folder), teacher_id, read, len(kept_rows), dict(rejected), examples, record,
                        _sign(folder, key))


def _refuse_unusable(source: Path, read: int, kept: Sequence[Any], rejected: Counter, examples: list[dict[str, Any]],
                     strict: bool) -> None:
    """Refuse an import with nothing to keep, or (``strict``) with any rejected row, naming where and the fix."""
    if read == 0:
        raise ImportDataError(f"{source} holds no rows; export prompt/completion rows (or chat messages) into it")
    if kept and not (strict and rejected):
        return
    shown = "; ".join(f"{e['where']}: {e['reason']} ({e['detail']}); fix: {e['fix']}" for e in examples[:3])
    counts = ", ".join(f"{reason}={n}" for reason, n in sorted(rejected.items()))
    what = "no row could be imported" if not kept else f"{sum(rejected.values())} row(s) rejected (--strict)"
    raise ImportDataError(f"{source}: {what} ({counts} of {read}): {shown}")


def claimed_provenance_notes(paths: Mapping[str, str | Path], verification: Mapping[str, Any]) -> list[str]:
    """For a report: per imported file (role -> path), what its provenance CLAIMS (who generated it,
    unverifiable) and what was VERIFIED (its hash against the manifest; its signature), from the
    manifest's import record and :func:`trait_guard.provenance.verify_files`' result. [] when no file
    was imported."""
    from trait_guard.provenance import ProvenanceError, read_manifest

    notes = []
    for role, path in paths.items():
        path = Path(path)
        try:
            entry = read_manifest(path.parent).get("files", {}).get(path.name) or {}
        except ProvenanceError:
            continue
        record = entry.get("import")
        if not record:
            continue
        hashed = role in verification.get("sha256", {})
        signature = verification.get("signatures", {}).get(role, {})
        signed = (f"signed by {signature.get('signer') or '?'} ({signature.get('key_fingerprint')})"
                  + ("" if signature.get("trusted") else ", key not checked against trusted keys")
                  if signature.get("signed") else "not signed")
        counts = record.get("counts", {})
        notes.append(
            f"{role}: IMPORTED rows; CLAIMED (not verified): generated_by={record.get('generated_by')!r}, from "
            f"{record.get('source')} (sha256 {str(record.get('source_sha256'))[:16]}...), base "
            f"{record.get('base', {}).get('name')}; VERIFIED: file hash "
            f"{'matches its manifest' if hashed else 'NOT verified'}, {signed}; import kept {counts.get('kept')} of "
            f"{counts.get('read')} row(s) ({counts.get('rejected', 0)} rejected)")
    return notes
