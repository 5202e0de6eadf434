"""Canal as a managed plugin: built without any image registry (scripts/build-plugin), pushed to
a real registry on the underlay, installed with `docker plugin install` on two simulated hosts
sharing one etcd, then used, disabled, reconfigured, re-enabled and removed.

Each host's dockerd also listens on /run/docker.sock inside the host (its private /run), where
the plugin's `docker-sock` mount finds it; that /run is made rshared first, as on a systemd
host, so a mount leaking out of the plugin would show up in the host's mount table. Each host
also gets its own /var/lib (a directory of its workdir bind-mounted in its private mount
namespace) and its own /etc (an overlay over the machine's, so /etc/canal/pki can be created
without touching the machine), and the host preparation the README asks for (the mount
sources /var/lib/canal, /etc/canal/pki, /run/flannel, /run/xtables.lock), so the plugin's
default mounts are used as is and the machine's /var/lib and /etc are never written. The one
mount source set per host is `docker-exec-root`: the test dockerd's own --exec-root, a shared
mount in the host's mount namespace (see testbed.host), where its sandboxes are.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from canal import config as configmod
from e2e_support import IMAGE
from testbed import REPO, Etcd, SimHost, TestbedError, Underlay, wait_until
from testbed._util import (
    cgroup_dirs,
    cmdline,
    log_tail,
    ns_id,
    pids_in_namespaces,
    remove_cgroups,
    run,
    stop_popen,
)
from testbed.pki import Pki

pytestmark = pytest.mark.e2e

CLUSTER = "100.64.0.0/16"
BUILD = REPO / "scripts" / "build-plugin"
#: Every plugin id installed here: dockerd 20.10 puts a plugin's cgroups at the hierarchies'
#: roots, named by that id (not below the host's --cgroup-parent), so they are removed by id.
PLUGIN_IDS: list[str] = []
SETTINGS = ["CANAL_DATASTORE=etcd", f"CANAL_NETWORK={CLUSTER}", "CANAL_LOG_LEVEL=debug",
            "CANAL_ETCD_TIMEOUT=2", "CANAL_RESYNC_INTERVAL=5"]
#: config.json's mounts, name -> (host source, plugin destination).
MOUNTS = {
    "state": ("/var/lib/canal", "/host/var/lib/canal"),
    "certs": ("/etc/canal/pki", "/etc/canal/pki"),
    "docker-sock": ("/run/docker.sock", "/run/docker.sock"),
    "xtables-lock": ("/run/xtables.lock", "/run/xtables.lock"),
    "flannel": ("/run/flannel", "/run/flannel"),
    "sysctl": ("/proc/sys/net", "/host/proc/sys/net"),
    "docker-exec-root": ("/run/docker", "/host/run/docker"),
}
#: The layout before the narrow mounts (the host's whole /var/lib and /run, read-write): the
#: upgrade test builds that plugin to upgrade from it.
PREVIOUS_MOUNTS = [
    ("state", ("/var/lib", "/host/var/lib")),
    ("run", ("/run", "/run")),
    ("sysctl", ("/proc/sys/net", "/host/proc/sys/net")),
]
#: What the host needs before the plugin can be enabled (the README's tmpfiles.d lines):
#: Docker refuses to start a plugin whose bind-mount source is missing.
HOST_DIRS = ["/var/lib/canal", "/etc/canal/pki", "/run/flannel"]
HOST_FILES = ["/run/xtables.lock"]


# ------------------------------------------------------------------------------ config.json


def test_config_json_declares_every_setting_a_user_needs():
    cfg = json.loads((REPO / "config.json").read_text())
    assert cfg["interface"] == {"types": ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"],
                                "socket": "canal.sock"}
    assert cfg["network"] == {"type": "host"}
    assert "canal serve" in " ".join(cfg["entrypoint"])
    env = {e["name"]: e for e in cfg["env"]}
    fixed = {"CANAL_SOCKET": "/run/docker/plugins/canal.sock", "CANAL_STATE_DIR": "/host/var/lib/canal",
             "CANAL_SYSCTL_DIR": "/host/proc/sys", "CANAL_NETNS_DIR": "/host/run/docker/netns"}
    for name, value in fixed.items():
        assert env[name]["value"] == value and env[name]["settable"] == []
    known = {configmod.env_name(f.name): f for f in dataclasses.fields(configmod.Config)}
    assert set(env) <= set(known), set(env) - set(known)
    for name in set(known) - set(fixed):
        assert env.get(name, {}).get("settable") == ["value"], f"{name} is not settable"
        field = known[name]
        value = getattr(configmod.load({}, {name: env[name]["value"]}), field.name)
        if name != "CANAL_DOCKER_HOST":  # the one default that differs: the mounted /run
            assert value == field.default, f"{name}: config.json says {value!r}, config.py {field.default!r}"
    # The narrowest host paths: nothing else of the host's /var/lib or /run (see MOUNTS).
    mounts = {m["name"]: m for m in cfg["mounts"]}
    assert {n: (m["source"], m["destination"]) for n, m in mounts.items()} == MOUNTS
    assert not {m["source"] for m in cfg["mounts"]} & {"/var/lib", "/run", "/var/run", "/etc", "/"}
    assert "ro" in mounts["certs"]["options"] and "rw" not in mounts["certs"]["options"]
    assert mounts["state"]["settable"] == ["source"] and mounts["certs"]["settable"] == ["source"]
    assert env["CANAL_DOCKER_HOST"]["value"] == "unix:///run/docker.sock"
    # Containers on several canal networks: the plugin enters their sandboxes (setns needs
    # CAP_SYS_ADMIN), found below dockerd's exec root, mounted so later sandboxes appear too.
    assert cfg["linux"]["capabilities"] == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    # wireguard-go (encryption where the kernel has no WireGuard) needs the TUN device.
    assert [d["path"] for d in cfg["linux"]["devices"]] == ["/dev/net/tun"]
    exec_root = mounts["docker-exec-root"]
    assert exec_root["type"] == "bind" and exec_root["settable"] == ["source"]
    assert {"rbind", "rslave", "ro"} <= set(exec_root["options"]) and "rw" not in exec_root["options"]
    assert env["CANAL_NETNS_DIR"]["value"] == exec_root["destination"] + "/netns"
    # Upgrade from the previous layout: the state directory is the same host directory.
    assert env["CANAL_STATE_DIR"]["value"] == mounts["state"]["destination"]
    previous = dict(PREVIOUS_MOUNTS)
    assert previous["state"][1] + "/canal" == env["CANAL_STATE_DIR"]["value"]
    assert previous["state"][0] + "/canal" == mounts["state"]["source"]


# ------------------------------------------------------------------------------ test bed


class SecureEtcd(Etcd):
    """The test bed's etcd on the underlay, serving https only to clients with a certificate
    of `pki`'s CA (--client-cert-auth), with etcd auth once enable_auth() ran."""

    def __init__(self, ul: Underlay, pki: Pki, client_port: int = 2381, peer_port: int = 2382) -> None:
        self.pki = pki
        self.root_password = ""
        super().__init__(ul, client_port, peer_port, name="cnlt-etcd-tls")

    def start(self, timeout: float = 30) -> None:
        self.endpoint = self.endpoint.replace("http://", "https://")
        super().start(timeout)

    def argv(self) -> list[str]:
        return [*super().argv(), "--cert-file", self.pki.server_cert, "--key-file", self.pki.server_key,
                "--trusted-ca-file", self.pki.ca, "--client-cert-auth"]

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 15):
        tls = ["--cacert", self.pki.ca, "--cert", self.pki.client_cert, "--key", self.pki.client_key]
        user = ["--user", f"root:{self.root_password}"] if self.root_password else []
        return super().etcdctl(*tls, *user, *args, check=check, timeout=timeout)

    def enable_auth(self, root_password: str, user: str, password: str, prefixes: list[str]) -> None:
        """etcd's RBAC recipe: root, a role with readwrite on each prefix for `user`, auth on."""
        self.etcdctl("user", "add", f"root:{root_password}", "--interactive=false")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("user", "add", f"{user}:{password}", "--interactive=false")
        self.etcdctl("role", "add", "canal")
        for prefix in prefixes:
            self.etcdctl("role", "grant-permission", "canal", "readwrite", prefix, "--prefix=true")
        self.etcdctl("user", "grant-role", user, "canal")
        self.etcdctl("auth", "enable")
        self.root_password = root_password


