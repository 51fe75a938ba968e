"""A private Postfix instance configured as a backup MX, for bench/compare.py.

Installs the Debian package if needed (debconf preseeded to "No configuration",
so the packaged instance has no main.cf and listens nowhere), then runs its own
instance from a temporary directory: its own main.cf/master.cf, queue and data
directories, SMTP on one 127.x alias only, relaying one domain to a static
next hop. Nothing outside that directory is touched except the package install.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

PACKAGE_TOOLS = ("postfix", "postqueue", "smtp-source", "smtp-sink")
PRESEED = "postfix postfix/main_mailer_type select No configuration\n"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

# Debian's master.cf (postfix 3.7) with every chroot column set to n, smtpd on
# one address only, and the pipe(8) examples (maildrop, uucp, ...) left out:
# nothing here delivers locally.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen}:smtp inet n    -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _run(cmd: list[str], timeout: float = 60, check: bool = True,
         env: dict[str, str] | None = None, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check,
                          env=env, input=stdin)


def installed() -> bool:
    return all(shutil.which(tool) for tool in PACKAGE_TOOLS)


def ensure_installed() -> None:
    """apt-get install postfix, preseeded so the packaged instance stays unconfigured."""
    if installed():
        return
    if os.geteuid() != 0:
        raise SystemExit("postfix is not installed and installing it needs root "
                         "(or run with --skip-postfix)")
    print("installing postfix (debconf: No configuration) ...", flush=True)
    _run(["debconf-set-selections"], stdin=PRESEED)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
    if _run(cmd, timeout=900, check=False, env=env).returncode != 0:
        _run(["apt-get", "update", "-q"], timeout=900, env=env)
        _run(cmd, timeout=900, env=env)
    if not installed():
        raise SystemExit("postfix installed, but its tools are not on PATH")


def default_instance_running() -> bool:
    """The packaged instance (/etc/postfix): running only if someone configured it."""
    if not Path("/etc/postfix/main.cf").exists():
        return False
    return _run(["postfix", "status"], check=False).returncode == 0


def stop_default_instance() -> bool:
    """Stop the packaged instance if it runs; True when it did (so it can be restarted)."""
    if not default_instance_running():
        return False
    print("stopping the default Postfix instance (/etc/postfix) for the benchmark", flush=True)
    _run(["postfix", "stop"], check=False)
    return True


def start_default_instance() -> None:
    _run(["postfix", "start"], check=False)


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


class PostfixInstance:
    """One private instance: `postfix -c DIR start`, with DIR a temporary directory.

    Settings that matter for the comparison (see compare.py's module docstring):
    durable queue (Postfix always fsyncs a queue file before its 250), same
    backoff, next hop and connect timeout as the mx-relay side, no per-client
    limits, no reverse DNS of clients (mx-relay does none), chroot off.
    """

    def __init__(self, root: Path, listen: str, next_hop: str, domain: str,
                 backoff: str = "1h", connect_timeout: str = "2s") -> None:
        self.root = root
        self.config_dir = root / "etc"
        self.queue_dir = root / "queue"
        self.data_dir = root / "data"
        self.maillog = root / "maillog"
        self.listen = listen
        self.started = False
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # postfix daemons and postdrop walk these paths
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(listen=listen))
        (self.config_dir / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
maillog_file = {self.maillog}
maillog_file_prefixes = {self.root}
myhostname = bench-postfix.example
mydomain = bench-postfix.example
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
# Postfix refuses an inet_interfaces address no interface has (127.0.0.20 is
# only routed to lo, not configured on it): the smtpd line in master.cf names
# {listen}:25 instead; this keeps every other service and the
# smtp client's source address on loopback.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8

# a backup MX for one domain: accept any local part, hand everything to the
# primary (a static next hop, no DNS), like mx-relay's [domains] next_hop
relay_domains = {domain}
relay_recipient_maps =
transport_maps = inline:{{{domain}=smtp:{next_hop}}}
smtpd_relay_restrictions = permit_auth_destination, reject
smtpd_recipient_restrictions = permit_auth_destination, reject
smtpd_peername_lookup = no
message_size_limit = 35000000
smtpd_recipient_limit = 100

# per-client limits off (mx-relay: max_messages_per_ip_per_minute = 0)
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
smtpd_client_auth_rate_limit = 0

# retries as on the mx-relay side: min_backoff = max_backoff, connect_timeout
minimal_backoff_time = {backoff}
maximal_backoff_time = {backoff}
queue_run_delay = {backoff}
smtp_connect_timeout = {connect_timeout}
smtp_tls_security_level = may
maximal_queue_lifetime = 5d
bounce_queue_lifetime = 5d
""")

    def _postfix(self, *args: str, timeout: float = 60, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        return _run(["postfix", "-c", str(self.config_dir), *args], timeout=timeout, check=check)

    def start(self) -> None:
        result = self._postfix("start", check=False, timeout=120)
        if result.returncode != 0:
            raise SystemExit(f"postfix did not start:\n{self.why()}{self.log_tail()}")
        self.started = True

    def why(self) -> str:
        """postfix(1) reports to stderr only when it is a terminal: give it one."""
        check = f"postfix -c {self.config_dir} check"
        if shutil.which("script") is None:
            return f"(run `{check}` in a terminal to see why)\n"
        out = _run(["script", "-qc", check, "/dev/null"], check=False)
        return out.stdout

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        self._postfix("stop", check=False, timeout=60)
        deadline = time.monotonic() + 20
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)  # waiting for master(8) to exit
        else:
            if pid is not None:
                self._postfix("abort", check=False)
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.started = False

    def queued(self) -> int:
        """Messages in the queue (every queue file; a delivered message's is removed)."""
        return sum(count_files(self.queue_dir / name) for name in QUEUES)

    def in_flight(self) -> int:
        """Messages not yet settled in the deferred queue (incoming, active)."""
        return sum(count_files(self.queue_dir / name) for name in ("maildrop", "incoming",
                                                                    "active"))

    def renew(self, trash: Path) -> None:
        """Stopped: move the queue directory into `trash` (start() makes a new one).

        Cheaper for the next measurement than deleting: on a disk mounted with
        online discard, blocks freed by thousands of unlinks are trimmed, and
        on thin-provisioned virtual disks writing into them again is slower.
        """
        assert not self.started
        trash.mkdir(parents=True, exist_ok=True)
        self.queue_dir.rename(trash / f"postfix-queue-{time.monotonic_ns()}")
        self.queue_dir.mkdir()

    def flush_command(self) -> list[str]:
        return ["postqueue", "-c", str(self.config_dir), "-f"]

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.maillog.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
