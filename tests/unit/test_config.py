"""Config parsing: durations, sizes, env overrides, and the errors operators read."""

from pathlib import Path

import pytest

from relay.core import config
from relay.core.config import ConfigError, parse_duration, parse_size

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
    assert f"{path}: smtp.tls_cert: file not found: cert.pem" in err.value.problems
    assert f"{path}: domains.verrotech.com.recipients_file: file not found: users.txt" in (
        err.value.problems
    )


def test_relative_files_resolve_next_to_config(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text("alice\n")
    path = write(tmp_path, '[domains."Verrotech.COM"]\nrecipients_file = "users.txt"\n')
    cfg = config.load(path, env={})
    domain = cfg.domain("verrotech.com.")
    assert domain is not None
    assert domain.recipients_file == str(tmp_path / "users.txt")


def test_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[queue]\nurl = "sqlite:///a.db"\n')
    cfg = config.load(path, env={"RELAY_QUEUE_URL": "sqlite:///b.db",
                                 "RELAY_LISTEN": "127.0.0.2:25, [::1]:2525"})
    assert cfg.queue.url == "sqlite:///b.db"
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
