"""approvals record the requester's person

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 20:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Requests held before person keys get an empty one: the service then compares their user name.
    with op.batch_alter_table("kubegate_approvals", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "requester_person", sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=""
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("kubegate_approvals", schema=None) as batch_op:
        batch_op.drop_column("requester_person")