class Registry:
    """Debian's docker-registry (distribution 2.8) inside the underlay netns, plain HTTP."""

    def __init__(self, ul: Underlay, port: int = 5000) -> None:
        self.ul = ul
        self.address = f"{ul.gateway_ip}:{port}"
        self.dir = ul.run_dir / "registry"
        self.dir.mkdir()
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n"
        )
        self.log = self.dir / "registry.log"
        self.proc = ul.popen(["docker-registry", "serve", str(config)], self.log)
        try:
            wait_until(self._answers, timeout=20, interval=0.2, what=f"registry on {self.address}")
        except Exception:
            self.close()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited:\n{log_tail(self.log)}")
        return self.ul.exec(["busybox", "wget", "-q", "-O", "-", f"http://{self.address}/v2/"],
                            check=False, timeout=5).returncode == 0

    def close(self) -> None:
        stop_popen(self.proc)


def plugin_enabled(h: SimHost, ref: str) -> bool | None:
    out = h.docker("plugin", "ls", "--format", "{{.Name}} {{.Enabled}}").stdout.split("\n")
    for line in out:
        if line.split(" ")[0] == ref:
            return line.split(" ")[1] == "true"
    return None


def plugin_pids(h: SimHost) -> list[int]:
    """Processes of the managed plugin living in this host (its netns: network type host)."""
    return [p for p in pids_in_namespaces(net=[ns_id(h.netns_path)]) if "canal serve" in cmdline(p)]


