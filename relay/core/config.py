"""Configuration: TOML parsed once into frozen, typed objects.

Owns the config file format of SPEC "Configuration": durations and sizes,
environment overrides, defaults, and the `file: key: problem` error lines that
`relay check-config` prints. Refuses to be a global: the parsed `Config` is
passed down explicitly to whatever needs it.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from relay.core.address import AddressError, destination_key, parse_domain
from relay.core.values import (
    HostPort,
    listen_address,
    parse_duration,
    parse_host_port,
    parse_next_hop,
    parse_size,
)

DEFAULT_PATH = Path("config/relay.toml")

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
ListenAddress = Annotated[
    HostPort, BeforeValidator(listen_address), PlainSerializer(HostPort.__str__, return_type=str)
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeConfig(_Section):
    """`[node]`: who this relay is, for banners, headers and MX loop avoidance."""

    hostname: str = "localhost"
    """Our host name: SMTP banner, EHLO name, Received header, DSN Reporting-MTA; an MX host of this
    name is this node (loop avoidance)."""
    addresses: tuple[str, ...] = ()
    """Extra IP addresses that are "me" for MX loop avoidance (NAT, proxies); the listen IPs always
    count."""
    user: str = ""
    """Started as root, `relay serve` drops to this user (its uid, gid and groups only) after
    binding its sockets and opening its queue, whose files it hands to that user; ignored with a
    warning when not started as root. A user that does not exist refuses the start."""

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if value:
            try:
                pwd.getpwnam(value)
            except KeyError:
                raise ValueError(f"no such user {value!r}") from None
        return value

    @field_validator("addresses")
    @classmethod
    def _ips(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_address(a)) for a in value)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not value or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError(f"{value!r} is not a host name")
        return value.lower()


class SmtpConfig(_Section):
    """`[smtp]`: the accept side: listeners, size and rate limits, timeouts, STARTTLS, ETRN."""

    listen: tuple[ListenAddress, ...] = (HostPort("0.0.0.0", 25),)
    """Addresses to accept SMTP on, as `"ip:port"` (`"[::]:25"` for IPv6); a single string is one
    address. `$RELAY_LISTEN` (comma-separated) overrides it."""
    reuse_port: bool = False
    """Bind the listeners with `SO_REUSEPORT`, so several `relay serve` on one host (the
    `mx-relay@.service` template, one PostgreSQL queue) share a port and the kernel spreads
    connections over them; off, a second relay on a port in use fails to start."""
    max_message_size: Size = 35_000_000
    """Largest message accepted; advertised as EHLO `SIZE`; larger gets `552 5.3.4`."""
    max_recipients: int = Field(100, ge=1)
    """Recipients per message; more get `452 4.5.3`."""
    max_connections: int = Field(1000, ge=1)
    """Simultaneous SMTP sessions in all; more are greeted with `421 4.7.0`."""
    max_connections_per_ip: int = Field(20, ge=1)
    """Simultaneous SMTP sessions per client IP; more are greeted with `421 4.7.0`."""
    max_messages_per_ip_per_minute: int = Field(600, ge=0)
    """MAIL commands per client IP a minute; more get `450 4.7.1`; 0 = no limit."""
    greet_pause: Duration = 0.0
    """Wait this long before the `220` greeting; a client that sends anything meanwhile is an
    early talker (spam software that does not wait) and gets `554 5.5.0` and is dropped; 0 = greet
    at once."""
    command_timeout: Duration = 300.0
    """Idle time allowed between commands; then `421 4.4.2` and the session is closed; 0 = no
    timeout."""
    data_timeout: Duration = 600.0
    """Time allowed inside DATA: a client starts with this much, earns 1 s for every
    `min_data_rate` bytes it sends, and never holds more than this; then `421 4.4.2` and the
    session is closed (a slow but steady client is not cut off); 0 = no timeout."""
    min_data_rate: Size = 500
    """Bytes a second a client must keep up inside DATA (Postfix's `smtpd_min_data_rate`): one
    dripping a byte every few seconds runs out of `data_timeout`; 0 = `data_timeout` is only an
    idle timeout."""
    max_session_time: Duration = 3600.0
    """Longest SMTP session: a client that still holds its connection after this long hears
    `421 4.4.2` and is closed (after the reply to a message it is sending); 0 = no limit."""
    shutdown_grace: Duration = 10.0  # on SIGTERM, for messages still arriving
    """On SIGTERM, how long a message still arriving may finish before its session hears `421` and
    the message is dropped (never acknowledged, so its client sends it again)."""
    tls_cert: str = ""
    """PEM certificate (chain) file; STARTTLS is offered when both `tls_cert` and `tls_key` are set.
    Relative to the config file."""
    tls_key: str = ""
    """PEM private key file for `tls_cert`; set both or neither. Relative to the config file."""
    etrn_clients: tuple[str, ...] = ()
    """IP addresses or CIDR networks allowed to send `ETRN <domain>`; others get `459 4.7.1`."""
    etrn_interval: Duration = 10.0
    """At most one `ETRN` per domain per client IP this often; more get `458 4.7.1`; 0 = no
    limit."""
    require_tls_from: tuple[str, ...] = ()
    """IP addresses or CIDR networks that must issue STARTTLS before MAIL; plaintext MAIL from
    them gets `530 5.7.0`. Needs `tls_cert` and `tls_key`."""
    max_inflight_data: Size = 1_000_000_000
    """Memory for messages being received, all sessions together; a message that would exceed it
    is read to its end but not kept, and gets `451 4.3.1`."""
    spf: bool = True
    """Evaluate SPF (RFC 7208) at `MAIL FROM` with the `[dns]` name servers, store the result with
    the message and prepend `Authentication-Results:`; `false` for a relay without DNS."""

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("etrn_clients", "require_tls_from")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in value)

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.require_tls_from and not self.tls_cert:
            raise ValueError("require_tls_from needs tls_cert and tls_key")
        return self

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


class QueueConfig(_Section):
    """`[queue]`: where the queue lives and how long its delivery log is kept."""

    url: str = "sqlite:////var/lib/relay/queue.db"  # absolute: /var/lib/relay/queue.db
    """SQLAlchemy URL of the queue database: `sqlite:////var/lib/relay/queue.db` (four slashes
    for an absolute path) or `postgresql+psycopg://user:password@host/dbname`.
    `$RELAY_QUEUE_URL` overrides it."""
    log_retention: Duration = 7 * 86400.0
    """How long per-recipient outcomes stay in the delivery log after a message leaves the queue."""
    lease: Duration = Field(120.0, gt=0)
    """How long a delivery stays this node's without its heartbeat: a node renews its leases every
    third of it; when one dies, another takes its deliveries over once this has passed. The
    `relay nodes` heartbeat and `relay_nodes_up` count a node up for this long after it was seen."""
    min_free_space: Size = 100_000_000
    """Free space the SQLite queue's file system must keep; below it `MAIL FROM` gets `452 4.3.1`
    and `/healthz` 503, until space returns; 0 = no check."""
    lock_timeout: Duration = Field(5.0, gt=0)
    """How long `relay serve` waits for the SQLite queue's write lock (held by another process)
    before a write fails: a message being stored then gets `451 4.3.0` (within about twice this)
    and `/healthz` answers 503 `database locked` until a write commits again. `relay` commands
    wait 30 s. No effect on PostgreSQL."""
    commit_delay: Duration = Field(0.001, ge=0, le=0.1)
    """How long the queue's writer may wait before a commit for the messages of other SMTP
    sessions of this process that are between MAIL FROM and the end of DATA (at most this, and
    only while there are some), so one commit stores them together: fewer commits per message,
    most of all with several nodes on one PostgreSQL queue. A session alone never waits; a
    message still hears 250 only once its commit is durable; 0 = no wait. At most 100 ms."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "sqlite+", "postgresql:", "postgresql+")):
            raise ValueError(f"{value!r}: expected sqlite:///PATH or postgresql+psycopg://...")
        try:
            make_url(value)
        except (ArgumentError, ValueError) as exc:
            raise ValueError(f"{value!r}: not a database URL: {exc}") from None
        return value

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None (PostgreSQL, or SQLite in memory)."""
        return _sqlite_path(self.url)

    @property
    def location(self) -> str:
        """Where the queue is, for people: SQLite's file, or the URL without its password."""
        path = self.sqlite_path
        if path is not None:
            return str(path)
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite":
            return "SQLite in memory"
        public = URL.create(
            url.drivername, url.username, None, url.host, url.port, url.database, url.query
        )
        return public.render_as_string(hide_password=False)


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


class DeliveryConfig(_Section):
    """`[delivery]`: outbound SMTP to next hops: concurrency, TLS, retry timing, lifetime."""

    port: int = Field(25, ge=1, le=65535)
    """TCP port used to reach next hops found by MX lookup."""
    concurrency: int = Field(100, ge=1)
    """Simultaneous outbound SMTP sessions, in all."""
    per_destination_concurrency: int = Field(20, ge=1)
    """Simultaneous outbound SMTP sessions to one destination domain."""
    connect_timeout: Duration = 30.0
    """Time allowed to connect to one next-hop address before trying the next one."""
    tls: Literal["none", "opportunistic", "required", "verify"] = "opportunistic"
    """STARTTLS to next hops: `none` never, `opportunistic` when offered, `required` or that
    hop counts as failed (certificate not checked), `verify`: required, and the certificate
    must be valid for the MX host name (or `next_hop` host or IP)."""
    tls_ca_file: str = ""
    """PEM file of the CAs `tls = "verify"` trusts (relative to the config file); empty = the
    system CAs."""
    command_timeout: Duration = 300.0
    """Time allowed for each outbound SMTP command's reply (greeting excepted)."""
    data_timeout: Duration = 600.0
    """Time allowed for the whole message after DATA's 354 until the final reply; running
    out after the final dot makes the attempt uncertain (retried)."""
    min_backoff: Duration = 300.0
    """Wait after the first failed attempt; doubles with each attempt (with jitter) up to
    `max_backoff`. Must be above 0."""
    max_backoff: Duration = 3600.0
    """Longest wait between two attempts; not less than `min_backoff`."""
    max_lifetime: Duration = 5 * 86400.0
    """Time in the queue after which undelivered recipients are bounced to the sender."""
    delay_warning: Duration = 0.0
    """Age at which the sender gets one delay DSN; 0 = never send delay DSNs."""

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliveryConfig:
        if self.min_backoff <= 0:
            raise ValueError("min_backoff must be greater than 0")
        if self.max_backoff < self.min_backoff:
            raise ValueError("max_backoff must not be less than min_backoff")
        if self.command_timeout <= 0 or self.data_timeout <= 0:
            raise ValueError("command_timeout and data_timeout must be greater than 0")
        return self


class DnsConfig(_Section):
    """`[dns]`: the resolver used for MX, A and AAAA lookups."""

    nameservers: tuple[str, ...] = ()
    """Name servers as `"ip"` or `"ip:port"` (port 53 by default); empty = the system resolver
    (/etc/resolv.conf)."""
    timeout: Duration = 5.0
    """Time allowed for one DNS lookup; a timeout defers the delivery."""

    @field_validator("nameservers")
    @classmethod
    def _servers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for server in value:
            hp = parse_host_port(server, default_port=53)
            ipaddress.ip_address(hp.host)
        return value

    @property
    def nameserver_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(
            (hp.host, hp.port) for hp in (parse_host_port(s, 53) for s in self.nameservers)
        )


class BouncesConfig(_Section):
    """`[bounces]`: to whom DSNs (failure, delay, relayed) go."""

    send_to: Literal["all", "spf-pass"] = "all"
    """`all`: every sender but `<>`; `spf-pass`: only a sender whose SPF result at `MAIL FROM` was
    `pass` (others are logged as `bounce suppressed` and counted), so bounces never become
    backscatter. Needs `smtp.spf`."""


class MetricsConfig(_Section):
    """`[metrics]`: the HTTP endpoint for Prometheus `/metrics` and `/healthz`."""

    listen: str = "127.0.0.1:9025"
    """`"ip:port"` serving Prometheus `/metrics` and `/healthz`; `""` disables the endpoint."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            listen_address(value)
        return value

    @property
    def address(self) -> HostPort | None:
        return listen_address(self.listen) if self.listen else None


class LogConfig(_Section):
    """`[log]`: the mail log and diagnostics on stderr."""

    format: Literal["text", "json"] = "text"  # json: one object per line, for log shippers
    """`text`: Postfix-like lines; `json`: one JSON object per line, for log shippers."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level logged; `relay serve --log-level` overrides it."""


class DomainConfig(_Section):
    """`[domains."NAME"]`: one table per hosted domain (either spelling of an IDN)."""

    recipients: tuple[str, ...] = ()
    """Local parts or full addresses accepted for this domain (`@domain` accepts all); empty (and no
    `recipients_file`) = accept any."""
    recipients_file: str = ""
    """File with one address or local part a line (`#` comments), added to `recipients` and re-read
    when it changes. Relative to the config file."""
    next_hop: str = ""
    """`"host:port"` or `"[ip]:port"` (port 25 by default) to deliver to instead of looking up MX
    records."""
    verify: Literal["off", "learned", "callout"] = "off"
    """`learned`: remember which addresses the next hop accepts (2xx) or refuses as unknown
    (5xx with `5.1.x`) during deliveries; a known-invalid address gets `550 5.1.1` at our RCPT.
    `callout`: as `learned`, and an address not known yet is asked of the next hop at RCPT time
    (EHLO, `MAIL FROM:<>`, `RCPT TO`, QUIT; no message), its answer learned and decisive.
    A `recipients` list or `recipients_file` decides instead when set."""
    unknown_recipient: Literal["accept", "tempfail"] = "accept"
    """With `verify` on, what an address not known yet gets: `accept`, or `tempfail`
    (`450 4.1.1`, so its sender tries again once the next hop has taught us)."""
    verify_valid_ttl: Duration = 30 * 86400.0
    """A known-valid address is forgotten this long after the next hop last accepted it."""
    verify_invalid_ttl: Duration = 3 * 86400.0
    """A known-invalid address is forgotten this long after the next hop last refused it."""
    verify_timeout: Duration = Field(10.0, gt=0)
    """Callout probes: the whole probe, connect to QUIT; the longest a RCPT waits for one.
    Past it, `unknown_recipient` applies."""

    @field_validator("recipients")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().lower() for v in value if v.strip())

    @field_validator("next_hop")
    @classmethod
    def _next_hop(cls, value: str) -> str:
        if value:
            parse_next_hop(value)
        return value.strip()


