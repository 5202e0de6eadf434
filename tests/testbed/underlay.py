"""The simulated physical network: one bridge in its own netns, plus etcd living on it.

The underlay bridge sits in a dedicated namespace (never the machine's root one), so the
machine's own interfaces, routes and firewall stay untouched.
"""

from __future__ import annotations

import ipaddress
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from ._util import (TestbedError, kill_pids, log, log_tail, ns_id,
                    pid_alive, pids_in_namespaces, run, spawn, stop_popen)
from .registry import NETNS_DIR, make_run_dir, new_run_id, register, run_pid, unregister

#: Benchmark range (RFC 2544); the only addresses the test bed may use.
ALLOWED_RANGE = ipaddress.ip_network("198.18.0.0/15")


class Underlay:
    """An L2 segment (bridge ``cnlt-br``, gateway address .254) in netns ``<run_id>-ul``.

    Owns the run directory ``/tmp/<run_id>``; closing it also closes the hosts and etcd
    attached to it, since they cannot outlive their network.
    """

    BRIDGE = "cnlt-br"

    def __init__(self, run_id: Optional[str] = None, subnet: str = "198.18.0.0/24",
                 mtu: int = 1500) -> None:
        self.run_id = run_id or new_run_id()
        if run_pid(self.run_id) is None:
            raise ValueError(f"run_id must look like 'cnlt<pid>[r<n>]', got {self.run_id!r}")
        self.subnet = ipaddress.ip_network(subnet)
        if not self.subnet.subnet_of(ALLOWED_RANGE) or self.subnet.num_addresses < 8:
            raise ValueError(f"underlay subnet {subnet} must be inside {ALLOWED_RANGE}")
        self.gateway_ip = str(self.subnet.broadcast_address - 1)  # .254 in a /24
        self.prefixlen = self.subnet.prefixlen
        self.mtu = mtu
        self.netns = f"{self.run_id}-ul"
        self.netns_path = str(NETNS_DIR / self.netns)
        self.hosts: List[Any] = []      # SimHosts attached here (they append themselves)
        self.services: List[Any] = []   # Etcd and the like
        self._closed = False
        self._netns_id = None
        self.run_dir: Path = make_run_dir(self.run_id)
        register(self)
        try:
            run(["ip", "netns", "add", self.netns], timeout=15)
            self._netns_id = ns_id(self.netns_path)
            self.ip("link", "set", "lo", "up")
            self.ip("link", "add", self.BRIDGE, "mtu", str(mtu), "type", "bridge",
                    "stp_state", "0", "forward_delay", "0")
            self.ip("addr", "add", f"{self.gateway_ip}/{self.prefixlen}", "dev", self.BRIDGE)
            self.ip("link", "set", self.BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Underlay({self.run_id!r}, {str(self.subnet)!r})"

    # ---------------------------------------------------------------- running things

    def exec(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
             env: Optional[Mapping[str, str]] = None, input: Any = None
             ) -> subprocess.CompletedProcess:
        """Run argv inside the underlay netns (root mount namespace)."""
        return run(["nsenter", f"--net={self.netns_path}", "--", *argv], check=check,
                   timeout=timeout, env=env, input=input)

    def popen(self, argv: Sequence[str], log_path: Path | str,
              env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
        """Start a long-running process inside the underlay netns, logging to log_path."""
        return spawn(["nsenter", f"--net={self.netns_path}", "--", *argv], log_path, env)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`ip -n <underlay netns> ...`."""
        return run(["ip", "-n", self.netns, *args], check=check, timeout=15)

    # ---------------------------------------------------------------- wiring hosts

    def check_host_ip(self, ip: str) -> None:
        addr = ipaddress.ip_address(ip)
        if addr not in self.subnet or str(addr) in (self.gateway_ip,) or \
                addr in (self.subnet.network_address, self.subnet.broadcast_address):
            raise ValueError(f"host address {ip} must be a free host address in {self.subnet}")
        for h in self.hosts:
            if h.address == str(addr):
                raise ValueError(f"address {ip} already used by {h.name}")

    def plug(self, port: str, host_netns: str, ifname: str = "eth0") -> None:
        """Create veth ``port`` (in the underlay netns, enslaved to the bridge) whose peer
        ``ifname`` is created directly in ``host_netns``; never touches the root netns."""
        self.ip("link", "add", port, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", ifname, "mtu", str(self.mtu), "netns", host_netns)
        self.ip("link", "set", port, "master", self.BRIDGE, "up")

    def unplug(self, port: str) -> None:
        if Path(self.netns_path).exists():
            self.ip("link", "del", port, check=False)

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        """Close attached hosts and services, then the netns and the run dir. Idempotent."""
        if self._closed:
            return
        for obj in [*reversed(self.hosts), *reversed(self.services)]:
            try:
                obj.close()
            except Exception as exc:
                log.error("closing %r failed: %r", obj, exc)
        if self._netns_id:
            left = kill_pids(pids_in_namespaces(net=[self._netns_id]))
            if left:
                log.error("processes survived in %s: %s", self.netns, left)
        if Path(self.netns_path).exists():
            res = run(["ip", "netns", "delete", self.netns], check=False, timeout=30)
            if res.returncode:
                log.error("ip netns delete %s: %s", self.netns, res.stderr.strip())
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self._closed = True
        unregister(self)


class Etcd:
    """A single-node etcd on the underlay gateway address, reachable from every host.

    ``stop()``/``start()`` keep the data dir, for datastore outage tests.
    """

    def __init__(self, underlay: Underlay, client_port: int = 2379, peer_port: int = 2380,
                 name: str = "cnlt-etcd") -> None:
        self.underlay = underlay
        self.name = name
        self.endpoint = f"http://{underlay.gateway_ip}:{client_port}"
        self.peer_url = f"http://127.0.0.1:{peer_port}"
        self.data_dir = underlay.run_dir / name
        self.log_path = underlay.run_dir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._closed = False
        underlay.services.append(self)
        register(self)
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Etcd({self.endpoint!r})"

    def argv(self) -> List[str]:
        return ["etcd", "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"{self.name}={self.peer_url}",
                "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 15
                ) -> subprocess.CompletedProcess:
        """etcdctl (API v3) against this etcd, run inside the underlay netns."""
        return self.underlay.exec(["etcdctl", "--endpoints", self.endpoint,
                                   "--dial-timeout", "2s", *args],
                                  check=check, timeout=timeout, env={"ETCDCTL_API": "3"})

    def start(self, timeout: float = 30) -> None:
        """Start (or restart, same data dir) and wait until it answers a health check."""
        if self.running():
            return
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        env = {"ETCD_UNSUPPORTED_ARCH": "arm64"} if platform.machine() == "aarch64" else {}
        self.proc = self.underlay.popen(self.argv(), self.log_path, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise TestbedError(f"etcd exited with {self.proc.returncode}:\n"
                                   f"{log_tail(self.log_path)}")
            res = self.etcdctl("endpoint", "health", "--command-timeout", "1s",
                               check=False, timeout=5)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"etcd not healthy after {timeout} s:\n{res.stderr}\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stop etcd (SIGKILL simulates a crash); the data dir stays for start()."""
        stop_popen(self.proc, sig, timeout, group=True)

    def close(self) -> None:
        """Stop etcd and remove its data. Idempotent."""
        if self._closed:
            return
        try:
            self.stop()
        except Exception as exc:
            log.error("stopping %r: %r", self, exc)
        if self.proc is not None and pid_alive(self.proc.pid):
            kill_pids([self.proc.pid])
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._closed = True
        if self in self.underlay.services:
            self.underlay.services.remove(self)
        unregister(self)
