"""The operator's side: the `relay` command, metrics and `/metrics` + `/healthz`.

Owns what an operator types and scrapes. Changes the queue only through the
queue's verbs. Nothing in `relay` imports it but the entry point and the wiring.
"""
