"""Config parsing: durations, sizes, env overrides, and the errors operators read."""

from pathlib import Path

import pytest

from relay.core import config
from relay.core.config import ConfigError
from relay.core.values import HostPort, parse_duration, parse_next_hop, parse_size

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), (90, 90), ("1.5h", 5400),
     ("250ms", 0.25), ("0s", 0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5x", "", "m5", "-3s", True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [("35MB", 35_000_000), ("512KiB", 524288), (1024, 1024), ("10 kb", 10_000), ("1GB", 10**9)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["35XB", "MB", "-1", True, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_problems_are_file_key_problem_lines(tmp_path: Path) -> None:
    path = write(tmp_path, """
[smtp]
listen = ["127.0.0.1:2525"]
bogus = 1
[delivery]
min_backoff = "5x"
tls = "sometimes"
""")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert f"{path}: smtp.bogus: unknown key" in err.value.problems
    assert any(p.startswith(f"{path}: delivery.min_backoff: ") for p in err.value.problems)
    assert any(p.startswith(f"{path}: delivery.tls: ") for p in err.value.problems)


def test_missing_files_named(tmp_path: Path) -> None:
    path = write(tmp_path, """
[smtp]
tls_cert = "cert.pem"
tls_key = "key.pem"
[domains."verrotech.com"]
recipients_file = "users.txt"
""")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert (
        f"{path}: smtp.tls_cert: file not found: cert.pem (resolved to {tmp_path}/cert.pem)"
        in err.value.problems
    )
    assert (
        f"{path}: domains.verrotech.com.recipients_file: file not found: users.txt "
        f"(resolved to {tmp_path}/users.txt)" in err.value.problems
    )


def test_relative_files_resolve_next_to_config(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text("alice\n")
    path = write(tmp_path, '[domains."Verrotech.COM"]\nrecipients_file = "users.txt"\n')
    cfg = config.load(path, env={})
    domain = cfg.domain("verrotech.com.")
    assert domain is not None
    assert domain.recipients_file == str(tmp_path / "users.txt")


def test_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELAY_QUEUE_URL is typed in a shell: relative to the working directory."""
    path = write(tmp_path, '[queue]\nurl = "sqlite:///a.db"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(path, env={"RELAY_QUEUE_URL": "sqlite:///b.db",
                                 "RELAY_LISTEN": "127.0.0.2:25, [::1]:2525"})
    assert cfg.queue.url == f"sqlite:///{elsewhere}/b.db"
    assert cfg.queue.location == str(elsewhere / "b.db")
    assert [str(a) for a in cfg.smtp.listen] == ["127.0.0.2:25", "[::1]:2525"]


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config.load(env={}).source == "<defaults>"
    env_file = write(tmp_path, '[node]\nhostname = "from-env.example"\n')
    assert config.load(env={"RELAY_CONFIG": str(env_file)}).node.hostname == "from-env.example"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "relay.toml").write_text('[node]\nhostname = "default.example"\n')
    assert config.load(env={}).node.hostname == "default.example"


@pytest.mark.parametrize("text", ["[smtp\n", "x = \n"])
def test_toml_syntax_error_is_one_line(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), env={})
    assert len(err.value.problems) == 1
    assert "TOML syntax" in err.value.problems[0]


@pytest.mark.parametrize("name", ["example.toml", "hektor.toml", "norwich.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = config.load(REPO / "config" / name, env={})
    assert cfg.domains


def test_reference_deployment_names() -> None:
    hektor = config.load(REPO / "config" / "hektor.toml", env={})
    norwich = config.load(REPO / "config" / "norwich.toml", env={})
    assert hektor.node.hostname == "mail.verrotech.net"
    assert norwich.node.hostname == "mail.noc.verrotech.com"
    assert "verrotech.com" in hektor.domains and "verrotech.com" in norwich.domains


@pytest.mark.parametrize("name", ["bücher.test", "xn--bcher-kva.test", "BÜCHER.Test."])
def test_an_idn_domain_is_configured_in_either_spelling(name: str) -> None:
    cfg = config.from_mapping({"domains": {name: {"next_hop": "[127.0.0.2]:25"}}}, env={})
    assert list(cfg.domains) == ["xn--bcher-kva.test"]
    for spelling in ("bücher.test", "XN--BCHER-KVA.test.", "Bücher.test"):
        found = cfg.domain(spelling)
        assert found is not None and found.next_hop == "[127.0.0.2]:25"


@pytest.mark.parametrize(
    ("domains", "problem"),
    [({"a..b": {}}, "'a..b' is not a domain name: empty label"),
     ({"bü_cher.test": {}}, "'bü_cher.test' is not a domain name"),
     ({"[192.0.2.1]": {}}, "needs a dot, no brackets"),
     ({"bücher.test": {}, "xn--bcher-kva.test": {}}, "configured twice")],
)
def test_bad_domain_keys_are_named(domains: dict[str, object], problem: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.from_mapping({"domains": domains}, env={})
    assert problem in str(caught.value)


# -- relative paths resolve next to the config, whatever the working directory ----


def test_relative_sqlite_queue_resolves_next_to_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write(etc, '[queue]\nurl = "sqlite:///var/queue.db?timeout=5"\n')
    monkeypatch.chdir(tmp_path)
    cfg = config.load(Path("etc/relay.toml"), env={})
    assert cfg.queue.url == f"sqlite:///{etc}/var/queue.db?timeout=5"
    assert cfg.queue.location == str(etc / "var" / "queue.db")
    assert config.effective(cfg)["queue"]["url"] == cfg.queue.url  # what check-config prints
    absolute = config.load(write(etc, '[queue]\nurl = "sqlite:////srv/q.db"\n'), env={})
    assert absolute.queue.location == "/srv/q.db"
    assert path.exists()


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("postgresql+psycopg://relay:s3cret@db.example:5432/relay",
         "postgresql+psycopg://relay@db.example:5432/relay"),
        ("sqlite://", "SQLite in memory"),
        ("sqlite:///:memory:", "SQLite in memory"),
    ],
)
def test_queue_location_never_shows_a_password(tmp_path: Path, url: str, location: str) -> None:
    cfg = config.load(write(tmp_path, f'[queue]\nurl = "{url}"\n'), env={})
    assert cfg.queue.url == url
    assert cfg.queue.location == location
    assert "s3cret" not in cfg.queue.location
    assert "s3cret" not in config.effective(cfg)["queue"]["url"]  # check-config prints it


def test_tls_files_resolve_next_to_config(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("cert.pem", "key.pem"):
        (tmp_path / "tls" / name).write_text("x")
    path = write(tmp_path, '[smtp]\ntls_cert = "tls/cert.pem"\ntls_key = "tls/key.pem"\n')
    cfg = config.load(path, env={})
    assert cfg.smtp.tls_cert == str(tmp_path / "tls" / "cert.pem")
    assert cfg.smtp.tls_key == str(tmp_path / "tls" / "key.pem")


# -- values that can never work are refused, as file: key: problem --------------------


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    prefix = f"{path}: "
    assert all(p.startswith(prefix) for p in err.value.problems), err.value.problems
    return [p.removeprefix(prefix) for p in err.value.problems]


@pytest.mark.parametrize(
    ("next_hop", "problem"),
    [
        ("mail.example.com:", "port must be a number from 0 to 65535"),
        ("127.0.0.1:0", "port must be from 1 to 65535"),
        ("mail.example.com:65536", "port must be a number from 0 to 65535"),
        ("mail.example.com:smtp", "port must be a number from 0 to 65535"),
        ("host name:25", "'host name' is not a host name or IP address"),
        ("-bad-.example:25", "'-bad-.example' is not a host name or IP address"),
        ("[mail.example.com]:25", "'mail.example.com' is not a host name or IP address"),
        ("[::1]25", "expected ':port' after ']'"),
        (":25", "missing host"),
    ],
)
def test_next_hop_that_cannot_work_is_refused(tmp_path: Path, next_hop: str, problem: str) -> None:
    [line] = problems_of(tmp_path, f'[domains."verrotech.com"]\nnext_hop = "{next_hop}"\n')
    assert line.startswith("domains.verrotech.com.next_hop: ")
    assert line.endswith(problem), line


@pytest.mark.parametrize(
    ("next_hop", "expected"),
    [
        ("mail.example.com", HostPort("mail.example.com", 25)),
        ("mail.example.com.:2526", HostPort("mail.example.com.", 2526)),
        ("127.0.0.1:2526", HostPort("127.0.0.1", 2526)),
        ("[::1]:2526", HostPort("::1", 2526)),
        ("[::1]", HostPort("::1", 25)),
        (" mx-1.example:65535 ", HostPort("mx-1.example", 65535)),
    ],
)
def test_next_hop_that_can_work_is_accepted(
    tmp_path: Path, next_hop: str, expected: HostPort
) -> None:
    cfg = config.load(write(tmp_path, f'[domains."a.example"]\nnext_hop = "{next_hop}"\n'),
                      env={})
    assert parse_next_hop(cfg.domains["a.example"].next_hop) == expected


@pytest.mark.parametrize(
    ("section", "listen", "problem"),
    [
        ("smtp", '["localhost:25"]', "listen on an IP address (ip:port), not a host name"),
        ("smtp", '["mail.example.com:25"]', "listen on an IP address (ip:port), not a host name"),
        ("smtp", '["127.0.0.1"]', "missing port (write host:port)"),
        ("smtp", '["127.0.0.1:"]', "port must be a number from 0 to 65535"),
        ("smtp", '["127.0.0.1:99999"]', "port must be a number from 0 to 65535"),
        ("metrics", '"localhost:9025"', "listen on an IP address (ip:port), not a host name"),
        ("metrics", '"127.0.0.1"', "missing port (write host:port)"),
    ],
)
def test_listen_addresses_must_be_ip_and_port(
    tmp_path: Path, section: str, listen: str, problem: str
) -> None:
    [line] = problems_of(tmp_path, f"[{section}]\nlisten = {listen}\n")
    assert line.startswith(f"{section}.listen"), line
    assert line.endswith(problem), line


def test_paths_that_cannot_work_are_refused(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "key.pem").write_text("x")
    (tmp_path / "plain-file").write_text("x")
    lines = problems_of(tmp_path, """
[smtp]
tls_cert = "certs"
tls_key = "key.pem"
[queue]
url = "sqlite:///plain-file/queue.db"
[domains."verrotech.com"]
recipients_file = "/nonexistent/users.txt"
""")
    assert lines == [
        f"smtp.tls_cert: not a regular file: certs (resolved to {tmp_path}/certs)",
        "domains.verrotech.com.recipients_file: file not found: /nonexistent/users.txt",
        f"queue.url: cannot create {tmp_path}/plain-file/queue.db: "
        f"{tmp_path}/plain-file is not a directory",
    ]


def test_queue_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "queue.db").mkdir()
    assert problems_of(tmp_path, '[queue]\nurl = "sqlite:///queue.db"\n') == [
        f"queue.url: {tmp_path}/queue.db is a directory, not a database file"
    ]


def test_queue_url_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    [line] = problems_of(tmp_path, '[queue]\nurl = "postgresql://u@h:port/db"\n')
    assert line.startswith("queue.url: 'postgresql://u@h:port/db': not a database URL")


def test_delivery_ca_file_resolves_next_to_config_and_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\ntls = "verify"\ntls_ca_file = "ca.pem"\n')
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert err.value.problems == [
        f"{path}: delivery.tls_ca_file: file not found: ca.pem (resolved to {tmp_path}/ca.pem)"
    ]
    (tmp_path / "ca.pem").write_text("x")
    cfg = config.load(path, env={})
    assert (cfg.delivery.tls, cfg.delivery.tls_ca_file) == ("verify", str(tmp_path / "ca.pem"))


def test_outbound_timeouts_default_and_parse(tmp_path: Path) -> None:
    defaults = config.load(write(tmp_path, ""), env={}).delivery
    assert (defaults.command_timeout, defaults.data_timeout) == (300.0, 600.0)
    path = write(tmp_path, '[delivery]\ncommand_timeout = "30s"\ndata_timeout = "500ms"\n')
    cfg = config.load(path, env={})
    assert (cfg.delivery.command_timeout, cfg.delivery.data_timeout) == (30.0, 0.5)


def test_zero_outbound_timeout_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\ndata_timeout = "0s"\n')
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert [p for p in err.value.problems if "data_timeout must be greater than 0" in p]