def run_mounts(h: SimHost) -> set[str]:
    """Mount points below /run in the host's mount namespace, but for the machine's own
    /run/netns entries (hidden under the host's tmpfs, they come and go with other test beds)."""
    return {m for m in h.exec(["findmnt", "-rn", "-o", "TARGET"]).stdout.split()
            if m.startswith("/run/") and not m.startswith("/run/netns")}


def plugin_host(ul: Underlay, name: str, ip: str, registry: Registry) -> SimHost:
    """A simulated host ready for the managed plugin: its own /var/lib and /etc, an rshared
    /run (as on a systemd host), the README's host preparation (the plugin's mount sources),
    a dockerd trusting the test registry and listening on /run/docker.sock."""
    h = SimHost(ul, name, ip)
    varlib = h.workdir / "varlib"
    varlib.mkdir()
    h.exec(["mount", "--bind", str(varlib), "/var/lib"])
    # The machine's /etc seen through an overlay whose writes land in the workdir.
    etc_upper, etc_work = h.workdir / "etc-upper", h.workdir / "etc-work"
    etc_upper.mkdir()
    etc_work.mkdir()
    h.exec(["mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir=/etc,upperdir={etc_upper},workdir={etc_work}", "/etc"])
    h.exec(["mount", "--make-rshared", "/run"])
    prepare_host(h)
    h.start_dockerd(["--insecure-registry", registry.address, "-H", "unix:///run/docker.sock"])
    h.load_image()
    return h


def prepare_host(h: SimHost) -> None:
    """What systemd-tmpfiles does with the README's canal.conf at every boot."""
    h.exec(["mkdir", "-p", *HOST_DIRS])
    h.exec(["chmod", "700", "/var/lib/canal", "/etc/canal/pki"])
    h.exec(["touch", *HOST_FILES])


def plugin_mountpoints(h: SimHost) -> set[str]:
    """Mount points inside the running plugin (its own mount namespace)."""
    [pid] = plugin_pids(h)[:1]
    with open(f"/proc/{pid}/mountinfo") as handle:
        return {line.split()[4] for line in handle}


@dataclasses.dataclass
class Bed:
    etcd: Etcd
    registry: Registry
    h1: SimHost
    h2: SimHost
    ref: str
    run_mounts: dict[str, set[str]]  # per host, before any plugin ran
    build: Path  # the plugin's build directory (config.json + rootfs/)

    @property
    def hosts(self) -> tuple[SimHost, SimHost]:
        return (self.h1, self.h2)


def exec_root_source(h: SimHost) -> str:
    """The `docker-exec-root` mount's source for this host: its dockerd's own --exec-root (a
    shared mount in the host's mount namespace, see testbed.host), where its sandboxes are."""
    return f"docker-exec-root.source={h.exec_root}"


def install(h: SimHost, ref: str, *settings: str) -> None:
    h.docker("plugin", "install", "--grant-all-permissions", ref, exec_root_source(h), *settings, timeout=600)
    PLUGIN_IDS.append(h.docker("plugin", "inspect", "-f", "{{.Id}}", ref).stdout.strip())


def install_etcd(h: SimHost, ref: str, etcd: Etcd) -> None:
    install(h, ref, f"CANAL_ETCD_ENDPOINTS={etcd.endpoint}", *SETTINGS)


def plugin_output(h: SimHost) -> str:
    """What the plugin printed: dockerd logs it with a plugin= field."""
    text = h.dockerd_log.read_text(errors="replace") if h.dockerd_log.exists() else ""
    return "\n".join(line for line in text.splitlines() if " plugin=" in line)


