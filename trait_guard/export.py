"""Shipping the student: the trained model (or its LoRA adapter) in HF format, with its guard record.

What. At the end of a guarded run, rank 0 saves the student under ``<output_dir>/student/`` with
``save_pretrained`` (the full model, or with ``student.lora_r > 0`` the PEFT adapter alone) and the
tokenizer, and writes ``trait_guard_export.json`` beside the weights: the guard's verdict, the
screen (gate) result, the data files' SHA-256 digests and provenance claim, the code version and
the MLflow run id. :func:`trait_guard.tracking.Tracker.log_student` then logs the folder to the MLflow
run under ``student/`` with the verdict, screen result and digests as tags.

Signed. With a signing key (``student.signing_key``, or ``$TRAIT_GUARD_SIGNING_KEY``: a path or the
PEM text, from ``trait-guard keys create``) the folder is signed with an attestation
(:func:`trait_guard.signing.sign_student`) that binds the model files to the data digests, the
verdicts and the code version; ``trait-guard verify <out_dir>/student --trusted-keys PUB --trained-on DATA``
checks it. Without a key the export is unsigned, and its record says so (``signature.signed: false``).

Why. A pipeline needs one place to pick the model up from and one file that says what vouches for
it. Which runs ship (:data:`SHIPPABLE_VERDICTS`): ``passed``, ``mitigated`` (the guard's mitigation was
in force: the weights are what the guard allowed), ``unmonitored`` and ``unguarded`` (trained to the
end, but with no powered signal or no guard: the verdict travels in the record and the tags, so a
registry or deploy step can insist on ``passed``). A ``halted`` or ``interrupted`` run never ships,
and a stale export left in the folder by an earlier run is removed so that it cannot be mistaken for
this run's. Under DeepSpeed ZeRO stage 3 no rank holds the whole model, so nothing is exported there
(convert the final checkpoint with DeepSpeed's ``zero_to_fp32.py``).

Usage::

    from trait_guard.export import export_student

    path, record = export_student(model, tokenizer, out_dir, summary, digests, engine=engine, zero_stage=2)
    # path: <out_dir>/student (None when the run does not ship; record["reason"] says why)
    model = AutoModelForCausalLM.from_pretrained(path)   # or PeftModel.from_pretrained(base, path)
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["EXPORT_DIR", "EXPORT_RECORD", "SHIPPABLE_VERDICTS", "data_digests", "export_record", "export_student",
           "not_shipped_reason", "save_student", "student_kind"]

logger = logging.getLogger(__name__)

EXPORT_DIR = "student"
EXPORT_RECORD = "trait_guard_export.json"
#: verdicts whose student is saved and logged; ``halted`` and ``interrupted`` never ship
SHIPPABLE_VERDICTS = ("passed", "mitigated", "unmonitored", "unguarded")


def not_shipped_reason(verdict: str, engine: Any = None, zero_stage: int | None = None,
                       enabled: bool = True) -> str | None:
    """Why this run's student does not ship, or None when it does (``enabled``: ``student.export``)."""
    if verdict not in SHIPPABLE_VERDICTS:
        what = ("the guard halted training" if verdict == "halted"
                else "the run was interrupted (resume it with --resume)" if verdict == "interrupted"
                else f"verdict {verdict!r}")
        return f"{what}: a {verdict} run never ships"
    if not enabled:
        return "student.export is false: not saved"
    if engine is not None and zero_stage == 3:
        return ("ZeRO stage 3 partitions the parameters across ranks, no rank holds the whole model: convert the "
                "final checkpoint with DeepSpeed's zero_to_fp32.py")
    return None


def student_kind(model: Any) -> str:
    """``lora`` for a PEFT model (its ``save_pretrained`` writes the adapter only), else ``full``."""
    return "lora" if hasattr(model, "peft_config") else "full"


