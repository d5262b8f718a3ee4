"""manager ownership: owner, owner_since, owner_epoch on managers (issue 12)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 13:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("managers") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("owner_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("owner_epoch", sa.BigInteger(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): a batch "move and copy" of
    # managers would drop a table the inventory tables' foreign keys point at
    op.drop_column("managers", "owner_epoch")
    op.drop_column("managers", "owner_since")
    op.drop_column("managers", "owner")
