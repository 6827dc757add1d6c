"""Fencing tokens checked inside the flush transaction.

Each shard lock comes with a token from a Redis counter that only grows. The
database keeps, per shard, the highest token that committed; a transaction
whose token is lower finds no row to update and rolls back (LockLost). The row
lock taken by that UPDATE also orders two flushers racing on one shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    bindparam,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from cachewarden.database import unavailable
from cachewarden.errors import LockLost

FENCE_TABLE = "cachewarden_fence"
_metadata = MetaData()
_fence = Table(
    FENCE_TABLE,
    _metadata,
    Column("name", String(255), primary_key=True),
    Column("token", BigInteger, nullable=False),
)
_created: set[str] = set()
# Built once: a statement built per batch cost ~90 us of SQLAlchemy work on each.
_check = (
    update(_fence)
    .where(_fence.c.name == bindparam("b_name"), _fence.c.token <= bindparam("b_token"))
    .values(token=bindparam("b_new_token"))
)


def fence_table(engine: Engine) -> Table:
    """The fence table, created on first use in the application's database."""
    url = str(engine.url)
    if url not in _created:
        try:
            _metadata.create_all(engine, checkfirst=True)
        except DBAPIError:
            # Two processes raced to create it (the loser's CREATE fails): check again;
            # a real database problem fails again and propagates.
            _metadata.create_all(engine, checkfirst=True)
        _created.add(url)
    return _fence


@dataclass(frozen=True)
class Fence:
    """The fencing token one flusher holds for one shard."""

    name: str
    token: int

    def check(self, conn: Connection) -> None:
        """Record our token for the shard, or raise LockLost if a newer one committed."""
        result = conn.execute(
            _check, {"b_name": self.name, "b_token": self.token, "b_new_token": self.token}
        )
        if result.rowcount != 1:
            raise LockLost(
                f"flush of {self.name} fenced off: a flusher with a newer token than "
                f"{self.token} has committed; this batch is left to it"
            )


def committed_token(engine: Engine, name: str) -> int:
    """The highest token committed for `name`, creating its row (at 0) if missing.

    Raises BackendUnavailable when the database cannot be reached (the flusher backs off).
    """
    try:
        return _committed_token(engine, name)
    except SQLAlchemyError as exc:
        raise unavailable(engine, exc) from exc


def _committed_token(engine: Engine, name: str) -> int:
    fence_table(engine)
    with engine.begin() as conn:
        token = conn.execute(select(_fence.c.token).where(_fence.c.name == name)).scalar()
        if token is not None:
            return int(token)
    try:
        with engine.begin() as conn:
            conn.execute(_fence.insert().values(name=name, token=0))
    except IntegrityError:
        pass
    return 0
