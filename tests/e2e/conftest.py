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

from e2e_support import PLUGIN_ARGS, canal_leftovers, clear, start_host

from testbed import REPO, SimHost, Underlay, cleanup_leftovers
from testbed._util import run

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


@pytest.fixture(scope="module")
def host(underlay) -> Iterator[SimHost]:
    h = start_host(underlay, "h1", "198.18.0.1", PLUGIN_ARGS)
    try:
        yield h
    finally:
        h.close()


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

