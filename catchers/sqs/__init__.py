"""The SQS catcher, one module per part (entry point ``catchers.sqs.catcher:create``).

Flow: **SQS message -> intake (route, map, validate) -> Target(s) + Ack**
-> batcher -> refresh committed -> Ack done -> message deleted.

``catcher`` (the Catcher and its factory), ``settings`` (options and counters),
``receiving`` (the receive loops), ``messages`` (message bodies -> CloudEvents),
``leases`` (visibility renewal, deletes after commit), ``client`` (the queue client).
"""
