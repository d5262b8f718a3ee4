"""AwesomeCloud: the reference provider, with its simulator.

Flow: batch -> refresher -> **provider** (collector -> client -> parser) -> persister.

The daemon finds :data:`provider` through the ``refreshd.providers`` entry
point ``awesome_cloud`` and never imports this package directly.  Modules:

- ``settings``   the manager settings model (``settings_model``)
- ``events``     the event mapper (``map_event``): CloudEvents -> Targets
- ``collector``  :class:`AwesomeConnection`: full and targeted collection
- ``client``     the HTTP client of the read API, with retries
- ``parser``     API objects -> inventory rows
- ``simulator/`` the simulated cloud: its object model, state, HTTP app, churn,
  event delivery and server (run standalone or embedded)

Beyond the :class:`daemon.model.provider.Provider` protocol this provider offers
:meth:`AwesomeCloudProvider.simulator_main`, which the CLI calls for
``refreshd simulator ...`` (the daemon must not import provider modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from pydantic import BaseModel

from daemon.api import settings_as
from providers.awesome_cloud import events
from providers.awesome_cloud.collector import AwesomeConnection
from providers.awesome_cloud.settings import AwesomeCloudSettings
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer, run_simulator

__all__ = [
    "AwesomeCloudProvider",
    "AwesomeCloudSettings",
    "AwesomeConnection",
    "Cloud",
    "SimulatorServer",
    "provider",
]


class AwesomeCloudProvider:
    """The entry point object: settings model, connections, event mapping, the simulator command."""

    name: str = "awesome_cloud"
    settings_model: type[BaseModel] = AwesomeCloudSettings

    def connect(self, manager: str, settings: BaseModel) -> AwesomeConnection:
        """A connection for ``manager`` (no I/O until it is entered with ``async with``)."""
        own = settings_as(AwesomeCloudSettings, settings, provider=self.name, manager=manager)
        return AwesomeConnection(manager, own)

    map_event = staticmethod(events.map_event)
    """The targets an AwesomeCloud event asks to refresh (pure; see ``events``)."""

    def simulator_main(self, argv: Sequence[str]) -> int:
        """Run the simulator standalone until SIGINT/SIGTERM; returns the exit code.

        ``argv`` are the arguments after ``refreshd simulator``: ``--host``
        (127.0.0.1), ``--port`` (8700), ``--vms`` (1000), ``--seed`` (1), ``--name``
        (awesome), ``--token`` (none), ``--churn-per-second`` (0).
        """
        return run_simulator(argv)


provider: Final = AwesomeCloudProvider()

if TYPE_CHECKING:  # mypy checks that the entry point object fits the daemon's protocol
    from daemon.api import Provider

    _conforms: Provider = provider
