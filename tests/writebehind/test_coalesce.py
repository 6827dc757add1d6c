"""Coalescing a batch of buffered writes (pure code, checked against a model with hypothesis).

The rule, derived from `supersedes()`: folding a key's operations in stream order,
an operation replaces the current survivor when either of them has no version, or
when its version is at least the survivor's. So for one key:

* if its last operation has no version, that operation survives;
* otherwise the survivor is the LAST operation with the HIGHEST version among the
  operations that follow the key's last unversioned one (all of them if there is none).

Survivors come out in the stream order of the surviving operations themselves.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from cachewarden.writebehind.coalesce import DELETE, WRITE, Op, coalesce, supersedes

KEYS = st.sampled_from(["a", "b", "c", "d"])
VERSIONS = st.one_of(st.none(), st.integers(min_value=0, max_value=5))


@st.composite
def streams(draw: st.DrawFn, versions: st.SearchStrategy[int | None] = VERSIONS) -> list[Op]:
    """A stream of operations with increasing ids, few keys and colliding versions."""
    specs = draw(st.lists(st.tuples(KEYS, st.sampled_from([WRITE, DELETE]), versions), max_size=40))
    return [
        Op(
            id=f"{1000 + i}-0",
            kind=kind,
            key=key,
            value="null" if kind == DELETE else f'{{"i":{i}}}',
            version=version,
        )
        for i, (key, kind, version) in enumerate(specs)
    ]


def _position(op: Op) -> int:
    return int(op.id.split("-")[0])


def model(ops: list[Op]) -> dict[str, Op]:
    """The survivor of each key, by the rule stated in the module docstring."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    survivors: dict[str, Op] = {}
    for key, seq in by_key.items():
        last_unversioned = max((i for i, op in enumerate(seq) if op.version is None), default=-1)
        if last_unversioned == len(seq) - 1:
            survivors[key] = seq[-1]
            continue
        tail = seq[last_unversioned + 1 :]
        top = max(op.version for op in tail if op.version is not None)
        survivors[key] = [op for op in tail if op.version == top][-1]
    for key, op in survivors.items():
        before = by_key[key][: by_key[key].index(op)]
        if any(o.kind == DELETE and o.version is None for o in before):
            survivors[key] = replace(op, replaces=True)
    return survivors


@given(streams())
def test_one_operation_per_key(ops: list[Op]) -> None:
    """Every key of the batch keeps exactly one operation, and no other key appears."""
    out = coalesce(ops)
    assert len(out) == len({op.key for op in out})
    assert {op.key for op in out} == {op.key for op in ops}


@given(streams())
def test_survivors_are_input_operations(ops: list[Op]) -> None:
    """Coalescing only selects operations (at most marking one `replaces`); it never invents one."""
    out = coalesce(ops)
    assert all(any(replace(op, replaces=False) == o for o in ops) for op in out)


@given(streams())
def test_survivor_matches_model(ops: list[Op]) -> None:
    """Each key's survivor is the one the documented rule picks."""
    assert {op.key: op for op in coalesce(ops)} == model(ops)


@given(streams(versions=st.none()))
def test_unversioned_last_operation_wins(ops: list[Op]) -> None:
    """Without versions the survivor of a key is its last operation in stream order."""
    last = {op.key: op for op in ops}
    assert {op.key: replace(op, replaces=False) for op in coalesce(ops)} == last


@given(streams(versions=st.integers(min_value=0, max_value=5)))
def test_versioned_highest_version_wins(ops: list[Op]) -> None:
    """With every operation versioned, a key keeps its highest version, the later one on a tie."""
    for op in coalesce(ops):
        mine = [o for o in ops if o.key == op.key]
        assert op.version == max(o.version for o in mine if o.version is not None)
        assert op is [o for o in mine if o.version == op.version][-1]


@given(streams())
def test_survivors_keep_stream_order(ops: list[Op]) -> None:
    """Survivors come out in the stream order of the surviving operations."""
    positions = [_position(op) for op in coalesce(ops)]
    assert positions == sorted(positions)


