"""Managers and their runs: the manager registry, ``refresh_runs`` of saved and failed refreshes.

Flow: persister -> **runs** (manager ids; a refresh's outcome) -> ``managers``, ``refresh_runs``.

A saved refresh is recorded in its own transaction (:func:`record_run`); a failed
one in a transaction of its own (:class:`FailureLog`), kept in memory while the
database cannot take it (it is away: that is often why the refresh failed).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Insert, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from daemon.model.targets import Trigger
from daemon.persistence import schema
from daemon.persistence.dialect import Writer
from daemon.persistence.refresh_result import Counts, RefreshKind, RefreshResult

log = logging.getLogger(__name__)

UNRECORDED_MAX = 10_000
"""Failed refreshes kept in memory while the database cannot record them."""


class Managers:
    """The ids of the managers of one database (``managers`` rows), created on first use."""

    def __init__(self, writer: Writer, now: Callable[[], datetime]) -> None:
        self._writer = writer
        self._now = now
        self._ids: dict[str, int] = {}

    def get(self, name: str) -> int | None:
        """The id of ``name``, None when :meth:`ensure` was not called for it."""
        return self._ids.get(name)

    def id_of(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise LookupError(f"manager {name!r}: call ensure_manager() first") from None

    async def ensure(self, name: str, provider: str) -> int:
        """The id of manager ``name``, creating its row on first use (several processes
        starting together may race to create it: the loser reads the winner's row)."""
        if name in self._ids:
            return self._ids[name]
        try:
            return await self._ensure(name, provider)
        except IntegrityError:
            log.debug("manager %s: created by another process meanwhile", name)
            return await self._ensure(name, provider)

    async def _ensure(self, name: str, provider: str) -> int:
        m = schema.managers
        async with self._writer.begin() as conn:
            row = (await conn.execute(select(m.c.id, m.c.provider).where(m.c.name == name))).first()
            if row is None:
                now = self._now()
                manager_id = (
                    await conn.execute(
                        insert(m)
                        .values(name=name, provider=provider, created_at=now, updated_at=now)
                        .returning(m.c.id)
                    )
                ).scalar_one()
            else:
                manager_id = int(row.id)
                if row.provider != provider:
                    await conn.execute(
                        update(m).where(m.c.id == manager_id).values(provider=provider)
                    )
        self._ids[name] = int(manager_id)
        return int(manager_id)


async def record_run(
    conn: AsyncConnection,
    manager_id: int,
    result: RefreshResult,
    *,
    now: datetime,
    spend_confirmation: bool = False,
) -> None:
    """The ``refresh_runs`` row of a saved refresh and the manager's status (its transaction)."""
    await conn.execute(
        _run_row(manager_id, result, counts=result.total, details=result.run_details())
    )
    values: dict[str, Any] = {
        "last_refresh_at": now,
        "last_refresh_error": None,
        "last_refresh_error_at": None,
        "updated_at": now,
    }
    if result.kind.full:
        values["last_full_refresh_at"] = now
    if spend_confirmation:  # the confirmed deletions were applied: spent
        values["deletions_confirmed_at"] = None
    m = schema.managers
    await conn.execute(update(m).where(m.c.id == manager_id).values(**values))


class _Run(Protocol):
    """What ``refresh_runs`` records of any refresh, saved or failed."""

    @property
    def kind(self) -> RefreshKind: ...
    @property
    def trigger(self) -> Trigger: ...
    @property
    def targets(self) -> int: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def duration(self) -> float: ...


def _run_row(
    manager_id: int,
    run: _Run,
    *,
    counts: Counts | None = None,
    error: str | None = None,
    details: dict[str, dict[str, int]] | None = None,
) -> Insert:
    """The ``refresh_runs`` insert of ``run``: a saved one's ``counts`` and ``details``,
    a failed one's ``error`` (no counts: zeros; no ``details``: the column stays SQL
    NULL, not a JSON null)."""
    counts = counts if counts is not None else Counts()
    optional = {"details": details} if details is not None else {}
    return insert(schema.refresh_runs).values(
        manager_id=manager_id,
        kind=run.kind.value,
        trigger=run.trigger.value,
        targets=run.targets,
        created=counts.created,
        updated=counts.updated,
        archived=counts.archived,
        deleted=counts.deleted,
        started_at=run.started_at,
        duration=run.duration,
        error=error,
        **optional,
    )


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed refresh, as ``refresh_runs`` records it."""

    manager: str
    manager_id: int
    kind: RefreshKind
    targets: int
    started_at: datetime
    duration: float
    message: str
    at: datetime
    trigger: Trigger


class FailureLog:
    """Records failed refreshes; keeps those the database cannot take for later."""

    def __init__(self, writer: Writer, now: Callable[[], datetime]) -> None:
        self._writer = writer
        self._now = now
        self._unrecorded: deque[_Failure] = deque(maxlen=UNRECORDED_MAX)

    async def record(
        self,
        manager: str,
        manager_id: int,
        *,
        kind: RefreshKind,
        targets: int,
        started_at: datetime,
        duration: float,
        error: BaseException,
        trigger: Trigger,
    ) -> None:
        """Record a failed refresh in ``refresh_runs`` and on the manager (own transaction).

        When the database cannot take it, the record is kept in memory (at most
        ``UNRECORDED_MAX``, the oldest dropped first) and written by
        :meth:`record_unrecorded` once it answers again.
        """
        failure = _Failure(
            manager=manager,
            manager_id=manager_id,
            kind=kind,
            targets=targets,
            started_at=started_at,
            duration=duration,
            message=f"{type(error).__name__}: {error}"[:4000],
            at=self._now(),
            trigger=trigger,
        )
        try:
            await self._write(failure)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any driver error: keep it for later
            if len(self._unrecorded) == UNRECORDED_MAX:
                log.warning("more than %d unrecorded failures: dropping the oldest", UNRECORDED_MAX)
            self._unrecorded.append(failure)
            log.warning(
                "manager %s: could not record the failed refresh (%s: %s); kept to record"
                " once the database answers",
                manager,
                type(exc).__name__,
                exc,
            )

    async def record_unrecorded(self) -> int:
        """Write the failures :meth:`record` could not; how many were written."""
        written = 0
        while self._unrecorded:
            failure = self._unrecorded[0]
            try:
                await self._write(failure)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - still away: try again later
                log.warning(
                    "still cannot record %d failed refreshes: %s", len(self._unrecorded), exc
                )
                break
            self._unrecorded.popleft()
            written += 1
        if written:
            log.info("recorded %d failed refreshes from while the database was away", written)
        return written

    async def _write(self, failure: _Failure) -> None:
        async with self._writer.begin() as conn:
            await conn.execute(_run_row(failure.manager_id, failure, error=failure.message))
            m = schema.managers
            await conn.execute(
                update(m)
                .where(m.c.id == failure.manager_id)
                .where(
                    (m.c.last_refresh_error_at.is_(None))
                    | (m.c.last_refresh_error_at <= failure.at)
                )
                .values(
                    last_refresh_error=failure.message,
                    last_refresh_error_at=failure.at,
                    updated_at=failure.at,
                )
            )
