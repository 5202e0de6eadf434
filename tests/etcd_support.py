"""Real etcd servers for tests: a throwaway single member on loopback, optionally with TLS.

A module (not a conftest) so that test modules can import it by name wherever they live.
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import requests
from testbed.pki import Pki

ETCD_MISSING = (
    "the etcd binary is not installed (looked for `etcd` on PATH and /usr/bin/etcd); the etcd "
    "half of the datastore tests needs it: apt-get install etcd-server (the project's test "
    "script does this)"
)


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if not found:
        pytest.fail(ETCD_MISSING, pytrace=False)
    return found


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on loopback (held together, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdServer:
    """A throwaway single-member etcd on 127.0.0.1 with its own data dir (on tmpfs if any).

    Short heartbeat/election settings make it start in well under a second and let etcd
    honour 1 s lease TTLs (its minimum TTL is 1.5 election timeouts).
    """

    def __init__(self, name: str = "canal-unit", pki: Pki | None = None, client_cert_auth: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.pki = pki  # serve https with pki's server certificate
        self.client_cert_auth = client_cert_auth
        self.extra_args = tuple(extra_args)
        self.root_password = ""  # set by enable_auth()
        self.binary = etcd_binary()
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="canal-etcd-", dir=base)
        self.data_dir = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.client_port, self.peer_port = free_ports(2)
        self.startup_seconds = 0.0
        atexit.register(self.close)  # even if pytest is killed between setup and teardown

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.pki else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def _tls_kwargs(self) -> dict:
        """requests arguments of a client the server accepts (the test's own health checks)."""
        if not self.pki:
            return {}
        return {"verify": self.pki.ca, "cert": (self.pki.client_cert, self.pki.client_key)}

    def argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls: list[str] = []
        if self.pki:
            tls = ["--cert-file", self.pki.server_cert, "--key-file", self.pki.server_key]
            if self.client_cert_auth:
                tls += ["--trusted-ca-file", self.pki.ca, "--client-cert-auth"]
        return [
            self.binary, *tls, *self.extra_args, "--name", self.name, "--data-dir", self.data_dir,
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]  # fmt: skip

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart on the same data dir) and wait until /health says true."""
        if self.running():
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        if platform.machine() == "aarch64":
            env["ETCD_UNSUPPORTED_ARCH"] = "arm64"
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}", pytrace=False)
            try:
                health = requests.get(self.endpoint + "/health", timeout=0.5, **self._tls_kwargs())
                if health.json().get("health") == "true":
                    break
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                pytest.fail(f"etcd not healthy after {timeout} s:\n{self.log_tail()}", pytrace=False)
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """SIGKILL, as a crash would; the data dir stays for start()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it paused
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nobody answers — a hung etcd."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def etcdctl(self, *args: str) -> str:
        env = dict(os.environ, ETCDCTL_API="3")
        tls: list[str] = []
        if self.pki:
            tls = ["--cacert", self.pki.ca, "--cert", self.pki.client_cert, "--key", self.pki.client_key]
        if self.root_password:
            tls += ["--user", f"root:{self.root_password}"]
        res = subprocess.run(
            ["etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "2s", *tls, *args],
            check=False, capture_output=True, text=True, timeout=15, env=env,
        )  # fmt: skip
        assert res.returncode == 0, f"etcdctl {' '.join(args)}: {res.stderr}"
        return res.stdout

    def enable_auth(self, root_password: str, users: dict[str, tuple[str, list[str]]]) -> None:
        """etcd RBAC as its docs give it: root (role root), then each user with a role granting
        readwrite on its prefixes, then `auth enable`. users: name -> (password, prefixes)."""
        self.etcdctl("user", "add", f"root:{root_password}", "--interactive=false")
        self.etcdctl("user", "grant-role", "root", "root")
        for name, (password, prefixes) in users.items():
            self.etcdctl("user", "add", f"{name}:{password}", "--interactive=false")
            self.etcdctl("role", "add", f"role-{name}")
            for prefix in prefixes:
                self.etcdctl("role", "grant-permission", f"role-{name}", "readwrite", prefix, "--prefix=true")
            self.etcdctl("user", "grant-role", name, f"role-{name}")
        self.etcdctl("auth", "enable")
        self.root_password = root_password

    def wipe(self) -> None:
        """Delete every key and revoke every lease: each test starts from an empty key space."""
        api = self.endpoint + "/v3"
        everything = {"key": "AA==", "range_end": "AA=="}  # "\0".."\0": all keys
        requests.post(api + "/kv/deleterange", json=everything, timeout=5).raise_for_status()
        leases = requests.post(api + "/lease/leases", json={}, timeout=5).json().get("leases") or []
        for lease in leases:
            requests.post(api + "/lease/revoke", json={"ID": lease["ID"]}, timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)


def start_etcd(name: str = "canal-unit", **options) -> EtcdServer:
    """A started server; a port grabbed by someone else in between gets another try."""
    for attempt in range(3):
        server = EtcdServer(name, **options)
        try:
            server.start()
            return server
        except BaseException:
            bind_clash = "address already in use" in server.log_tail().lower()
            server.close()
            if not bind_clash or attempt == 2:
                raise
    raise AssertionError("unreachable")


