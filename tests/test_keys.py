"""Redis key names and shard assignment (pure)."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachewarden.codec import RESERVED_KEY_CHARS
from cachewarden.keys import Keyspace, due_member, parse_due_member, shard_of

VALID_KEYS = st.text(
    alphabet=st.characters(
        blacklist_characters="".join(RESERVED_KEY_CHARS), blacklist_categories=("Cc", "Zs", "Cs")
    ),
    min_size=1,
    max_size=40,
).filter(lambda k: not any(ch.isspace() for ch in k))


@given(st.text(max_size=60), st.integers(min_value=1, max_value=1024))
def test_shard_is_crc32_mod_shards(key: str, shards: int) -> None:
    """shard_of is zlib's CRC-32 of the UTF-8 key modulo the shard count, within range."""
    shard = shard_of(key, shards)
    assert shard == zlib.crc32(key.encode("utf-8")) % shards
    assert 0 <= shard < shards


@pytest.mark.parametrize(
    ("key", "shards", "shard"),
    [("42", 16, 8), ("42", 4, 0), ("user-1", 16, 4), ("é", 16, 14), ("é", 4, 2)],
)
def test_shard_values_are_pinned(key: str, shards: int, shard: int) -> None:
    """Known keys land on fixed shards, so clients in other languages and releases agree."""
    assert shard_of(key, shards) == shard


def test_one_shard_takes_everything() -> None:
    """With one shard every key maps to shard 0."""
    assert {shard_of(str(i), 1) for i in range(100)} == {0}


def test_layout_matches_the_documented_names() -> None:
    """Every key name is exactly the one the keys.py docstring documents (prefix cw, user, 3)."""
    ks = Keyspace("cw")
    assert ks.entry("user", "42") == "cw:user:42"
    assert ks.entry_pattern("user") == "cw:user:*"
    assert ks.stream("user", 3) == "cw:@wb:user:3"
    assert ks.dirty("user", 3) == "cw:@wb:user:3:dirty"
    assert ks.due() == "cw:@wb:due"
    assert ks.queued("user", 3) == "cw:@wb:user:3:queued"
    assert ks.retries("user", 3) == "cw:@wb:user:3:retry"
    assert ks.dead("user") == "cw:@wb:user:dead"
    assert ks.dead_keys("user") == "cw:@wb:user:dead:keys"
    assert ks.flush_lock("user", 3) == "cw:@lock:flush:user:3"
    assert ks.flush_fence("user", 3) == "cw:@fence:flush:user:3"
    assert ks.lease("user", "42") == "cw:@lease:user:42"
    assert ks.refresh_requests("user") == "cw:@refreshq:user"
    assert ks.stream(*parse_due_member(due_member("user", 3))) == ks.stream("user", 3)


def test_docstring_lists_the_same_names() -> None:
    """The layout in the module docstring names each key this test checks."""
    import cachewarden.keys as keys_module

    doc = keys_module.__doc__ or ""
    for name in (
        "cw:user:42",
        "cw:@wb:user:3",
        "cw:@wb:user:3:dirty",
        "cw:@wb:due",
        "cw:@wb:user:3:queued",
        "cw:@wb:user:3:retry",
        "cw:@wb:user:dead",
        "cw:@wb:user:dead:keys",
        "cw:@lock:flush:user:3",
        "cw:@fence:flush:user:3",
        "cw:@lease:user:42",
    ):
        assert f"    {name} " in doc


@given(VALID_KEYS, st.integers(min_value=0, max_value=1023))
def test_entries_never_meet_internal_names(key: str, shard: int) -> None:
    """A valid key's entry name differs from every internal name of the entity and prefix."""
    ks = Keyspace("cw")
    internal = {
        ks.stream("user", shard),
        ks.dirty("user", shard),
        ks.due(),
        ks.queued("user", shard),
        ks.retries("user", shard),
        ks.dead("user"),
        ks.dead_keys("user"),
        ks.flush_lock("user", shard),
        ks.flush_fence("user", shard),
        ks.lease("user", key),
    }
    entry = ks.entry("user", key)
    assert entry not in internal
    assert entry.startswith("cw:user:")
    assert all(name.startswith("cw:@") for name in internal)


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,62}", fullmatch=True), st.integers(0, 1023))
def test_due_member_round_trips(entity: str, shard: int) -> None:
    """parse_due_member reverses due_member for every valid entity name and shard."""
    assert parse_due_member(due_member(entity, shard)) == (entity, shard)


def test_every_name_is_under_the_prefix() -> None:
    """Each name starts with the prefix and a colon, so one prefix holds all of cachewarden."""
    ks = Keyspace("app.v2")
    names = [
        ks.entry("user", "1"),
        ks.stream("user", 0),
        ks.dirty("user", 0),
        ks.due(),
        ks.queued("user", 0),
        ks.retries("user", 0),
        ks.dead("user"),
        ks.dead_keys("user"),
        ks.lease("user", "1"),
        ks.flush_lock("user", 0),
        ks.flush_fence("user", 0),
    ]
    assert all(name.startswith("app.v2:") for name in names)
