"""cloud values as text; rejected_objects

Columns that hold values from the cloud (ids, names, states, device names,
addresses) become ``text``: a 300-character vm name is a fact of the cloud,
not an error.  On PostgreSQL ``varchar(n) -> text`` is binary coercible: no
table rewrite, no index rebuild.  SQLite does not enforce declared lengths
(a ``VARCHAR(255)`` column already stores any text), so the columns are left
as they are there (recreating the tables would only copy them).

``rejected_objects``: one row per object of a manager that could not be saved,
with the error, first/last seen and how many times; cleared once it saves.

``managers.deletions_confirmed_at``: an operator confirmed the deletions the
mass-deletion guard held; the manager's next full refresh applies its deletions
whatever their share and clears it (in the database, so any process may run it).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# (table, column, old length, nullable)
TEXT_COLUMNS = (
    ("flavors", "ems_ref", 255, False),
    ("flavors", "name", 255, True),
    ("images", "ems_ref", 255, False),
    ("images", "name", 255, True),
    ("images", "os", 100, True),
    ("security_groups", "ems_ref", 255, False),
    ("security_groups", "name", 255, True),
    ("vms", "ems_ref", 255, False),
    ("vms", "name", 255, True),
    ("vms", "state", 50, True),
    ("disks", "device_name", 100, False),
    ("network_ports", "ems_ref", 255, False),
    ("network_ports", "mac_address", 64, True),
    ("network_ports", "ip_address", 64, True),
)

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column(
        "managers", sa.Column("deletions_confirmed_at", sa.DateTime(timezone=True), nullable=True)
    )
    if op.get_bind().dialect.name == "postgresql":
        for table, column, length, nullable in TEXT_COLUMNS:
            op.alter_column(
                table,
                column,
                type_=sa.Text(),
                existing_type=sa.String(length=length),
                existing_nullable=nullable,
            )
    op.create_table(
        "rejected_objects",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("manager_id", Id, nullable=False),
        sa.Column("collection", sa.String(length=100), nullable=False),
        sa.Column("ref", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(length=100), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_rejected_objects_manager_id_managers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected_objects")),
        sa.UniqueConstraint(
            "manager_id",
            "collection",
            "ref",
            name=op.f("uq_rejected_objects_manager_id_collection_ref"),
        ),
    )


def downgrade() -> None:
    """Back to 0001.  On PostgreSQL a value longer than its old column fails the downgrade
    (nothing is truncated silently): shorten or remove such rows first."""
    op.drop_table("rejected_objects")
    op.drop_column("managers", "deletions_confirmed_at")  # SQLite >= 3.35
    if op.get_bind().dialect.name == "postgresql":
        for table, column, length, nullable in TEXT_COLUMNS:
            op.alter_column(
                table,
                column,
                type_=sa.String(length=length),
                existing_type=sa.Text(),
                existing_nullable=nullable,
            )
