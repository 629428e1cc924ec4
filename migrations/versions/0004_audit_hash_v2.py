"""audit chain v2: each row gets a hash_version and a salt, so a row can be shown redacted (its body hash
only) and its link still recomputes; rows already written stay version 1 and verify as before

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN on both databases: no table copy, and PostgreSQL's append-only trigger (UPDATE or
    # DELETE) does not fire, since the default fills existing rows without updating them
    op.add_column("audit_events", sa.Column("hash_version", sa.SmallInteger(), nullable=False, server_default="1"))
    op.add_column("audit_events", sa.Column("salt", sa.String(length=32), nullable=True))


def downgrade() -> None:
    written = op.get_bind().scalar(sa.text("SELECT count(*) FROM audit_events WHERE hash_version > 1"))
    if written:
        raise RuntimeError(
            f"{written} audit rows are hashed in version 2; schema 0003 cannot hold their salt, so they "
            "would no longer verify: restore a backup taken before the upgrade instead"
        )
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("salt")
        batch.drop_column("hash_version")
