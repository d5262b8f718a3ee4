"""How the benchmarks wire refreshd together: through the daemon's composition root.

Flow: benchmark script -> **wired()** -> daemon/service/composition.assemble (engine ->
upgrade -> provider connections -> Persister -> Refresher).

Every benchmark that runs refreshd in its own process builds it as ``refreshd run``
does, from a config: :func:`wired` takes the managers' ``[[managers]]`` blocks, so a
benchmark measures the daemon's own wiring, not a copy of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.provider import ManagerConnection
from daemon.persistence.db import create_engine
from daemon.persistence.persister import Persister
from daemon.persistence.settings import PersisterSettings
from daemon.pipeline.refresher import Refresher
from daemon.service.composition import Parts, assemble
from daemon.service.config import parse_config

MANAGER = "bench"
PROVIDER = "awesome_cloud"


@dataclass
class Wiring:
    engine: AsyncEngine
    persisters: list[Persister]
    """One per ``settings`` asked for, all on ``engine``."""
    refreshers: list[Refresher]
    """One per persister, all over the same managers and connections."""
    parts: Parts

    @property
    def persister(self) -> Persister:
        return self.persisters[0]

    @property
    def refresher(self) -> Refresher:
        return self.refreshers[0]

    def connection(self, manager: str) -> Any:
        """The open provider connection of ``manager`` (its concrete class: benchmarks
        read provider specifics such as the embedded cloud)."""
        connection: ManagerConnection = self.parts.connection(manager)
        return connection


@asynccontextmanager
async def wired(
    url: str,
    managers: Mapping[str, Mapping[str, Any]],
    *,
    settings: Sequence[PersisterSettings | None] = (None,),
    instrument: Callable[[AsyncEngine], None] | None = None,
) -> AsyncIterator[Wiring]:
    """refreshd on database ``url`` (migrated) for ``managers`` (name -> its
    ``[[managers]]`` block without the name: ``provider`` and the provider's keys), as
    the composition root builds it; the engine is disposed on exit.  ``instrument`` sees
    the engine before its first connection (event listeners); ``settings``: one
    persister (and refresher) each, ``None`` the default; the first is the root's own,
    the others share its connections (a comparison of persister settings that are not
    config keys)."""
    engine = create_engine(url)
    try:
        if instrument is not None:
            instrument(engine)
        loaded = parse_config(
            {
                "database_url": url,
                "managers": [{"name": name, **block} for name, block in managers.items()],
            },
            source="<bench>",
        )
        first, *others = settings
        async with assemble(loaded, engine=engine, persister=_persister(first)) as parts:
            persisters = [parts.persister] + [_persister(s)(engine) for s in others]
            refreshers = [parts.refresher] + [Refresher(p, parts.managers) for p in persisters[1:]]
            yield Wiring(engine, persisters, refreshers, parts)
    finally:
        await engine.dispose()


def _persister(settings: PersisterSettings | None) -> Callable[[AsyncEngine], Persister]:
    def build(engine: AsyncEngine) -> Persister:
        return Persister(engine) if settings is None else Persister(engine, settings=settings)

    return build