def remove_everything(h: SimHost, ref: str) -> None:
    if not h.dockerd_running():
        return
    ids = h.docker("ps", "-aq").stdout.split()
    if ids:
        h.docker("rm", "-f", *ids, check=False)
    if plugin_enabled(h, ref) is not None:
        for net in h.docker("network", "ls", "--filter", f"driver={ref}", "-q").stdout.split():
            h.docker("network", "rm", net, check=False)
        h.docker("plugin", "rm", "-f", ref, check=False)


@pytest.fixture(scope="module")
def bed(plugin_rootfs) -> Iterator[Bed]:
    ul = Underlay()
    registry = None
    hosts: list[SimHost] = []
    ref = ""
    try:
        etcd = Etcd(ul)
        registry = Registry(ul)
        ref = f"{registry.address}/canal:test"
        for i in (1, 2):
            hosts.append(plugin_host(ul, f"h{i}", f"198.18.0.{i}", registry))
        baseline = {h.name: run_mounts(h) for h in hosts}
        h1, h2 = hosts
        started = time.monotonic()
        # Cached since the session's build, unless the tree changed in between (then rebuilt).
        built = run([str(BUILD), ref], timeout=1800,
                    env={"DOCKER_HOST": f"unix://{h1.docker_sock}", "DOCKER_CONFIG": str(h1.workdir / "docker-cli")})
        build_dir = Path(built.stdout.strip().splitlines()[-1])  # config.json + rootfs/
        created = time.monotonic()
        h1.docker("plugin", "push", ref, timeout=600)
        h1.docker("plugin", "rm", ref)
        pushed = time.monotonic()
        for h in hosts:
            install_etcd(h, ref, etcd)
        print(f"\nplugin create {created - started:.0f} s, push {pushed - created:.0f} s, "
              f"install on 2 hosts {time.monotonic() - pushed:.0f} s")
        yield Bed(etcd, registry, h1, h2, ref, baseline, build_dir)
        for h in hosts:
            out = plugin_output(h)
            assert "Traceback" not in out, out[out.index("Traceback") - 2000:][:6000]
    finally:
        for h in hosts:
            try:
                remove_everything(h, ref)
            except Exception as exc:  # noqa: BLE001 - the hosts are destroyed below anyway
                print(f"cleanup of {h.name}: {exc!r}")
        if registry is not None:
            registry.close()
        ul.close()
        for plugin_id in PLUGIN_IDS:  # left only where a plugin was killed, not removed
            remove_cgroups(cgroup_dirs(plugin_id))


@pytest.fixture
def b(bed) -> Iterator[Bed]:
    """The module's bed with the plugin installed and enabled on both hosts; containers and
    Canal networks are removed after each test."""
    for h in bed.hosts:
        if plugin_enabled(h, bed.ref) is None:
            install_etcd(h, bed.ref, bed.etcd)
        elif not plugin_enabled(h, bed.ref):
            h.docker("plugin", "enable", bed.ref)
    yield bed
    for h in bed.hosts:
        ids = h.docker("ps", "-aq").stdout.split()
        if ids:
            h.docker("rm", "-f", *ids)
        if plugin_enabled(h, bed.ref) is not None:
            nets = h.docker("network", "ls", "--filter", f"driver={bed.ref}", "-q").stdout.split()
            if nets:
                h.docker("network", "rm", *nets)
        assert not [l for l in h.ip("-o", "link").stdout.splitlines() if ": cnl" in l]


# ------------------------------------------------------------------------------ helpers


def net(b: Bed, h: SimHost, name: str, *opts: str) -> None:
    h.docker("network", "create", "-d", b.ref, "--ipam-driver", b.ref, *opts, name)


def daemon(h: SimHost, name: str, network: str) -> None:
    h.docker("run", "-d", "--name", name, "--network", network, IMAGE, "sleep", "1000")


def ip_of(h: SimHost, container: str, network: str) -> str:
    return h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def mtu_of(h: SimHost, container: str) -> int:
    return int(h.container_exec(container, "cat", "/sys/class/net/eth0/mtu").stdout)


def pings(h: SimHost, container: str, target: str, timeout: float = 15) -> bool:
    """Reachable within `timeout` (the first packets may race the peers' route programming)."""
    def once() -> bool:
        return h.container_exec(container, "ping", "-c1", "-W1", target, check=False).returncode == 0
    try:
        return bool(wait_until(once, timeout=timeout, interval=0.2, what=f"ping {target}"))
    except TestbedError:
        return False


# ------------------------------------------------------------------------------ tests


