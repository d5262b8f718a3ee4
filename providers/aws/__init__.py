"""AWS: EC2 inventory of one account in one region per manager.

Flow: batch -> refresher -> **provider** (collector -> client -> parser) -> persister.

The daemon finds :data:`provider` through the ``refreshd.providers`` entry
point ``aws`` and never imports this package directly.  Its events
(EventBridge, CloudTrail and AWS Config) arrive over Kafka or SQS; the
provider maps them (``map_event``) and routes them by account and region
(``routing_key``, matched against the connection's ``account_region``).  Modules:

- ``settings``   the manager settings model (``settings_model``)
- ``events``     the event mapper, and the account and region an event comes from
- ``collector``  :class:`AwsConnection`: full and targeted collection
- ``client``     the EC2/STS clients on aiobotocore, retries and error translation
- ``parser``     EC2 API objects -> inventory rows

Needs the ``aws`` extra (``pip install 'refreshd[aws]'``: aiobotocore).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from pydantic import BaseModel

from daemon.api import settings_as
from providers.aws import events
from providers.aws.collector import AwsConnection
from providers.aws.settings import AwsSettings

__all__ = ["AwsConnection", "AwsProvider", "AwsSettings", "provider"]


class AwsProvider:
    """The entry point object: the settings model, connections and event mapping."""

    name: str = "aws"
    settings_model: type[BaseModel] = AwsSettings

    def connect(self, manager: str, settings: BaseModel) -> AwsConnection:
        """A connection for ``manager`` (no I/O until it is entered with ``async with``)."""
        own = settings_as(AwsSettings, settings, provider=self.name, manager=manager)
        return AwsConnection(manager, own)

    map_event = staticmethod(events.map_event)
    """The targets an AWS event asks to refresh (pure; see ``events``)."""
    routing_key = staticmethod(events.account_region)
    """The event's ``(account id, region)``, matched against ``AwsConnection.routing_key``."""


provider: Final = AwsProvider()

if TYPE_CHECKING:  # mypy checks that the entry point object fits the daemon's protocol
    from daemon.api import RoutedProvider

    _conforms: RoutedProvider = provider
