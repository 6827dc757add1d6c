"""Key validation and the JSON encoding of rows (pure)."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachewarden.codec import (
    ABSENT,
    MAX_KEY_BYTES,
    binary_text,
    binary_value,
    decode_row,
    encode_row,
    key_text,
)
from cachewarden.errors import CachewardenError, InvalidKey, InvalidValue

LIMIT = 512 * 1024

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
ROWS = st.dictionaries(st.text(min_size=1, max_size=12), JSON_VALUES, max_size=6)


@pytest.mark.parametrize("char", sorted("*?[]:"))
def test_reserved_characters_are_refused(char: str) -> None:
    """A key holding any of * ? [ ] : raises InvalidKey naming the entity, the key and the rule."""
    key = f"ab{char}cd"
    with pytest.raises(InvalidKey) as info:
        key_text("user", key)
    message = str(info.value)
    assert message.startswith("user:")
    assert repr(key) in message
    assert "may not hold" in message


@pytest.mark.parametrize(
    "key", ["a b", " a", "a\tb", "a\nb", "a\u00a0b", "a\x00b", "a\x7fb", "a\x9bb"]
)
def test_spaces_and_control_characters_are_refused(key: str) -> None:
    """A key with a space, tab, newline, NUL or other control character raises InvalidKey."""
    with pytest.raises(InvalidKey) as info:
        key_text("user", key)
    assert repr(key) in str(info.value)


def test_empty_key_is_refused() -> None:
    """An empty key raises InvalidKey saying the key is empty."""
    with pytest.raises(InvalidKey, match=r"^user: the key is empty"):
        key_text("user", "")


def test_too_long_key_is_refused() -> None:
    """A key over the byte limit raises InvalidKey quoting its start and the limit."""
    key = "k" * (MAX_KEY_BYTES + 1)
    with pytest.raises(InvalidKey) as info:
        key_text("user", key)
    assert "'kkkkkkkkkk" in str(info.value)
    assert str(MAX_KEY_BYTES) in str(info.value)


def test_key_limit_counts_utf8_bytes() -> None:
    """The limit counts UTF-8 bytes: 512 ASCII bytes pass, 257 two-byte characters do not."""
    assert key_text("user", "k" * MAX_KEY_BYTES) == "k" * MAX_KEY_BYTES
    with pytest.raises(InvalidKey):
        key_text("user", "é" * (MAX_KEY_BYTES // 2 + 1))


@pytest.mark.parametrize("key", [1.5, None, b"42", True, ("a",)])
def test_non_str_int_keys_are_refused(key: object) -> None:
    """A key that is not a str or an int (floats, bytes, bools, None) raises InvalidKey naming its type."""
    with pytest.raises(InvalidKey) as info:
        key_text("user", key)
    assert type(key).__name__ in str(info.value)
    assert "use a str or an int" in str(info.value)


@pytest.mark.parametrize(
    ("key", "text"), [(42, "42"), (-7, "-7"), ("abc", "abc"), ("é-ü_1.2@x", "é-ü_1.2@x")]
)
def test_valid_keys_pass(key: str | int, text: str) -> None:
    """Ints become their decimal text; other safe strings pass unchanged."""
    assert key_text("user", key) == text


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({1, 2}, "holds a set"),
        (float("nan"), "holds nan"),
        (float("inf"), "holds inf"),
        (decimal.Decimal("NaN"), "holds Decimal('NaN')"),
        (decimal.Decimal("-Infinity"), "holds Decimal('-Infinity')"),
        (complex(1, 2), "holds a complex"),
    ],
)
def test_unencodable_column_names_column_and_fix(value: object, says: str) -> None:
    """A row with a value JSON cannot carry raises InvalidValue naming the key, the column and the fix."""
    with pytest.raises(InvalidValue) as info:
        encode_row("user", "42", {"name": "ann", "born": value}, LIMIT)
    message = str(info.value)
    assert message.startswith("user:42:")
    assert "column 'born'" in message
    assert says in message
    assert "convert it to str, int, float, bool, None, list, dict, Decimal, datetime" in message
    assert "UUID or bytes first" in message


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (decimal.Decimal("12345678901234567890.0123456789"), "12345678901234567890.0123456789"),
        (decimal.Decimal("1E+3"), "1E+3"),
        (datetime.datetime(2024, 1, 2, 3, 4, 5, 6), "2024-01-02T03:04:05.000006"),
        (
            datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
            "2024-01-02T03:04:05+00:00",
        ),
        (datetime.date(2024, 1, 2), "2024-01-02"),
        (datetime.time(3, 4, 5), "03:04:05"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (b"\x00\xff", "base64:AP8="),
        (bytearray(b"\x00\xff\x00"), "base64:AP8A"),
        (memoryview(b"raw"), "base64:cmF3"),
        (b"", "base64:"),
    ],
)
def test_exact_values_are_encoded_as_documented_strings(value: object, text: str) -> None:
    """A Decimal keeps every digit, datetimes, dates, times and UUIDs are ISO 8601 or canonical text, and bytes, bytearrays and memoryviews are "base64:" and their padded standard base64."""
    assert json.loads(encode_row("user", "42", {"v": value}, LIMIT)) == {"v": text}


def test_nested_unencodable_value_names_its_column() -> None:
    """A bad value nested in a list still names the top-level column that holds it."""
    with pytest.raises(InvalidValue, match="column 'tags'"):
        encode_row("user", "42", {"tags": ["a", {1, 2}]}, LIMIT)


@pytest.mark.parametrize("row", [["a", "b"], "text", 42, None, ("a", 1)])
def test_non_dict_row_is_refused(row: Any) -> None:
    """A row that is not a mapping raises InvalidValue naming its type and asking for a dict."""
    with pytest.raises(InvalidValue) as info:
        encode_row("user", "42", row, LIMIT)
    assert type(row).__name__ in str(info.value)
    assert "pass a dict of column values" in str(info.value)


def test_size_limit_is_exact_and_names_the_setting() -> None:
    """A row of exactly max_bytes passes; one byte more raises InvalidValue naming the setting."""
    overhead = len(json.dumps({"name": ""}, separators=(",", ":")))
    fits = {"name": "x" * (100 - overhead)}
    assert len(encode_row("user", "1", fits, 100).encode()) == 100
    with pytest.raises(InvalidValue) as info:
        encode_row("user", "1", {"name": "x" * (101 - overhead)}, 100)
    message = str(info.value)
    assert "101 bytes" in message and "limit of 100" in message
    assert "entities.user.max_value_bytes" in message


def test_size_limit_counts_utf8_bytes() -> None:
    """The size limit counts encoded UTF-8 bytes, not characters."""
    with pytest.raises(InvalidValue):
        encode_row("user", "1", {"n": "é" * 10}, 20)
    assert encode_row("user", "1", {"n": "é" * 10}, 30) == '{"n":"' + "é" * 10 + '"}'


def test_encoding_is_compact_json() -> None:
    """Rows are encoded as compact JSON with non-ASCII text kept as is."""
    assert encode_row("user", "1", {"id": 1, "name": "Zoë"}, LIMIT) == '{"id":1,"name":"Zoë"}'


@given(ROWS)
def test_rows_round_trip(row: dict[str, Any]) -> None:
    """Any JSON-compatible row decodes back to an equal row."""
    assert decode_row(encode_row("user", "1", row, 10**9)) == row


def test_absent_marker_decodes_to_none() -> None:
    """The entry "null" means known absent and decodes to None (str or bytes)."""
    assert ABSENT == "null"
    assert decode_row(ABSENT) is None
    assert decode_row(b"null") is None


@pytest.mark.parametrize("text", ["[1,2]", "3", '"s"', "true"])
def test_non_object_entry_is_refused(text: str) -> None:
    """A cache entry holding JSON that is neither an object nor null raises InvalidValue."""
    with pytest.raises(InvalidValue, match="is not a JSON object"):
        decode_row(text)


def test_errors_share_the_root() -> None:
    """InvalidKey and InvalidValue are CachewardenErrors, so callers catch one root."""
    assert issubclass(InvalidKey, CachewardenError)
    assert issubclass(InvalidValue, CachewardenError)


@given(st.binary(max_size=300))
def test_binary_values_round_trip(data: bytes) -> None:
    """Any bytes encoded by binary_text decode to the same bytes with binary_value, through a JSON row."""
    row = json.loads(encode_row("user", "1", {"b": data}, LIMIT))
    assert row["b"] == binary_text(data) and binary_value(row["b"]) == data


@pytest.mark.parametrize(
    "text",
    [
        "AP8=",  # no prefix
        "00ff",  # the hex older loads wrote
        "BASE64:AP8=",  # the prefix is lower case
        "base64:AP8",  # padding missing
        "base64:AP8==",  # padding too long
        "base64:AP*=",  # outside the alphabet
        "base64:AP_=",  # the URL-safe alphabet
        "base64: AP8=",  # whitespace
        "base64:AP8=\n",  # a line break
    ],
)
def test_malformed_binary_text_is_refused(text: str) -> None:
    """binary_value raises ValueError for text that is not "base64:" and padded standard base64."""
    with pytest.raises(ValueError, match="base64"):
        binary_value(text)
