"""Alembic migrations (SQLite and PostgreSQL). Run with `unlearn migrate` or on `unlearn serve` start."""
