"""A simulated Docker host: its own netns, private /run and /sys, dockerd and Canal plugin.

Each host is a network namespace plugged into the Underlay plus a "holder" process that
owns a private mount namespace with its own tmpfs /run (docker.sock, /run/docker/plugins)
and a sysfs showing the host's own interfaces, and a UTS namespace with its own hostname.  dockerd, the plugin and `exec()` all run
with ``nsenter`` into both namespaces, so default paths work as on a real machine and
nothing touches the machine's root netns.

dockerd's --exec-root (where its sandboxes, the containers' network namespaces, are mounted at
netns/<id>) is bound onto itself and made a *shared* mount inside the host's mount namespace,
as it is on a systemd host (where / and /run are shared): a managed plugin that bind-mounts it
rslave then sees sandboxes created after it started.  The mount exists only in the holder's
namespace (created private), never in the machine's own.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ._util import (PREFIX, TestbedError, cgroup_dirs, cgroup_pids, kill_pids, log, log_tail,
                    ns_id, pids_in_namespaces, plugin_post, remove_cgroups, run,
                    spawn, stop_popen, unix_http)
from .image import IMAGE, IMAGE_CHANGES, busybox_rootfs_tar
from .registry import NETNS_DIR, register, unregister
from .underlay import Underlay

#: The repository root (tests/testbed/host.py -> ../../..).
REPO = Path(__file__).resolve().parents[2]

#: Plugin socket path inside a host (its private /run).
PLUGIN_SOCKET = "/run/docker/plugins/canal.sock"

#: Docker's own address pools, kept inside the benchmark range like everything else.
DOCKER_ADDRESS_POOL = "base=198.19.128.0/17,size=24"

#: Longest workdir that still leaves room for socket names below it (sun_path is 108 bytes).
_MAX_SOCKDIR = 48

_HOLDER_SCRIPT = r"""
set -e
echo "$CNLT_HOSTNAME" > /proc/sys/kernel/hostname
mount -t tmpfs -o mode=0755 cnlt-run /run
mkdir -p /run/docker/plugins /run/.cnlt-sys
mount -t sysfs cnlt-sys /run/.cnlt-sys
for m in "$@"; do
    d="/run/.cnlt-sys${m#/sys}"
    if [ -d "$d" ]; then mount --rbind "$m" "$d"; else echo "holder: skip $m" >&2; fi
done
mount --move /run/.cnlt-sys /sys
rmdir /run/.cnlt-sys
mkdir -p "$CNLT_EXEC_ROOT"
mount --bind "$CNLT_EXEC_ROOT" "$CNLT_EXEC_ROOT"
mount --make-shared "$CNLT_EXEC_ROOT"
echo ready
exec sleep infinity >/dev/null
"""


def _sys_submounts() -> List[str]:
    """Mount points directly below /sys (cgroups, securityfs, ...), to carry over into the
    host's fresh sysfs so dockerd still finds its cgroups."""
    entries = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        entries.append((f[0], f[1], f[4].replace("\\040", " ")))
    sys_ids = {mid for mid, _, mp in entries if mp == "/sys"}
    return sorted({mp for _, parent, mp in entries
                   if parent in sys_ids and mp.startswith("/sys/")})


