"""Simulated Canal hosts for bench/scale.py: the datastore side of N plugins, without a kernel.

Each simulated host does against the one real etcd what a Canal plugin's datastore side does,
through the plugin's own code (so the records are byte for byte what real hosts write):
  - identity and lease: canal.services.hosts.Hosts.ensure + SubnetManager.acquire, renewed as
    the plugin renews (SubnetManager.renew + Hosts.touch every min(resync, ttl/3) seconds);
  - a network record of the shared network name on that host;
  - endpoints: the initial population in bulk transactions of the exact records CreateEndpoint
    + Join + the Docker label watcher leave behind (address, endpoint, and for addresses
    outside the host's subnet a route record); churn through the real services
    (Ipam.request_address, Networks.create_endpoint/join/update_endpoint/leave/delete_endpoint,
    Ipam.release_address) with a kernel-less Links;
  - watches: one canal.agent.mirror.Mirror per host over the policies and the flannel leases.
    (A real plugin mirrors the whole /canal/v1/ tree; N full mirrors of 100,000 endpoints do
    not fit in one process on a small machine. The real host mirrors everything, and its own
    datastore metrics show what that costs per host.)

Run by bench/scale.py as a child process (in the real host's network namespace, so etcd is
reachable): one JSON command a line on stdin, one JSON answer a line on stdout:
  {"cmd": "populate"} -> {"ok": true, "endpoints": n, "seconds": s}
  {"cmd": "churn", "rate": 100} / {"cmd": "churn", "rate": 0} -> {"ok": true}
  {"cmd": "stats"} -> counters;  {"cmd": "stop"} -> removes every record it wrote, exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "plugin")]

from canal.agent.mirror import Mirror  # noqa: E402
from canal.api.protocol import CreateEndpoint  # noqa: E402
from canal.datastore.base import Datastore, Put, dumps  # noqa: E402
from canal.datastore.keys import Keys  # noqa: E402
from canal.records import (  # noqa: E402
    AddressRecord,
    EndpointRecord,
    Lease,
    NetworkRecord,
    RouteRecord,
)
from canal.services.hosts import Hosts  # noqa: E402
from canal.services.ipam import DEFAULT_POOL_ID, Ipam  # noqa: E402
from canal.services.networks import Networks, container_mac  # noqa: E402
from canal.services.subnets import LEASE_TTL, SubnetManager  # noqa: E402

PREFIX, FLANNEL_PREFIX = "/canal/v1", "/coreos.com/network"
NETWORK_NAME = "appnet"
SIM_NET = "5ca1e" + "0" * 59  # the simulated hosts' Docker network ID (libnetwork-shaped)
EP_TAG = "5ca1e0"  # every simulated endpoint ID starts with it: one range delete removes them
HOST_TAG = "scale-sim"
ROUTED_POOL = "canal-cluster"  # addresses outside the owner's subnet (--ip): peers need a /32
MTU = 1450
TXN_OPS = 100  # etcd's --max-txn-ops is 128 by default


def host_name(index: int) -> str:
    return f"{HOST_TAG}{index:04d}"


def public_ip(index: int) -> str:
    """Underlay addresses in 198.19.0.0/16 (benchmark range): only ever written into leases."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.19.0.1")) + index))


def endpoint_id(host_index: int, serial: int) -> str:
    return f"{EP_TAG}{host_index:06x}{serial:052x}"


def container_id(host_index: int, serial: int) -> str:
    return f"c0{host_index:06x}{serial:056x}"


def labels_for(serial: int, policies: int) -> dict[str, str]:
    """Selected as a source by one of bench/scale.py's policies (role == c<i>), as in bench/policy.py."""
    return {"role": f"c{serial % max(1, policies)}", "tier": "sim"}


def joined_records(
    keys: Keys, host: str, subnet: ipaddress.IPv4Network, ep_id: str, cid: str, ip: ipaddress.IPv4Address,
    labels: dict[str, str], now: float, pool: str = DEFAULT_POOL_ID,
) -> list[tuple[str, dict[str, Any]]]:
    """(key, JSON) of what a plugin has written once a container is running on `host`: the
    address bound to the endpoint, the joined endpoint with its labels, and for an address
    outside the host's subnet the route record peers route by (canal.agent.desired)."""
    name = f"sim-{ep_id[6:18]}"
    endpoint = EndpointRecord(
        id=ep_id, network=SIM_NET, host=host, ip=ip, mac=container_mac(ip), mtu=MTU, joined=True,
        sandbox=f"/var/run/docker/netns/{cid[:12]}", created=now, labels=labels, container=cid,
        container_name=name,
    )
    address = AddressRecord(ip=ip, pool=pool, kind="endpoint", host=host, endpoint=ep_id, network=SIM_NET,
                            time=int(now))
    out = [(keys.address(ip), address.to_json()), (keys.endpoint(ep_id), endpoint.to_json())]
    if ip not in subnet:
        out.append((keys.route(ip), RouteRecord(ip, host, subnet).to_json()))
    return out


