"""request probes and withdrawals: a forgotten request's items sealed under a per-request key, for
re-verifying later versions; jobs get a kind (unlearn | withdraw), one unlearn job per request

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_probes",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("baseline", sa.JSON(), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("shredded_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["request_id"], ["deletion_requests.id"], ondelete="CASCADE",
                                name=op.f("fk_request_probes_request_id_deletion_requests")),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_request_probes")),
    )
    op.create_index(op.f("ix_request_probes_expires_at"), "request_probes", ["expires_at"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="unlearn"))
        batch.drop_constraint("uq_jobs_request_id", type_="unique")
        batch.create_index("ix_jobs_request_id", ["request_id"], unique=False)
        batch.create_index("uq_jobs_unlearn_request_id", ["request_id"], unique=True,
                           sqlite_where=sa.text("kind = 'unlearn'"), postgresql_where=sa.text("kind = 'unlearn'"))


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind <> 'unlearn'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("uq_jobs_unlearn_request_id")
        batch.drop_index("ix_jobs_request_id")
        batch.create_unique_constraint("uq_jobs_request_id", ["request_id"])
        batch.drop_column("kind")
    op.drop_index(op.f("ix_request_probes_expires_at"), table_name="request_probes")
    op.drop_table("request_probes")
