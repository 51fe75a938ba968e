"""DSN parameters of RFC 3461 (and RFC 6533's UTF-8 addresses): parse, encode, decode.

Owns the syntax of `RET=`, `ENVID=` (MAIL FROM) and `NOTIFY=`, `ORCPT=`
(RCPT TO), xtext (RFC 3461 4) and RFC 6533's utf-8-addr-xtext/unitext,
and what a recipient's NOTIFY asks for. Values are kept exactly as the
client sent them (`MailParams`, `RcptParams`), so a next hop that offers
DSN gets them unchanged; decoding is for our own DSNs. Errors are values
(`ParamError`) that the SMTP side answers with `501 5.5.4`.

Refuses SMTP state and storage: a pure function of its arguments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MailParams",
    "ParamError",
    "RcptParams",
    "orcpt_address",
    "take_mail_params",
    "take_rcpt_params",
    "wants",
    "xtext_decode",
    "xtext_encode",
]

NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
_MAIL_KEYS = ("RET", "ENVID")
_RCPT_KEYS = ("NOTIFY", "ORCPT")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # an atom, as RFC 3464 names them
_HEX = "0123456789ABCDEF"
_EMBEDDED = re.compile(r"\\x\{([0-9A-F]{1,6})\}")  # RFC 6533 EmbeddedUnicodeChar


@dataclass(frozen=True, slots=True)
class ParamError:
    """Why a DSN parameter was refused: the text after `501 5.5.4 `."""

    text: str

    @property
    def reply(self) -> str:
        return f"501 5.5.4 {self.text}"


@dataclass(frozen=True, slots=True)
class MailParams:
    """RET (upper case: FULL or HDRS) and ENVID (xtext as sent); None: not given."""

    ret: str | None = None
    envid: str | None = None

    def options(self) -> list[str]:
        """The MAIL FROM parameters to pass on, as they came."""
        return [f"{key}={value}" for key, value in (("RET", self.ret), ("ENVID", self.envid))
                if value is not None]


@dataclass(frozen=True, slots=True)
class RcptParams:
    """NOTIFY (upper-case words) and ORCPT (`addr-type;xtext` as sent); None: not given."""

    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    def options(self, smtputf8: bool = True) -> list[str]:
        """The RCPT TO parameters to pass on, as they came; without `smtputf8`
        a UTF-8 ORCPT goes as RFC 6533 utf-8-addr-xtext, which is 7-bit."""
        out = []
        if self.notify is not None:
            out.append("NOTIFY=" + ",".join(self.notify))
        if self.orcpt is not None:
            orcpt = self.orcpt
            if not smtputf8 and not orcpt.isascii():
                parsed = orcpt_address(orcpt)
                orcpt = ("utf-8;" + utf8_addr_xtext(parsed[1]) if isinstance(parsed, tuple)
                         else xtext_encode(orcpt))
            out.append(f"ORCPT={orcpt}")
        return out


NO_MAIL_PARAMS = MailParams()
NO_RCPT_PARAMS = RcptParams()


def wants(notify: Sequence[str] | None, event: str) -> bool:
    """Does a recipient with this NOTIFY want a DSN on `event` (SUCCESS,
    FAILURE, DELAY)? Without NOTIFY, failures and delays are reported
    (RFC 3461 4.1 leaves it to us; we do as Postfix does), successes not."""
    if notify is None:
        return event != "SUCCESS"
    return event in notify


def xtext_encode(text: str) -> str:
    """RFC 3461 4: `+XX` for "+", "=" and anything outside 33..126 (UTF-8 octets)."""
    out = []
    for ch in text:
        if 33 <= ord(ch) <= 126 and ch not in "+=":
            out.append(ch)
        else:
            out += [f"+{octet:02X}" for octet in ch.encode("utf-8")]
    return "".join(out)


def utf8_addr_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: `\\x{HEX}` for anything outside QCHAR (7-bit)."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "\\+=" else f"\\x{{{ord(c):X}}}"
                   for c in address)


def xtext_decode(value: str) -> str | ParamError:
    """The text an xtext stands for (its octets read as UTF-8), or why it is not xtext."""
    octets = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            pair = value[i + 1:i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                return ParamError("Bad xtext: '+' must be followed by two upper-case hex digits")
            octets.append(int(pair, 16))
            i += 3
            continue
        if not 33 <= ord(ch) <= 126 or ch == "=":
            return ParamError("Bad xtext: character outside xchar")
        octets.append(ord(ch))
        i += 1
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        return ParamError("Bad xtext: not UTF-8")


def _unitext_decode(value: str) -> str | ParamError:
    """RFC 6533 utf-8-addr-xtext / utf-8-addr-unitext (and plain xtext): `\\x{HEX}`
    escapes and, for the xtext forms, `+XX`; raw UTF-8 is allowed (unitext)."""
    if "+" in value:  # an xtext form: its +XX first
        if not value.isascii():
            return ParamError("Bad ORCPT address: '+' in utf-8-addr-unitext")
        decoded = xtext_decode(value)
        if isinstance(decoded, ParamError):
            return decoded
        value = decoded
    if any(ord(c) < 33 or ord(c) == 127 for c in value):
        return ParamError("Bad ORCPT address: control character")

    def replace(match: re.Match[str]) -> str:
        code = int(match.group(1), 16)
        return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"

    rest = _EMBEDDED.sub("", value)
    if "\\" in rest:
        return ParamError("Bad ORCPT address: '\\' outside \\x{HEX}")
    return _EMBEDDED.sub(replace, value)


def orcpt_address(orcpt: str) -> tuple[str, str] | ParamError:
    """(addr-type lower case, the decoded address) of an ORCPT value."""
    kind, semi, value = orcpt.partition(";")
    if not semi or not _ADDR_TYPE.fullmatch(kind) or not value:
        return ParamError("Bad ORCPT parameter: addr-type;address expected")
    kind = kind.lower()
    if kind == "utf-8":
        decoded = _unitext_decode(value)
    elif kind == "rfc822":
        if not value.isascii():
            return ParamError("Bad ORCPT parameter: rfc822 address must be xtext")
        decoded = xtext_decode(value)
    else:
        return ParamError(f"Bad ORCPT parameter: unknown address type {kind}")
    if isinstance(decoded, ParamError):
        return decoded
    if not decoded:
        return ParamError("Bad ORCPT parameter: empty address")
    if kind == "rfc822" and not decoded.isascii():
        return ParamError("Bad ORCPT parameter: non-ASCII rfc822 address (use utf-8)")
    return kind, decoded


def _split(params: Sequence[str], keys: tuple[str, ...]
           ) -> tuple[dict[str, str], list[str]] | ParamError:
    """Our `keys` (upper case, each at most once) apart from the other parameters."""
    ours: dict[str, str] = {}
    rest: list[str] = []
    for param in params:
        key, eq, value = param.partition("=")
        key = key.upper()
        if key not in keys:
            rest.append(param)
        elif key in ours:
            return ParamError(f"Repeated {key} parameter")
        elif not eq or not value:
            return ParamError(f"Bad {key} parameter: a value is required")
        else:
            ours[key] = value
    return ours, rest


def take_mail_params(params: Sequence[str]) -> tuple[MailParams, list[str]] | ParamError:
    """RET and ENVID from MAIL FROM's parameters, and the parameters left over."""
    split = _split(params, _MAIL_KEYS)
    if isinstance(split, ParamError):
        return split
    ours, rest = split
    ret = ours.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            return ParamError("Bad RET parameter: FULL or HDRS expected")
    envid = ours.get("ENVID")
    if envid is not None:
        if len(envid) > MAX_ENVID:
            return ParamError(f"Bad ENVID parameter: longer than {MAX_ENVID} characters")
        decoded = xtext_decode(envid)
        if isinstance(decoded, ParamError):
            return ParamError(f"Bad ENVID parameter: {decoded.text}")
        if not all(32 <= ord(c) <= 126 for c in decoded):
            return ParamError("Bad ENVID parameter: not printable US-ASCII")
    return MailParams(ret, envid), rest


