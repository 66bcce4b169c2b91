"""login tickets signed with a shared key

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 03:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The HMAC key of login tickets, shared by the replicas (a login starts stateless; see plugins/login).
    op.create_table(
        "kubegate_login_keys",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("kubegate_login_keys")
