"""Validation and JSON encoding of keys and rows.

Values are JSON objects, never pickle, so an application in any language can
read the cache. The JSON text `null` in a cache entry means "known absent".

The values a SQLAlchemy or Django application holds that JSON has no type for
are written as strings, exactly: a `Decimal` as its digits (`str(d)`, every
digit kept), a `datetime`, `date` or `time` as ISO 8601 (`isoformat()`), a
`UUID` in its canonical form. Loads write them the same way, and the flusher
turns them back into the column's type (`writebehind.sink`).

Binary values (`bytes`, `bytearray`, `memoryview`; a PostgreSQL `bytea`, a MySQL or
MariaDB `BLOB`/`VARBINARY`/`BINARY`, an SQLite `BLOB`) are written as the text
`base64:` followed by their standard base64 (RFC 4648 section 4: the alphabet
`A-Z a-z 0-9 + /`, padded with `=`, no line breaks): b"\x00\xff" is
"base64:AP8=", b"" is "base64:". Loads write a binary column so, `Cache.write`
encodes Python bytes so, and the flusher decodes exactly this form for a column
whose type is binary (anything else there is a refused row, dead-lettered). In
any other column the text is only text.

A composite key (an entity whose `key` lists several columns) is a tuple of its
columns' values, in the order `key` names them. Its text is each part's text (an
int in decimal, a str as it is, with the rules of a one-column key) joined by ",",
with "%" and "," inside a part written "%25" and "%2C": ("acme", 42) is "acme,42",
("a,b", 7) is "a%2Cb,7", ("100%", 7) is "100%25,7". Each part's text is
unambiguous and the escape is undone only one way, so two keys never share a text.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from cachewarden.errors import InvalidKey, InvalidValue

# A key as applications pass it: a str or an int, or a tuple of them for a composite key.
Key = str | int | tuple[str | int, ...]

MAX_KEY_BYTES = 512
RESERVED_KEY_CHARS = frozenset("*?[]:")
ABSENT = "null"
BINARY_PREFIX = "base64:"
# What a binary column's text must be (messages name it).
BINARY_FORM = "'base64:' followed by standard padded base64 (RFC 4648), e.g. 'base64:AP8='"


def binary_text(value: bytes | bytearray | memoryview) -> str:
    """The JSON text of a binary value: "base64:" and its standard, padded base64."""
    return BINARY_PREFIX + base64.b64encode(value).decode("ascii")


def binary_value(text: str) -> bytes:
    """The bytes of a binary value's text (binary_text); ValueError for any other text."""
    if not text.startswith(BINARY_PREFIX):
        raise ValueError(f"{text[:60]!r} does not start with {BINARY_PREFIX!r}")
    data = text[len(BINARY_PREFIX) :]
    try:
        # validate=True: no character outside the alphabet (no whitespace) is skipped.
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{text[:60]!r} is not valid padded base64 after the prefix") from None


