"""What one client may take of the SMTP listener: connections, mail a minute, ETRNs.

Owns the counts behind `smtp.max_connections`, `max_connections_per_ip`,
`max_messages_per_ip_per_minute` and `etrn_interval`, as Postfix's anvil keeps them for smtpd.
Refuses I/O and replies: sessions ask, and say the 421, 450 or 458 themselves.
"""

from __future__ import annotations

import collections

from relay.core.clock import Clock

WINDOW = 60.0  # seconds: the per-minute message limit looks this far back


class ClientLimits:
    """Connection counts in total and per client IP; MAIL commands per IP
    over the last minute (0 means no limit)."""

    def __init__(self, max_connections: int, max_connections_per_ip: int,
                 max_messages_per_minute: int, clock: Clock,
                 etrn_interval: float = 0.0) -> None:
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.max_messages_per_minute = max_messages_per_minute
        self.clock = clock
        self.connections = 0
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._mail_times: dict[str, collections.deque[float]] = {}
        self._swept_at = 0.0
        self.etrn_interval = etrn_interval
        self._etrn_times: dict[tuple[str, str], float] = {}

    def connect(self, ip: str) -> bool:
        """Count a connection from `ip` in; False (nothing counted) when over a limit."""
        if (self.connections >= self.max_connections
                or self._per_ip[ip] >= self.max_connections_per_ip):
            return False
        self.connections += 1
        self._per_ip[ip] += 1
        return True

    def disconnect(self, ip: str) -> None:
        """Count out a connection that `connect` counted in."""
        self.connections -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def connections_from(self, ip: str) -> int:
        return self._per_ip[ip]

    def allow_message(self, ip: str) -> bool:
        """Count one MAIL from `ip`, unless it already sent the most a minute allows."""
        limit = self.max_messages_per_minute
        if not limit:
            return True
        now = self.clock.now().timestamp()
        cutoff = now - WINDOW
        if now - self._swept_at > WINDOW:  # forget clients quiet for a minute
            self._swept_at = now
            for key in [k for k, times in self._mail_times.items() if times[-1] <= cutoff]:
                del self._mail_times[key]
        times = self._mail_times.setdefault(ip, collections.deque())
        while times and times[0] <= cutoff:
            times.popleft()
        if len(times) >= limit:
            return False
        times.append(now)
        return True

    def allow_etrn(self, ip: str, domain: str) -> bool:
        """Count one ETRN for `domain` from `ip`, unless it had one within
        `etrn_interval`: each ETRN starts a delivery run, so a client repeating
        it must not keep the delivery side busy (0 means no limit)."""
        interval = self.etrn_interval
        if interval <= 0:
            return True
        now = self.clock.now().timestamp()
        if len(self._etrn_times) > 1024:  # forget the ones whose interval has passed
            self._etrn_times = {k: t for k, t in self._etrn_times.items() if now - t < interval}
        last = self._etrn_times.get((ip, domain))
        if last is not None and now - last < interval:
            return False
        self._etrn_times[(ip, domain)] = now
        return True
