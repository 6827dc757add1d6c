"""Reading a warming job's rows: its query in key order, its first chunk, its keyset ranges.

A run reads its first chunk (`first`), and if there is more, streams the keys
after it (`keys_after`: a server-side cursor on PostgreSQL, an unbuffered one
on MariaDB, plain iteration on SQLite) to cut the rest into chunks of
`chunk_size` keys, each read on its own (`chunk`: `key > lo AND key <= hi`; a composite key compares
as a row value, `(a, b) > (:lo0, :lo1)`, in the order of its columns).
Rows are encoded exactly as a load encodes them (readpath.sqlload.jsonable,
codec.encode_row): binary columns as "base64:" text, so a warmed row written back
lands as it was read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Select, TextClause, bindparam, false, select, text, tuple_
from sqlalchemy import column as result_column
from sqlalchemy.engine import Result
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.selectable import TextualSelect

from cachewarden.codec import encode_row, key_text
from cachewarden.dberrors import first_line
from cachewarden.errors import InvalidKey, InvalidValue, WarmFailed
from cachewarden.readpath.sqlload import jsonable
from cachewarden.settings import EntitySettings, WarmingJob
from cachewarden.tables import EntityTable

# Keys fetched per round trip while streaming the key column.
KEYS_PER_FETCH = 10_000


@dataclass
class Chunk:
    """The encoded rows of one keyset range: (key, JSON) pairs, and what could not be cached."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # "key: problem"
    last_key: str | None = None  # the range's last key, as text


