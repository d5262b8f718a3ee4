import logging
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.databases",
    "tests.fixtures.kafka_broker",
    "tests.fixtures.moto_server",
    "tests.fixtures.private_postgres",
]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A CLI test installs the daemon's log handler on the stream pytest captured for it;
    once that stream is closed, later tests' log records would fail to print there."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)
