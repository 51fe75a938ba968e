"""mx-relay: a store-and-forward SMTP backup MX relay with a durable SQL queue."""

__version__ = "0.1.0"
