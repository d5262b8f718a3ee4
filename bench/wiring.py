"""The one place the benchmarks wire refreshd together: engine, migrations, persisters and
refreshers over the managers' provider connections.

Flow: benchmark script -> **wired()** -> engine -> upgrade -> Persister -> Refresher.

Every benchmark that runs refreshd in its own process gets its engine, persister and
refresher from :func:`wired`, so a switch to another composition root is one edit here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence.db import create_engine
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from daemon.persistence.settings import PersisterSettings
from daemon.pipeline.refresher import RefreshableManager, Refresher

MANAGER = "bench"
PROVIDER = "awesome_cloud"


@dataclass
class Wiring:
    engine: AsyncEngine
    persisters: list[Persister]
    """One per ``settings`` asked for, all on ``engine``."""
    refreshers: list[Refresher]
    """One per persister, all over the same managers."""

    @property
    def persister(self) -> Persister:
        return self.persisters[0]

    @property
    def refresher(self) -> Refresher:
        return self.refreshers[0]


@asynccontextmanager
async def wired(
    url: str,
    connections: Mapping[str, tuple[str, Any]],
    *,
    settings: Sequence[PersisterSettings | None] = (None,),
    instrument: Callable[[AsyncEngine], None] | None = None,
) -> AsyncIterator[Wiring]:
    """refreshd on database ``url`` (migrated to the latest schema) for ``connections``
    (manager name -> (provider name, open provider connection)); the engine is disposed
    on exit.  ``instrument`` sees the engine before its first connection (event
    listeners); ``settings``: one persister (and refresher) each, ``None`` the default."""
    engine = create_engine(url)
    try:
        if instrument is not None:
            instrument(engine)
        await upgrade(engine)
        persisters = [
            Persister(engine) if s is None else Persister(engine, settings=s) for s in settings
        ]
        managers = {
            name: RefreshableManager(name, provider, connection)
            for name, (provider, connection) in connections.items()
        }
        refreshers = [Refresher(p, managers) for p in persisters]
        yield Wiring(engine, persisters, refreshers)
    finally:
        await engine.dispose()