def take_rcpt_params(params: Sequence[str], smtputf8: bool = False
                     ) -> tuple[RcptParams, list[str]] | ParamError:
    """NOTIFY and ORCPT from RCPT TO's parameters, and the parameters left over.

    An ORCPT with raw UTF-8 (RFC 6533 utf-8-addr-unitext) needs `smtputf8`.
    """
    split = _split(params, _RCPT_KEYS)
    if isinstance(split, ParamError):
        return split
    ours, rest = split
    notify: tuple[str, ...] | None = None
    if "NOTIFY" in ours:
        words = tuple(w.upper() for w in ours["NOTIFY"].split(","))
        if words != ("NEVER",):
            if not all(w in NOTIFY_WORDS for w in words):
                return ParamError("Bad NOTIFY parameter: NEVER, or SUCCESS, FAILURE, DELAY")
            if len(set(words)) != len(words):
                return ParamError("Bad NOTIFY parameter: a word is repeated")
        notify = words
    orcpt = ours.get("ORCPT")
    if orcpt is not None:
        if len(orcpt) > MAX_ORCPT:
            return ParamError(f"Bad ORCPT parameter: longer than {MAX_ORCPT} characters")
        if not orcpt.isascii():
            if not smtputf8:
                return ParamError("Bad ORCPT parameter: UTF-8 without SMTPUTF8")
            try:
                orcpt.encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8 (surrogate escapes)
                return ParamError("Bad ORCPT parameter: not UTF-8")
        parsed = orcpt_address(orcpt)
        if isinstance(parsed, ParamError):
            return parsed
    return RcptParams(notify, orcpt), rest


def notify_text(notify: Sequence[str] | None) -> str | None:
    """NOTIFY as stored: the words joined by commas; None when not given."""
    return None if notify is None else ",".join(notify)


def notify_words(stored: str | None) -> tuple[str, ...] | None:
    """The inverse of `notify_text`."""
    return None if stored is None else tuple(stored.split(","))
