"""Fixtures shared by every tier: real loopback servers live in tests/support."""

pytest_plugins = [
    "tests.support.dns_server",
    "tests.support.smtp_sink",
    "tests.support.relay_process",
    "tests.support.postgres",
]
