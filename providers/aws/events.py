"""AWS event mapping: one AWS event document -> the Targets it asks to refresh.

Flow: raw record / message -> CloudEvent -> route -> **AWS event mapper** -> Target(s) -> batcher.

:func:`map_event` is the provider's ``map_event`` (``AwsProvider``).  It
is a pure function of the manager name and the event as a dict (the shape of
``CloudEvent.to_dict()``).  AWS sends plain JSON, so the AWS document is
always ``event["data"]``, whether it came bare or inside a CloudEvents
envelope.  It maps:

* EventBridge ``EC2 Instance State-change Notification`` -> the vm
  (``detail.instance-id``);
* EventBridge ``AWS API Call via CloudTrail`` from ``ec2.amazonaws.com`` ->
  the ids named in ``requestParameters`` and ``responseElements`` (a bounded
  walk): ``instanceId`` -> vms, ``imageId`` -> images, ``groupId`` ->
  security_groups, ``volumeId`` -> disks and ``networkInterfaceId`` ->
  network_ports, the latter two only when the payload names no instance
  (disks and ports are children of a vm: its refresh brings them).  Tagged
  ``resourceId`` values map by prefix, each on its own.  Failed calls
  (``errorCode``), read-only calls and other services -> no target;
* AWS Config ``ConfigurationItemChangeNotification`` and its oversized
  variant, raw (as SNS delivers it) or as the EventBridge ``Config
  Configuration Item Change`` -> the EC2 instance, security group, volume or
  network interface; a volume or interface attached to an instance -> that
  vm.  Other resource types and other Config messages -> no target;
* any other EventBridge event -> no target (the catcher counts it as skipped).

Ids must carry their kind's prefix (``i-``, ``ami-``, ``sg-``, ``vol-``,
``eni-``): a placement group's ``groupId`` is no security group.  A payload
too large to walk whole asks for a full refresh.  A document that is neither
an EventBridge event nor a Config notification, or a known kind that lacks
the fields it needs, raises :class:`ValueError` with the reason; catchers
dead-letter it.  :func:`account_region` tells the account and region an event
comes from: the provider's ``routing_key`` (catchers' ``manager_by_account``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from daemon.api import Target

STATE_CHANGE: Final = "EC2 Instance State-change Notification"
CLOUDTRAIL: Final = "AWS API Call via CloudTrail"
CONFIG_CHANGE: Final = "Config Configuration Item Change"
EC2_SOURCE: Final = "ec2.amazonaws.com"
CI_CHANGE: Final = "ConfigurationItemChangeNotification"
CI_OVERSIZED: Final = "OversizedConfigurationItemChangeNotification"

MAX_DEPTH: Final = 8
"""Levels of keys read (an array of objects is at its key's level; an inner array adds one)."""
MAX_NODES: Final = 50_000
"""Values visited per event; a larger payload (beyond EventBridge's 256 KB) means a full refresh."""

_EC2_KINDS: Final = (
    # collection, id prefix, CloudTrail parameter, AWS Config resource type
    ("vms", "i-", "instanceId", "AWS::EC2::Instance"),
    ("images", "ami-", "imageId", None),
    ("security_groups", "sg-", "groupId", "AWS::EC2::SecurityGroup"),
    ("disks", "vol-", "volumeId", "AWS::EC2::Volume"),
    ("network_ports", "eni-", "networkInterfaceId", "AWS::EC2::NetworkInterface"),
)
"""The EC2 resources an event can name, one row each: the mappings below are read from it."""

PREFIXES: Final[Mapping[str, str]] = {c: prefix for c, prefix, _, _ in _EC2_KINDS}
"""The collections a CloudTrail call can name, and the prefix of their ids."""

COLLECTION_OF_KEY: Final[Mapping[str, str]] = {key: c for c, _, key, _ in _EC2_KINDS}
"""CloudTrail parameter names (first letter lower-cased, also with a plural ``s``)."""

TAGGED_KEY: Final = "resourceId"
"""CreateTags/DeleteTags name unrelated resources: each maps by its prefix."""

CHILDREN: Final = frozenset({"disks", "network_ports"})
_BY_KEY: Final = 1
_BY_TAG: Final = 2

CONFIG_COLLECTIONS: Final[Mapping[str, str]] = {t: c for c, _, _, t in _EC2_KINDS if t}
"""AWS Config resource types and the collection of each."""
CONFIG_INSTANCE: Final = "AWS::EC2::Instance"
ATTACHED_TO_INSTANCE: Final = "is attached to instance"


def map_event(manager: str, event: dict[str, Any]) -> list[Target]:
    """The targets ``event`` asks to refresh in ``manager`` (``[]``: nothing to do).

    Raises ValueError when ``event`` is not a usable AWS event.
    """
    document = event.get("data")
    transport_id = event.get("id")
    fallback = transport_id if isinstance(transport_id, str) and transport_id else None
    if not isinstance(document, Mapping):
        raise ValueError(f"AWS event {fallback!r}: data is not a JSON object ({_kind(document)})")
    if "detail-type" in document:
        return _map_eventbridge(manager, document, fallback)
    if "messageType" in document:
        return _map_config(manager, document, None, fallback, where="Config notification")
    raise ValueError(
        f"AWS event {fallback!r} is neither an EventBridge event (no 'detail-type') "
        "nor an AWS Config notification (no 'messageType')"
    )


def account_region(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """The AWS ``(account id, region)`` ``event`` comes from, or None when it does not say."""
    document = event.get("data")
    if not isinstance(document, Mapping):
        return None
    if "detail-type" in document:
        account, region = document.get("account"), document.get("region")
        if not account:  # some emitters (moto's EventBridge) leave it out: the ARNs say it
            account = _account_of_arns(document.get("resources"))
    else:
        item = document.get("configurationItem") or document.get("configurationItemSummary")
        if not isinstance(item, Mapping):
            return None
        account, region = item.get("awsAccountId"), item.get("awsRegion")
    if isinstance(account, str) and account and isinstance(region, str) and region:
        return (account, region)
    return None


def _account_of_arns(resources: Any) -> str | None:
    """The account of the first ``arn:aws:<service>:<region>:<account>:...`` in ``resources``."""
    for arn in resources if isinstance(resources, list) else ():
        parts = arn.split(":", 5) if isinstance(arn, str) else []
        if len(parts) == 6 and parts[0] == "arn" and parts[4]:
            return parts[4]
    return None


def _map_eventbridge(
    manager: str, document: Mapping[str, Any], fallback: str | None
) -> list[Target]:
    detail_type = document["detail-type"]
    eb_id = document.get("id")
    event_id = eb_id if isinstance(eb_id, str) and eb_id else fallback
    if not isinstance(detail_type, str):
        raise ValueError(f"EventBridge event {event_id!r}: detail-type is {_kind(detail_type)}")
    where = f"{detail_type} {event_id!r}"
    source = document.get("source")
    known = (
        (detail_type == STATE_CHANGE and source == "aws.ec2")
        or detail_type == CLOUDTRAIL
        or (detail_type == CONFIG_CHANGE and source == "aws.config")
    )
    if not known:
        return []
    detail = document.get("detail")
    if not isinstance(detail, Mapping):
        raise ValueError(f"{where}: detail is not an object ({_kind(detail)})")
    if detail_type == STATE_CHANGE:
        instance = detail.get("instance-id")
        if not isinstance(instance, str) or not instance:
            raise ValueError(f"{where}: detail.instance-id is not an id ({_kind(instance)})")
        return [Target.of(manager, "vms", instance, event_id=event_id)]
    if detail_type == CLOUDTRAIL:
        return _map_cloudtrail(manager, detail, event_id, where)
    return _map_config(manager, detail, event_id, fallback, where=f"{where}: detail")


def _map_cloudtrail(
    manager: str, detail: Mapping[str, Any], event_id: str | None, where: str
) -> list[Target]:
    event_source = detail.get("eventSource")
    if not isinstance(event_source, str):
        raise ValueError(f"{where}: detail.eventSource is {_kind(event_source)}")
    if event_source != EC2_SOURCE or detail.get("errorCode") or detail.get("readOnly") is True:
        return []
    found = _walk((detail.get("requestParameters"), detail.get("responseElements")))
    if found is None:
        return [Target.full(manager, event_id=event_id)]
    names_vm = any(c == "vms" and how & _BY_KEY for (c, _), how in found.items())
    return [
        Target.of(manager, collection, ref, event_id=event_id)
        for (collection, ref), how in found.items()
        if how & _BY_TAG or not (names_vm and collection in CHILDREN)
    ]


def _walk(roots: tuple[Any, ...]) -> dict[tuple[str, str], int] | None:
    """The ids under ``roots`` in document order: ``(collection, id) -> _BY_KEY | _BY_TAG``.

    Iterative; reads keys at most :data:`MAX_DEPTH` levels down (an array of
    objects is one level with its key); None past :data:`MAX_NODES` values.
    """
    found: dict[tuple[str, str], int] = {}
    stack: list[tuple[Any, int]] = [(root, 0) for root in reversed(roots)]
    budget = MAX_NODES
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return None
        if depth >= MAX_DEPTH:
            continue
        if isinstance(node, list):
            stack.extend(
                (item, depth if isinstance(item, Mapping) else depth + 1) for item in reversed(node)
            )
            continue
        if not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            for collection, ref, how in _ids(key, value):
                found[(collection, ref)] = found.get((collection, ref), 0) | how
        children = [v for v in node.values() if isinstance(v, Mapping | list)]
        stack.extend((child, depth + 1) for child in reversed(children))
    return found


def _ids(key: Any, value: Any) -> Iterator[tuple[str, str, int]]:
    """The ``(collection, id, how)`` one key names (its value: an id or a list of ids)."""
    if not isinstance(key, str) or not key:
        return
    name = key[0].lower() + key[1:]
    ids = value if isinstance(value, list) else (value,)
    if name in (TAGGED_KEY, TAGGED_KEY + "s"):
        for ref in ids:
            collection = _collection_of_id(ref)
            if collection is not None:
                yield (collection, ref, _BY_TAG)
        return
    collection = COLLECTION_OF_KEY.get(name)
    if collection is None and name.endswith("s"):
        collection = COLLECTION_OF_KEY.get(name[:-1])
    if collection is None:
        return
    prefix = PREFIXES[collection]
    for ref in ids:
        if isinstance(ref, str) and ref.startswith(prefix) and len(ref) > len(prefix):
            yield (collection, ref, _BY_KEY)


def _collection_of_id(ref: Any) -> str | None:
    if not isinstance(ref, str):
        return None
    for collection, prefix in PREFIXES.items():
        if ref.startswith(prefix) and len(ref) > len(prefix):
            return collection
    return None


def _map_config(
    manager: str,
    message: Mapping[str, Any],
    event_id: str | None,
    fallback: str | None,
    *,
    where: str,
) -> list[Target]:
    message_type = message.get("messageType")
    if not isinstance(message_type, str):
        raise ValueError(f"{where}: messageType is {_kind(message_type)}")
    if message_type not in (CI_CHANGE, CI_OVERSIZED):
        return []
    key = "configurationItem" if message_type == CI_CHANGE else "configurationItemSummary"
    item = message.get(key)
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: {message_type} without a {key} object ({_kind(item)})")
    resource_type, resource_id = item.get("resourceType"), item.get("resourceId")
    if not isinstance(resource_type, str) or not resource_type:
        raise ValueError(f"{where}: {key}.resourceType is {_kind(resource_type)}")
    collection = CONFIG_COLLECTIONS.get(resource_type)
    if collection is None:
        return []
    if not isinstance(resource_id, str) or not resource_id:
        raise ValueError(f"{where}: {key}.resourceId is {_kind(resource_id)}")
    if event_id is None:
        event_id = _config_state_id(item, resource_id) or fallback
    refs = [(collection, resource_id)]
    if collection in CHILDREN:
        vms = [("vms", vm) for vm in _attached_instances(item.get("relationships"))]
        refs = vms or refs
    unique = dict.fromkeys(refs)
    return [Target.of(manager, c, ref, event_id=event_id) for c, ref in unique]


def _attached_instances(relationships: Any) -> Iterator[str]:
    if not isinstance(relationships, list):
        return
    for relation in relationships:
        if not isinstance(relation, Mapping):
            continue
        name, vm = relation.get("name"), relation.get("resourceId")
        if (
            relation.get("resourceType") == CONFIG_INSTANCE
            and isinstance(name, str)
            and name.lower() == ATTACHED_TO_INSTANCE
            and isinstance(vm, str)
            and vm
        ):
            yield vm


def _config_state_id(item: Mapping[str, Any], resource_id: str) -> str | None:
    """``config:<resourceId>:<configurationStateId>``, or ``...@<captureTime>`` without it."""
    state = item.get("configurationStateId")
    if isinstance(state, str | int) and not isinstance(state, bool) and str(state):
        return f"config:{resource_id}:{state}"
    captured = item.get("configurationItemCaptureTime")
    if isinstance(captured, str) and captured:
        return f"config:{resource_id}@{captured}"
    return None


def _kind(value: Any) -> str:
    """``value`` described for an error message."""
    if value is None:
        return "missing"
    if isinstance(value, Mapping | list):
        return "an object" if isinstance(value, Mapping) else "an array"
    return f"{type(value).__name__} {value!r}"[:80]