def test_installed_from_the_registry_and_enabled_on_both_hosts(b):
    for h in b.hosts:
        assert plugin_enabled(h, b.ref) is True
        [info] = h.docker_json("plugin", "inspect", b.ref)
        env = info["Settings"]["Env"]
        assert f"CANAL_ETCD_ENDPOINTS={b.etcd.endpoint}" in env and f"CANAL_NETWORK={CLUSTER}" in env
        assert info["PluginReference"] == b.ref
        mounts = {m["Name"]: m["Source"] for m in info["Settings"]["Mounts"]}
        assert mounts == {**{name: source for name, (source, _) in MOUNTS.items()},
                          "docker-exec-root": str(h.exec_root)}
        assert len(plugin_pids(h)) >= 1
        # Inside the plugin: exactly the narrow mounts, not the host's /run or /var/lib.
        inside = plugin_mountpoints(h)
        assert {dest for _, dest in MOUNTS.values()} <= inside, inside
        assert not inside & {"/run", "/var/run", "/host/var/lib", "/var/lib", "/host/run"}, inside
        # Nothing the plugin mounts (its runtime dir at /run/docker/plugins) leaks into the
        # host's rshared /run.
        assert run_mounts(h) == b.run_mounts[h.name]


def test_containers_on_two_hosts_talk(b):
    for h in b.hosts:
        net(b, h, "appnet")
    daemon(b.h1, "c1", "appnet")
    daemon(b.h2, "c2", "appnet")
    ip1, ip2 = ip_of(b.h1, "c1", "appnet"), ip_of(b.h2, "c2", "appnet")
    assert ip1 != ip2
    assert pings(b.h1, "c1", ip2) and pings(b.h2, "c2", ip1)
    # The plugin read Docker's API through the mounted /run/docker.sock (lazily, after start).
    def names() -> list[str]:
        out = b.etcd.etcdctl("get", "--prefix", "/canal/v1/networks/", "--print-value-only").stdout
        return sorted(json.loads(line).get("name") or "" for line in out.splitlines() if line.startswith("{"))
    wait_until(lambda: names() == ["appnet", "appnet"], timeout=20, what="network names learned from Docker")


def test_encrypted_network_through_wireguard_go_in_the_plugin(b):
    """`-o encrypted`: the managed plugin runs wireguard-go from its rootfs over the host's
    /dev/net/tun (config.json's devices), and containers on two hosts talk through it."""
    for h in b.hosts:
        net(b, h, "secretnet", "-o", "encrypted")
    daemon(b.h1, "s1", "secretnet")
    daemon(b.h2, "s2", "secretnet")
    ip1, ip2 = ip_of(b.h1, "s1", "secretnet"), ip_of(b.h2, "s2", "secretnet")
    assert pings(b.h1, "s1", ip2, timeout=30) and pings(b.h2, "s2", ip1)
    for h in b.hosts:
        assert "flannel-wg" in h.ip("link", "show", "flannel-wg").stdout
        assert "dev flannel-wg" in h.ip("route", "show", "table", "25900").stdout
    leases = b.etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--print-value-only").stdout
    assert leases.count('"PublicKey"') == 2


def test_second_canal_network_by_connect(b):
    """`docker network connect` of a second canal network: the managed plugin enters the
    container's sandbox (CAP_SYS_ADMIN, the docker-exec-root mount) and routes each network
    through its own interface. A sandbox created after the plugin started is visible in the
    plugin (rslave over the host's shared exec root), and gone from it again once its container
    is removed (the plugin's mount namespace keeps no network namespace alive)."""
    h = b.h1
    for name in ("front", "back"):
        net(b, h, name)
    daemon(h, "web", "front")
    daemon(h, "db", "back")
    daemon(h, "proxy", "front")
    key = h.docker("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "proxy").stdout.strip()
    inside = "/host/run/docker/netns/" + key.rsplit("/", 1)[-1]
    assert key.startswith(f"{h.exec_root}/netns/") and inside in plugin_mountpoints(h), key
    # The connect's Join reads the sandbox: no fallback for an unreadable one (EPERM without
    # CAP_SYS_ADMIN, say), which the plugin logs as "cannot read sandbox".
    unread = plugin_output(h).count("cannot read sandbox")
    h.docker("network", "connect", "back", "proxy")
    web, db = ip_of(h, "web", "front"), ip_of(h, "db", "back")
    assert pings(h, "proxy", web) and pings(h, "proxy", db)
    # Canal's own routes in the sandbox (busybox's ip does not show the protocol): each
    # network's through its own interface.
    pid = h.container_pid("proxy")
    ours = h.exec(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "route", "show", "proto", "101"]).stdout
    assert "dev eth0" in ours and "dev eth1" in ours, ours
    assert pings(h, "db", ip_of(h, "proxy", "back"))
    assert not pings(h, "web", db, timeout=3)  # isolation (db answers the proxy, above)
    assert plugin_output(h).count("cannot read sandbox") == unread
    h.docker("rm", "-f", "proxy")
    wait_until(lambda: inside not in plugin_mountpoints(h), timeout=10, what="the sandbox gone from the plugin")


