#!/usr/bin/env python3
"""Benchmark (issues 3, 10): cross-host TCP throughput and ping latency between two containers on
two simulated hosts — over Canal (vxlan), over Docker's own overlay network (a two-node swarm,
--attachable) and over the bare underlay — and over Canal host-gw on a second pair of hosts (its
own flannel prefix in the same etcd), interleaved in one run. Namespaces only.

    .venv/bin/python bench/multihost.py [--seconds 5] [--repeat 3] [--json bench/results/multihost.json]
        [--baseline DIR]

--baseline DIR adds a third Canal vxlan cluster (m5/m6, its own prefixes in the same etcd) whose
plugin runs from DIR/plugin (e.g. `git worktree add /tmp/base main`), measured as "canal-base"
in the same interleaved rounds: an A/B of a dataplane change within one run.

Writes the samples as JSON and a plot next to it (.png): throughput and per-packet rtt per path.

Also Canal encrypted (an `-o encrypted` network on m1/m2: WireGuard), bare WireGuard of the same
kind between m3 and m4 (host to host: the ceiling for Canal's, kernel or wireguard-go), and
Docker's encrypted overlay where the kernel carries IPsec ESP (said so where it does not).

Targets: Canal vxlan >= 1.0 x Docker overlay throughput; host-gw >= 0.9 x underlay; encrypted
>= 0.9 x bare WireGuard.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "plugin")]

import _results  # noqa: E402
from testbed import IMAGE, Etcd, SimHost, Underlay, wait_until  # noqa: E402


def netns_of(host: SimHost, container: str) -> str:
    return f"--net=/proc/{host.container_pid(container)}/ns/net"


def iperf(client: SimHost, client_ns: list[str], server_ip: str, seconds: int) -> float:
    out = client.exec(["nsenter", *client_ns, "iperf3", "-c", server_ip, "-t", str(seconds), "-J"],
                      timeout=seconds + 30).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_ms(client: SimHost, client_ns: list[str], target: str, count: int = 20) -> list[float]:
    """Round-trip times of every reply (busybox and iputils both print `time=X ms`)."""
    out = client.exec(["nsenter", *client_ns, "ping", "-c", str(count), "-i", "0.05", target]).stdout
    rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if not rtts:
        raise RuntimeError(f"no ping reply from {target}: {out!r}")
    return rtts


def wireguard_implementation(h: SimHost) -> str:
    """What Canal chose on this kernel: the module, or wireguard-go."""
    kind = h.exec(["ip", "-d", "link", "show", "flannel-wg"]).stdout
    return "wireguard-go" if " tun " in kind else "kernel"


def bare_wireguard(a: SimHost, b: SimHost, implementation: str) -> str:
    """A plain WireGuard tunnel a <-> b (device wgbare, port 51830, 100.127.0.1/.2), of the same
    kind as Canal's: the ceiling for Canal encrypted. Returns a's tunnel address."""
    for h, mine, peer in ((a, "100.127.0.1", "100.127.0.2"), (b, "100.127.0.2", "100.127.0.1")):
        if implementation == "kernel":
            h.ip("link", "add", "wgbare", "type", "wireguard")
        else:
            h.exec(["wireguard-go", "wgbare"])
        key = h.exec(["wg", "genkey"]).stdout.strip()
        (h.workdir / "wgbare.key").write_text(key + "\n")
        os.chmod(h.workdir / "wgbare.key", 0o600)
        h.exec(["wg", "set", "wgbare", "private-key", str(h.workdir / "wgbare.key"), "listen-port", "51830"])
        h.ip("addr", "add", f"{mine}/32", "dev", "wgbare")
        h.ip("link", "set", "wgbare", "mtu", "1420", "up")
        h.ip("route", "add", f"{peer}/32", "dev", "wgbare")
    for h, far, allowed in ((a, b, "100.127.0.2/32"), (b, a, "100.127.0.1/32")):
        public = far.exec(["wg", "show", "wgbare", "public-key"]).stdout.strip()
        h.exec(["wg", "set", "wgbare", "peer", public, "endpoint", f"{far.address}:51830", "allowed-ips", allowed])
    wait_until(lambda: b.exec(["ping", "-c1", "-W1", "100.127.0.1"], check=False).returncode == 0, timeout=30)
    return "100.127.0.1"


def docker_encrypted_overlay(h1: SimHost, h2: SimHost, servers: dict[str, str]) -> bool:
    """Docker's `--opt encrypted` overlay (IPsec ESP between the nodes), if a ping crosses it here."""
    h1.docker("network", "create", "-d", "overlay", "--attachable", "--opt", "encrypted", "--subnet",
              "100.96.1.0/24", "ovlenc")
    h1.docker("run", "-d", "--name", "srv-ovlenc", "--network", "ovlenc", IMAGE, "sleep", "100000")
    h2.docker("run", "-d", "--name", "cli-ovlenc", "--network", "ovlenc", IMAGE, "sleep", "100000")
    servers["ovlenc"] = h1.docker_json("inspect", "srv-ovlenc")[0]["NetworkSettings"]["Networks"]["ovlenc"]["IPAddress"]
    try:
        wait_until(lambda: h2.exec(["nsenter", netns_of(h2, "cli-ovlenc"), "ping", "-c1", "-W1", servers["ovlenc"]],
                                   check=False).returncode == 0, timeout=15)
    except Exception:  # noqa: BLE001 - not carried on this kernel: reported, not measured
        return False
    h1.exec(["nsenter", netns_of(h1, "srv-ovlenc"), "iperf3", "-s", "-D"])
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", metavar="DIR", help="checkout whose plugin/ runs a second vxlan cluster")
    _results.add_json_option(parser, "multihost")
    args = parser.parse_args()
    ul = Underlay()
    servers: dict[str, str] = {}
    try:
        etcd = Etcd(ul)
        h1, h2 = (SimHost(ul, f"m{i}", f"198.18.0.{i}") for i in (1, 2))
        for h in (h1, h2):
            h.start_dockerd()
            h.load_image()
            h.start_plugin(["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint,
                            "--network", "100.64.0.0/16", "--docker-host", f"unix://{h.docker_sock}"])
            h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "canalnet")
        # A second cluster in the same etcd, configured host-gw (flannel's Backend), on m3/m4.
        h3, h4 = (SimHost(ul, f"m{i}", f"198.18.0.{i}") for i in (3, 4))
        for h in (h3, h4):
            h.start_dockerd()
            h.load_image()
            h.start_plugin(["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint, "--backend", "host-gw",
                            "--etcd-prefix", "/canal/hostgw", "--flannel-prefix", "/hostgw/network",
                            "--network", "100.65.0.0/16", "--docker-host", f"unix://{h.docker_sock}"])
            h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "canalnet")
        h3.docker("run", "-d", "--name", "srv-hostgw", "--network", "canalnet", IMAGE, "sleep", "100000")
        h4.docker("run", "-d", "--name", "cli-hostgw", "--network", "canalnet", IMAGE, "sleep", "100000")
        servers["hostgw"] = h3.docker_json("inspect", "srv-hostgw")[0]["NetworkSettings"]["Networks"]["canalnet"]["IPAddress"]
        h3.exec(["nsenter", netns_of(h3, "srv-hostgw"), "iperf3", "-s", "-D"])
        wait_until(lambda: h4.exec(["nsenter", netns_of(h4, "cli-hostgw"), "ping", "-c1", "-W1", servers["hostgw"]],
                                   check=False).returncode == 0, timeout=30)
        if args.baseline:  # the same vxlan cluster, run by another checkout's plugin
            base_env = {"PYTHONPATH": os.path.join(os.path.abspath(args.baseline), "plugin")}
            h5, h6 = (SimHost(ul, f"m{i}", f"198.18.0.{i}") for i in (5, 6))
            for h in (h5, h6):
                h.start_dockerd()
                h.load_image()
                h.start_plugin(["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint,
                                "--etcd-prefix", "/canal/base", "--flannel-prefix", "/base/network",
                                "--network", "100.66.0.0/16", "--docker-host", f"unix://{h.docker_sock}"],
                               env=base_env)
                h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "canalnet")
            h5.docker("run", "-d", "--name", "srv-base", "--network", "canalnet", IMAGE, "sleep", "100000")
            h6.docker("run", "-d", "--name", "cli-base", "--network", "canalnet", IMAGE, "sleep", "100000")
            servers["base"] = h5.docker_json("inspect", "srv-base")[0]["NetworkSettings"]["Networks"]["canalnet"]["IPAddress"]
            h5.exec(["nsenter", netns_of(h5, "srv-base"), "iperf3", "-s", "-D"])
            wait_until(lambda: h6.exec(["nsenter", netns_of(h6, "cli-base"), "ping", "-c1", "-W1", servers["base"]],
                                       check=False).returncode == 0, timeout=30)
        h1.docker("swarm", "init", "--advertise-addr", h1.address)
        token = h1.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        h2.docker("swarm", "join", "--token", token, f"{h1.address}:2377")
        h1.docker("network", "create", "-d", "overlay", "--attachable", "--subnet", "100.96.0.0/24", "ovl")
        for kind in ("canalnet", "ovl"):
            h1.docker("run", "-d", "--name", f"srv-{kind}", "--network", kind, IMAGE, "sleep", "100000")
            h2.docker("run", "-d", "--name", f"cli-{kind}", "--network", kind, IMAGE, "sleep", "100000")
            data = h1.docker_json("inspect", f"srv-{kind}")[0]["NetworkSettings"]["Networks"][kind]
            servers[kind] = data["IPAddress"]
            h1.exec(["nsenter", netns_of(h1, f"srv-{kind}"), "iperf3", "-s", "-D"])
            wait_until(lambda k=kind: h2.exec(["nsenter", netns_of(h2, f"cli-{k}"), "ping", "-c1", "-W1", servers[k]],
                                               check=False).returncode == 0, timeout=30)
        h1.exec(["iperf3", "-s", "-D"])  # the bare underlay, host to host
        # Canal encrypted: a second network on m1/m2 with -o encrypted (WireGuard beside VXLAN).
        for h in (h1, h2):
            h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "-o", "encrypted", "secretnet")
        h1.docker("run", "-d", "--name", "srv-secret", "--network", "secretnet", IMAGE, "sleep", "100000")
        h2.docker("run", "-d", "--name", "cli-secret", "--network", "secretnet", IMAGE, "sleep", "100000")
        servers["secret"] = h1.docker_json("inspect", "srv-secret")[0]["NetworkSettings"]["Networks"]["secretnet"]["IPAddress"]
        h1.exec(["nsenter", netns_of(h1, "srv-secret"), "iperf3", "-s", "-D"])
        wait_until(lambda: h2.exec(["nsenter", netns_of(h2, "cli-secret"), "ping", "-c1", "-W1", servers["secret"]],
                                   check=False).returncode == 0, timeout=30)
        implementation = wireguard_implementation(h1)
        # Bare WireGuard of the same kind between m3 and m4, host to host: the limit for Canal's.
        bare = bare_wireguard(h3, h4, implementation)
        h3.exec(["iperf3", "-s", "-D"])
        # Docker's own encrypted overlay (IPsec ESP): only where the kernel can carry it.
        docker_encrypted = docker_encrypted_overlay(h1, h2, servers)
        paths = {
            "canal": (lambda: [netns_of(h2, "cli-canalnet")], servers["canalnet"]),
            "overlay": (lambda: [netns_of(h2, "cli-ovl")], servers["ovl"]),
            "underlay": (lambda: [], h1.address),
            "host-gw": (lambda: [netns_of(h4, "cli-hostgw")], servers["hostgw"]),
        }
        paths["canal-encrypted"] = (lambda: [netns_of(h2, "cli-secret")], servers["secret"])
        paths["wg-bare"] = (lambda: [], bare)
        if docker_encrypted:
            paths["overlay-encrypted"] = (lambda: [netns_of(h2, "cli-ovlenc")], servers["ovlenc"])
        client = {name: h4 if name in ("host-gw", "wg-bare") else h2 for name in paths}
        if args.baseline:
            paths["canal-base"] = (lambda: [netns_of(h6, "cli-base")], servers["base"])
            client["canal-base"] = h6
        gbps: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.repeat):  # interleaved, so drift hits every path alike
            for name, (ns, target) in paths.items():
                gbps[name].append(iperf(client[name], ns(), target, args.seconds))
        rtts = {name: ping_ms(client[name], ns(), target) for name, (ns, target) in paths.items()}
        lat = {name: statistics.mean(values) for name, values in rtts.items()}
        print(f"TCP throughput (iperf3, {args.seconds}s x {args.repeat}, median) and ping rtt (mean of 20):")
        for name in paths:
            print(f"  {name:9} {statistics.median(gbps[name]):7.2f} Gbit/s   {lat[name]:.3f} ms")
        canal, overlay, under = (statistics.median(gbps[k]) for k in ("canal", "overlay", "underlay"))
        print(f"  canal/overlay throughput {canal / overlay:.3f} (target >= 1.0)")
        print(f"  canal/underlay throughput {canal / under:.3f}")
        if args.baseline:
            print(f"  canal/canal-base throughput {canal / statistics.median(gbps['canal-base']):.3f} "
                  f"(canal-base: the plugin of {args.baseline})")
        hostgw = statistics.median(gbps["host-gw"])
        print(f"  host-gw/underlay throughput {hostgw / under:.3f} (target >= 0.9), host-gw/overlay {hostgw / overlay:.3f} (target >= 1.3)")
        print(f"  latency host-gw/overlay {lat['host-gw'] / lat['overlay']:.3f}")
        print(f"  latency canal/overlay {lat['canal'] / lat['overlay']:.3f}, canal/underlay {lat['canal'] / lat['underlay']:.3f}")
        encrypted, wg = statistics.median(gbps["canal-encrypted"]), statistics.median(gbps["wg-bare"])
        print(f"  canal-encrypted/wg-bare throughput {encrypted / wg:.3f} (target >= 0.9; both {implementation}), "
              f"latency {lat['canal-encrypted'] / lat['wg-bare']:.3f}")
        if docker_encrypted:
            print(f"  latency canal-encrypted/overlay-encrypted {lat['canal-encrypted'] / lat['overlay-encrypted']:.3f}")
        else:
            print("  Docker's encrypted overlay: no ping across it on this kernel (no IPsec ESP): not measured")
        _results.save({
            "benchmark": "multihost",
            "params": {"seconds": args.seconds, "repeat": args.repeat, "baseline": args.baseline or "",
                       "wireguard": implementation, "docker_encrypted_overlay": docker_encrypted},
            "headline": [
                *(_results.headline(f"{k} throughput median", statistics.median(gbps[k]), "Gbit/s") for k in paths),
                _results.headline("canal/overlay throughput", canal / overlay, "", ">= 1.0"),
                _results.headline("host-gw/underlay throughput", hostgw / under, "", ">= 0.9"),
                _results.headline("canal-encrypted/wg-bare throughput", encrypted / wg, "", ">= 0.9"),
                *(_results.headline(f"{k} rtt mean", lat[k], "ms") for k in paths),
            ],
            "panels": [
                {"kind": "box", "title": f"TCP throughput (iperf3, {args.seconds} s runs)", "ylabel": "Gbit/s",
                 "series": {k: [round(v, 3) for v in gbps[k]] for k in paths}},
                {"kind": "box", "title": "ping rtt, every reply", "ylabel": "ms", "series": rtts},
            ],
        }, args.json)
    finally:
        ul.close()


if __name__ == "__main__":
    main()
