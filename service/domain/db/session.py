"""Engine and session factory. SQLite runs in WAL mode with a busy timeout so the API and the worker
processes can share one file; PostgreSQL is used as is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # isolation_level=None lets us issue BEGIN IMMEDIATE ourselves (see `begin_immediate`)
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn) -> None:
    # pysqlite's own transaction handling is off (isolation_level=None): begin explicitly.
    conn.exec_driver_sql("BEGIN")


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session for code outside a request (worker, CLI). The caller commits."""
    session = get_sessionmaker(url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def write_lock(session: Session) -> None:
    """Take the database write lock now, as the first statement of a unit of work that must serialise
    (audit appends, job leases, version numbering).

    SQLite: a no-op UPDATE acquires the RESERVED lock; concurrent writers queue on busy_timeout instead of
    failing later with a stale snapshot. Call it before any read in the transaction.
    PostgreSQL: a transaction-scoped advisory lock (released on commit/rollback).
    """
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("UPDATE serving_state SET id = id WHERE id = -1")
    else:
        conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))


def ping(url: str) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))
