"""The relational schema: the public contract users query.

Flow: ... -> parser -> persister -> **tables**.

Top-level collections (``vms``, ``images``, ``flavors``, ``security_groups``)
are unique on ``(manager_id, ems_ref)`` and are archived (``archived_at``),
never deleted, so a row keeps its id for life.  Children of vms (``disks``,
``network_ports``, ``vm_security_groups``) are unique within their vm and are
destroyed when the cloud no longer has them.  Values that come from the cloud
are ``text`` (no length limit: PostgreSQL ``text`` costs nothing over
``varchar(n)``).  ``refresh_runs`` is the audit trail: one row per refresh.
``rejected_objects`` lists the objects of a manager that could not be saved
(one row per object, cleared once it saves).  Alembic migrations in
``daemon/persistence/migrations`` create exactly these tables; a test keeps the two in step.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
Timestamp = DateTime(timezone=True)


def _id() -> Column[int]:
    return Column("id", Id, primary_key=True, autoincrement=True)


def _manager_id() -> Column[int]:
    return Column("manager_id", Id, ForeignKey("managers.id"), nullable=False)


def _stamps(*, archive: bool) -> list[Column[object]]:
    cols: list[Column[object]] = [
        Column("created_at", Timestamp, nullable=False),
        Column("updated_at", Timestamp, nullable=False),
    ]
    if archive:
        cols.append(Column("archived_at", Timestamp, nullable=True))
    return cols


managers = Table(
    "managers",
    metadata,
    _id(),
    Column("name", String(200), nullable=False, unique=True),
    Column("provider", String(100), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("last_refresh_at", Timestamp),
    Column("last_full_refresh_at", Timestamp),
    Column("last_refresh_error", Text),
    Column("last_refresh_error_at", Timestamp),
    Column("deletions_confirmed_at", Timestamp),
    # the process that took the manager last (daemon/pipeline/ownership.py), and the fencing epoch
    Column("owner", String(255)),
    Column("owner_since", Timestamp),
    Column("owner_epoch", BigInteger, nullable=False, server_default="0"),
)


def _top_level(name: str, *columns: Column[object]) -> Table:
    return Table(
        name,
        metadata,
        _id(),
        _manager_id(),
        Column("ems_ref", Text, nullable=False),
        Column("name", Text),
        *columns,
        Column("extra", Json),
        *_stamps(archive=True),
        UniqueConstraint("manager_id", "ems_ref"),
    )


flavors = _top_level(
    "flavors",
    Column("cpus", Integer),
    Column("memory_mb", Integer),
)
images = _top_level("images", Column("os", Text))
security_groups = _top_level("security_groups")
vms = _top_level(
    "vms",
    Column("state", Text),
    Column("flavor_id", Id, ForeignKey("flavors.id"), index=True),
    Column("image_id", Id, ForeignKey("images.id"), index=True),
    Column("tags", Json),
)


def _child(name: str, *columns: Column[object], unique: tuple[str, ...]) -> Table:
    # manager_id has no foreign key of its own: vm_id -> vms.id -> managers.id implies it
    # (migration 0002 dropped it: a trigger call per inserted row, no gain)
    return Table(
        name,
        metadata,
        _id(),
        Column("manager_id", Id, nullable=False),
        Column("vm_id", Id, ForeignKey("vms.id"), nullable=False),
        *columns,
        *_stamps(archive=False),
        UniqueConstraint("vm_id", *unique),
        Index(None, "manager_id"),
    )


disks = _child(
    "disks",
    Column("device_name", Text, nullable=False),
    Column("size_gb", Integer),
    Column("extra", Json),
    unique=("device_name",),
)
network_ports = _child(
    "network_ports",
    Column("ems_ref", Text, nullable=False),
    Column("mac_address", Text),
    Column("ip_address", Text),
    Column("extra", Json),
    unique=("ems_ref",),
)
vm_security_groups = _child(
    "vm_security_groups",
    Column("security_group_id", Id, ForeignKey("security_groups.id"), nullable=False),
    unique=("security_group_id",),
)

refresh_runs = Table(
    "refresh_runs",
    metadata,
    _id(),
    _manager_id(),
    Column("kind", String(20), nullable=False),
    Column("trigger", String(20)),
    Column("targets", Integer, nullable=False),
    Column("created", Integer, nullable=False),
    Column("updated", Integer, nullable=False),
    Column("archived", Integer, nullable=False),
    Column("deleted", Integer, nullable=False),
    Column("started_at", Timestamp, nullable=False),
    Column("duration", Float, nullable=False),
    Column("error", Text),
    Column("details", Json),
    Index(None, "manager_id", "started_at"),
)

rejected_objects = Table(
    "rejected_objects",
    metadata,
    _id(),
    _manager_id(),
    Column("collection", String(100), nullable=False),
    Column("ref", Text, nullable=False),
    Column("reason", String(100), nullable=False),
    Column("error", Text, nullable=False),
    Column("first_seen", Timestamp, nullable=False),
    Column("last_seen", Timestamp, nullable=False),
    Column("count", Integer, nullable=False),
    UniqueConstraint("manager_id", "collection", "ref"),
)
