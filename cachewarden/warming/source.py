"""Reading a warming job's rows: its query in key order, its first chunk, its keyset ranges.

A run reads its first chunk (`first`), and if there is more, streams the keys
after it (`keys_after`: a server-side cursor on PostgreSQL, an unbuffered one
on MariaDB, plain iteration on SQLite) to cut the rest into chunks of
`chunk_size` keys, each read on its own (`chunk`: `key > lo AND key <= hi`).
Rows are encoded exactly as a load encodes them (readpath.sqlload.jsonable,
codec.encode_row): binary columns as "base64:" text, so a warmed row written back
lands as it was read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Select, TextClause, bindparam, false, select, text
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
        key = self.spec.key
        if job.query is None:
            column = table.key_column
            base = select(table.table)
            self._first: Select[Any] | TextClause = base.order_by(column).limit(bindparam("n"))
            self._keys: Select[Any] | TextualSelect = (
                select(column).where(column > bindparam("lo")).order_by(column)
            )
            self._between: Select[Any] | TextClause = base.where(
                column > bindparam("lo"), column <= bindparam("hi")
            )
            self._after: Select[Any] | TextClause = base.where(column > bindparam("lo"))
            self._probe: Select[Any] | TextClause = base.where(false())
        else:
            # The job's own SQL as a derived table; the key column's name is the
            # reflected one, quoted by the dialect.
            q = engine.dialect.identifier_preparer.quote(key)
            sub = f"({job.query}) AS cw_q"
            self._first = text(f"SELECT * FROM {sub} ORDER BY cw_q.{q} LIMIT :n")
            # Typed: SQLAlchemy 2.1 buffers an untyped text() result whole, even streamed.
            self._keys = text(
                f"SELECT cw_q.{q} FROM {sub} WHERE cw_q.{q} > :lo ORDER BY cw_q.{q}"
            ).columns(result_column(key, table.key_column.type))
            self._between = text(f"SELECT * FROM {sub} WHERE cw_q.{q} > :lo AND cw_q.{q} <= :hi")
            self._after = text(f"SELECT * FROM {sub} WHERE cw_q.{q} > :lo")
            self._probe = text(f"SELECT * FROM {sub} WHERE 1 = 0")

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
        params = {"lo": self._value(lo)}
        if hi is None:
            columns, rows = self._run(self._after, params)
        else:
            columns, rows = self._run(self._between, params | {"hi": self._value(hi)})
        return self._encode(columns, rows)

    def keys_after(self, lo: str) -> Iterator[Any]:
        """Every key after `lo`, in key order, streamed (bounded memory)."""
        try:
            with self.engine.connect() as conn:
                streaming = conn.execution_options(stream_results=True, yield_per=KEYS_PER_FETCH)
                result = streaming.execute(self._keys, {"lo": self._value(lo)})
                for partition in result.partitions():
                    for (value,) in partition:
                        yield value
        except SQLAlchemyError as exc:
            raise self._failed(exc) from exc

    def probe(self) -> list[str]:
        """Run the query for no rows: its columns (raises WarmFailed as a run would)."""
        return self._run(self._probe, {})[0]

    # -- helpers -----------------------------------------------------------------

    def key_of(self, value: Any) -> str:
        """A key column value as its cache key text."""
        return str(value) if type(value) is int else key_text(self.spec.name, str(value))

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
        if self.spec.key not in columns:
            raise WarmFailed(
                f"warming job {self.job.name!r}: the query's result has no column "
                f"{self.spec.key!r}, the key of entity {self.spec.name!r} (it has: "
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
        at = columns.index(self.spec.key)
        name, limit = self.spec.name, self.spec.max_value_bytes
        out = chunk.rows
        for row in rows:
            value = row[at]
            try:
                key = str(value) if type(value) is int else key_text(name, str(value))
                entry = jsonable(dict(zip(columns, row, strict=True)))
                out.append((key, encode_row(name, key, entry, limit)))
            except (InvalidKey, InvalidValue) as exc:
                chunk.invalid.append(str(exc))
        if rows:
            chunk.last_key = self.key_of(rows[-1][at])
        return chunk
