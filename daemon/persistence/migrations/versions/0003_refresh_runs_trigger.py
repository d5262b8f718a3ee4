"""refresh_runs.trigger: why each refresh ran

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 13:45:00

``scheduled``, ``startup``, ``event``, ``manual`` or ``escalated``
(daemon.model.targets.Trigger); NULL for runs recorded before this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("refresh_runs") as batch:
        batch.add_column(sa.Column("trigger", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("refresh_runs") as batch:
        batch.drop_column("trigger")