def test_disable_enable_keeps_connectivity_allocations_and_takes_new_settings(b):
    h1, h2 = b.hosts
    for h in b.hosts:
        net(b, h, "appnet")
    daemon(h1, "c1", "appnet")
    daemon(h2, "c2", "appnet")
    ip1, ip2 = ip_of(h1, "c1", "appnet"), ip_of(h2, "c2", "appnet")
    assert pings(h1, "c1", ip2)
    assert mtu_of(h2, "c2") == 1450

    refused = h2.docker("plugin", "set", b.ref, "CANAL_MTU=1400", check=False)
    assert refused.returncode != 0  # settings change only while disabled
    h2.docker("plugin", "disable", "-f", b.ref)
    assert plugin_enabled(h2, b.ref) is False
    wait_until(lambda: not plugin_pids(h2), timeout=15, what="the plugin process to stop")
    # The dataplane lives in the kernel: running containers keep talking without the plugin.
    assert pings(h1, "c1", ip2) and pings(h2, "c2", ip1)

    h2.docker("plugin", "set", b.ref, "CANAL_MTU=1400")
    [info] = h2.docker_json("plugin", "inspect", b.ref)
    assert "CANAL_MTU=1400" in info["Settings"]["Env"]
    h2.docker("plugin", "enable", b.ref)
    assert plugin_enabled(h2, b.ref) is True

    assert pings(h1, "c1", ip2) and pings(h2, "c2", ip1)
    daemon(h2, "c3", "appnet")
    ip3 = ip_of(h2, "c3", "appnet")
    assert ip3 not in (ip1, ip2)  # the allocations survived the restart
    assert mtu_of(h2, "c3") == 1400 and mtu_of(h2, "c2") == 1450  # the new setting applies
    assert pings(h2, "c3", ip1) and pings(h1, "c1", ip3)


def test_plugin_comes_back_with_dockerd_before_its_api_listens(b):
    """dockerd restores managed plugins before its API socket exists: the plugin must start
    without Docker's API (it reads it lazily) and serve the restored network."""
    h1, h2 = b.hosts
    for h in b.hosts:
        net(b, h, "appnet")
    daemon(h1, "c1", "appnet")
    ip1 = ip_of(h1, "c1", "appnet")
    h2.restart_dockerd()
    assert plugin_enabled(h2, b.ref) is True
    daemon(h2, "c2", "appnet")
    assert pings(h2, "c2", ip1) and pings(h1, "c1", ip_of(h2, "c2", "appnet"))


def test_plugin_rm_leaves_nothing_behind(b):
    for h in b.hosts:
        net(b, h, "appnet")
        daemon(h, f"x{h.name}", "appnet")
    for h in b.hosts:
        h.docker("rm", "-f", f"x{h.name}")
        h.docker("network", "rm", "appnet")
        h.docker("plugin", "rm", "-f", b.ref)
        assert plugin_enabled(h, b.ref) is None
        wait_until(lambda h=h: not plugin_pids(h), timeout=15, what="the plugin process to exit")
        assert not [l for l in h.ip("-o", "link").stdout.splitlines() if ": cnl" in l]
        assert run_mounts(h) == b.run_mounts[h.name]


