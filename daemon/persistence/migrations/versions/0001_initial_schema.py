"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 16:22:26.940430
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "managers",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_refresh_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_full_refresh_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_refresh_error", sa.Text(), nullable=True),
        sa.Column("last_refresh_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_managers")),
        sa.UniqueConstraint("name", name=op.f("uq_managers_name")),
    )
    op.create_table(
        "flavors",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("ems_ref", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("cpus", sa.Integer(), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column(
            "extra",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_flavors_manager_id_managers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flavors")),
        sa.UniqueConstraint("manager_id", "ems_ref", name=op.f("uq_flavors_manager_id_ems_ref")),
    )
    op.create_table(
        "images",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("ems_ref", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("os", sa.String(length=100), nullable=True),
        sa.Column(
            "extra",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_images_manager_id_managers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("manager_id", "ems_ref", name=op.f("uq_images_manager_id_ems_ref")),
    )
    op.create_table(
        "refresh_runs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("targets", sa.Integer(), nullable=False),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("updated", sa.Integer(), nullable=False),
        sa.Column("archived", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "details",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_refresh_runs_manager_id_managers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refresh_runs")),
    )
    with op.batch_alter_table("refresh_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_refresh_runs_manager_id_started_at"),
            ["manager_id", "started_at"],
            unique=False,
        )

    op.create_table(
        "security_groups",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("ems_ref", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column(
            "extra",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_security_groups_manager_id_managers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_security_groups")),
        sa.UniqueConstraint(
            "manager_id", "ems_ref", name=op.f("uq_security_groups_manager_id_ems_ref")
        ),
    )
    op.create_table(
        "vms",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("ems_ref", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("state", sa.String(length=50), nullable=True),
        sa.Column("flavor_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("image_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "tags",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "extra",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["flavor_id"], ["flavors.id"], name=op.f("fk_vms_flavor_id_flavors")
        ),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_vms_image_id_images")),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_vms_manager_id_managers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vms")),
        sa.UniqueConstraint("manager_id", "ems_ref", name=op.f("uq_vms_manager_id_ems_ref")),
    )
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vms_flavor_id"), ["flavor_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_vms_image_id"), ["image_id"], unique=False)

    op.create_table(
        "disks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("vm_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_name", sa.String(length=100), nullable=False),
        sa.Column("size_gb", sa.Integer(), nullable=True),
        sa.Column(
            "extra",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_disks_manager_id_managers")
        ),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name=op.f("fk_disks_vm_id_vms")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disks")),
        sa.UniqueConstraint("vm_id", "device_name", name=op.f("uq_disks_vm_id_device_name")),
    )
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_disks_manager_id"), ["manager_id"], unique=False)

    op.create_table(
        "network_ports",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("vm_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ems_ref", sa.String(length=255), nullable=False),
        sa.Column("mac_address", sa.String(length=64), nullable=True),
        sa.Column("ip_address", sa.String(length=64), nullable=True),
        sa.Column(
            "extra",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_network_ports_manager_id_managers")
        ),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name=op.f("fk_network_ports_vm_id_vms")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_network_ports")),
        sa.UniqueConstraint("vm_id", "ems_ref", name=op.f("uq_network_ports_vm_id_ems_ref")),
    )
    with op.batch_alter_table("network_ports", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_network_ports_manager_id"), ["manager_id"], unique=False
        )

    op.create_table(
        "vm_security_groups",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "manager_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("vm_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "security_group_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["manager_id"], ["managers.id"], name=op.f("fk_vm_security_groups_manager_id_managers")
        ),
        sa.ForeignKeyConstraint(
            ["security_group_id"],
            ["security_groups.id"],
            name=op.f("fk_vm_security_groups_security_group_id_security_groups"),
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_vm_security_groups_vm_id_vms")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vm_security_groups")),
        sa.UniqueConstraint(
            "vm_id", "security_group_id", name=op.f("uq_vm_security_groups_vm_id_security_group_id")
        ),
    )
    with op.batch_alter_table("vm_security_groups", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_vm_security_groups_manager_id"), ["manager_id"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("vm_security_groups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vm_security_groups_manager_id"))

    op.drop_table("vm_security_groups")
    with op.batch_alter_table("network_ports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_network_ports_manager_id"))

    op.drop_table("network_ports")
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_disks_manager_id"))

    op.drop_table("disks")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vms_image_id"))
        batch_op.drop_index(batch_op.f("ix_vms_flavor_id"))

    op.drop_table("vms")
    op.drop_table("security_groups")
    with op.batch_alter_table("refresh_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_refresh_runs_manager_id_started_at"))

    op.drop_table("refresh_runs")
    op.drop_table("images")
    op.drop_table("flavors")
    op.drop_table("managers")
