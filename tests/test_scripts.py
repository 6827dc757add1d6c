"""The Lua scripts: every key they touch arrives in KEYS, and each has one typed owner."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from cachewarden.scripts import Registry
from tests.helpers import REDIS_URL

SCRIPTS = Path(__file__).resolve().parent.parent / "cachewarden" / "scripts"
LUA = sorted(SCRIPTS.glob("*.lua"))
# Commands whose first argument is not a key.
KEYLESS = {"TIME", "INFO"}
CALL = re.compile(r"redis\.p?call\(\s*'([A-Z]+)'\s*(?:,\s*([^,)]+))?")


def _key_names(source: str) -> set[str]:
    """Local names that only ever hold a KEYS element (`local x = KEYS[...]`, `a and KEYS[1] or KEYS[2]`, `for _, x in ipairs(KEYS)`)."""
    names: set[str] = set(re.findall(r"for \w+, (\w+) in ipairs\(KEYS\)", source))
    for match in re.finditer(r"local ([\w, ]+?) = ([^\n]+)", source):
        targets = [t.strip() for t in match.group(1).split(",")]
        values = [v.strip() for v in match.group(2).split(",")]
        for target, value in zip(targets, values, strict=False):
            if re.fullmatch(r"(KEYS\[[^\]]+\]|\w+ and KEYS\[\d\] or KEYS\[\d\])", value):
                names.add(target)
    return names


def test_there_are_scripts_to_check() -> None:
    """The scripts folder holds the read, enqueue and flush scripts this test inspects."""
    assert {p.stem for p in LUA} >= {"read", "enqueue", "finish", "sweep_claim", "dispatch"}


@pytest.mark.parametrize("path", LUA, ids=[p.stem for p in LUA])
def test_every_key_a_script_touches_comes_from_keys(path: Path) -> None:
    """Each redis.call's key argument is a KEYS element (or a local holding one), never a name built in Lua."""
    source = path.read_text()
    allowed = _key_names(source)
    calls = CALL.findall(source)
    assert calls, "the pattern found no redis.call"
    for command, first in calls:
        if command in KEYLESS:
            continue
        key = first.strip()
        assert key.startswith("KEYS[") or key in allowed, f"{path.name}: {command} {key}"
        assert ".." not in key


def test_a_key_built_in_lua_would_be_caught() -> None:
    """The check above refuses a key concatenated inside a script, as dispatch.lua once did."""
    built = "redis.call('SET', ARGV[3] .. member .. ':queued', 'queued', 'NX')"
    (command, first), *_ = CALL.findall(built)
    assert command == "SET" and not first.strip().startswith("KEYS[")
    assert first.strip() not in _key_names(built)


def test_each_script_has_one_typed_owner() -> None:
    """Each .lua file is run by name from exactly one module of cachewarden/scripts (its typed functions)."""
    owners: dict[str, list[str]] = {p.stem: [] for p in LUA}
    for module in sorted(SCRIPTS.glob("*.py")):
        text = module.read_text()
        for name in owners:
            if re.search(rf"""["']{name}["']""", text):
                owners[name].append(module.name)
    assert {name: mods for name, mods in owners.items() if len(mods) != 1} == {}
    outside = [
        p
        for p in (SCRIPTS.parent).rglob("*.py")
        if p.parent != SCRIPTS and re.search(r"""\.(run|call|script)\(\s*["']""", p.read_text())
    ]
    assert outside == []


def test_a_direct_call_survives_a_flushed_script_cache_and_a_killed_connection(
    prefix: str, redis_admin: redis.Redis
) -> None:
    """Registry.call loads a script Redis has forgotten, and retries once on a fresh connection when its connection was killed."""
    name = f"{prefix}-probe"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, client_name=name)
    lua = Registry(client)
    key = f"{prefix}:probe"
    client.set(key, "v")

    def ids() -> set[str]:
        return {c["id"] for c in redis_admin.client_list() if c["name"] == name}

    assert lua.call("lease_fail", [key], ["token", "", 0, ""]) == 0  # a real script, no lease held
    redis_admin.script_flush()
    assert lua.call("lease_fail", [key], ["token", "", 0, ""]) == 0
    before = ids()
    for conn_id in before:
        redis_admin.client_kill_filter(_id=conn_id)
    assert lua.call("lease_fail", [key], ["token", "", 0, ""]) == 0
    after = ids()
    assert after and not after & before  # the call ran on a new connection
    lua.close()
    client.close()
