"""Applying a coalesced batch to the application's table, fenced, in one transaction.

The table is reflected, never declared here; the upsert is the dialect's own
(PostgreSQL and SQLite `ON CONFLICT`, MySQL/MariaDB `ON DUPLICATE KEY`).
A batch the database rejects on the rows' merits (`dberrors.Kind.ROW`) is
bisected until the bad rows stand alone; those are returned, with the
database's error, for the dead-letter stream. Any other error is a fault: it
raises, and the whole batch stays pending. So does a batch whose every row the
database refused with the same words (a trigger, a constraint every row breaks
after a migration): that is about the table, not the rows. A column the
database or the reflection does not know re-reflects the table once and tries
again, so a migration's new column is written without a restart. Each
transaction waits at most `lock_wait` for a row lock; when that runs out, the
locked rows are found (`SELECT ... FOR UPDATE SKIP LOCKED`) and set aside for
the flusher to keep pending, and the rest is applied.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, Table, and_, bindparam, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.dml import Insert

from cachewarden.codec import BINARY_FORM, binary_value
from cachewarden.database import describe, unavailable
from cachewarden.dberrors import Kind, classify, driver_text, first_line
from cachewarden.errors import BackendUnavailable, ConfigError
from cachewarden.settings import EntitySettings
from cachewarden.tables import EntityTable
from cachewarden.writebehind.coalesce import DELETE, Op
from cachewarden.writebehind.fence import Fence, fence_table
from cachewarden.writebehind.pgarrays import UnnestUpsert, build_lookup, build_unnest
from cachewarden.writebehind.pgcopy import COPY_MIN_ROWS, CopyMerge

_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]

# A batch of at least this many rows that the database refused row by row with one
# message is a fault of the table (a trigger, a migration's constraint), not of its
# rows: it waits. Fewer rows refused alike (two writes with the same mistake) are
# dead-lettered as the bad rows they most likely are.
ALIKE_ROWS = 10


@dataclass(frozen=True)
class Rejected:
    """An operation the database refused, with its error."""

    op: Op
    error: str
    # The database's whole message (None for a row refused before it reached the
    # database): a batch refused row by row with one message is a fault.
    detail: str | None = None


@dataclass(frozen=True)
class _Refusal:
    error: str
    detail: str | None


@dataclass
class Outcome:
    """What applying a batch did besides committing: rows refused, writes outranked."""

    rejected: list[Rejected] = field(default_factory=list)
    # Writes that lost to a newer version already in the database.
    stale: list[Op] = field(default_factory=list)
    # Operations on rows another transaction holds locked: not applied, still pending.
    locked: list[Op] = field(default_factory=list)

    def __add__(self, other: Outcome) -> Outcome:
        return Outcome(
            self.rejected + other.rejected, self.stale + other.stale, self.locked + other.locked
        )


class _RowProblem(Exception):
    """A row that fails before it reaches the database (unknown column, bad JSON)."""


class _UnknownColumn(_RowProblem):
    """A row carrying a column the reflected table lacks."""


class _Locked(Exception):
    """A statement's lock wait ran out: some rows of the batch are locked by others."""

    def __init__(self, error: SQLAlchemyError) -> None:
        super().__init__(first_line(error))
        self.error = error


