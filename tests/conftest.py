pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.databases",
    "tests.fixtures.kafka_broker",
    "tests.fixtures.moto_server",
    "tests.fixtures.private_postgres",
]