@given(streams())
def test_coalescing_is_idempotent(ops: list[Op]) -> None:
    """Coalescing a coalesced batch changes nothing (a replayed batch coalesces the same)."""
    once = coalesce(ops)
    assert coalesce(once) == once


@given(streams(versions=st.integers(min_value=0, max_value=5)), st.integers(0, 40))
def test_versioned_split_batches_agree(ops: list[Op], cut: int) -> None:
    """With versions on every operation, coalescing two halves then the survivors equals one pass."""
    halves = coalesce(coalesce(ops[:cut]) + coalesce(ops[cut:]))
    assert {op.key: op for op in halves} == {op.key: op for op in coalesce(ops)}


@given(streams(versions=st.none()), st.integers(0, 40))
def test_unversioned_split_batches_agree(ops: list[Op], cut: int) -> None:
    """Without versions, coalescing two halves then the survivors equals one pass."""
    halves = coalesce(coalesce(ops[:cut]) + coalesce(ops[cut:]))
    assert {op.key: op for op in halves} == {op.key: op for op in coalesce(ops)}


def test_lower_version_after_higher_is_dropped() -> None:
    """A write delivered out of order (version 1 after version 2) does not replace version 2."""
    v2 = Op("1-0", WRITE, "k", '{"n":2}', 2)
    v1 = Op("2-0", WRITE, "k", '{"n":1}', 1)
    assert coalesce([v2, v1]) == [v2]
    assert not supersedes(v1, v2)
    assert supersedes(v2, v1)


def test_equal_versions_later_wins() -> None:
    """Two operations with the same version: the later in stream order wins."""
    first = Op("1-0", WRITE, "k", '{"n":1}', 3)
    second = Op("2-0", DELETE, "k", "null", 3)
    assert coalesce([first, second]) == [second]


def test_delete_and_write_last_wins() -> None:
    """Unversioned, a delete after a write wins, and a write after a delete wins."""
    w = Op("1-0", WRITE, "k", '{"n":1}')
    d = Op("2-0", DELETE, "k", "null")
    assert coalesce([w, d]) == [d]
    assert coalesce([d, w]) == [replace(w, replaces=True)]


def test_write_after_unversioned_delete_is_not_judged_by_the_deleted_version() -> None:
    """A versioned write after an unversioned delete is marked to apply unguarded."""
    d = Op("1-0", DELETE, "k", "null")
    mid = Op("2-0", DELETE, "k", "null", 3)
    w = Op("3-0", WRITE, "k", '{"n":1}', 1)
    assert coalesce([d, w]) == [replace(w, replaces=True)]
    # A delete at version 3 outranks the write at version 1; it still clears unguarded.
    assert coalesce([d, mid, w]) == [replace(mid, replaces=True)]
    w4 = Op("4-0", WRITE, "k", '{"n":4}', 4)
    assert coalesce([d, mid, w4]) == [replace(w4, replaces=True)]
    assert coalesce([Op("0-1", WRITE, "k", "{}", 9), w]) == [Op("0-1", WRITE, "k", "{}", 9)]


def test_survivor_order_follows_the_surviving_operation() -> None:
    """A key whose later low-version write is dropped keeps its place in the output order."""
    a5 = Op("1-0", WRITE, "a", "{}", 5)
    b = Op("2-0", WRITE, "b", "{}", 1)
    a3 = Op("3-0", WRITE, "a", "{}", 3)
    assert coalesce([a5, b, a3]) == [a5, b]


def test_from_fields_reads_stream_entry() -> None:
    """A stream entry's fields o, k, v and n become an Op; a missing or empty n is no version."""
    assert Op.from_fields("5-1", {"o": "w", "k": "42", "v": "{}", "n": "7"}) == Op(
        "5-1", WRITE, "42", "{}", 7
    )
    assert Op.from_fields("5-2", {"o": "d", "k": "42", "v": "null"}).version is None
    assert Op.from_fields("5-3", {"o": "d", "k": "42", "v": "null", "n": ""}).version is None


def test_empty_batch() -> None:
    """An empty batch coalesces to nothing."""
    assert coalesce([]) == []
