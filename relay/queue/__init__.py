"""The queue database: schema and migrations, the one writer, and read-only views.

Owns every SQL statement, durability (what is fsync'd before which reply), leases
and counts. Refuses SMTP, DNS and delivery decisions: callers pass it values and
read values back. Imports only `relay.core`.
"""
