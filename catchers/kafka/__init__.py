"""The Kafka catcher, one module per part (entry point ``catchers.kafka.catcher:create``).

Flow: **Kafka record -> intake (route, map, validate) -> Target(s) + RecordAck**
-> batcher -> refresh committed -> Ack done -> offset committed.

``catcher`` (the Catcher and its factory), ``settings`` (options and counters),
``polling`` (the poll loop), ``records`` (records -> the intake, dead letters in
order), ``commits`` and ``offsets`` (at-least-once offset commits),
``resets`` (offset resets -> full refresh), ``dead_letters`` (the producer).
"""
