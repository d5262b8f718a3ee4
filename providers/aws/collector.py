"""Collector of one AWS manager (an account in a region): full and targeted refreshes of EC2.

Flow: refresher -> **collector** -> client (EC2 API) -> parser -> InventoryPage -> persister.

:class:`AwsConnection` is the provider's ``ManagerConnection``.  Entering it
opens the EC2 and STS clients and, unless ``account_id`` is set, asks STS for
the account id (events are routed by account and region); a failure there is
only logged, so a manager whose credentials are refused does not stop the
daemon: its refreshes fail with :class:`~daemon.model.provider.ProviderAuthError`
and are retried slowly.

Full refresh (streamed, memory flat whatever the account's size):

1. security groups, page by page;
2. the images the account owns (``own_images``);
3. instances, ``page_size`` at a time; each page carries its vms with their
   disks (sizes from DescribeVolumes by the page's volume ids), network
   interfaces and security group links, plus the instance types
   (DescribeInstanceTypes) and images first used on that page.

Targeted refresh: by id, never a listing.  Volume and interface targets are
first expanded to the instance they are attached to (DescribeVolumes /
DescribeNetworkInterfaces), and those instances join the deletion scope
(``InventoryPage.expanded``).  Then the instances, and the images, instance
types and security groups they use or that are targeted themselves, are
fetched with ``Filters`` of at most ``ids_per_request`` (<= 200) ids, so the
number of requests depends on the number of targets, not on the account; the
requests that do not depend on each other are sent concurrently (instances
first, then their volumes, types, images and groups together).
An id the API does not know (absent from a filtered answer, or an
``Invalid*.NotFound`` code) is simply absent, so the persister archives it.

Terminated instances are left out (so archived) unless ``keep_terminated``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterable, Sequence
from types import TracebackType
from typing import Any, Final, Self

from daemon.api import InventoryPage, ProviderAuthError, ProviderError, Target, TargetCollection
from providers.aws.client import Ec2Api
from providers.aws.parser import (
    flavor_rows,
    image_rows,
    instance_groups,
    parse_instances,
    security_group_rows,
    volume_ids,
)
from providers.aws.settings import AwsSettings

log = logging.getLogger(__name__)

TERMINATED: Final = "terminated"
NOT_FOUND: Final = (
    "InvalidInstanceID.NotFound",
    "InvalidInstanceID.Malformed",
    "InvalidAMIID.NotFound",
    "InvalidAMIID.Malformed",
    "InvalidGroup.NotFound",
    "InvalidGroupId.Malformed",
    "InvalidVolume.NotFound",
    "InvalidNetworkInterfaceID.NotFound",
    "InvalidInstanceType",
)
ACCOUNT_LOOKUP_TIMEOUT: Final = 10.0
"""Seconds entering a connection may spend asking STS for the account id."""
INSTANCE_TYPES_PER_REQUEST: Final = 100
"""DescribeInstanceTypes takes at most 100 instance types."""


def chunks(values: Iterable[str], size: int) -> list[list[str]]:
    ordered = sorted(set(values))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class AwsConnection:
    """An open connection to one AWS account and region (``async with`` opens it)."""

    def __init__(self, manager: str, settings: AwsSettings) -> None:
        self.manager = manager
        self.settings = settings
        self.api = Ec2Api(manager, settings)
        self._account: str | None = settings.account_id
        self._open = False

    def api_stats(self) -> dict[str, int]:
        """Requests sent to AWS (each retry counts) and throttled answers."""
        return self.api.api_stats()

    @property
    def account_region(self) -> tuple[str, str] | None:
        """(account id, region) once the account id is known: how events are routed here."""
        return (self._account, self.settings.region) if self._account else None

    @property
    def routing_key(self) -> tuple[str, str] | None:
        """The key of the events routed here (``AwsProvider.routing_key``): the account_region."""
        return self.account_region

    async def __aenter__(self) -> Self:
        if self._open:
            raise RuntimeError(f"connection of manager {self.manager} is already open")
        await self.api.__aenter__()
        self._open = True
        where = self.settings.endpoint_url or "AWS"
        log.info("manager %s: EC2 client for %s at %s", self.manager, self.settings.region, where)
        if self._account is None:  # before catchers start, so that events route at once
            try:
                async with asyncio.timeout(ACCOUNT_LOOKUP_TIMEOUT):
                    await self._learn_account()
            except (TimeoutError, ProviderAuthError) as exc:
                log.warning(
                    "manager %s: account id unknown until the first refresh (%s); events "
                    "routed by account wait for it: set account_id to route them at once",
                    self.manager,
                    exc or "STS did not answer in time",
                )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await self.api.__aexit__(exc_type, exc, tb)

    async def _learn_account(self) -> None:
        """Ask STS for the account id once; a failure only delays event routing."""
        if self._account is not None:
            return
        try:
            identity = await self.api.call("get_caller_identity", service="sts")
        except ProviderAuthError:
            raise
        except ProviderError as exc:
            log.warning("manager %s: cannot learn the account id from STS: %s", self.manager, exc)
            return
        account = (identity or {}).get("Account")
        if isinstance(account, str) and account:
            self._account = account
            log.info("manager %s: account %s", self.manager, account)

    def _kept(self, reservations: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        keep_terminated = self.settings.keep_terminated
        return [
            instance
            for reservation in reservations
            for instance in reservation.get("Instances") or ()
            if keep_terminated or (instance.get("State") or {}).get("Name") != TERMINATED
        ]

    # -- full ---------------------------------------------------------------------------

    async def collect_full(self) -> AsyncGenerator[InventoryPage, None]:
        """Security groups, owned images, then instances page by page with what they use."""
        await self._learn_account()
        api = self.api
        async for page in api.pages(
            "describe_security_groups", PaginationConfig={"PageSize": 1000}
        ):
            yield InventoryPage({"security_groups": security_group_rows(page["SecurityGroups"])})
        images_seen: set[str] = set()
        if self.settings.own_images:
            async for page in api.pages(
                "describe_images", Owners=["self"], PaginationConfig={"PageSize": 1000}
            ):
                images_seen.update(i["ImageId"] for i in page["Images"] if i.get("ImageId"))
                yield InventoryPage({"images": image_rows(page["Images"])})
        types_seen: set[str] = set()
        count = 0
        async for page in api.pages(
            "describe_instances", PaginationConfig={"PageSize": self.settings.page_size}
        ):
            instances = self._kept(page.get("Reservations") or ())
            count += len(instances)
            new_types = {i["InstanceType"] for i in instances if i.get("InstanceType")}
            new_types -= types_seen
            new_images = {i["ImageId"] for i in instances if i.get("ImageId")} - images_seen
            types_seen |= new_types
            images_seen |= new_images
            yield await self._instances_page(instances, new_types, new_images, ())
        log.debug("manager %s: listed %d instances", self.manager, count)

    # -- targeted -----------------------------------------------------------------------

    async def collect_targeted(
        self, targets: TargetCollection
    ) -> AsyncGenerator[InventoryPage, None]:
        """The targeted objects and what targeted instances use, in one page."""
        if targets.is_full:
            async for page in self.collect_full():
                yield page
            return
        await self._learn_account()
        wanted = set(targets.references("vms"))
        expanded = await self._attached_instances(
            targets.references("disks"), targets.references("network_ports")
        )
        expanded -= wanted
        wanted |= expanded
        instances = self._kept(await self._by_filter("describe_instances", "instance-id", wanted))
        types = {i["InstanceType"] for i in instances if i.get("InstanceType")}
        images = {i["ImageId"] for i in instances if i.get("ImageId")}
        groups = {g for i in instances for g in instance_groups(i)}
        page = await self._instances_page(
            instances,
            types | targets.references("flavors"),
            images | targets.references("images"),
            groups | targets.references("security_groups"),
        )
        page.expanded.extend(Target.of(self.manager, "vms", vm) for vm in sorted(expanded))
        yield page

    async def _attached_instances(self, volumes: set[str], interfaces: set[str]) -> set[str]:
        """The instances the targeted volumes and network interfaces are attached to."""
        found: set[str] = set()
        by_volume, by_interface = await asyncio.gather(
            self._by_filter("describe_volumes", "volume-id", volumes),
            self._by_filter("describe_network_interfaces", "network-interface-id", interfaces),
        )
        for volume in by_volume:
            for attachment in volume.get("Attachments") or ():
                if attachment.get("InstanceId"):
                    found.add(attachment["InstanceId"])
        for eni in by_interface:
            instance = (eni.get("Attachment") or {}).get("InstanceId")
            if instance:
                found.add(instance)
        return found

    # -- shared -------------------------------------------------------------------------

    async def _instances_page(
        self,
        instances: Sequence[dict[str, Any]],
        types: set[str],
        images: set[str],
        groups: Iterable[str],
    ) -> InventoryPage:
        """Instances with their children and the objects they use (fetched concurrently)."""
        volumes, flavors, used_images, used_groups = await asyncio.gather(
            self._by_filter(
                "describe_volumes", "volume-id", {v for i in instances for v in volume_ids(i)}
            ),
            self._instance_types(types),
            self._by_filter("describe_images", "image-id", images),
            self._by_filter("describe_security_groups", "group-id", set(groups)),
        )
        page = parse_instances(instances, {v["VolumeId"]: v for v in volumes})
        page.extend("flavors", flavor_rows(flavors))
        page.extend("images", image_rows(used_images))
        page.extend("security_groups", security_group_rows(used_groups))
        return page

    async def _instance_types(self, types: set[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for chunk in chunks(types, INSTANCE_TYPES_PER_REQUEST):
            answer = await self.api.call(
                "describe_instance_types", InstanceTypes=chunk, missing_ok=NOT_FOUND
            )
            if answer is None and len(chunk) > 1:  # one unknown type fails the whole request
                for single in chunk:
                    one = await self.api.call(
                        "describe_instance_types", InstanceTypes=[single], missing_ok=NOT_FOUND
                    )
                    found.extend((one or {}).get("InstanceTypes") or ())
                continue
            found.extend((answer or {}).get("InstanceTypes") or ())
        return found

    async def _by_filter(self, operation: str, name: str, ids: set[str]) -> list[dict[str, Any]]:
        """The objects with those ids, ``ids_per_request`` ids per request (unknown ids: absent).

        A filter, unlike an id list, does not fail the whole request for one
        unknown id; the answer is paginated in case a filter matches many.
        """
        key = _RESULT_KEY[operation]
        found: list[dict[str, Any]] = []
        for chunk in chunks(ids, self.settings.ids_per_request):
            filters = [{"Name": name, "Values": chunk}]
            async for page in self.api.pages(operation, missing_ok=NOT_FOUND, Filters=filters):
                found.extend(page.get(key) or ())
        return found


_RESULT_KEY: Final = {
    "describe_instances": "Reservations",
    "describe_volumes": "Volumes",
    "describe_images": "Images",
    "describe_security_groups": "SecurityGroups",
    "describe_network_interfaces": "NetworkInterfaces",
}
