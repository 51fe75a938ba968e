"""The queue manager: due work, next hops, one SMTP delivery, backoff, destination
state, DSNs.

Owns what happens to a claimed message until its outcome is recorded. Refuses to
write the database except through the queue's writer, and refuses to accept mail.
"""
