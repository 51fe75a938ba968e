"""Alembic revisions of the queue schema; installed as `relay.migrations`."""