class Config(_Section):
    """The whole file: one table per section, `[domains."NAME"]` per hosted domain."""

    node: NodeConfig = NodeConfig()
    smtp: SmtpConfig = SmtpConfig()
    queue: QueueConfig = QueueConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    dns: DnsConfig = DnsConfig()
    bounces: BouncesConfig = BouncesConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    domains: dict[str, DomainConfig] = {}
    """Hosted domains, one `[domains."NAME"]` table each; mail for any other domain is refused with
    `554 5.7.1`."""
    source: str = "<defaults>"

    @field_validator("domains")
    @classmethod
    def _domain_names(cls, value: dict[str, DomainConfig]) -> dict[str, DomainConfig]:
        """Either spelling of a domain (`bücher.test`, `xn--bcher-kva.test`) is
        accepted; it is stored under its A-label key, as the queue stores it."""
        out: dict[str, DomainConfig] = {}
        for name, domain in value.items():
            try:
                parsed = parse_domain(name)
            except AddressError as exc:
                raise ValueError(str(exc)) from None
            if parsed.is_literal or "." not in parsed.key:
                raise ValueError(f"{name!r} is not a domain name: needs a dot, no brackets")
            if parsed.key in out:
                raise ValueError(f"{name!r} is configured twice (as {parsed.key})")
            out[parsed.key] = domain
        return out

    @model_validator(mode="after")
    def _spf_for_bounces(self) -> Config:
        if self.bounces.send_to == "spf-pass" and not self.smtp.spf:
            raise ValueError('bounces.send_to: "spf-pass" needs smtp.spf = true')
        return self

    def domain(self, name: str) -> DomainConfig | None:
        return self.domains.get(destination_key(name))


