"""Fixtures shared by every tier: real loopback servers live in tests/support."""
