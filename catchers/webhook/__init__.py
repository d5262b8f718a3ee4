"""The webhook catcher, one module per part (entry point ``catchers.webhook.catcher:create``).

Flow: **HTTP request -> CloudEvent(s)** -> intake (route, map) -> **Target(s) + Ack**
-> batcher -> refresh committed -> Ack done -> 200.

``catcher`` (the Catcher, its answers and its factory), ``settings`` (options and
counters), ``requests`` (decoding a request's events, waiting for their commit).
"""
