"""What processes sharing one queue tell each other.

Owns wake-ups (`notify.py`): an operator's flush, release or ETRN reaches
every running `relay serve` at once instead of at its next poll; and each
node's presence (`nodes.py`): its id, the heartbeat that renews its leases,
the peers loop avoidance counts as itself. Refuses queue contents: a
wake-up carries no data, it only says "look again"; the rows are the
queue's.
"""
