"""The accept side: listening sockets, one aiosmtpd session, DATA reading, client limits,
hosted-domain policy.

Owns every reply a sending client hears, and the rule that `250` comes only after
the queue's commit. Refuses to write the database itself (it hands messages to
`relay.queue.store`) and to deliver anything.
"""