class NoLinks:
    """The kernel side of Networks (veths) on a host that has no kernel: nothing to do."""

    guard = threading.Lock()

    def prepare(self, link: Any) -> None:
        pass

    def ensure_veth(self, link: Any) -> None:
        pass

    def forget(self, endpoint_id: str) -> None:
        pass


@dataclass
class SimHost:
    index: int
    store: Datastore
    keys: Keys
    network: str
    subnet_len: int
    policies: int
    renew_every: float
    lease: Lease | None = None
    serial: int = 0
    running: dict[str, tuple[str, str]] = field(default_factory=dict)  # endpoint ID -> (ip, pool)
    lock: threading.Lock = field(default_factory=threading.Lock)
    mirror: Mirror | None = None
    changes_seen: int = 0

    def __post_init__(self) -> None:
        self.name = host_name(index=self.index)
        self.hosts = Hosts(self.store, self.keys, self.name, public_ip(self.index))
        self.subnets = SubnetManager(self.store, self.keys, self.network, self.subnet_len, vni=1, port=8472)
        self.ipam = Ipam(self.store, self.keys, self.name, self.subnet)
        self.networks = Networks(self.store, self.keys, self.ipam, NoLinks(), self.name,  # type: ignore[arg-type]
                                 lambda: MTU, lambda sync: None)

    def subnet(self) -> ipaddress.IPv4Network:
        assert self.lease is not None
        return self.lease.subnet

    def start(self, watch: bool) -> None:
        """What `canal serve` does first against the datastore: identity, lease, network record."""
        record = self.hosts.ensure()
        self.lease = self.subnets.acquire(public_ip(self.index), record.vtep_mac,
                                          str(record.subnet) if record.subnet else None)
        subnet = self.lease.subnet
        self.hosts.update(lambda r: replace(r, subnet=subnet))
        self.store.put(self.keys.network(self.name, SIM_NET), NetworkRecord(
            id=SIM_NET, host=self.name, pools=("0.0.0.0/0",), mtu=MTU, name=NETWORK_NAME).to_json())
        if watch:
            self.mirror = Mirror(self.store, [self.keys.policies, self.keys.leases], self._changed)
            self.mirror.start()

    def _changed(self) -> None:
        self.changes_seen += 1

    def renew(self) -> None:
        """The plugin's periodic step: SubnetManager.renew, then Hosts.touch."""
        assert self.lease is not None
        self.lease = self.subnets.renew(self.lease)
        self.hosts.touch()

    def bulk_records(self, count: int, routed: int, routed_block: ipaddress.IPv4Network, routed_base: int,
                     now: float) -> list[tuple[str, dict[str, Any]]]:
        """The records of `count` running containers, `routed` of them with an address from the
        routed block (outside every host subnet); the rest from the host's subnet."""
        subnet = self.subnet()
        out: list[tuple[str, dict[str, Any]]] = []
        for k in range(count):
            serial = self.serial
            self.serial += 1
            ep_id, cid = endpoint_id(self.index, serial), container_id(self.index, serial)
            if k < routed:
                ip = routed_block.network_address + routed_base + k
                pool = ROUTED_POOL
            else:
                ip = subnet.network_address + 2 + (k - routed)
                pool = DEFAULT_POOL_ID
            self.running[ep_id] = (str(ip), pool)
            out.extend(joined_records(self.keys, self.name, subnet, ep_id, cid, ip,
                                      labels_for(serial, self.policies), now, pool))
        return out

    def start_container(self) -> None:
        """`docker run` on this host, as the plugin sees it: RequestAddress, CreateEndpoint,
        Join, then the label watcher's update."""
        with self.lock:
            serial = self.serial
            self.serial += 1
        ep_id, cid = endpoint_id(self.index, serial), container_id(self.index, serial)
        address, _ = self.ipam.request_address(DEFAULT_POOL_ID, "", None)
        self.networks.create_endpoint(CreateEndpoint(NetworkID=SIM_NET, EndpointID=ep_id,
                                                     Interface={"Address": address}, Options={}))
        self.networks.join(SIM_NET, ep_id, f"/var/run/docker/netns/{cid[:12]}")
        labels = labels_for(serial, self.policies)
        self.networks.update_endpoint(SIM_NET, ep_id, lambda r: replace(
            r, labels=labels, container=cid, container_name=f"sim-{ep_id[6:18]}"))
        with self.lock:
            self.running[ep_id] = (address, DEFAULT_POOL_ID)

    def stop_container(self, rng: random.Random) -> bool:
        """`docker rm -f` of one running container: Leave, DeleteEndpoint, ReleaseAddress."""
        with self.lock:
            if not self.running:
                return False
            ep_id = rng.choice(list(self.running))
            address, pool = self.running.pop(ep_id)
        self.networks.leave(SIM_NET, ep_id)
        self.networks.delete_endpoint(SIM_NET, ep_id)
        self.ipam.release_address(pool, address if "/" in address else f"{address}/32")
        return True