class ConfigError(Exception):
    """Raised with every problem found, each as `file: key: problem`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    if url := env.get("RELAY_QUEUE_URL"):
        data.setdefault("queue", {})["url"] = url
    if listen := env.get("RELAY_LISTEN"):
        data.setdefault("smtp", {})["listen"] = [p.strip() for p in listen.split(",") if p.strip()]
    return data


def _file_problem(path: Path) -> str | None:
    """Why a file the relay must read cannot be read, or None."""
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable"
    return None


def _database_problem(path: Path) -> str | None:
    """Why a SQLite database file cannot be opened or created there, or None."""
    if path.is_dir():
        return f"{path} is a directory, not a database file"
    if path.exists():
        return None
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot create {path}: {ancestor} is not a directory"
    return None


def _check_files(written: Config, resolved: Config) -> list[str]:
    """Paths the config names must work now, not at the first TLS handshake.

    A problem names the path as written and, when relative, where it resolved.
    """

    def paths(config: Config) -> list[tuple[str, str]]:
        named = [("smtp.tls_cert", config.smtp.tls_cert), ("smtp.tls_key", config.smtp.tls_key),
                 ("delivery.tls_ca_file", config.delivery.tls_ca_file)]
        named += [
            (f"domains.{name}.recipients_file", domain.recipients_file)
            for name, domain in config.domains.items()
        ]
        return named

    problems = []
    for (key, value), (_, path) in zip(paths(written), paths(resolved), strict=True):
        if value and (problem := _file_problem(Path(path))):
            where = "" if value == path else f" (resolved to {path})"
            problems.append(f"{key}: {problem}: {value}{where}")
    database = resolved.queue.sqlite_path
    if database is not None and (problem := _database_problem(database)):
        problems.append(f"queue.url: {problem}")
    return problems


def _resolve_paths(config: Config, base: Path, queue_base: Path) -> Config:
    """Relative file paths are relative to the config file's directory (SPEC Part 2);
    a SQLite URL from the environment is relative to the working directory."""

    def fix(value: str) -> str:
        return str(base / value) if value and not Path(value).is_absolute() else value

    smtp = config.smtp.model_copy(
        update={"tls_cert": fix(config.smtp.tls_cert), "tls_key": fix(config.smtp.tls_key)}
    )
    delivery = config.delivery.model_copy(
        update={"tls_ca_file": fix(config.delivery.tls_ca_file)})
    domains = {
        name: d.model_copy(update={"recipients_file": fix(d.recipients_file)})
        for name, d in config.domains.items()
    }
    queue = config.queue
    database = queue.sqlite_path
    if database is not None and not database.is_absolute():
        url = make_url(queue.url).set(database=str(queue_base / database))
        queue = queue.model_copy(update={"url": url.render_as_string(hide_password=False)})
    return config.model_copy(
        update={"smtp": smtp, "delivery": delivery, "domains": domains, "queue": queue})


def _format_error(source: str, error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    message = message.removeprefix("Value error, ")
    if not error["loc"] and re.match(r"[a-z_]+\.[a-z_]+: ", message):
        return f"{source}: {message}"  # a rule across sections names its own key
    return f"{source}: {key}: {message}"


def from_mapping(
    data: Mapping[str, Any],
    source: str = "<defaults>",
    base: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Validate already-parsed TOML data; every problem is reported at once.

    Relative paths resolve against `base` (the config file's directory; the
    working directory when None), a `RELAY_QUEUE_URL` against the working directory.
    """
    env = os.environ if env is None else env
    merged = _env_overrides(
        {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}, env
    )
    if "source" in merged:
        raise ConfigError([f"{source}: source: unknown key"])
    try:
        config = Config.model_validate({**merged, "source": source})
    except ValidationError as exc:
        raise ConfigError([_format_error(source, e) for e in exc.errors()]) from None
    cwd = Path.cwd()
    base = (cwd / base) if base is not None else cwd
    resolved = _resolve_paths(config, base, cwd if env.get("RELAY_QUEUE_URL") else base)
    if problems := [f"{source}: {p}" for p in _check_files(config, resolved)]:
        raise ConfigError(problems)
    return resolved


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Find and load the config: PATH, else $RELAY_CONFIG, else config/relay.toml, else defaults."""
    env = os.environ if env is None else env
    chosen = Path(path) if path else Path(env["RELAY_CONFIG"]) if env.get("RELAY_CONFIG") else None
    if chosen is None:
        if not DEFAULT_PATH.is_file():
            return from_mapping({}, env=env)
        chosen = DEFAULT_PATH
    source = str(chosen)
    try:
        data = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: not UTF-8 text"]) from None
    return from_mapping(data, source=source, base=chosen.parent, env=env)


def effective(config: Config) -> dict[str, Any]:
    """The config as plain data, for `relay check-config` to print: paths as
    resolved, a database password as `***`."""
    data = config.model_dump(mode="json", exclude={"source"})
    data["queue"]["url"] = make_url(config.queue.url).render_as_string(hide_password=True)
    return data
