"""Self-check of the test bed itself: real dockerds on simulated hosts, etcd, cleanup.

Needs root, dockerd, etcd and busybox-static.  Builds everything inline (no fixtures) and
checks that nothing survives close(), a SIGTERM or a crash (with cleanup_leftovers).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from testbed import (IMAGE, REPO, Etcd, SimHost, TestbedError, Underlay, cleanup_leftovers,
                     live_objects)
from testbed._util import cgroup_dirs, cmdline, ns_id, pids_in_namespaces

pytestmark = [pytest.mark.e2e]


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def assert_run_gone(run_id: str) -> None:
    """Nothing named after the run is left: netns, processes, cgroups, temp dir."""
    assert not [n for n in netns_names() if n.startswith(run_id + "-")]
    token = re.compile(re.escape(run_id) + r"(?![0-9r])")
    procs = [f"{p} {cmdline(p)}" for p in map(int, filter(str.isdigit, os.listdir("/proc")))
             if token.search(cmdline(p))]
    assert not procs, procs
    assert not Path(f"/tmp/{run_id}").exists()
    assert not [d for h in ("h1", "h2") for d in cgroup_dirs(f"{run_id}-{h}")]


def test_two_hosts_with_dockerd_containers_and_underlay(record_property):
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                timeout=10).stdout
    timings: dict[str, float] = {}
    ul = Underlay()
    run_id = ul.run_id
    try:
        hosts = []
        for i, name in enumerate(("h1", "h2"), start=1):
            t0 = time.monotonic()
            h = SimHost(ul, name, f"198.18.0.{i}")
            h.start_dockerd()
            h.load_image()
            timings[f"setup_{name}"] = time.monotonic() - t0
            hosts.append(h)
        h1, h2 = hosts

        # Each host has its own daemon, /run and /sys; none has a default route.
        assert h1.docker_json("info", "--format", "{{json .ID}}") != \
            h2.docker_json("info", "--format", "{{json .ID}}")
        assert h1.exec(["ls", "/run/docker/plugins"]).returncode == 0
        assert h2.exec(["cat", "/proc/sys/kernel/hostname"]).stdout.strip() == "h2"
        assert h2.docker("info", "--format", "{{.Name}}").stdout.strip() == "h2"
        assert Path(h1.docker_sock).is_socket()
        mac = h1.exec(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
        assert mac in h1.ip("link", "show", "eth0").stdout
        for h in hosts:
            assert "default" not in h.ip("route", "show").stdout

        for i, h in enumerate(hosts, start=1):
            h.docker("run", "-d", "--name", f"c{i}", IMAGE, "sleep", "600")
            state = h.docker_json("inspect", f"c{i}")[0]["State"]
            assert state["Running"], state
            assert h.container_exec(f"c{i}", "echo", "hello").stdout.strip() == "hello"
            assert h.container_pid(f"c{i}") > 1

        # Underlay: host1 reaches host2's address from inside host1's netns.
        ping = h1.exec(["busybox", "ping", "-c", "2", "-W", "2", h2.address], timeout=20)
        assert " 0% packet loss" in ping.stdout, ping.stdout

        # dockerd's rules live in the host's netns.
        assert "DOCKER" in h1.exec(["iptables", "-S"]).stdout

        t0 = time.monotonic()
        h2.close()
        timings["teardown_h2"] = time.monotonic() - t0
        h2.close()  # idempotent
        assert not Path(h2.workdir).exists()
        assert h2.netns not in netns_names()
    finally:
        t0 = time.monotonic()
        ul.close()
        timings["teardown_underlay_h1"] = time.monotonic() - t0
    ul.close()  # idempotent
    assert_run_gone(run_id)
    assert not [o for o in live_objects() if getattr(o, "run_id", None) == run_id]
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                          timeout=10).stdout == root_links
    for key, value in timings.items():
        record_property(key, round(value, 2))
    print("testbed timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))


def test_etcd_reachable_from_a_host_and_survives_restart():
    ul = Underlay()
    run_id = ul.run_id
    try:
        etcd = Etcd(ul)
        assert etcd.endpoint == "http://198.18.0.254:2379"
        h = SimHost(ul, "h1", "198.18.0.1")
        ctl = ["etcdctl", "--endpoints", etcd.endpoint, "--dial-timeout", "3s"]
        env = {"ETCDCTL_API": "3"}
        h.exec([*ctl, "put", "/canal/test", "v1"], env=env)
        assert h.exec([*ctl, "get", "--print-value-only", "/canal/test"],
                      env=env).stdout.strip() == "v1"

        etcd.stop()
        assert not etcd.running()
        down = h.exec([*ctl, "--command-timeout", "2s", "get", "/canal/test"], env=env,
                      check=False, timeout=15)
        assert down.returncode != 0
        etcd.start()
        assert h.exec([*ctl, "get", "--print-value-only", "/canal/test"],
                      env=env).stdout.strip() == "v1"
    finally:
        ul.close()
    assert_run_gone(run_id)


def test_plugin_start_failure_reports_log_tail():
    ul = Underlay()
    try:
        h = SimHost(ul, "h1", "198.18.0.1")
        bogus = [sys.executable, "-c", "import sys; print('plugin-boom'); sys.exit(3)"]
        with pytest.raises(TestbedError, match="plugin-boom"):
            h.start_plugin(command=bogus, timeout=10)
        assert not h.plugin_running()
    finally:
        ul.close()


def test_rejects_addresses_outside_the_benchmark_range():
    with pytest.raises(ValueError):
        Underlay(subnet="10.0.0.0/24")
    ul = Underlay()
    try:
        with pytest.raises(ValueError):
            SimHost(ul, "h1", "198.18.1.1")
    finally:
        ul.close()


_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from testbed import IMAGE, Etcd, SimHost, Underlay
    ul = Underlay(); Etcd(ul)
    h = SimHost(ul, "h1", "198.18.0.1"); h.start_dockerd(); h.load_image()
    h.docker("run", "-d", "--name", "c1", IMAGE, "sleep", "600")
    print(ul.run_id, flush=True)
    if sys.argv[1] == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
""")


def _start_child(mode: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'plugin'}:{REPO / 'tests'}")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, mode], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], 90)
    run_id = child.stdout.readline().strip() if ready else ""
    assert run_id.startswith("cnlt"), child.stderr.read() if child.poll() is not None else ""
    return child, run_id


def test_sigterm_cleans_up():
    child, run_id = _start_child("wait")
    try:
        assert f"{run_id}-h1" in netns_names()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) != 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert_run_gone(run_id)


def test_cleanup_leftovers_after_crash():
    child, run_id = _start_child("crash")
    child.wait(timeout=30)
    netns_id = ns_id(f"/run/netns/{run_id}-h1")
    assert netns_id and pids_in_namespaces(net=[netns_id])  # dockerd & co. outlived it
    done = cleanup_leftovers()
    assert any(run_id in line for line in done), done
    assert not [line for line in done if line.startswith("WARNING")], done
    assert_run_gone(run_id)