def test_local_datastore_keeps_allocations_across_disable_enable_and_upgrade(bed):
    """The embedded datastore lives in the host's /var/lib/canal, outside the plugin's rootfs:
    the database is created on first use and kept by disable, enable, upgrade."""
    h1 = bed.h1
    remove_everything(h1, bed.ref)
    state = h1.workdir / "varlib" / "canal"  # the host's /var/lib/canal
    clear_dir(state)
    try:
        install(h1, bed.ref, "CANAL_DATASTORE=local", f"CANAL_NETWORK={CLUSTER}", "CANAL_LOG_LEVEL=debug")
        net(bed, h1, "localnet")
        daemon(h1, "l1", "localnet")
        assert (state / "canal.db").is_file()
        h1.docker("plugin", "disable", "-f", bed.ref)
        h1.docker("plugin", "enable", bed.ref)
        daemon(h1, "l2", "localnet")
        h1.docker("plugin", "disable", "-f", bed.ref)
        h1.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check",
                  bed.ref, bed.ref, timeout=600)
        [info] = h1.docker_json("plugin", "inspect", bed.ref)
        assert "CANAL_DATASTORE=local" in info["Settings"]["Env"]  # settings survive the upgrade
        h1.docker("plugin", "enable", bed.ref)
        daemon(h1, "l3", "localnet")
        ips = [ip_of(h1, c, "localnet") for c in ("l1", "l2", "l3")]
        assert len(set(ips)) == 3, ips
        assert pings(h1, "l3", ips[0]) and pings(h1, "l1", ips[1])
    finally:
        remove_everything(h1, bed.ref)
    assert not [l for l in h1.ip("-o", "link").stdout.splitlines() if ": cnl" in l]


def clear_dir(path: Path) -> None:
    """Empty a host directory but keep it: it is a mount source, which must exist."""
    path.mkdir(exist_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def previous_plugin_dir(build: Path, dest: Path) -> None:
    """A plugin directory laid out as before the narrow mounts: the host's whole /var/lib and
    /run read-write, no etcd TLS settings; this build's rootfs (hard links, not a copy)."""
    cfg = json.loads((REPO / "config.json").read_text())
    sysctl = next(m for m in cfg["mounts"] if m["name"] == "sysctl")
    cfg["mounts"] = [
        {"name": "state", "description": "the host's /var/lib", "source": "/var/lib",
         "destination": "/host/var/lib", "type": "bind", "options": ["bind", "private", "rw"],
         "settable": ["source"]},
        {"name": "run", "description": "the host's /run", "source": "/run", "destination": "/run",
         "type": "bind", "options": ["bind", "private", "rw"]},
        sysctl,
    ]
    cfg["env"] = [e for e in cfg["env"] if not e["name"].startswith(
        ("CANAL_ETCD_CAFILE", "CANAL_ETCD_CERTFILE", "CANAL_ETCD_KEYFILE", "CANAL_ETCD_USERNAME",
         "CANAL_ETCD_PASSWORD"))]
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    if run(["cp", "-al", str(build / "rootfs"), str(dest / "rootfs")], check=False).returncode != 0:
        run(["cp", "-a", str(build / "rootfs"), str(dest / "rootfs")], timeout=300)


def test_upgrade_from_the_previous_wide_layout_keeps_allocations(bed):
    """A plugin installed with the whole /var/lib and /run mounted, upgraded to the narrow
    mounts: the database is in the same host directory, every allocation survives."""
    h1 = bed.h1
    remove_everything(h1, bed.ref)
    state = h1.workdir / "varlib" / "canal"
    clear_dir(state)
    old = f"{bed.registry.address}/canal:previous"
    olddir = h1.workdir / "plugin-previous"
    try:
        previous_plugin_dir(bed.build, olddir)
        h1.docker("plugin", "create", old, str(olddir), timeout=600)
        PLUGIN_IDS.append(h1.docker("plugin", "inspect", "-f", "{{.Id}}", old).stdout.strip())
        h1.docker("plugin", "set", old, "CANAL_DATASTORE=local", f"CANAL_NETWORK={CLUSTER}",
                  "CANAL_LOG_LEVEL=debug")
        h1.docker("plugin", "enable", old)
        [info] = h1.docker_json("plugin", "inspect", old)
        assert {m["Name"]: m["Source"] for m in info["Settings"]["Mounts"]} == \
            {name: source for name, (source, _) in PREVIOUS_MOUNTS}  # really the old layout
        h1.docker("network", "create", "-d", old, "--ipam-driver", old, "upnet")
        daemon(h1, "u1", "upnet")
        daemon(h1, "u2", "upnet")
        assert (state / "canal.db").is_file()  # the old layout wrote the host's /var/lib/canal

        h1.docker("plugin", "disable", "-f", old)
        # --skip-remote-check: the plugin was created locally, so it has no remote to compare.
        up = h1.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", old, bed.ref,
                       timeout=600)
        print(f"upgrade: {up.stdout.strip()} {up.stderr.strip()}")
        [info] = h1.docker_json("plugin", "inspect", old)
        # Docker runs a plugin with its config's mounts, which the upgrade replaced (Settings
        # still lists the old ones: Docker keeps a plugin's settings across an upgrade).
        assert {m["Name"]: m["Source"] for m in info["Config"]["Mounts"]} == \
            {name: source for name, (source, _) in MOUNTS.items()}
        assert "CANAL_DATASTORE=local" in info["Settings"]["Env"]  # settings survive the upgrade
        h1.docker("plugin", "enable", old)
        inside = plugin_mountpoints(h1)
        assert {dest for _, dest in MOUNTS.values()} <= inside, inside
        daemon(h1, "u3", "upnet")
        ips = [ip_of(h1, c, "upnet") for c in ("u1", "u2", "u3")]
        assert len(set(ips)) == 3, ips  # u3 got none of the addresses allocated before
        assert pings(h1, "u3", ips[0]) and pings(h1, "u1", ips[1])
        assert not inside & {"/run", "/host/var/lib"}, inside
    finally:
        remove_everything(h1, old)
        shutil.rmtree(olddir, ignore_errors=True)
    assert not [l for l in h1.ip("-o", "link").stdout.splitlines() if ": cnl" in l]