def write_bulk(store: Datastore, items: list[tuple[str, dict[str, Any]]]) -> None:
    for start in range(0, len(items), TXN_OPS):
        store.txn([], [Put(k, dumps(v)) for k, v in items[start:start + TXN_OPS]])


class Cluster:
    """N simulated hosts in one process: threads for renewals, watches and churn."""

    def __init__(self, store: Datastore, hosts: int, endpoints: int, policies: int, network: str, subnet_len: int,
                 routed_fraction: float, routed_block: str, renew_every: float, watch: bool, workers: int,
                 seed: int, clock: Callable[[], float] = time.time):
        self.store = store
        self.keys = Keys(PREFIX, FLANNEL_PREFIX)
        self.endpoints = endpoints
        self.routed_fraction = routed_fraction
        self.routed_block = ipaddress.IPv4Network(routed_block)
        self.watch = watch
        self.workers = workers
        self.clock = clock
        self.rng = random.Random(seed)
        self.hosts = [SimHost(i, store, self.keys, network, subnet_len, policies, renew_every) for i in range(hosts)]
        self.rate = 0.0
        self.stopping = threading.Event()
        self.counts = {"starts": 0, "stops": 0, "errors": 0, "renewals": 0, "renew_errors": 0}
        self.last_error = ""
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def populate(self) -> dict[str, Any]:
        started = time.monotonic()
        # hosts start concurrently, as machines do (leases are taken under guards): one by one,
        # 500 of them took minutes on a loaded 2-core machine
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda h: h.start(self.watch), self.hosts))
        per_host, extra = divmod(self.endpoints, len(self.hosts))
        routed_base = 0
        batch: list[tuple[str, dict[str, Any]]] = []
        now = self.clock()
        for host in self.hosts:
            count = per_host + (1 if host.index < extra else 0)
            routed = int(count * self.routed_fraction)
            batch.extend(host.bulk_records(count, routed, self.routed_block, routed_base, now))
            routed_base += routed
            if len(batch) >= 10 * TXN_OPS:
                write_bulk(self.store, batch)
                batch = []
        write_bulk(self.store, batch)
        for host in self.hosts:
            self._spawn(self._renew_loop, host)
        for n in range(self.workers):
            self._spawn(self._churn_loop, n)
        return {"ok": True, "endpoints": self.endpoints, "hosts": len(self.hosts),
                "seconds": round(time.monotonic() - started, 2)}

    def _spawn(self, target: Callable[[Any], None], arg: Any) -> None:
        thread = threading.Thread(target=target, args=(arg,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _renew_loop(self, host: SimHost) -> None:
        # staggered like hosts started at different times
        if self.stopping.wait(self.rng.uniform(0, host.renew_every)):
            return
        while True:
            try:
                host.renew()
                self._count("renewals")
            except Exception as err:  # noqa: BLE001 - counted and shown; the loop goes on like the plugin's
                self._count("renew_errors", err)
            if self.stopping.wait(host.renew_every):
                return

    def _churn_loop(self, worker: int) -> None:
        """Each worker takes its share of the cluster-wide rate: a start or a stop in turn, on a
        random host, so the endpoint count stays level."""
        rng = random.Random(worker)
        start_next = True
        next_at = time.monotonic()
        while not self.stopping.is_set():
            rate = self.rate
            if rate <= 0:
                self.stopping.wait(0.1)
                next_at = time.monotonic()
                continue
            next_at += self.workers / rate
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stopping.wait(delay)
            elif delay < -1:
                next_at = time.monotonic()  # behind by more than a second: do not burst
            host = rng.choice(self.hosts)
            try:
                if start_next:
                    host.start_container()
                    self._count("starts")
                elif host.stop_container(rng):
                    self._count("stops")
            except Exception as err:  # noqa: BLE001
                self._count("errors", err)
            start_next = not start_next

    def _count(self, name: str, err: Exception | None = None) -> None:
        with self._lock:
            self.counts[name] += 1
            if err is not None:
                self.last_error = f"{type(err).__name__}: {err}"[:300]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counts)
        out["last_error"] = self.last_error
        out["running"] = sum(len(h.running) for h in self.hosts)
        out["watch_changes"] = sum(h.changes_seen for h in self.hosts)
        out["threads"] = threading.active_count()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the simulator's own, to tell its load apart
        return out

    def stop(self) -> dict[str, Any]:
        """Stop every thread, then remove every record this cluster wrote (range deletes and
        lease revocations: a few requests, not one per record)."""
        self.stopping.set()
        self.rate = 0
        for host in self.hosts:
            if host.mirror is not None:
                host.mirror.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        removed = clean(self.store, self.keys, [h.lease for h in self.hosts if h.lease is not None],
                        self.routed_block)
        return {"ok": True, "removed": removed}


def clean(store: Datastore, keys: Keys, leases: list[Lease], routed_block: ipaddress.IPv4Network) -> int:
    """Delete what simulated hosts wrote: their endpoints, addresses, routes, networks, host
    records and leases."""
    from canal.datastore.keys import hex_prefix

    removed = 0
    prefixes = [keys.endpoints + EP_TAG, keys.routes + hex_prefix(routed_block),
                keys.addresses + hex_prefix(routed_block), f"{keys.root}/hosts/{HOST_TAG}",
                f"{keys.root}/networks/{HOST_TAG}"]
    for lease in leases:
        # a nibble-aligned subnet is exactly one key prefix; another would cover its neighbours
        assert lease.subnet.prefixlen % 4 == 0, f"subnet {lease.subnet} is not on a nibble boundary"
        prefixes.append(keys.addresses + hex_prefix(lease.subnet))
        prefixes.append(keys.lease(lease.subnet))
    for prefix in prefixes:
        removed += delete_prefix(store, prefix)
    for lease in leases:
        if lease.lease_id:
            try:
                store.revoke(lease.lease_id)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
    return removed


def delete_prefix(store: Datastore, prefix: str) -> int:
    """etcd DeleteRange over a prefix (the Datastore interface deletes single keys only)."""
    from canal.datastore.etcd import EtcdDatastore, _b64, _prefix_range

    assert isinstance(store, EtcdDatastore)
    key, end = _prefix_range(prefix)
    answer = store._call("delete", "/v3/kv/deleterange", {"key": _b64(key), "range_end": _b64(end)})[0]
    return int(answer.get("deleted", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--hosts", type=int, required=True)
    parser.add_argument("--endpoints", type=int, required=True)
    parser.add_argument("--policies", type=int, default=10)
    parser.add_argument("--network", required=True)
    parser.add_argument("--subnet-len", type=int, required=True)
    parser.add_argument("--routed-fraction", type=float, default=0.05)
    parser.add_argument("--routed-block", required=True)
    parser.add_argument("--renew-every", type=float, default=min(30.0, LEASE_TTL / 3))
    parser.add_argument("--no-watch", action="store_true")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from canal.datastore.etcd import EtcdDatastore

    store = EtcdDatastore(args.etcd, timeout=10)
    cluster = Cluster(store, args.hosts, args.endpoints, args.policies, args.network, args.subnet_len,
                      args.routed_fraction, args.routed_block, args.renew_every, not args.no_watch, args.workers,
                      args.seed)

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "populate":
                    answer(cluster.populate())
                elif cmd["cmd"] == "churn":
                    cluster.rate = float(cmd["rate"])
                    answer({"ok": True})
                elif cmd["cmd"] == "stats":
                    answer(cluster.stats())
                elif cmd["cmd"] == "stop":
                    break
                else:
                    answer({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
            except Exception as err:  # noqa: BLE001 - reported to the driver, which stops
                answer({"ok": False, "error": f"{type(err).__name__}: {err}"})
    finally:
        answer(cluster.stop())
        store.close()


if __name__ == "__main__":
    main()
