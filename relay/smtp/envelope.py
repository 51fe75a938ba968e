"""What a session learns at MAIL and RCPT: the envelope and its DSN parameters.

Owns `RelayEnvelope` (aiosmtpd's envelope plus BODY=8BITMIME, the recipient
keys that make a repeated mailbox count once, and the RFC 3461 parameters of
the transaction and of each recipient) and the replies to bad DSN
parameters (`501 5.5.4`). Refuses the SMTP dialogue itself (`server.py`) and
the syntax of the parameters (`relay.core.dsnparams`).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiosmtpd.smtp import Envelope

from relay.core.dsnparams import (
    NO_MAIL_PARAMS,
    NO_RCPT_PARAMS,
    MailParams,
    ParamError,
    RcptParams,
    take_mail_params,
    take_rcpt_params,
)
from relay.smtp.spf import SpfVerdict


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus what we learn at MAIL and RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.body_8bitmime = False
        self.rcpt_keys: set[str] = set()
        self.dsn = NO_MAIL_PARAMS
        self.rcpt_dsn: list[RcptParams] = []  # one per entry of rcpt_tos
        self.spf: SpfVerdict | None = None  # None: SPF is off

    def recipient_params(self) -> tuple[tuple[str, RcptParams], ...]:
        """(recipient, its DSN parameters) for those that gave any."""
        return tuple((rcpt, params) for rcpt, params in zip(self.rcpt_tos, self.rcpt_dsn,
                                                            strict=True)
                     if params != NO_RCPT_PARAMS)


def mail_params(params: Sequence[str]) -> tuple[MailParams, list[str]] | str:
    """MAIL FROM's RET and ENVID and the other parameters, or the reply refusing them."""
    taken = take_mail_params(params)
    return taken.reply if isinstance(taken, ParamError) else taken


def rcpt_params(params: Sequence[str], esmtp: bool, smtputf8: bool) -> RcptParams | str:
    """RCPT TO's NOTIFY and ORCPT, or the reply refusing its parameters
    (any at all after HELO; any other than these two)."""
    if not params:
        return NO_RCPT_PARAMS
    if not esmtp:
        return "501 5.5.4 Syntax: RCPT TO:<address>"
    taken = take_rcpt_params(params, smtputf8)
    if isinstance(taken, ParamError):
        return taken.reply
    found, rest = taken
    if rest:
        return f"555 5.5.4 Unsupported option: {rest[0].partition('=')[0]}"
    return found
