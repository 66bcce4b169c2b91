"""approvals bind the media type and keep the whole body

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OLD_PREVIEW_CHARS = 1024  # what records kept of a body before: its first 1024 characters, cut unmarked

approvals = sa.table(
    "kubegate_approvals", sa.column("body", sa.String), sa.column("body_truncated", sa.Boolean)
)


def upgrade() -> None:
    # `media_type` stays NULL on older records: they were held without it, so they bind no media type and
    # cannot be approved (their intent hash matches no request now either). The preview becomes `body`;
    # where it may have been cut, `body_truncated` says so (and those cannot be approved either).
    with op.batch_alter_table("kubegate_approvals", schema=None) as batch_op:
        batch_op.alter_column("body_preview", new_column_name="body", existing_type=sa.String(),
                              existing_nullable=False)  # fmt: skip
        batch_op.add_column(sa.Column("media_type", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(
            sa.Column("body_truncated", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(
        approvals.update()
        .where(sa.func.length(approvals.c.body) >= OLD_PREVIEW_CHARS)
        .values(body_truncated=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("kubegate_approvals", schema=None) as batch_op:
        batch_op.drop_column("body_truncated")
        batch_op.drop_column("media_type")
        batch_op.alter_column("body", new_column_name="body_preview", existing_type=sa.String(),
                              existing_nullable=False)  # fmt: skip
