"""Issue 12, faults under load (short forms; bench/chaos.py runs the long ones): a fault is
injected into real components (plugin, dockerd, etcd, the host's path to etcd, SQLite's disk,
a whole host), then the invariant checker of chaos_support must find nothing, with nobody's
help but the plugin's own retries and Docker's."""

from __future__ import annotations

import os
import random
import signal

import pytest
from chaos_support import (
    Bed,
    EtcdCluster,
    Outcome,
    scenario_disk_full,
    scenario_dockerd,
    scenario_etcd_member,
    scenario_etcd_stop,
    scenario_host_gone,
    scenario_kill,
    scenario_partition,
)
from e2e_support import PLUGIN_ARGS, etcd_cluster, etcd_plugin_args

from testbed import IMAGE, Etcd, SimHost, Underlay

TTL = 8
GRACE = 5
# Longer than the partition (15 s) plus a TTL: a host cut off that long is away, not gone; past
# it, its peers would rightly collect its records (the default is a day).
ABSENCE = 30


def plugin_args(host: SimHost, etcd: Etcd) -> list[str]:
    return etcd_plugin_args(host, etcd, "--gc-grace", str(GRACE), "--host-absence", str(ABSENCE), ttl=TTL, resync=3)


@pytest.fixture(scope="module")
def bed():
    with etcd_cluster(plugin_args) as (ul, etcd, hosts):
        b = Bed(etcd, hosts, lambda h: plugin_args(h, etcd), grace=GRACE, underlay=ul)
        b.setup()
        found, _ = b.settle(60)
        assert found == [], "\n".join(map(str, found))
        yield b


@pytest.fixture
def underlay_of_bed(bed):
    return bed.underlay


@pytest.fixture
def b(bed):
    yield bed
    bed.ensure_up()
    bed.clear_churn()


def clean(outcome: Outcome) -> None:
    print(f"{outcome.scenario} seed {outcome.seed}: recovered in {outcome.recovery:.1f} s; {outcome.note}")
    assert outcome.violations == [], "\n".join(map(str, outcome.violations))


def test_checker_sees_planted_leaks_and_names_them(b):
    """Positive control: kernel state without a record is reported, with what and where (the
    plugin frozen meanwhile, or its next pass would repair it first)."""
    h = b.hosts[0]
    os.killpg(h.plugin.pid, signal.SIGSTOP)
    try:
        h.ip("link", "add", "cnl0123456789ab", "type", "veth", "peer", "name", "cnltplant")
        h.exec(["ipset", "add", "canal-masq", "100.64.250.250"])
        h.ip("route", "add", "100.64.250.0/24", "dev", "flannel.1", "proto", "102", "onlink", "via", "100.64.250.0")
        h.exec(["bridge", "fdb", "append", "02:00:00:00:00:99", "dev", "flannel.1", "dst", "198.18.0.99"])
        found = [str(v) for v in b.check(connectivity=False)]
        for leak in ("veth cnl0123456789ab", "canal-masq member 100.64.250.250", "route 100.64.250.0/24",
                     "FDB 02:00:00:00:00:99 dst 198.18.0.99"):
            assert any(leak in v and h.name in v for v in found), (leak, found)
    finally:
        h.ip("link", "del", "cnl0123456789ab", check=False)
        h.exec(["ipset", "del", "canal-masq", "100.64.250.250"], check=False)
        h.ip("route", "del", "100.64.250.0/24", "proto", "102", check=False)
        h.exec(["bridge", "fdb", "del", "02:00:00:00:00:99", "dev", "flannel.1", "dst", "198.18.0.99"], check=False)
        os.killpg(h.plugin.pid, signal.SIGCONT)
    assert b.check() == []


@pytest.mark.parametrize("seed", [random.randrange(1 << 30)])
def test_kill_plugin_during_concurrent_runs(b, seed):
    clean(scenario_kill(b, seed, count=10))


@pytest.mark.parametrize("live_restore", [True, False], ids=["live-restore", "no-live-restore"])
def test_dockerd_restart_while_containers_run(b, live_restore):
    clean(scenario_dockerd(b, random.randrange(1 << 30), live_restore))


def test_etcd_frozen_longer_than_the_lease(b):
    clean(scenario_etcd_stop(b, random.randrange(1 << 30), outage=15))


def test_one_host_partitioned_from_etcd(b):
    clean(scenario_partition(b, random.randrange(1 << 30), outage=15))


def test_host_removed_for_good_is_cleaned_up_everywhere(b):
    clean(scenario_host_gone(b, random.randrange(1 << 30)))


def test_sqlite_disk_full_and_plugin_killed_mid_write(underlay_of_bed):
    """The embedded datastore on a tiny tmpfs (mounted in the host's own mount namespace)."""
    ul = underlay_of_bed
    host = SimHost(ul, "s1", "198.18.0.20")
    try:
        state = str(host.workdir / "canal")
        host.exec(["mkdir", "-p", state])
        host.exec(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "cnlt-state", state])
        host.start_dockerd()
        host.load_image()
        args = [*PLUGIN_ARGS, "--gc-grace", str(GRACE), "--docker-host", f"unix://{host.docker_sock}"]
        host.start_plugin(args)
        host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "chaos")
        for i in range(3):
            host.docker("run", "-d", "--name", f"pre{i}", "--network", "chaos", IMAGE, "sleep", "100000")
        clean(scenario_disk_full(host, random.randrange(1 << 30), state, args, GRACE))
    finally:
        host.close()


def test_etcd_cluster_losing_a_member_fails_over():
    """Three etcd members; the plugins get all three endpoints (--etcd-endpoints a,b,c)."""
    ul = Underlay()
    try:
        cluster = EtcdCluster(ul)
        hosts = []
        for i in (1, 2):
            h = SimHost(ul, f"h{i}", f"198.18.0.{i}")
            h.start_dockerd()
            h.load_image()
            h.start_plugin(plugin_args(h, cluster))  # type: ignore[arg-type]
            hosts.append(h)
        bed = Bed(cluster, hosts, lambda h: plugin_args(h, cluster), grace=GRACE, underlay=ul)  # type: ignore[arg-type]
        bed.setup()
        found, _ = bed.settle(60)
        assert found == [], "\n".join(map(str, found))
        clean(scenario_etcd_member(bed, random.randrange(1 << 30)))
    finally:
        ul.close()
