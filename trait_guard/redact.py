"""What a run's params and tags may show: MLflow-safe keys and values, secrets redacted.

What. :func:`flatten_params` turns a nested config (dicts, pydantic models, dataclasses) into
``{"a.b.c": "value"}`` strings within MLflow's limits; :func:`clean_tags` does the same for tags;
:func:`clean_key` makes any key one MLflow accepts. On the way, a value whose key looks like a secret
(:func:`is_secret_key`: ``password``, ``hf_token``, ``apiKey``, ...) is replaced by ``***``, and so are
the password of a ``scheme://user:password@host`` URI and the value of any secret-named environment
variable found inside a value (:func:`redact_secrets`).

Why. Params and tags are visible to everyone who can open the MLflow UI, and a job config may carry a
token under a plain key or inside a URI. :class:`trait_guard.tracking.MlflowTracker` sends every param
and tag through here.

Usage::

    from trait_guard.redact import flatten_params

    flatten_params({"hub": {"token": "hf_abc"}, "training": {"lr": 1e-4}})
    # {"hub.token": "***", "training.lr": "0.0001"}
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from trait_guard.files import to_jsonable

__all__ = ["REDACTED", "clean_key", "clean_tags", "flatten_params", "is_secret_key", "redact_secrets"]

# MLflow's limits (mlflow.utils.validation); fixed here so that importing this module stays light.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250

REDACTED = "***"
_SECRET_WORDS = frozenset({"password", "passwd", "secret", "secrets", "token", "key", "apikey",
                           "credential", "credentials"})
# A secret word followed by one of these names something harmless: pad_token_id, num_key_value_heads.
_BENIGN_AFTER = frozenset({"id", "ids", "idx", "index", "len", "length", "count", "size", "limit",
                           "value", "values", "heads", "dim", "dims", "type", "types", "budget"})


def _key_words(key: str) -> list[str]:
    """Lower-case components of a key: split on separators and camelCase (``awsSecretKey``)."""
    words = []
    for part in re.split(r"[^A-Za-z0-9]+", key):
        words += re.findall(r"[A-Z]+(?=[A-Z][a-z]|\d|\b)|[A-Z]?[a-z]+|[A-Z]+|\d+", part)
    return [w.lower() for w in words]


def is_secret_key(key: str) -> bool:
    """Whether a (flattened) key looks like it holds a secret: a component is password, secret,
    token, key or credential (any case; ``db.password``, ``hf_token``, ``apiKey``), unless the next
    component names something harmless (``pad_token_id``, ``num_key_value_heads``). Plurals such as
    ``max_new_tokens`` or ``keywords`` are not components and do not match."""
    words = _key_words(key)
    for i, word in enumerate(words):
        if word in _SECRET_WORDS and not (i + 1 < len(words) and words[i + 1] in _BENIGN_AFTER):
            return True
    return False


def _param_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return json.dumps(to_jsonable(value))
    if isinstance(value, Mapping):  # only empty mappings reach here
        return json.dumps(to_jsonable(value))
    if hasattr(value, "item") and not isinstance(value, (int, float, bool)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    return str(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_mapping(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def flatten_params(params: Mapping[str, Any] | BaseModel | Any, prefix: str = "",
                   redact: bool = True) -> dict[str, str]:
    """Nested dicts (pydantic models, dataclasses) to ``{"a.b.c": "value"}``: values stringified
    (lists as JSON) and truncated to MLflow's limit, secret-looking keys' values replaced by ``***``."""
    out: dict[str, str] = {}

    def walk(obj: Any, key: str) -> None:
        obj = _as_mapping(obj)
        if isinstance(obj, Mapping) and obj:
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))
            return
        if not key:
            raise TypeError(f"params must be a mapping (or a pydantic model / dataclass), got {type(obj).__name__}")
        if redact and is_secret_key(key):
            out[key] = REDACTED
        else:
            text = _param_value(obj)
            out[key] = _truncate(redact_secrets(text) if redact else text, MAX_PARAM_VALUE)

    walk(params, prefix)
    return out


_URI_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@/\s]+@")


def environment_snapshot() -> dict[str, str]:
    """A copy of the environment that tolerates variables removed while it is read: another thread
    may delete one meanwhile (MLflow's telemetry thread removes its own ``_MLFLOW_TELEMETRY_*``), and
    iterating ``os.environ`` then raises KeyError or RuntimeError (a demo run failed on it)."""
    for _ in range(100):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)  # the environment changed under 100 reads in a row: let that error show


def redact_secrets(text: str) -> str:
    """``text`` with the password of a ``scheme://user:password@host`` URI and the value of every
    secret-named environment variable (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_TOKEN``, ...;
    values of 8+ characters) replaced by ``***``: a config value may carry a secret under a plain key."""
    text = _URI_PASSWORD.sub(lambda m: m.group(1) + REDACTED + "@", text)
    for name, value in environment_snapshot().items():
        if len(value) >= 8 and is_secret_key(name) and value in text:
            text = text.replace(value, REDACTED)
    return text


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]" if os.name == "nt" else r"[^/\w.\- :]")


def clean_key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, no empty/relative path parts, <= 250 chars."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = key[: MAX_KEY - 9] + "~" + digest
    return key


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow takes them: keys cleaned (:func:`clean_key`), values stringified (None as ``""``)
    and truncated, secret-looking keys' values and secrets inside values replaced by ``***``."""
    out = {}
    for key, value in tags.items():
        key = clean_key(key)
        if is_secret_key(key):
            out[key] = REDACTED
        else:
            out[key] = _truncate(redact_secrets(_param_value(value)) if value is not None else "", MAX_TAG_VALUE)
    return out
