"""child tables: drop the redundant manager_id foreign keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 13:10:00

``disks``, ``network_ports`` and ``vm_security_groups`` belong to a vm, and the
vm belongs to its manager (``vm_id -> vms.id``, ``vms.manager_id -> managers.id``),
so their own ``manager_id -> managers.id`` foreign key checks nothing the parent's
does not, yet costs a trigger call per inserted row (about 15% of a child insert,
bench/RESULTS.md).  The column and its index stay: full-refresh scopes and status
queries select children by ``manager_id``.  Downgrade adds the constraints back.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CHILD_TABLES = ("disks", "network_ports", "vm_security_groups")


def upgrade() -> None:
    for table in CHILD_TABLES:
        # batch mode: SQLite cannot drop a constraint in place, it recreates the table
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(f"fk_{table}_manager_id_managers", type_="foreignkey")


def downgrade() -> None:
    for table in CHILD_TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.create_foreign_key(
                f"fk_{table}_manager_id_managers", "managers", ["manager_id"], ["id"]
            )
