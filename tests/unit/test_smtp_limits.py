"""Per-client limits: connections in total and per IP, MAIL commands per IP a minute.

(tests/component/test_smtpd.py checks the replies these lead to over real sockets.)
"""

from datetime import UTC, datetime

from relay.core.clock import FakeClock
from relay.smtp.limits import ClientLimits

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def limits(total: int = 10, per_ip: int = 2, per_minute: int = 3) -> ClientLimits:
    return ClientLimits(total, per_ip, per_minute, FakeClock(T0))


def test_a_client_gets_its_per_ip_share_and_no_more() -> None:
    lim = limits(per_ip=2)
    assert lim.connect("192.0.2.1") and lim.connect("192.0.2.1")
    assert not lim.connect("192.0.2.1")
    assert lim.connect("192.0.2.2")  # another client is not held back
    assert lim.connections == 3 and lim.connections_from("192.0.2.1") == 2


def test_the_total_limit_holds_across_clients() -> None:
    lim = limits(total=2, per_ip=5)
    assert lim.connect("192.0.2.1") and lim.connect("192.0.2.2")
    assert not lim.connect("192.0.2.3")
    assert lim.connections == 2  # a refused connection is not counted


def test_a_disconnect_makes_room_again() -> None:
    lim = limits(total=1, per_ip=1)
    assert lim.connect("192.0.2.1")
    lim.disconnect("192.0.2.1")
    assert lim.connections == 0 and lim.connections_from("192.0.2.1") == 0
    assert lim.connect("192.0.2.2")


def test_messages_per_minute_slide_with_the_clock() -> None:
    lim = limits(per_minute=3)
    clock = lim.clock
    assert isinstance(clock, FakeClock)
    assert all(lim.allow_message("192.0.2.1") for _ in range(3))
    assert not lim.allow_message("192.0.2.1")
    assert lim.allow_message("192.0.2.2")
    clock.advance(59)
    assert not lim.allow_message("192.0.2.1")
    clock.advance(1.5)  # the first three are over a minute old
    assert lim.allow_message("192.0.2.1")


def test_clients_quiet_for_a_minute_are_forgotten() -> None:
    lim = limits(per_minute=3)
    clock = lim.clock
    assert isinstance(clock, FakeClock)
    for n in range(100):
        lim.allow_message(f"192.0.2.{n}")
    clock.advance(120)
    lim.allow_message("198.51.100.1")
    assert list(lim._mail_times) == ["198.51.100.1"]


def test_no_message_limit_when_it_is_zero() -> None:
    lim = limits(per_minute=0)
    assert all(lim.allow_message("192.0.2.1") for _ in range(10_000))
