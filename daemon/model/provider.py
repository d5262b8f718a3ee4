"""What a provider offers the daemon, and how the daemon finds providers.

Flow: event -> catcher -> **provider.map_event** -> Target(s) -> batch -> refresher
-> **provider (collector + parser)** -> persister.

A provider is a pip-installable object registered under the entry point group
``refreshd.providers``; the daemon looks it up by name and never imports a
provider module directly.  One object offers everything about its cloud:
``connect`` and ``map_event`` (its events -> Targets), and optionally
``routing_key`` (which connection an event belongs to).  For each configured
manager the daemon validates the provider-specific settings with
``settings_model`` and opens one :class:`ManagerConnection` for the life of
the process.  A connection collects *parsed* inventory: full (streamed page by
page, references and parents before the rows that use them) or targeted (only
the targeted objects, their children and the objects they refer to).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from daemon.model.inventory import InventoryPage
from daemon.model.targets import Target, TargetCollection

PROVIDER_GROUP = "refreshd.providers"


class ProviderError(Exception):
    """A provider could not collect; ``retryable`` says whether trying again may help."""

    retryable: bool = True

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ProviderAuthError(ProviderError):
    """Credentials were refused: retrying will not help until an operator acts."""

    retryable = False


@runtime_checkable
class ManagerConnection(AbstractAsyncContextManager["ManagerConnection"], Protocol):
    """An open connection to one manager's cloud (``async with`` opens and closes it).

    Optional member (not required by this protocol): ``routing_key``, an
    attribute or property ``Hashable | None``: the key of the events that
    belong to this connection (for AWS its ``(account id, region)``), None
    while the connection does not know it yet.  It is read again when an event
    finds no manager, so a key learnt late is found.  See
    :meth:`RoutedProvider.routing_key` and :func:`connection_key`.
    """

    def collect_full(self) -> AsyncGenerator[InventoryPage, None]:
        """Every object of the manager, page by page, in dependency order."""
        ...

    def collect_targeted(self, targets: TargetCollection) -> AsyncGenerator[InventoryPage, None]:
        """The targeted objects, with their children and the objects they refer to.

        A targeted ref the cloud no longer has is simply absent from the pages.
        """
        ...


EventMapper = Callable[[str, dict[str, Any]], Sequence[Target]]
"""``(manager, decoded event) -> targets``: a provider's pure ``map_event``."""

RoutingKey = Callable[[dict[str, Any]], Hashable | None]
"""``decoded event -> key`` (None: the event does not say): a provider's ``routing_key``."""


class Provider(Protocol):
    """The entry point object of a provider package.

    Optional member: ``routing_key`` (see :class:`RoutedProvider`); a
    provider without it is never chosen by key-routing catchers.
    """

    name: str
    settings_model: type[BaseModel]

    def connect(self, manager: str, settings: BaseModel) -> ManagerConnection:
        """A connection for ``manager`` (does no I/O until entered)."""
        ...

    def map_event(self, manager: str, event: dict[str, Any]) -> Sequence[Target]:
        """The targets ``event`` asks to refresh in ``manager`` (empty: nothing to do).

        Pure.  ``event`` is the decoded event as a dict (the structured
        CloudEvents JSON shape, see ``catchers/cloudevents.py``); ValueError
        (with the reason) when it is not a usable event of this provider.
        """
        ...


class RoutedProvider(Provider, Protocol):
    """A provider whose events say which of its connections they belong to."""

    def routing_key(self, event: dict[str, Any]) -> Hashable | None:
        """The key of ``event`` (the shape ``map_event`` gets), None when it does not say.

        An event goes to the manager whose connection's ``routing_key``
        equals it (catchers' ``manager_by_account = true``).
        """
        ...


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def settings_as(
    model: type[SettingsT], settings: BaseModel, *, provider: str, manager: str
) -> SettingsT:
    """``settings`` as the provider's own ``model`` (a ``connect`` checks what it was given).

    Raises TypeError naming the manager, the provider and both models when they differ.
    """
    if not isinstance(settings, model):
        raise TypeError(
            f"manager {manager}: {provider} needs {model.__name__}, not {type(settings).__name__}"
        )
    return settings


def routing_key_of(provider: Provider) -> RoutingKey | None:
    """The provider's optional ``routing_key``, or None when it has none."""
    key: RoutingKey | None = getattr(provider, "routing_key", None)
    return key


def connection_key(connection: object) -> Hashable | None:
    """A connection's optional ``routing_key``; None when absent, unknown or not hashable."""
    key = getattr(connection, "routing_key", None)
    return key if isinstance(key, Hashable) else None


class UnknownProviderError(LookupError):
    pass


EXTRA_OF_MODULE = {"aiobotocore": "aws", "botocore": "aws", "asyncpg": "postgres"}
"""The optional dependencies of plugins, and the ``refreshd[...]`` extra that installs each."""


def load_entry_point(entry: EntryPoint, what: str) -> Any:
    """Load a plugin; a plugin whose optional dependencies are missing says which extra.

    Raises :class:`PluginUnavailableError` instead of the bare ImportError, so
    a daemon that does not use that plugin is not bothered by it.
    """
    try:
        return entry.load()
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        extra = EXTRA_OF_MODULE.get(missing)
        hint = f": pip install 'refreshd[{extra}]'" if extra else ""
        raise PluginUnavailableError(
            f"{what} {entry.name!r} cannot be loaded ({exc}); install what it needs{hint}"
        ) from exc


class PluginUnavailableError(LookupError):
    """A plugin is registered but its optional dependencies are not installed."""


@cache
def _provider_entries() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=PROVIDER_GROUP)}


@cache
def load_provider(name: str) -> Provider:
    """The provider ``name``; UnknownProviderError (a LookupError) says why not."""
    entries = _provider_entries()
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none (is refreshd installed?)"
        raise UnknownProviderError(f"unknown provider {name!r}; installed: {known}")
    try:
        provider: Provider = load_entry_point(entries[name], "provider")
    except PluginUnavailableError as exc:
        raise UnknownProviderError(str(exc)) from exc
    return provider