ETCD_PASSWORD = "e2e-Pa55word-not-for-logs"


def forget_vxlan(h: SimHost) -> None:
    """Drop what the plugin left for its previous etcd: with --flannel-mode auto, a subnet.env
    and a flannel.1 that the new etcd has no record of look like a flanneld owning the host."""
    h.exec(["rm", "-f", "/run/flannel/subnet.env"])
    h.ip("link", "del", "flannel.1", check=False)


def test_two_hosts_through_a_tls_and_auth_etcd(bed):
    """The managed plugin on both hosts against an etcd that wants a client certificate of its
    CA and a user/password: certificates and password file from the `certs` mount."""
    ul = bed.etcd.underlay
    pki_dir = ul.run_dir / "pki"
    pki_dir.mkdir()
    pki = Pki(str(pki_dir), ips=[ul.gateway_ip])
    etcd = SecureEtcd(ul, pki)
    try:
        etcd.enable_auth("root-" + ETCD_PASSWORD, "canal", ETCD_PASSWORD,
                         ["/canal/v1", "/coreos.com/network"])
        settings = [f"CANAL_ETCD_ENDPOINTS={etcd.endpoint}", "CANAL_ETCD_CAFILE=/etc/canal/pki/ca.crt",
                    "CANAL_ETCD_CERTFILE=/etc/canal/pki/client.crt", "CANAL_ETCD_KEYFILE=/etc/canal/pki/client.key",
                    "CANAL_ETCD_USERNAME=canal", "CANAL_ETCD_PASSWORD_FILE=/etc/canal/pki/etcd-password"]
        for h in bed.hosts:
            remove_everything(h, bed.ref)
            forget_vxlan(h)
            h.exec(["cp", pki.ca, "/etc/canal/pki/ca.crt"])
            # Without a Common Name: etcd's gateway refuses one once auth is on (see README).
            h.exec(["cp", pki.nocn_client_cert, "/etc/canal/pki/client.crt"])
            h.exec(["cp", pki.nocn_client_key, "/etc/canal/pki/client.key"])
            h.exec(["sh", "-c", "umask 077; cat >/etc/canal/pki/etcd-password"], input=ETCD_PASSWORD + "\n")
            install(h, bed.ref, *settings, *SETTINGS)
        for h in bed.hosts:
            net(bed, h, "tlsnet")
        daemon(bed.h1, "t1", "tlsnet")
        daemon(bed.h2, "t2", "tlsnet")
        ip1, ip2 = ip_of(bed.h1, "t1", "tlsnet"), ip_of(bed.h2, "t2", "tlsnet")
        reached = pings(bed.h1, "t1", ip2) and pings(bed.h2, "t2", ip1)
        assert reached
        leases = etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--keys-only").stdout.split()
        assert len(leases) == 2, leases  # both hosts leased their subnets in the TLS etcd
        for h in bed.hosts:
            assert ETCD_PASSWORD not in plugin_output(h)
            assert ETCD_PASSWORD not in h.docker("plugin", "inspect", bed.ref).stdout
        # Positive control: the same etcd refuses a client without its certificate.
        refused = ul.exec(["etcdctl", "--endpoints", etcd.endpoint, "--cacert", pki.ca, "--user",
                           f"canal:{ETCD_PASSWORD}", "--dial-timeout", "2s", "--command-timeout", "3s",
                           "get", "/canal/v1/x"], check=False, timeout=20, env={"ETCDCTL_API": "3"})
        assert refused.returncode != 0
    finally:
        for h in bed.hosts:
            remove_everything(h, bed.ref)  # the next test's fixture reinstalls on the plain etcd
            forget_vxlan(h)
        etcd.close()
