"""Real dockerd + real kernel + the real plugin, inside namespaces the tests create.

Prerequisites are asserted, not skipped: the README's test command installs them, and a
suite that silently skips its real tier would pass without testing anything.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from testbed import IMAGE, REPO, SimHost, Underlay, cleanup_leftovers
from testbed._util import run

CLUSTER = "100.64.0.0/16"
# A short full-resync period, so repair of tampered state is seen within a test's patience.
PLUGIN_ARGS = ["--network", CLUSTER, "--log-level", "debug", "--resync-interval", "5"]
REQUIRED = ("dockerd", "docker", "busybox", "nsenter", "ipset", "iptables-nft-save", "etcd", "etcdctl")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def prerequisites() -> None:
    missing = [b for b in REQUIRED if not shutil.which(b)]
    assert os.geteuid() == 0, "the end-to-end tests need root (they create namespaces)"
    assert not missing, f"missing {missing}: run scripts/test, which installs them"
    cleanup_leftovers()  # what an earlier, killed run may have left


@pytest.fixture(scope="module")
def underlay() -> Iterator[Underlay]:
    ul = Underlay()
    try:
        yield ul
    finally:
        ul.close()


def start_host(ul: Underlay, name: str, ip: str, plugin_args: list[str]) -> SimHost:
    host = SimHost(ul, name, ip)
    # Also on Docker's default socket (in the host's private /run), where the plugin looks.
    host.start_dockerd(["-H", "unix:///run/docker.sock"])
    host.load_image()
    host.start_plugin(plugin_args)
    return host


@pytest.fixture(scope="module")
def host(underlay) -> Iterator[SimHost]:
    h = start_host(underlay, "h1", "198.18.0.1", PLUGIN_ARGS)
    try:
        yield h
    finally:
        h.close()


def canal_leftovers(host: SimHost) -> dict[str, list[str]]:
    """Everything of ours still in the host's kernel."""
    links = [l.split(":")[1].strip().split("@")[0] for l in host.ip("-o", "link").stdout.splitlines()]
    routes = host.ip("route", "show", "proto", "101").stdout.split("\n")
    chains = [l for l in host.exec(["iptables-nft-save"]).stdout.splitlines() if "CANAL" in l]
    sets = host.exec(["ipset", "list", "-n"]).stdout.split()
    return {
        "veths": [l for l in links if l.startswith(("cnl", "cnp"))],
        "routes": [r for r in routes if r.strip()],
        "iptables": chains,
        "ipsets": [s for s in sets if s.startswith("canal-")],
    }


@pytest.fixture
def h1(host) -> Iterator[SimHost]:
    """The module's host, cleaned after each test; the cleanup itself is checked."""
    yield host
    if not host.plugin_running():
        host.start_plugin(PLUGIN_ARGS)
    if not host.dockerd_running():
        host.start_dockerd(["-H", "unix:///run/docker.sock"])
    clear(host)
    assert canal_leftovers(host) == {"veths": [], "routes": [], "iptables": [], "ipsets": []}


def clear(host: SimHost, driver: str = "canal") -> None:
    """Remove every container and canal network of a host (through Docker, as a user would),
    then check the plugin logged no unexpected exception while the test ran."""
    ids = host.docker("ps", "-aq").stdout.split()
    if ids:
        host.docker("rm", "-f", *ids)
    nets = host.docker("network", "ls", "--filter", f"driver={driver}", "-q").stdout.split()
    if nets:
        host.docker("network", "rm", *nets)
    log = host.plugin_log.read_text(errors="replace") if host.plugin_log.exists() else ""
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]


def _install_registry_package() -> None:
    if not shutil.which("docker-registry"):
        run(["bash", "-c", f"source {REPO}/scripts/lib.sh && apt_install docker-registry"], timeout=600)


@pytest.fixture(scope="session")
def plugin_rootfs() -> Path:
    """The managed plugin's build directory (config.json + rootfs/), built once per machine:
    cached by scripts/build-plugin, keyed by a hash of the tree."""
    _install_registry_package()
    started = time.monotonic()
    res = run([str(REPO / "scripts" / "build-plugin"), "--rootfs-only"], timeout=1800)
    print(f"\nbuild-plugin --rootfs-only: {time.monotonic() - started:.0f} s\n{res.stderr.strip()}")
    return Path(res.stdout.strip().splitlines()[-1])


__all__ = ["CLUSTER", "IMAGE", "PLUGIN_ARGS", "canal_leftovers", "clear", "start_host"]