class SimHost:
    """One simulated machine on an Underlay.  See the module docstring for the layout.

    ``workdir`` (default ``/tmp/<run_id>/<name>``) holds dockerd's data, logs and the
    plugin state; it is removed on close().  ``docker_sock`` is the daemon's socket path,
    usable from the root namespaces.
    """

    def __init__(self, underlay: Underlay, name: str, ip: str,
                 workdir: Optional[os.PathLike | str] = None, *,
                 docker_bip: Optional[str] = None) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", name) or name == "ul":
            raise ValueError(f"host name {name!r}: 1-10 chars [a-z0-9], starting with a letter")
        if any(h.name == name for h in underlay.hosts):
            raise ValueError(f"host {name!r} already exists on {underlay!r}")
        underlay.check_host_ip(ip)
        self.underlay = underlay
        self.name = name
        self.address = str(ipaddress.ip_address(ip))  # `ip` is the method
        self.cidr = f"{self.address}/{underlay.prefixlen}"
        self.netns = f"{underlay.run_id}-{name}"
        self.hostname = name                  # own UTS namespace: plugins key state on it
        self.netns_path = str(NETNS_DIR / self.netns)
        self.port = f"{PREFIX}-{name}"        # veth end in the underlay netns
        self.cgroup_parent = self.netns       # all container cgroups go below this
        self.workdir = Path(workdir) if workdir else underlay.run_dir / name
        sockdir = self.workdir
        if len(str(sockdir)) > _MAX_SOCKDIR:
            sockdir = underlay.run_dir / f"{name}.s"
        self.sockdir = sockdir
        self.docker_sock = str(sockdir / "docker.sock")
        self.exec_root = sockdir / "exec"
        self.data_root = self.workdir / "data"
        self.dockerd_log = self.workdir / "dockerd.log"
        self.plugin_log = self.workdir / "plugin.log"
        host_index = int(ipaddress.ip_address(self.address)) % 128
        self.docker_bip = docker_bip or f"198.19.{host_index}.1/24"
        self.holder: Optional[subprocess.Popen] = None
        self.dockerd: Optional[subprocess.Popen] = None
        self.plugin: Optional[subprocess.Popen] = None
        self.plugin_activation: Any = None    # last Plugin.Activate answer
        self._dockerd_args: Tuple[str, ...] = ()
        self._netns_id = None
        self._mnt_id = None
        self._closed = False
        underlay.hosts.append(self)
        register(self)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SimHost({self.netns!r}, {self.address!r})"

    def _setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(parents=True, exist_ok=True)
        run(["ip", "netns", "add", self.netns], timeout=15)
        self._netns_id = ns_id(self.netns_path)
        self.underlay.plug(self.port, self.netns, "eth0")
        self.ip("link", "set", "lo", "up")
        self.ip("addr", "add", self.cidr, "dev", "eth0")
        self.ip("link", "set", "eth0", "up")
        self._start_holder()

    def _start_holder(self, timeout: float = 15) -> None:
        """Start the process that keeps this host's private mount namespace alive."""
        argv = ["nsenter", f"--net={self.netns_path}", "--",
                "unshare", "--mount", "--uts", "--propagation", "private", "--",
                "sh", "-c", _HOLDER_SCRIPT, "cnlt-holder", *_sys_submounts()]
        with open(self.workdir / "holder.log", "ab") as errlog:
            self.holder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=errlog, start_new_session=True,
                                           env={**os.environ, "CNLT_HOSTNAME": self.hostname,
                                                "CNLT_EXEC_ROOT": str(self.exec_root)})
        assert self.holder.stdout is not None
        ready, _, _ = select.select([self.holder.stdout], [], [], timeout)
        line = self.holder.stdout.readline().decode().strip() if ready else ""
        self.holder.stdout.close()
        if line != "ready":
            raise TestbedError(f"{self.name}: holder did not start ({line!r}):\n"
                               f"{log_tail(self.workdir / 'holder.log')}")
        self._mnt_id = ns_id(f"/proc/{self.holder.pid}/ns/mnt")

    # ---------------------------------------------------------------- running things

    @property
    def holder_pid(self) -> int:
        if self.holder is None:
            raise TestbedError(f"{self.name}: no holder process")
        return self.holder.pid

    def nsenter_prefix(self) -> List[str]:
        """argv prefix that runs a command in this host's network, mount and UTS namespaces."""
        return ["nsenter", f"--mount=/proc/{self.holder_pid}/ns/mnt",
                f"--uts=/proc/{self.holder_pid}/ns/uts", f"--net={self.netns_path}", "--"]

    def exec(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
             env: Optional[Mapping[str, str]] = None, input: Any = None
             ) -> subprocess.CompletedProcess:
        """Run argv inside the host (its netns, hostname, private /run and /sys); text output.

        ``env`` adds variables to the inherited environment.
        """
        return run([*self.nsenter_prefix(), *argv], check=check, timeout=timeout, env=env,
                   input=input)

    def popen(self, argv: Sequence[str], log_path: os.PathLike | str,
              env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
        """Start a long-running process inside the host in its own process group."""
        return spawn([*self.nsenter_prefix(), *argv], log_path, env)

    def ip(self, *args: str, check: bool = True, timeout: float = 15
           ) -> subprocess.CompletedProcess:
        """`ip -n <host netns> ...`."""
        return run(["ip", "-n", self.netns, *args], check=check, timeout=timeout)

    # ---------------------------------------------------------------- dockerd

    def dockerd_argv(self, extra_args: Sequence[str] = ()) -> List[str]:
        extra = list(extra_args)
        argv = ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "--pidfile", str(self.workdir / "docker.pid"), "-H", f"unix://{self.docker_sock}",
                "--config-file", str(self.workdir / "daemon.json"),
                "--cgroup-parent", f"/{self.cgroup_parent}"]
        if not any(a.split("=")[0] in ("--bip", "--bridge", "-b") for a in extra):
            argv += ["--bip", self.docker_bip]
        if not any(a.startswith("--default-address-pool") for a in extra):
            argv += ["--default-address-pool", DOCKER_ADDRESS_POOL]
        return argv + extra

    def dockerd_running(self) -> bool:
        return self.dockerd is not None and self.dockerd.poll() is None

    def start_dockerd(self, extra_args: Sequence[str] = (), timeout: float = 30) -> None:
        """Start this host's dockerd (own data/exec root, socket, cgroup parent) and wait
        until it answers."""
        if self.dockerd_running():
            raise TestbedError(f"{self.name}: dockerd already running")
        self._dockerd_args = tuple(extra_args)
        # Own config file (never /etc/docker/daemon.json); the engine key too, which
        # dockerd 20.10 would otherwise write to /etc/docker/key.json.
        cfg = {"deprecated-key-path": str(self.workdir / "key.json")}
        (self.workdir / "daemon.json").write_text(json.dumps(cfg) + "\n")
        self.dockerd = self.popen(self.dockerd_argv(extra_args), self.dockerd_log)
        deadline = time.monotonic() + timeout
        while True:
            if self.dockerd.poll() is not None:
                raise TestbedError(f"{self.name}: dockerd exited with {self.dockerd.returncode}:"
                                   f"\n{log_tail(self.dockerd_log)}")
            try:
                status, _ = unix_http(self.docker_sock, "GET", "/_ping", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TestbedError(f"{self.name}: dockerd not answering after {timeout} s:\n"
                                   f"{log_tail(self.dockerd_log)}")
            time.sleep(0.05)
        self.docker("version", "--format", "{{.Server.Version}}", timeout=15)

    def stop_dockerd(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop dockerd (it stops its containers and containerd); sweep stragglers."""
        if self.dockerd is None:
            return
        stop_popen(self.dockerd, sig, timeout, group=False)
        # containerd is normally stopped by dockerd; shims only outlive a killed dockerd.
        leftovers = [p for p in self._host_pids()
                     if _comm(p).startswith("containerd") or _comm(p) == "dockerd"]
        if leftovers:
            kill_pids(leftovers, signal.SIGTERM, timeout=5)
            kill_pids(leftovers, signal.SIGKILL)

    def restart_dockerd(self, extra_args: Optional[Sequence[str]] = None,
                        timeout: float = 30) -> None:
        """Stop and start dockerd (same arguments unless new ones are given)."""
        self.stop_dockerd()
        self.start_dockerd(self._dockerd_args if extra_args is None else extra_args, timeout)

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               input: Any = None) -> subprocess.CompletedProcess:
        """The docker CLI against this host's daemon (text output)."""
        return run(["docker", "-H", f"unix://{self.docker_sock}", *args], check=check,
                   timeout=timeout, input=input,
                   env={"DOCKER_CONFIG": str(self.workdir / "docker-cli")})

    def docker_json(self, *args: str, timeout: float = 60) -> Any:
        """Parsed JSON output of a docker command, e.g. docker_json("inspect", "c1")."""
        return json.loads(self.docker(*args, timeout=timeout).stdout)

    def load_image(self) -> str:
        """Make IMAGE available (docker import of an in-memory busybox rootfs); returns it."""
        if self.docker("image", "inspect", IMAGE, check=False, timeout=30).returncode == 0:
            return IMAGE
        argv = ["docker", "-H", f"unix://{self.docker_sock}", "import"]
        for change in IMAGE_CHANGES:
            argv += ["--change", change]
        run([*argv, "-", IMAGE], input=busybox_rootfs_tar(), text=False, timeout=120,
            env={"DOCKER_CONFIG": str(self.workdir / "docker-cli")})
        return IMAGE

    def container_pid(self, name: str) -> int:
        """Host pid of a running container's init (for nsenter into its netns)."""
        pid = int(self.docker("inspect", "-f", "{{.State.Pid}}", name, timeout=30).stdout)
        if pid <= 0:
            raise TestbedError(f"{self.name}: container {name} is not running")
        return pid

    def container_exec(self, name: str, *argv: str, check: bool = True, timeout: float = 60
                       ) -> subprocess.CompletedProcess:
        """`docker exec NAME argv...`."""
        return self.docker("exec", name, *argv, check=check, timeout=timeout)

    # ---------------------------------------------------------------- plugin

    @property
    def plugin_socket(self) -> str:
        """The plugin's socket as reachable from the root mount namespace."""
        return f"/proc/{self.holder_pid}/root{PLUGIN_SOCKET}"

    def plugin_argv(self, args: Sequence[str] = ()) -> List[str]:
        return [sys.executable, "-m", "canal", "serve", *args]

    def plugin_running(self) -> bool:
        return self.plugin is not None and self.plugin.poll() is None

    def start_plugin(self, args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
                     *, timeout: float = 20, command: Optional[Sequence[str]] = None) -> Any:
        """Run the Canal plugin in this host and wait until Plugin.Activate answers.

        ``command`` replaces the whole command line (for throwaway fakes only).  Returns
        the Activate answer.
        """
        if self.plugin_running():
            raise TestbedError(f"{self.name}: plugin already running")
        penv: Dict[str, str] = {"PYTHONPATH": str(REPO / "plugin"),
                                "CANAL_STATE_DIR": str(self.workdir / "canal"),
                                # dockerd's --exec-root is the test's own: its sandboxes too
                                "CANAL_NETNS_DIR": str(self.exec_root / "netns")}
        penv.update(env or {})
        argv = list(command) if command is not None else self.plugin_argv(args)
        self.plugin = self.popen(argv, self.plugin_log, env=penv)
        deadline = time.monotonic() + timeout
        last: Any = "socket not there yet"
        while True:
            if self.plugin.poll() is not None:
                raise TestbedError(f"{self.name}: plugin exited with {self.plugin.returncode}:"
                                   f"\n{log_tail(self.plugin_log)}")
            if os.path.exists(self.plugin_socket):
                try:
                    status, body = plugin_post(self.plugin_socket, "Plugin.Activate", timeout=2)
                    if status == 200 and isinstance(body, dict):
                        self.plugin_activation = body
                        return body
                    last = f"HTTP {status}: {body!r}"
                except OSError as exc:
                    last = exc
            if time.monotonic() > deadline:
                raise TestbedError(f"{self.name}: plugin not answering Plugin.Activate after "
                                   f"{timeout} s ({last}):\n{log_tail(self.plugin_log)}")
            time.sleep(0.05)

    def stop_plugin(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stop the plugin's whole process group (SIGKILL simulates a crash)."""
        stop_popen(self.plugin, sig, timeout, group=True)

    def plugin_post(self, method: str, payload: Any = None, timeout: float = 10
                    ) -> Tuple[int, Any]:
        """POST to the plugin like dockerd does; returns (HTTP status, decoded JSON)."""
        return plugin_post(self.plugin_socket, method, payload, timeout)

    # ---------------------------------------------------------------- teardown

    def _host_pids(self) -> List[int]:
        """Every process living in this host: its netns, its mount ns, its cgroups."""
        pids = set(pids_in_namespaces(net=[self._netns_id] if self._netns_id else [],
                                      mnt=[self._mnt_id] if self._mnt_id else []))
        pids |= set(cgroup_pids(cgroup_dirs(self.cgroup_parent)))
        return sorted(pids)

    def close(self) -> None:
        """Remove containers, stop plugin and dockerd, kill what is left, delete the netns
        and the workdir.  Safe to call twice and after a failed setup; never raises."""
        if self._closed:
            return
        # dockerd needs ~1 s for an orderly exit; pointless for a host being destroyed, and
        # _sweep kills its containerd and shims anyway.
        steps = [self._rm_containers, self.stop_plugin,
                 lambda: self.stop_dockerd(signal.SIGKILL), self._sweep,
                 lambda: self.underlay.unplug(self.port), self._delete_netns, self._rm_dirs]
        for step in steps:
            try:
                step()
            except Exception as exc:
                log.error("%s: cleanup step %s failed: %r", self.name,
                          getattr(step, "__name__", step), exc)
        self._closed = True
        if self in self.underlay.hosts:
            self.underlay.hosts.remove(self)
        unregister(self)

    def _rm_containers(self) -> None:
        if not self.dockerd_running():
            return
        ids = self.docker("ps", "-aq", timeout=30).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=60)

    def _sweep(self) -> None:
        pids = self._host_pids()
        if pids:
            left = kill_pids(pids, signal.SIGKILL)
            if left:
                log.error("%s: processes survived SIGKILL: %s", self.name, left)
        for proc in (self.holder, self.dockerd, self.plugin):
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.error("%s: pid %s did not exit", self.name, proc.pid)
        left = remove_cgroups(cgroup_dirs(self.cgroup_parent))
        if left:
            log.error("%s: cgroups not removable: %s", self.name, left)

    def _delete_netns(self) -> None:
        if Path(self.netns_path).exists():
            run(["ip", "netns", "delete", self.netns], timeout=30)

    def _rm_dirs(self) -> None:
        for d in {self.workdir, self.sockdir}:
            shutil.rmtree(d, ignore_errors=True)
            if d.exists():
                log.error("%s: could not remove %s", self.name, d)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


__all__ = ["SimHost", "IMAGE", "PLUGIN_SOCKET", "REPO"]
