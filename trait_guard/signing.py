"""Signed provenance: an Ed25519 signature over a folder of teacher data, made where the data is made.

What. :func:`sign_folder` hashes every file of a data folder (the Parquet files, ``manifest.json``,
``summary.json``) and signs an in-toto Statement listing them (subject = file name + SHA-256) in a
DSSE envelope, written as ``<folder>/provenance.sig.json``. :func:`verify_folder` checks that
envelope against the public keys the verifier trusts and that the files still hash to what was
signed; it returns who signed (the trusted key's label), the key's fingerprint and the files
covered, or raises :class:`SignatureError` naming the fix. :func:`create_keypair` writes a key pair
(``trait-guard keys create``).

Why. ``manifest.json`` records each file's hash, but anyone who can write the folder can rewrite
the manifest with fresh hashes. A signature made with a private key only the generator holds cannot
be rewritten; a verifier that trusts only that key's public half learns that the files are the ones
the generator wrote. (OpenSSF ``model-signing`` was tried first: see docs/provenance.md for why this
module signs with ``cryptography`` directly.)

Keys. Private keys: PKCS#8 PEM, unencrypted, given by path or, for a Kubernetes Secret in an
environment variable, as the PEM text itself (``TRAIT_GUARD_SIGNING_KEY``). Trusted public keys:
SubjectPublicKeyInfo PEM files, folders of ``*.pub`` files, or PEM text (``TRAIT_GUARD_TRUSTED_KEYS``,
paths separated by ``os.pathsep``).

Usage::

    create_keypair("keys/", name="generator")                    # keys/generator.key, keys/generator.pub
    sign_folder("outputs/teacher_data", "keys/generator.key")
    verify_folder("outputs/teacher_data", ["keys/generator.pub"])  # -> {"signer": "generator", ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trait_guard.errors import TraitGuardInputError
from trait_guard.files import file_sha256

SIGNATURE_NAME = "provenance.sig.json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/trait-guard/trait_guard/provenance/v1"
#: the predicate of a signed student export: what the model was trained on and what vouched for it
STUDENT_PREDICATE_TYPE = "https://github.com/trait-guard/trait_guard/student/v1"
SIGNING_KEY_ENV = "TRAIT_GUARD_SIGNING_KEY"
TRUSTED_KEYS_ENV = "TRAIT_GUARD_TRUSTED_KEYS"
_PEM = "-----BEGIN"

__all__ = ["SIGNATURE_NAME", "SIGNING_KEY_ENV", "STUDENT_PREDICATE_TYPE", "TRUSTED_KEYS_ENV", "SignatureError",
           "TrustedKey", "check_trained_on", "create_keypair", "fingerprint", "load_signing_key", "load_trusted_keys",
           "read_signature", "sign_folder", "sign_student", "student_predicate", "verify_folder"]


class SignatureError(TraitGuardInputError):
    """A data folder is unsigned, signed by a key the verifier does not trust, or changed after signing."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key the verifier trusts, with the label it is reported by (its file's stem)."""

    label: str
    key: Any  # Ed25519PublicKey
    fingerprint: str


# ----------------------------------------------------------------------------------------------- keys


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: Any) -> str:
    """``SHA256:<hex>`` of the raw 32-byte Ed25519 public key: the key id in envelopes and reports."""
    return "SHA256:" + hashlib.sha256(_raw_public(public_key)).hexdigest()