def data_digests(paths: Mapping[str, str | Path], provenance: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per role (``train``, ``reference``): the file's path, name (its stem), SHA-256 and provenance claim.

    The digest is the provenance check's (equal to the manifest's) when the file verified; for a file
    trained on unverified (``data.allow_unverified``) it is computed here, and ``verified`` is false.
    """
    from trait_guard.files import file_sha256

    verified = provenance.get("sha256") or {}
    out = {}
    for role, path in paths.items():
        path = Path(path)
        digest = verified.get(role)
        out[role] = {"path": str(path.resolve()), "name": path.stem,
                     "sha256": digest or file_sha256(path), "verified": digest is not None}
    return out


def save_student(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """``save_pretrained`` of the model (a PEFT model writes its adapter only) and the tokenizer into
    ``folder``, replacing what was there. Written to a sibling folder first, then moved into place, so
    a crash never leaves a half-written student under the final name."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def export_record(summary: Mapping[str, Any], digests: Mapping[str, Mapping[str, Any]], kind: str | None,
                  reason: str | None = None) -> dict[str, Any]:
    """What vouches for the student (``trait_guard_export.json``; also the tracker's tags): the verdict,
    the screen (gate) result, the data digests, the code version and the MLflow run."""
    gate = summary.get("gate")
    return {
        "shipped": reason is None,
        "reason": reason,
        "verdict": summary.get("verdict"),
        "kind": kind,
        "student_base": summary.get("student"),
        "trait": summary.get("trait"),
        "weights_step": summary.get("weights_step"),
        "updates": summary.get("updates"),
        "screen": None if gate is None else {"flagged": bool(gate.get("flagged")), "alpha": gate.get("alpha"),
                                             "flagged_signals": list(gate.get("flagged_signals") or [])},
        "alarms": len(summary.get("alarms") or []),
        "data": {role: dict(d) for role, d in digests.items()},
        "code_version": summary.get("code_version"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
    }


def export_student(model: Any, tokenizer: Any, out_dir: str | Path, summary: Mapping[str, Any],
                   digests: Mapping[str, Mapping[str, Any]], engine: Any = None,
                   zero_stage: int | None = None, enabled: bool = True,
                   signing_key: Any = None) -> tuple[Path | None, dict[str, Any]]:
    """Save the student of a run that ships (see the module docstring) under ``<out_dir>/student``.

    ``signing_key``: an Ed25519 private key, a path or PEM text; None reads ``$TRAIT_GUARD_SIGNING_KEY``
    (unset: the export is not signed). The key is loaded before anything is written, so an unreadable
    key fails the export instead of leaving an unsigned student behind a run that asked for a signed one.
    Returns the folder (None when the run does not ship) and the export record, with ``signature``
    (``signed``, ``signer``, ``key_fingerprint``) for the tracker's tags. A run that does not ship
    removes a stale ``student/`` folder holding an earlier run's ``trait_guard_export.json``.
    """
    folder = Path(out_dir) / EXPORT_DIR
    reason = not_shipped_reason(str(summary.get("verdict")), engine, zero_stage, enabled)
    if reason is not None:
        if (folder / EXPORT_RECORD).is_file():
            logger.warning("removing %s: an earlier run's export, not this %s run's", folder, summary.get("verdict"))
            shutil.rmtree(folder, ignore_errors=True)
        return None, export_record(summary, digests, None, reason)
    from trait_guard.signing import load_signing_key, sign_student

    key = signing_key if hasattr(signing_key, "sign") else load_signing_key(signing_key)
    kind = student_kind(model)
    save_student(model, tokenizer, folder)
    record = export_record(summary, digests, kind)
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    if key is None:
        record["signature"] = {"signed": False, "signer": None, "key_fingerprint": None}
        logger.warning("the exported student at %s is NOT signed (no student.signing_key or $TRAIT_GUARD_SIGNING_KEY)",
                       folder)
    else:
        signer = Path(str(signing_key)).stem if isinstance(signing_key, (str, Path)) and \
            not str(signing_key).lstrip().startswith("-----") else ""
        signed = sign_student(folder, key, record, signer=signer)
        record["signature"] = {"signed": True, "signer": signed["signer"], "key_fingerprint": signed["key_fingerprint"],
                               "files": len(signed["files"])}
    return folder, record
