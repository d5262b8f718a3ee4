"""The plugin API: everything a provider or a catcher may use from the daemon, and nothing else.

Flow: event stream -> **catcher** (api: Target, Ack, TargetSink, CatcherContext)
-> batcher -> refresher -> **provider** (api: Provider, ManagerConnection,
InventoryPage, Rejection, ProviderError) -> persister.

Providers (``providers/<name>/``) and catchers (``catchers/``) import the daemon
only through this module; an import-linter contract in ``pyproject.toml``
enforces it, so the daemon's internals can move without breaking a plugin.
What is here is the contract: changing a name or a signature below is a
breaking change for every plugin.  docs/plugins.md shows how the pieces fit
(add a provider in one folder, add a catcher).
"""

from __future__ import annotations

from daemon.model.acks import Ack, QueueFullError, TargetSink
from daemon.model.catcher import (
    Catcher,
    CatcherContext,
    CatcherFactory,
    CatcherStats,
    ManagedCatcher,
    ManagerEndpoint,
)
from daemon.model.inventory import COLLECTIONS, InventoryPage, Row
from daemon.model.provider import (
    EventMapper,
    ManagerConnection,
    Provider,
    ProviderAuthError,
    ProviderError,
    RoutedProvider,
    RoutingKey,
    settings_as,
)
from daemon.model.rejection import Rejection, RejectReason
from daemon.model.targets import Ref, Target, TargetCollection, Trigger
from daemon.pipeline.batcher import BatcherStoppedError
from daemon.service.config import Duration
from daemon.service.http import bearer_ok, unauthorized
from daemon.service.secrets import Secret, SecretUnavailableError
from daemon.service.validation_errors import format_validation_error

__all__ = [
    "COLLECTIONS",
    "Ack",
    "BatcherStoppedError",
    "Catcher",
    "CatcherContext",
    "CatcherFactory",
    "CatcherStats",
    "Duration",
    "EventMapper",
    "InventoryPage",
    "ManagedCatcher",
    "ManagerConnection",
    "ManagerEndpoint",
    "Provider",
    "ProviderAuthError",
    "ProviderError",
    "QueueFullError",
    "Ref",
    "RejectReason",
    "Rejection",
    "RoutedProvider",
    "RoutingKey",
    "Row",
    "Secret",
    "SecretUnavailableError",
    "Target",
    "TargetCollection",
    "TargetSink",
    "Trigger",
    "bearer_ok",
    "format_validation_error",
    "settings_as",
    "unauthorized",
]