def _public_pem(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def create_keypair(out_dir: str | Path, name: str = "trait-guard") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``<out_dir>/<name>.key`` (private, PKCS#8 PEM, mode 0600) and
    ``<out_dir>/<name>.pub`` (public, PEM). Refuses to overwrite an existing key. Returns both paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise TraitGuardInputError(f"{path} exists; choose another --out or --name (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # created 0600 from the start: the private key is never readable by others, not even briefly
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_text(_public_pem(key.public_key()), encoding="ascii")
    return private_path, public_path


def load_signing_key(source: str | Path | None = None) -> Any | None:
    """The Ed25519 private key from ``source`` (a path, or PEM text), else from ``$TRAIT_GUARD_SIGNING_KEY``;
    None when neither is set. A key that cannot be read, or is not Ed25519, raises :class:`SignatureError`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    source = source if source not in (None, "") else os.environ.get(SIGNING_KEY_ENV, "").strip() or None
    if source is None:
        return None
    text = str(source)
    where = f"${SIGNING_KEY_ENV}" if text.lstrip().startswith(_PEM) else text
    try:
        data = text.encode("ascii") if text.lstrip().startswith(_PEM) else Path(text).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except FileNotFoundError as err:
        raise SignatureError(f"signing key {text} does not exist; create one with `trait-guard keys create --out DIR`, "
                             f"or unset --signing-key / ${SIGNING_KEY_ENV} to write unsigned data") from err
    except (ValueError, TypeError, UnicodeError) as err:
        raise SignatureError(f"signing key {where} is not an unencrypted PEM private key ({err}); create one with "
                             "`trait-guard keys create --out DIR`") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {where} is {type(key).__name__}, not Ed25519; create one with "
                             "`trait-guard keys create --out DIR`")
    return key


def _pem_blocks(text: str) -> list[str]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("-----BEGIN"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.startswith("-----END"):
                blocks.append("\n".join(current) + "\n")
                current = None
    return blocks


def _public_from_pem(pem: str, where: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if "PRIVATE KEY" in pem.splitlines()[0]:
        raise SignatureError(f"{where} holds a PRIVATE key; a verifier needs only the public key (the .pub file of "
                             "`trait-guard keys create`). Never hand the private key to a verifier")
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeError) as err:
        raise SignatureError(f"trusted key {where} is not a PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"trusted key {where} is {type(key).__name__}, not Ed25519")
    return key


def _split_sources(sources: str | Path | Iterable[str | Path]) -> list[str]:
    if isinstance(sources, (str, Path)):
        text = str(sources)
        if text.lstrip().startswith(_PEM):
            return [text]
        return [part for part in text.split(os.pathsep) if part.strip()]
    return [str(s) for s in sources if str(s).strip()]


def load_trusted_keys(sources: str | Path | Iterable[str | Path] | None = None) -> list[TrustedKey]:
    """The public keys a verifier trusts, from ``sources`` (paths to ``.pub`` files, folders of them,
    or PEM text), else from ``$TRAIT_GUARD_TRUSTED_KEYS``; [] when none is configured."""
    if sources is None:
        sources = os.environ.get(TRUSTED_KEYS_ENV, "")
    keys: list[TrustedKey] = []
    for source in _split_sources(sources):
        if source.lstrip().startswith(_PEM):
            named = [(f"{TRUSTED_KEYS_ENV}[{i}]", pem) for i, pem in enumerate(_pem_blocks(source))]
        else:
            path = Path(source.strip())
            files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
            if not path.exists() or not files:
                raise SignatureError(f"trusted key {path} does not exist (or is a folder without *.pub files); name "
                                     f"the .pub file of `trait-guard keys create` (--trusted-keys / ${TRUSTED_KEYS_ENV} "
                                     "/ data.trusted_keys)")
            named = [(f.stem, f.read_text(encoding="ascii", errors="replace")) for f in files]
        for label, pem in named:
            for block in _pem_blocks(pem) or [pem]:
                key = _public_from_pem(block, label)
                keys.append(TrustedKey(label, key, fingerprint(key)))
    return keys


# ------------------------------------------------------------------------------------------- signing


def _folder_files(folder: Path) -> list[str]:
    """The files a signature covers: every regular file under ``folder`` but the signature itself and
    partial writes, as POSIX paths relative to the folder, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != SIGNATURE_NAME and not p.name.endswith(".partial"))


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed (binds the payload type)."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign_folder(folder: str | Path, key: Any, *, signer: str | None = None,
                predicate_type: str = PREDICATE_TYPE, predicate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sign every file of ``folder`` with the Ed25519 private ``key`` (a key object, a path or PEM text).

    Writes ``<folder>/provenance.sig.json``: a DSSE envelope whose payload is an in-toto Statement
    (subjects: each file's relative name and SHA-256; predicate: generator, time, the signer's name,
    plus ``predicate``'s fields under ``predicate_type``: a student export's attestation, see
    :func:`sign_student`). The envelope also carries the public key, so a verifier without trusted
    keys can still say which key signed (but not that it is a key it trusts). Returns ``{"signed":
    True, "key_fingerprint", "signer", "files"}``.
    """
    from trait_guard import __version__
    from trait_guard.files import atomic_write_text

    folder = Path(folder)
    if not hasattr(key, "sign"):
        key = load_signing_key(key)
    if key is None:
        raise SignatureError("no signing key given")
    files = _folder_files(folder)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": file_sha256(folder / name)}} for name in files],
        "predicateType": predicate_type,
        "predicate": {**dict(predicate or {}), "generator": f"trait_guard {__version__}", "signer": signer or "",
                      "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")
    public = key.public_key()
    key_id = fingerprint(public)
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key_id, "sig": base64.b64encode(key.sign(_pae(PAYLOAD_TYPE, payload))).decode("ascii"),
                        "public_key": _public_pem(public)}],
    }
    atomic_write_text(folder / SIGNATURE_NAME, json.dumps(envelope, indent=2) + "\n")
    return {"signed": True, "key_fingerprint": key_id, "signer": signer or "", "files": files}


def read_signature(folder: str | Path) -> dict[str, Any] | None:
    """The folder's DSSE envelope (None when the folder is unsigned)."""
    path = Path(folder) / SIGNATURE_NAME
    if not path.is_file():
        return None
    try:
        envelope = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SignatureError(f"{path} is not valid JSON ({err}); re-sign the folder at its source") from err
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE or not envelope.get("signatures"):
        raise SignatureError(f"{path} is not a DSSE envelope of an in-toto statement; re-sign the folder at its source")
    return envelope


def _as_trusted(keys: Sequence[TrustedKey] | str | Iterable[str] | None) -> list[TrustedKey]:
    """``keys`` as loaded :class:`TrustedKey` s (sources are loaded; None is none)."""
    if keys is None:
        return []
    if not isinstance(keys, (str, Path)):
        keys = list(keys)
        if all(isinstance(k, TrustedKey) for k in keys):
            return keys
    return load_trusted_keys(keys)


_FIX = ("Regenerate the data where the signing key lives (`trait-guard generate --signing-key KEY`), "
        "or restore the files as signed")


def verify_folder(folder: str | Path, trusted_keys: Sequence[TrustedKey] | str | Iterable[str] | None = None, *,
                  files: Iterable[str] | None = None, hashes: Mapping[str, str] | None = None,
                  require_trusted: bool = True) -> dict[str, Any]:
    """Check ``folder``'s signature and that its files are the ones signed.

    ``trusted_keys``: :class:`TrustedKey` s or sources for :func:`load_trusted_keys`. ``files``: the
    names that must be covered (default: every signed file, plus every ``.parquet`` and ``manifest.json``
    present); ``hashes``: SHA-256s already computed (name -> hex), to avoid hashing large files twice.
    With ``require_trusted`` (the default) the envelope must verify under a trusted key; without it (no
    trusted keys configured) the envelope is checked against the public key it carries, and the result
    says ``trusted: False``.

    Returns ``{"signed": True, "trusted": bool, "signer", "key_fingerprint", "files": [...],
    "unsigned_files": [...], "predicate_type", "predicate"}`` (the predicate is signed, so a student
    export's attested verdict and data digests can be believed once this returns); anything wrong
    raises :class:`SignatureError` naming the fix.
    """
    folder = Path(folder)
    keys = _as_trusted(trusted_keys)
    envelope = read_signature(folder)
    if envelope is None:
        raise SignatureError(f"{folder} is not signed (no {SIGNATURE_NAME}). {_FIX}")
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
    except (ValueError, TypeError, KeyError) as err:
        raise SignatureError(f"{folder / SIGNATURE_NAME}: payload is not base64 ({err}). {_FIX}") from err
    matched = _signing_key(folder, envelope, _pae(envelope["payloadType"], payload), keys, require_trusted)
    try:
        statement = json.loads(payload)
        signed = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    except (ValueError, KeyError, TypeError) as err:
        raise SignatureError(f"{folder / SIGNATURE_NAME}: the signed statement is malformed ({err}). {_FIX}") from err
    required, present = _check_signed_files(folder, signed, files, hashes)
    return {"signed": True, "trusted": require_trusted, "signer": matched.label if require_trusted else
            statement.get("predicate", {}).get("signer", ""), "key_fingerprint": matched.fingerprint,
            "files": sorted(required), "unsigned_files": sorted(present - set(signed)),
            "predicate_type": statement.get("predicateType"), "predicate": statement.get("predicate") or {}}


def _signing_key(folder: Path, envelope: Mapping[str, Any], message: bytes, keys: Sequence[TrustedKey],
                 require_trusted: bool) -> TrustedKey:
    """The key whose signature in ``envelope`` verifies ``message``: a trusted one, or (without
    ``require_trusted``) the one the envelope carries. Raises :class:`SignatureError` naming the fix."""
    from cryptography.exceptions import InvalidSignature

    matched: TrustedKey | None = None
    for entry in envelope["signatures"]:
        try:
            sig = base64.b64decode(entry.get("sig", ""), validate=True)
        except (ValueError, TypeError):
            continue
        candidates = list(keys) if require_trusted else []
        if not require_trusted and entry.get("public_key"):
            embedded = _public_from_pem(entry["public_key"], f"{folder / SIGNATURE_NAME}")
            candidates = [TrustedKey("(untrusted: key in the envelope)", embedded, fingerprint(embedded))]
        for key in candidates:
            try:
                key.key.verify(sig, message)
            except InvalidSignature:
                continue
            matched = key
            break
        if matched:
            break
    if matched is None:
        key_ids = [e.get("keyid", "?") for e in envelope["signatures"]]
        if require_trusted and not keys:
            raise SignatureError(f"no trusted keys to check {folder} against; pass --trusted-keys PUB (or set "
                                 f"${TRUSTED_KEYS_ENV} / data.trusted_keys)")
        if require_trusted:
            raise SignatureError(
                f"{folder} is signed by key {', '.join(key_ids)}, which is not among the trusted keys "
                f"({', '.join(f'{k.label} {k.fingerprint[:23]}' for k in keys)}), or the signature does not match its "
                f"statement. If that key is the generator's, add its .pub file to --trusted-keys / "
                f"${TRUSTED_KEYS_ENV} / data.trusted_keys; otherwise {_FIX[0].lower() + _FIX[1:]}")
        raise SignatureError(f"{folder / SIGNATURE_NAME}: the signature does not match its statement. {_FIX}")
    return matched


def _check_signed_files(folder: Path, signed: Mapping[str, str], files: Iterable[str] | None,
                        hashes: Mapping[str, str] | None) -> tuple[set[str], set[str]]:
    """Every required file is signed, present and unchanged; returns (required, present) names."""
    present = set(_folder_files(folder))
    if files is None:
        required = set(signed) | {n for n in present if n.endswith(".parquet") or n == "manifest.json"}
    else:
        required = set(files)
    unsigned = sorted(n for n in required if n not in signed)
    if unsigned:
        raise SignatureError(f"{folder}: {unsigned} were added after signing (not in the signed statement). {_FIX}")
    known = dict(hashes or {})
    for name in sorted(required):
        path = folder / name
        if not path.is_file():
            raise SignatureError(f"{path} was signed but is missing. {_FIX}")
        actual = known.get(name) or file_sha256(path)
        if actual != signed[name]:
            raise SignatureError(f"{path} changed after signing: SHA-256 {actual[:16]}... but the signed statement "
                                 f"says {signed[name][:16]}... {_FIX}")
    return required, present


# ------------------------------------------------------------------------------------ student export

#: the export record's fields a student attestation carries (see :func:`trait_guard.export.export_record`)
_ATTESTED = ("verdict", "kind", "student_base", "trait", "weights_step", "updates", "alarms", "screen",
             "code_version", "mlflow_run_id")


def student_predicate(record: Mapping[str, Any]) -> dict[str, Any]:
    """The signed claims of a student export: the guard verdict, the screen (gate) result, what the
    weights are (kind, base model, the step they are from), the code version and MLflow run, and each
    data role's SHA-256 with whether its provenance verified. Local paths are left out: they mean
    nothing on the verifier's machine; the digests are what bind the model to its data."""
    out = {key: record.get(key) for key in _ATTESTED}
    out["data"] = {role: {"name": d.get("name"), "sha256": d.get("sha256"), "verified": bool(d.get("verified"))}
                   for role, d in (record.get("data") or {}).items()}
    return out


def sign_student(folder: str | Path, key: Any, record: Mapping[str, Any], *, signer: str | None = None
                 ) -> dict[str, Any]:
    """Sign an exported student folder (weights, tokenizer, ``trait_guard_export.json``) with an
    attestation (:data:`STUDENT_PREDICATE_TYPE`) binding the files to :func:`student_predicate` of
    ``record``. Returns :func:`sign_folder`'s result plus the ``predicate_type``."""
    result = sign_folder(folder, key, signer=signer, predicate_type=STUDENT_PREDICATE_TYPE,
                         predicate=student_predicate(record))
    return {**result, "predicate_type": STUDENT_PREDICATE_TYPE}


def _parquet_digests(sources: Iterable[str | Path]) -> dict[str, str]:
    """SHA-256 -> path of every ``.parquet`` file named in ``sources`` (files, or folders searched recursively)."""
    found: dict[str, str] = {}
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise SignatureError(f"{path} does not exist; name the data file or folder the student was trained on")
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        for file in files:
            found.setdefault(file_sha256(file), str(file))
    return found


def check_trained_on(predicate: Mapping[str, Any], data: Iterable[str | Path]) -> dict[str, str | None]:
    """Check a verified student attestation against data the verifier holds: the ``train`` role's
    SHA-256 must be one of the given files' (or folders' ``.parquet`` files'). Returns role -> the
    matching file (None for a role whose file was not given, e.g. the reference); a ``train`` digest
    that matches nothing raises :class:`SignatureError`."""
    attested = predicate.get("data") or {}
    if "train" not in attested:
        raise SignatureError("the attestation names no training data; it is not a student export of trait-guard train")
    have = _parquet_digests(data)
    matched = {role: have.get(str(d.get("sha256"))) for role, d in attested.items()}
    if matched["train"] is None:
        raise SignatureError(
            f"the student was trained on {attested['train'].get('name')} (SHA-256 {str(attested['train'].get('sha256'))[:16]}"
            f"...), which is none of the {len(have)} Parquet file(s) given; pass the folder or file it was trained on")
    return matched
