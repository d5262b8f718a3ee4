"""The AwesomeCloud simulator: an in-memory cloud served over HTTP, with churn and event delivery.

Flow: **simulator** (model -> cloud -> app -> server) -> client -> collector -> parser;
cloud mutations -> delivery -> Kafka topic / webhook -> refreshd catcher.

Used by the tests, the benchmarks, the demo (the embedded endpoint of a
manager connection) and ``refreshd simulator`` (through
``provider.simulator_main``).  Modules:

- ``model``     object shapes, validation and random objects (no state)
- ``cloud``     :class:`cloud.Cloud`: the objects, their mutations and the event log
- ``churn``     random realistic mutations of a cloud
- ``app``       the HTTP app: read API, admin API, fault injection, request stats
- ``delivery``  pushing the event log to Kafka or to a webhook
- ``server``    serving a cloud on a TCP port, embedded or standalone (the CLI command)
"""