class WarmSource:
    """One job's statements on one engine."""

    def __init__(self, engine: Engine, job: WarmingJob, table: EntityTable) -> None:
        self.engine = engine
        self.job = job
        self.table = table
        self.spec: EntitySettings = table.entity
        names = self.spec.key_columns
        # The range bounds: one parameter each (lo, hi), or one per key column (lo0,
        # lo1, ...) compared as a row value, (a, b) > (:lo0, :lo1), in key order.
        self._bounds = {
            bound: (
                (bound,) if len(names) == 1 else tuple(f"{bound}{i}" for i in range(len(names)))
            )
            for bound in ("lo", "hi")
        }
        if job.query is None:
            columns = table.key_columns
            key = table.key_clause()
            lo, hi = (self._bound_clause(b) for b in ("lo", "hi"))
            base = select(table.table)
            self._first: Select[Any] | TextClause = base.order_by(*columns).limit(bindparam("n"))
            self._keys: Select[Any] | TextualSelect = (
                select(*columns).where(key > lo).order_by(*columns)
            )
            self._between: Select[Any] | TextClause = base.where(key > lo, key <= hi)
            self._after: Select[Any] | TextClause = base.where(key > lo)
            self._probe: Select[Any] | TextClause = base.where(false())
        else:
            # The job's own SQL as a derived table; the key columns' names are the
            # reflected ones, quoted by the dialect.
            quote = engine.dialect.identifier_preparer.quote
            qs = [f"cw_q.{quote(n)}" for n in names]
            order = ", ".join(qs)
            key_sql = qs[0] if len(qs) == 1 else f"({order})"
            lo_sql, hi_sql = (self._bound_sql(b) for b in ("lo", "hi"))
            sub = f"({job.query}) AS cw_q"
            self._first = text(f"SELECT * FROM {sub} ORDER BY {order} LIMIT :n")
            # Typed: SQLAlchemy 2.1 buffers an untyped text() result whole, even streamed.
            self._keys = text(
                f"SELECT {order} FROM {sub} WHERE {key_sql} > {lo_sql} ORDER BY {order}"
            ).columns(
                *(result_column(n, c.type) for n, c in zip(names, table.key_columns, strict=True))
            )
            self._between = text(
                f"SELECT * FROM {sub} WHERE {key_sql} > {lo_sql} AND {key_sql} <= {hi_sql}"
            )
            self._after = text(f"SELECT * FROM {sub} WHERE {key_sql} > {lo_sql}")
            self._probe = text(f"SELECT * FROM {sub} WHERE 1 = 0")

    def _bound_clause(self, bound: str) -> Any:
        """A range bound as a SQL expression: its parameter, or the row value of them."""
        params: list[Any] = [bindparam(name) for name in self._bounds[bound]]
        return params[0] if len(params) == 1 else tuple_(*params)

    def _bound_sql(self, bound: str) -> str:
        """A range bound in the job's own SQL: :lo, or (:lo0, :lo1)."""
        names = [f":{name}" for name in self._bounds[bound]]
        return names[0] if len(names) == 1 else f"({', '.join(names)})"

    def _params(self, bound: str, text_key: str) -> dict[str, Any]:
        """The parameters of a range bound given as key text."""
        value = self._value(text_key)
        names = self._bounds[bound]
        return {names[0]: value} if len(names) == 1 else dict(zip(names, value, strict=True))

    # -- statements --------------------------------------------------------------

    def first(self, n: int) -> tuple[Chunk, bool]:
        """The first `n` rows in key order, and whether there are more."""
        try:
            rows = self._run(self._first, {"n": n + 1})
        except WarmFailed:
            if self.job.query is not None:
                self.probe()  # a result without the key column: say that, not "no such column"
            raise
        more = len(rows[1]) > n
        return self._encode(rows[0], rows[1][:n]), more

    def chunk(self, lo: str, hi: str | None) -> Chunk:
        """The rows with `lo < key <= hi` (no upper bound when `hi` is None)."""
        params = self._params("lo", lo)
        if hi is None:
            columns, rows = self._run(self._after, params)
        else:
            columns, rows = self._run(self._between, params | self._params("hi", hi))
        return self._encode(columns, rows)

    def keys_after(self, lo: str) -> Iterator[Any]:
        """Every key after `lo`, in key order, streamed (bounded memory)."""
        try:
            with self.engine.connect() as conn:
                streaming = conn.execution_options(stream_results=True, yield_per=KEYS_PER_FETCH)
                result = streaming.execute(self._keys, self._params("lo", lo))
                composite = self.table.composite
                for partition in result.partitions():
                    for row in partition:
                        yield tuple(row) if composite else row[0]
        except SQLAlchemyError as exc:
            raise self._failed(exc) from exc

    def probe(self) -> list[str]:
        """Run the query for no rows: its columns (raises WarmFailed as a run would)."""
        return self._run(self._probe, {})[0]

    # -- helpers -----------------------------------------------------------------

    def key_of(self, value: Any) -> str:
        """A key value (a tuple of them for a composite key) as its cache key text."""
        return self.table.text_of(value)

    def _value(self, text_key: str) -> Any:
        try:
            return self.table.key_value(text_key)
        except ValueError as exc:
            raise WarmFailed(f"warming job {self.job.name!r}: {exc}") from None

    def _run(self, statement: Any, params: dict[str, Any]) -> tuple[list[str], Sequence[Any]]:
        try:
            with self.engine.connect() as conn:
                result: Result[Any] = conn.execute(statement, params)
                columns = list(result.keys())
                rows = result.all()
        except SQLAlchemyError as exc:
            raise self._failed(exc) from exc
        missing = [c for c in self.spec.key_columns if c not in columns]
        if missing:
            raise WarmFailed(
                f"warming job {self.job.name!r}: the query's result has no column "
                f"{missing[0]!r}, of the key of entity {self.spec.name!r} (it has: "
                f"{', '.join(columns)}); select it (warming.{self.job.name}.query)"
            )
        return columns, rows

    def _failed(self, exc: SQLAlchemyError) -> WarmFailed:
        return WarmFailed(
            f"warming job {self.job.name!r}: the query failed: {first_line(exc)} "
            f"(warming.{self.job.name}.query)"
        )

    def _encode(self, columns: list[str], rows: Sequence[Any]) -> Chunk:
        chunk = Chunk()
        name, limit = self.spec.name, self.spec.max_value_bytes
        out = chunk.rows
        if not self.table.composite:
            at = columns.index(self.spec.key_columns[0])
            key_at: Any = lambda row: row[at]  # noqa: E731
        else:
            ats = [columns.index(c) for c in self.spec.key_columns]
            key_at = lambda row: tuple(row[i] for i in ats)  # noqa: E731
        for row in rows:
            value = key_at(row)
            try:
                if type(value) is int:
                    key = str(value)
                elif self.table.composite:
                    key = self.table.text_of(value)
                else:
                    key = key_text(name, str(value))
                entry = jsonable(dict(zip(columns, row, strict=True)))
                out.append((key, encode_row(name, key, entry, limit)))
            except (InvalidKey, InvalidValue) as exc:
                chunk.invalid.append(str(exc))
        if rows:
            chunk.last_key = self.key_of(key_at(rows[-1]))
        return chunk