def exact_text(value: Any) -> str:
    """The JSON text of a Decimal, date, time, datetime, UUID or binary value (bytes,
    bytearray, memoryview); TypeError for others."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value!r} is not a finite number")
        return str(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return binary_text(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=exact_text
)
_decode = json.loads


def key_text(entity: str, key: object, parts: int = 1) -> str:
    """The validated string form of a key (ints are written in decimal); a composite
    key's (`parts` > 1: a tuple or list of that many values) is its parts' texts
    joined by "," (see the module's docstring)."""
    if parts > 1:
        return _composite_text(entity, key, parts)
    if type(key) is int and -(10**40) < key < 10**40:
        return str(key)  # digits and '-' only, and few of them: always valid
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise InvalidKey(f"{entity}: key {key!r} is a {type(key).__name__}; use a str or an int")
    text = str(key)
    if not text:
        raise InvalidKey(f"{entity}: the key is empty; every row needs a non-empty key")
    if _BAD_KEY_CHAR.search(text) is not None:
        bad = sorted({ch for ch in text if _BAD_KEY_CHAR.match(ch)})
        raise InvalidKey(
            f"{entity}: key {text!r} contains {''.join(bad)!r}; keys may not hold "
            "'*', '?', '[', ']', ':', spaces or control characters"
        )
    if len(text) * 4 > MAX_KEY_BYTES and len(text.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"{entity}: key {text[:40]!r}... is over {MAX_KEY_BYTES} bytes")
    return text


def _composite_text(entity: str, key: object, parts: int) -> str:
    if not isinstance(key, tuple | list) or len(key) != parts:
        shown = f"a {type(key).__name__}" if not isinstance(key, tuple | list) else "of "
        shown = shown + (f"{len(key)} values" if isinstance(key, tuple | list) else "")
        raise InvalidKey(
            f"{entity}: key {key!r} is {shown}; the key of {entity} has {parts} columns: "
            f"pass a tuple of {parts} values, in the order `key` names its columns, "
            "such as ('acme', 42)"
        )
    texts = []
    for part in key:
        text = key_text(entity, part)
        if "%" in text or "," in text:
            text = text.replace("%", "%25").replace(",", "%2C")
        texts.append(text)
    joined = ",".join(texts)
    if len(joined.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"{entity}: key {joined[:40]!r}... is over {MAX_KEY_BYTES} bytes")
    return joined


def key_parts(text: str, parts: int) -> list[str]:
    """The texts of a composite key's parts (key_text's inverse); ValueError when `text`
    is not `parts` of them."""
    found = text.split(",")
    if len(found) != parts:
        raise ValueError(f"key {text!r} is not {parts} values joined by ','")
    if "%" in text:
        found = [p.replace("%2C", ",").replace("%25", "%") for p in found]
    return found


# Reserved characters, whitespace (str.isspace), C0 controls, DEL and C1 controls.
_BAD_KEY_CHAR = re.compile(r"[*?\[\]:\s\x00-\x1f\x7f-\x9f]")


def encode_row(entity: str, key: str, row: Mapping[str, Any], max_bytes: int) -> str:
    """Encode a row as compact JSON; raise InvalidValue naming the problem and the fix."""
    if type(row) is not dict and not isinstance(row, Mapping):
        raise InvalidValue(
            f"{entity}:{key}: the row is a {type(row).__name__}; pass a dict of column values"
        )
    try:
        text = _encoder.encode(row)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(
            f"{entity}:{key}: the row cannot be encoded as JSON ({_explain(row, exc)}); "
            "convert it to str, int, float, bool, None, list, dict, Decimal, datetime, date, "
            "time, UUID or bytes first"
        ) from None
    # A UTF-8 character is at most 4 bytes: only measure rows that could be too big.
    size = len(text) if len(text) * 4 <= max_bytes else len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidValue(
            f"{entity}:{key}: the row is {size} bytes encoded, over the limit of "
            f"{max_bytes} (entities.{entity}.max_value_bytes)"
        )
    return text


def encode_entry(entity: str, key: str, row: Mapping[str, Any] | None, max_bytes: int) -> str:
    """The cache entry of a loaded row: its JSON, or ABSENT where the database has none."""
    return ABSENT if row is None else encode_row(entity, key, row, max_bytes)


def _explain(row: Mapping[str, Any], exc: Exception) -> str:
    for column, value in row.items():
        if isinstance(value, float | Decimal) and not (
            math.isfinite(value) if isinstance(value, float) else value.is_finite()
        ):
            return f"column {column!r} holds {value!r}, which JSON cannot carry"
        try:
            _encoder.encode(value)
        except (TypeError, ValueError):
            return f"column {column!r} holds a {type(value).__name__}"
    return str(exc)


def decode_row(text: str | bytes) -> dict[str, Any] | None:
    """Decode a cache entry: the row, or None for a known-absent entry."""
    value = _decode(text)
    if value is None or isinstance(value, dict):
        return value
    raise InvalidValue(f"cache entry {str(text)[:60]!r} is not a JSON object")
