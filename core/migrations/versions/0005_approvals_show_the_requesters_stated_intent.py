"""approvals show the requester's stated intent

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 05:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The reason a caller stated (`Kubegate-Intent`, an MCP tool's `reason`), masked; empty on older requests.
    with op.batch_alter_table("kubegate_approvals", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("intent", sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("kubegate_approvals", schema=None) as batch_op:
        batch_op.drop_column("intent")