@dataclass
class _Plan:
    """One batch sorted into the statements of its transaction."""

    # Rows to write, by their (sorted) columns: one statement per column set.
    writes: defaultdict[tuple[str, ...], list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    plain_deletes: list[Any] = field(default_factory=list)
    versioned_deletes: list[dict[str, Any]] = field(default_factory=list)
    cleared: list[Any] = field(default_factory=list)  # versioned writes after an unversioned delete
    versioned: dict[Any, Op] = field(default_factory=dict)  # key -> its versioned write


# How many times a batch is tried around the locks it met before it waits whole.
LOCK_ROUNDS = 3


class SqlSink:
    """Writes batches of one entity into its reflected table."""

    def __init__(
        self,
        engine: Engine,
        entity: EntitySettings,
        reflected: EntityTable,
        reflect_again: Callable[[], EntityTable] | None = None,
    ) -> None:
        self.engine = engine
        self.entity = entity
        self.dialect = engine.dialect.name
        # PostgreSQL through psycopg: one array parameter per column (see ArrayColumn).
        # A composite key takes the generic statements (executemany), which match rows
        # by the tuple of their key columns.
        self._fast = (
            self.dialect == "postgresql"
            and engine.dialect.driver == "psycopg"
            and not entity.composite
        )
        self._reflect_again = reflect_again
        self._batch = 0  # apply() calls so far
        self._bind(reflected)
        fence_table(engine)

    def _bind(self, reflected: EntityTable) -> None:
        """Build on `reflected` (again after a schema change): statements are per table."""
        self.reflected = reflected
        self.table = reflected.table
        self._reflected_in = self._batch
        self._statements: dict[tuple[str, ...], Insert] = {}
        self._unnests: dict[tuple[str, ...], UnnestUpsert | None] = {}
        self._lookup = build_lookup(self.engine, self.table, self.entity) if self._fast else None
        self._copy = CopyMerge(self.engine, self.table, self.entity) if self._fast else None
        self._checked: dict[tuple[str, ...], tuple[str, ...]] = {}  # JSON key order -> columns
        self._exact = _exact_columns(self.table)

    def _schema_moved(self) -> bool:
        """Re-reflect the table, once per batch; True if it was (False: it already was,
        so the column really is missing, or the table changes while we look)."""
        if self._reflect_again is None or self._reflected_in == self._batch:
            return False
        self._bind(self._reflect_again())
        return True

    # -- public ---------------------------------------------------------------

    def apply(self, ops: Sequence[Op], fence: Fence, judge_alike: bool = True) -> Outcome:
        """Apply `ops` (one per key); report the rejected and the outranked ones.

        Raises LockLost, BackendUnavailable for a fault (the database down,
        read-only or refusing us, or refusing every row alike), or ConfigError when the
        table has no unique constraint on the key, committing nothing of the failing
        transaction."""
        self._batch += 1
        outcome = self._around_locks(ops, fence)
        details = {bad.detail for bad in outcome.rejected}
        alike = judge_alike and len(ops) >= ALIKE_ROWS and len(outcome.rejected) == len(ops)
        if alike and None not in details:
            if len(details) == 1:
                raise BackendUnavailable(
                    f"the database refused every row of a batch of {len(ops)} "
                    f"{self.entity.name} writes with the same error, so the fault is the "
                    f"table's, not the rows' ({outcome.rejected[0].error}); they stay "
                    f"pending (database {describe(self.engine)})"
                )
        return outcome

    def _around_locks(self, ops: Sequence[Op], fence: Fence) -> Outcome:
        """Apply `ops`; where a lock wait runs out, set the locked rows aside and apply the
        rest (a lock taken meanwhile starts another round, LOCK_ROUNDS at most)."""
        held: list[Op] = []
        for _ in range(LOCK_ROUNDS):
            try:
                return self._apply(ops, fence) + Outcome(locked=held)
            except _Locked:
                locked = self._locked_keys(ops)
                held += [op for op in ops if op.key in locked]
                ops = [op for op in ops if op.key not in locked]
        raise BackendUnavailable(
            f"{self.entity.name}: rows of a batch stayed locked by other transactions past "
            f"{LOCK_ROUNDS} rounds of lock_wait; the batch stays pending"
        )

    def _locked_keys(self, ops: Sequence[Op]) -> set[str]:
        """The keys of `ops` whose rows another transaction holds locked right now."""
        values: dict[Any, str] = {}
        for op in ops:
            try:
                values[self.reflected.key_value(op.key)] = op.key
            except ValueError:
                continue  # not a key of this table: the batch's row errors deal with it
        if not values:
            return set()
        key_of = self.reflected.key_of_row
        found = select(*self.reflected.key_columns).where(
            self.reflected.key_clause().in_(list(values))
        )
        with self.engine.begin() as conn:
            existing = {key_of(row) for row in conn.execute(found).mappings()}
            locking = found.with_for_update(skip_locked=True)
            free = {key_of(row) for row in conn.execute(locking).mappings()}
        return {values[v] for v in existing - free}

    def _apply(self, ops: Sequence[Op], fence: Fence) -> Outcome:
        if self._fast and len(ops) > 1:
            # The array statements first; on a row error the generic path below takes
            # the whole batch and isolates the bad rows as always.
            outcome = self._attempt(ops, fence, fast=True)
            if isinstance(outcome, Outcome):
                return outcome
        refusal = self._attempt(ops, fence, fast=False)
        if isinstance(refusal, Outcome):
            return refusal
        if len(ops) == 1:
            return Outcome(rejected=[Rejected(ops[0], refusal.error, refusal.detail)])
        middle = len(ops) // 2
        return self._apply(ops[:middle], fence) + self._apply(ops[middle:], fence)

    def _attempt(self, ops: Sequence[Op], fence: Fence, fast: bool) -> Outcome | _Refusal:
        """One try at the batch: its Outcome, or the row error that refused it.

        Raises LockLost, BackendUnavailable for any fault, and ConfigError where the table
        lacks the key's unique constraint (dberrors.classify)."""
        try:
            return Outcome(stale=self._transaction(ops, fence, fast))
        except _UnknownColumn as exc:
            if self._schema_moved():
                return self._attempt(ops, fence, fast)
            return _Refusal(str(exc), None)
        except _RowProblem as exc:
            return _Refusal(str(exc), None)
        except SQLAlchemyError as exc:
            kind = classify(exc)
            if kind is Kind.LOCKED:
                raise _Locked(exc) from exc
            if kind is Kind.SCHEMA and self._schema_moved():
                return self._attempt(ops, fence, fast)
            if kind is Kind.CONFIG:
                # Not an outage and not the rows': the batch stays pending (flush backs
                # off on a ConfigError, dead-letters nothing) until the table is fixed.
                raise ConfigError(f"database {describe(self.engine)}", *self._unfit(exc)) from exc
            if kind is not Kind.ROW:
                raise unavailable(self.engine, exc) from exc
            return _Refusal(first_line(exc), driver_text(exc))
        except _UNBOUND as exc:
            # Raised bare, outside SQLAlchemy's errors, by the driver (or SQLAlchemy's
            # parameter processing) for a value it cannot take: PyMySQL's TypeError for a
            # dict, psycopg's for a str in a bytea column, a UnicodeEncodeError for a lone
            # surrogate, sqlite3's OverflowError for an integer past 64 bits. A refusal of
            # the rows like any other (bisected, dead-lettered alone); raised in
            # cachewarden's own code it is a bug, and a fault.
            if _raised_here(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
            return _Refusal(f"the database driver could not take a value ({reason})", reason)

    def _unfit(self, exc: SQLAlchemyError) -> tuple[str, str]:
        """The setting and the problem of a statement the table's shape refuses for good."""
        spec = self.entity
        return (
            f"entities.{spec.name}.key",
            f"table {spec.table!r} has no primary key or unique constraint on "
            f"({spec.key_label}) ({first_line(exc)}): add one (ALTER TABLE {spec.table} ADD "
            f"PRIMARY KEY ({spec.key_label}), or ADD UNIQUE ({spec.key_label})); the writes "
            "stay pending",
        )

    # -- the transaction ------------------------------------------------------

    def _transaction(self, ops: Sequence[Op], fence: Fence, fast: bool = False) -> list[Op]:
        """One fenced transaction; returns the keys whose write a newer version outranked."""
        plan = self._plan(ops)
        with self.engine.begin() as conn:
            self._wait_for_locks(conn)
            fence.check(conn)
            self._deletes(conn, plan.cleared, [])
            staged = [False]  # the COPY path's staging table filled in this transaction
            lost: set[Any] = set()  # keys whose COPY merge the version guard refused
            others: list[dict[str, Any]] = []  # rows the other statements wrote
            for columns, rows in plan.writes.items():
                if not self._upsert_rows(conn, columns, rows, fast, staged, lost):
                    others += rows
            self._deletes(conn, plan.plain_deletes, plan.versioned_deletes)
            versioned = plan.versioned
            stale = [op for key, op in versioned.items() if key in lost] if lost else []
            if not others or not versioned:
                return stale
            key_of = self.reflected.key_of_row
            rest: dict[Any, Op] = {}
            for row in others:
                key = key_of(row)
                write = versioned.get(key)
                if write is not None:
                    rest[key] = write
            return stale + self._outranked(conn, rest, fast)

    def _plan(self, ops: Sequence[Op]) -> _Plan:
        """Sort `ops` into the transaction's statements: each write's row decoded (its
        columns, its key converted once), each delete's key."""
        plan = _Plan()
        writes, versioned = plan.writes, plan.versioned
        names, has_version = self.entity.key_columns, self.entity.version_column is not None
        key_name = names[0] if len(names) == 1 else None  # None: a composite key
        key_type = self.reflected.key_type  # None: every key converted by key_value
        int_key = key_type is int
        scan, checked, exact = _scan, self._checked, self._exact
        for op in ops:
            if op.kind == DELETE:
                key = self._key_value(op)
                if op.version is None or op.replaces or not has_version:
                    plan.plain_deletes.append(key)
                else:
                    plan.versioned_deletes.append({"k": key, "v": op.version})
                continue
            # The row: the C scanner (without json.loads' regexes) takes a JSON object
            # whole; anything else is looked at again by _decoded. Its columns are
            # checked once per key order.
            value = op.value
            try:
                row, end = scan(value, 0)
            except (ValueError, StopIteration):
                row = end = None
            if end != len(value) or row.__class__ is not dict:
                row = self._decoded(value, row, end)
            columns = checked.get(tuple(row))
            if columns is None:
                columns = self._columns(row)
            if exact:
                self._revive(row)
            if key_name is None:
                key = self._key_value(op)
                row.update(zip(names, key, strict=True))
            else:
                key = row[key_name]
                # The row's own key (Cache.write puts it there) where it is the key
                # text's one conversion already: an int spelled as the text is, or the text.
                if key.__class__ is not key_type or (str(key) if int_key else key) != op.key:
                    key = row[key_name] = self._key_value(op)
            writes[columns].append(row)
            if op.version is not None and has_version:
                versioned[key] = op
                if op.replaces:
                    plan.cleared.append(key)
        return plan

    def _wait_for_locks(self, conn: Connection) -> None:
        """Bound how long this transaction's statements wait for a row lock (lock_wait).

        Not on SQLite: it locks the whole database, so a short busy timeout could not
        set a row aside; it would only turn each wait into a growing backoff (its
        connections keep database.py's 30 s busy timeout)."""
        ms = self.entity.write_behind.lock_wait_ms
        if self.dialect == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(ms)}")
        elif self.dialect in ("mysql", "mariadb"):
            seconds = max(1, -(-ms // 1000))  # whole seconds, at least 1
            conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {int(seconds)}")

    def _upsert_rows(
        self,
        conn: Connection,
        columns: tuple[str, ...],
        rows: list[dict[str, Any]],
        fast: bool,
        staged: list[bool],
        lost: set[Any],
    ) -> bool:
        """Write `rows`; True when the COPY path merged them (the keys its version guard
        refused are added to `lost`), False when another statement wrote them."""
        if fast:
            if self._copy is not None and len(rows) >= COPY_MIN_ROWS:
                refused = self._copy.apply(conn, columns, rows, reused=staged[0])
                if refused is not None:
                    staged[0] = True
                    lost |= refused
                    return True
            if columns not in self._unnests:
                self._unnests[columns] = build_unnest(self.engine, self.table, columns, self.entity)
            unnest = self._unnests[columns]
            params = unnest.params(rows) if unnest is not None else None
            if unnest is not None and params is not None:
                conn.exec_driver_sql(unnest.sql, params)
                return False
        conn.execute(self._upsert(columns), rows)
        return False

    def _outranked(
        self, conn: Connection, versioned: dict[Any, Op], fast: bool = False
    ) -> list[Op]:
        """Keys whose row holds a newer version than the write just applied (guard said no)."""
        if not versioned or self.entity.version_column is None:
            return []
        keys = list(versioned)
        found = self._lookup.run(conn, keys) if fast and self._lookup is not None else None
        if found is None:
            found = self._mismatched(conn, versioned)
        if found is None:
            reflected = self.reflected
            version_col = self.table.c[self.entity.version_column].label("cw_version")
            looked = select(*reflected.key_columns, version_col).where(
                reflected.key_clause().in_(keys)
            )
            found = [
                (reflected.key_of_row(row), row["cw_version"])
                for row in conn.execute(looked).mappings()
            ]
        stale = []
        for key, version in found:
            op = versioned.get(key)
            if (
                op is not None
                and op.version is not None
                and version is not None
                and version > op.version
            ):
                stale.append(op)
        return stale

    def _mismatched(self, conn: Connection, versioned: dict[Any, Op]) -> list[Any] | None:
        """MySQL/MariaDB with integer keys and versions: only the rows whose version is not
        the one just written, asked with the batch's (key, version) pairs as literals.
        The driver there decodes each result row in Python, so fetching every row's
        version back cost more than the upsert; an outranked row is the rare one.
        None where this does not apply (the plain lookup then runs)."""
        if (
            self.dialect not in ("mysql", "mariadb")
            or self.entity.version_column is None
            or self.entity.composite
        ):
            return None
        for key, op in versioned.items():
            if key.__class__ is not int or op.version.__class__ is not int:
                return None
        quote = self.engine.dialect.identifier_preparer
        k = quote.quote(self.entity.key_columns[0])
        v = quote.quote(self.entity.version_column)
        table = quote.format_table(self.table)
        if "%" in k + v + table:  # the driver formats the statement with %
            return None
        keys = ",".join(map(str, versioned))
        pairs = ",".join(f"({key},{op.version})" for key, op in versioned.items())
        sql = f"SELECT {k}, {v} FROM {table} WHERE {k} IN ({keys}) AND ({k}, {v}) NOT IN ({pairs})"
        return list(conn.exec_driver_sql(sql).all())

    def _decoded(self, value: str, row: Any, end: int | None) -> dict[str, Any]:
        """The row of a buffered value the scanner did not take whole as an object (`row`
        and `end` are what it returned; `end` None: it raised): surrounding whitespace
        or trailing junk go to json.loads; what is not a JSON object is refused."""
        if end is not None and end != len(value):
            try:
                row = json.loads(value)
            except ValueError:
                end = None
        if end is None:
            raise _RowProblem(f"the buffered value is not JSON: {value[:60]!r}")
        if not isinstance(row, dict):
            raise _RowProblem(f"the buffered value is not a JSON object: {value[:60]!r}")
        return row

    def _columns(self, row: dict[str, Any]) -> tuple[str, ...]:
        """A row's columns, sorted (the upsert statement's cache key), after checking that
        the table has each and the row has the key; remembered per key order."""
        unknown = [c for c in row if c not in self.table.c]
        if unknown:
            raise _UnknownColumn(
                f"column {unknown[0]!r} is not in table {self.table.name!r} (reflected "
                "again to be sure); fix the writer or add the column, then replay "
                "the dead letter"
            )
        missing = [c for c in self.entity.key_columns if c not in row]
        if missing:
            raise _RowProblem(
                f"the row has no {missing[0]!r} (a key column); writers must "
                "include it, as Cache.write does"
            )
        names = tuple(row)
        columns = tuple(sorted(names))
        if len(self._checked) < 1024:
            self._checked[names] = columns
        return columns

    def _revive(self, row: dict[str, Any]) -> None:
        """Turn the exact text of decimals, dates, times, UUIDs and binary values (codec)
        back into the column's type."""
        for column, parse in self._exact.items():
            value = row.get(column)
            if isinstance(value, str):
                try:
                    row[column] = parse(value)
                except (ValueError, ArithmeticError):
                    raise _RowProblem(self._unreadable(column, value, parse)) from None
            elif parse is binary_value and value is not None:
                raise _RowProblem(self._unreadable(column, value, parse))

    def _unreadable(self, column: str, value: Any, parse: Callable[[str], Any]) -> str:
        """Why `value` of `column` cannot be what the column holds, and the form it needs."""
        shown = repr(value[:60]) if isinstance(value, str) else repr(value)[:60]
        where = f"column {column!r} of table {self.table.name!r}"
        if parse is binary_value:
            return (
                f"{where} is binary and holds {shown}, which is not {BINARY_FORM} "
                "(see codec; Cache.write encodes bytes so, and loads give them so)"
            )
        kind = parse.__qualname__.split(".")[0]
        return (
            f"{where} holds {shown}, which is not a {kind} "
            "(see codec: ISO 8601 text, a Decimal's digits)"
        )

    def _key_value(self, op: Op) -> Any:
        try:
            return self.reflected.key_value(op.key)
        except ValueError as exc:
            raise _RowProblem(str(exc)) from None

    def _deletes(self, conn: Connection, keys: list[Any], versioned: list[dict[str, Any]]) -> None:
        """Delete the rows of `keys`, and of each {"k": key, "v": version} whose row holds
        that version or an older one."""
        reflected = self.reflected
        if keys:
            conn.execute(self.table.delete().where(reflected.key_clause().in_(keys)))
        if versioned and self.entity.version_column is not None:
            version_col = self.table.c[self.entity.version_column]
            columns = reflected.key_columns
            if len(columns) == 1:
                match = columns[0] == bindparam("k")
            else:  # one parameter per key column: k0, k1, ...
                match = and_(*(c == bindparam(f"k{i}") for i, c in enumerate(columns)))
                versioned = [
                    {"v": d["v"]} | {f"k{i}": part for i, part in enumerate(d["k"])}
                    for d in versioned
                ]
            stmt = self.table.delete().where(and_(match, version_col <= bindparam("v")))
            conn.execute(stmt, versioned)

    def _upsert(self, columns: tuple[str, ...]) -> Insert:
        stmt = self._statements.get(columns)
        if stmt is None:
            stmt = _build_upsert(self.dialect, self.table, columns, self.entity)
            self._statements[columns] = stmt
        return stmt


_PARSERS: dict[type, Callable[[str], Any]] = {
    Decimal: Decimal,
    datetime.datetime: datetime.datetime.fromisoformat,
    datetime.date: datetime.date.fromisoformat,
    datetime.time: datetime.time.fromisoformat,
    uuid.UUID: uuid.UUID,
    bytes: binary_value,  # bytea, BLOB, VARBINARY, BINARY: "base64:" text
}

# What a driver raises bare, outside SQLAlchemy's errors, for a value it cannot bind.
_UNBOUND = (TypeError, ValueError, ArithmeticError)


def _raised_here(exc: BaseException) -> bool:
    """True when `exc` was raised in cachewarden's own code (its innermost frame), not in
    the driver or SQLAlchemy that it called."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return isinstance(module, str) and module.split(".")[0] == "cachewarden"


def _exact_columns(table: Table) -> dict[str, Callable[[str], Any]]:
    """The table's columns whose values travel as exact text (codec), with their parsers:
    decimals, dates, times, UUIDs, and binary columns (a python_type of bytes)."""
    found: dict[str, Callable[[str], Any]] = {}
    for column in table.c:
        try:
            python_type = column.type.python_type
        except NotImplementedError:
            continue
        parse = _PARSERS.get(python_type)
        if parse is not None:
            found[column.name] = parse
    return found


def _build_upsert(
    dialect: str, table: Table, columns: tuple[str, ...], entity: EntitySettings
) -> Insert:
    keys, version = entity.key_columns, entity.version_column
    updated = [c for c in columns if c not in keys]
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt: Any = pg_insert(table) if dialect == "postgresql" else sqlite_insert(table)
        if not updated:
            done: Insert = stmt.on_conflict_do_nothing(index_elements=[table.c[k] for k in keys])
            return done
        where = None
        if version is not None and version in columns:
            where = table.c[version] <= stmt.excluded[version]
        upsert: Insert = stmt.on_conflict_do_update(
            index_elements=[table.c[k] for k in keys],
            set_={c: stmt.excluded[c] for c in updated},
            where=where,
        )
        return upsert
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert as mysql_insert

        mstmt = mysql_insert(table)
        new = mstmt.inserted
        if version is not None and version in columns:
            # MySQL assigns left to right: the version column must be assigned last,
            # so every guard compares against the old version.
            guard = table.c[version] <= new[version]
            ordered = [c for c in updated if c != version] + [version]
            return mstmt.on_duplicate_key_update(
                [(c, func.if_(guard, new[c], table.c[c])) for c in ordered]
            )
        if not updated:
            return mstmt.prefix_with("IGNORE")
        return mstmt.on_duplicate_key_update([(c, new[c]) for c in updated])
    raise ConfigError("database.url", "dialect", f"{dialect!r} has no upsert support here")
