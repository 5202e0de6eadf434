"""`canal uninstall`: remove everything Canal owns on this host, offline.

Offline by design: it runs with the plugin stopped (a running plugin would put everything
back on its next pass), with the same settings as `canal serve` (flags or CANAL_*), so it
also serves the managed plugin after `docker plugin disable`. It refuses while the plugin's
socket answers, and while canal endpoints of this host exist (naming their containers):
their veths and rules are what keeps those containers connected.

Compute, then apply: `plan()` reads the kernel and the datastore and returns the steps (each
with what it removes, printed before it runs); `--dry-run` stops there. Every step is
idempotent, so an interrupted uninstall is finished by running it again.

Owned, and removed: chains CANAL-* in every table of both iptables backends and families with
the jumps to them; ipsets canal-*; routes with protocol 101 (endpoint routes) and 102 (tunnel
routes) and 103 (direct routes of host-gw and DirectRouting) and 104 (WireGuard routes), the
WireGuard mark rule (priority 900), all in both families, and device flannel-wg (unless flannel-mode external: then it
is flanneld's); leftover veths cnl*/cnp*; the VXLAN device flannel.<VNI> unless a real flanneld owns
it (external mode: its MAC is not our host record's) — its neighbours and FDB go with it;
/run/flannel/subnet.env when Canal wrote it; in etcd, this host's subnet lease (peers drop
the routes to it on their next pass), its host record and its networks, routes and addresses;
the systemd unit scripts/run-plugin writes. Docker's networks of driver canal stay in Docker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

from canal.dataplane.cmd import run as run_cmd
from canal.dataplane.firewall import FirewallState, restore_text
from canal.dataplane.iptables import check_restore, find_tool, parse_save
from canal.datastore.base import Datastore, Delete
from canal.datastore.keys import Keys
from canal.errors import CanalError, Conflict
from canal.records import (
    HostRecord,
    Lease,
    RecordError,
    address_entry,
    endpoint_entry,
    network_entry,
    route_entry,
)
from canal.services.hosts import Hosts, v6_mac

log = logging.getLogger(__name__)

SYSTEMD_UNIT = "/etc/systemd/system/canal.service"
SUBNET_ENV = "/run/flannel/subnet.env"
RTPROTS = (101, 102, 103, 104)  # endpoint, tunnel, direct (host-gw, DirectRouting), WireGuard routes
Run = Callable[..., Any]


@dataclass
class Step:
    what: str  # shown to the operator before it runs
    apply: Callable[[], Any]


def _records(store: Datastore) -> Callable[[str, Callable[[str, Any], Any]], dict[str, Any]]:
    """The mirror's records() over direct reads: parsed, malformed ones skipped."""

    def records(prefix: str, parse: Callable[[str, Any], Any]) -> dict[str, Any]:
        out = {}
        for key, raw in store.list_json(prefix).items():
            try:
                out[key] = parse(key, raw)
            except (RecordError, CanalError):
                continue
        return out

    return records


def refuse_endpoints(store: Datastore, keys: Keys, host: str) -> None:
    """Conflict naming the containers of this host's canal endpoints, if any."""
    mine: set[str] = set()
    for rel, raw in store.list_json(keys.endpoints).items():
        try:
            ep = endpoint_entry(rel, raw)
        except (RecordError, CanalError):  # malformed, but if it says it is ours it still counts
            if isinstance(raw, dict) and raw.get("host") == host:
                mine.add(f"endpoint {rel[:12]!r} (malformed record)")
            continue
        if ep.host == host:
            mine.add(ep.container_name or ep.container[:12] or f"endpoint {ep.id[:12]}")
    if mine:
        raise Conflict(
            f"canal endpoints are still on host {host}, of container(s): {', '.join(sorted(mine))}. "
            "Remove them (docker rm -f, with the plugin running) and run canal uninstall again"
        )


class Uninstall:
    """Plans the removal; `run` runs external commands (canal.dataplane.cmd.run's signature)."""

    def __init__(self, host: str, public_ip: str, vni: int, store: Optional[Datastore], keys: Keys,
                 flannel_mode: str = "auto", release: bool = True, run: Run = run_cmd, which: Callable[[str], Optional[str]] | None = None,
                 sys_class_net: str = "/sys/class/net", unit: str = SYSTEMD_UNIT, subnet_env: str = SUBNET_ENV):
        self.host, self.public_ip, self.vni = host, public_ip, vni
        self.store, self.keys, self.flannel_mode = store, keys, flannel_mode
        self.release = release  # multi-host: give up the lease and records (the local store keeps them)
        self.run = run
        self.which = which
        self.sys_class_net, self.unit, self.subnet_env = sys_class_net, unit, subnet_env

    # -- the plan ----------------------------------------------------------------------------

    def plan(self) -> list[Step]:
        if self.store is not None:
            refuse_endpoints(self.store, self.keys, self.host)
        steps = self._iptables() + self._ipsets() + self._routes() + self._rules() + self._links()
        if self.store is not None and self.release:
            steps += self._datastore()
        for path, why in ((self.unit, "the systemd unit"),):
            if os.path.exists(path):
                steps.append(Step(f"remove {why} {path}", partial(self._remove_unit, path)))
        return steps

    def _iptables(self) -> list[Step]:
        steps = []
        for backend in ("nft", "legacy"):
            for family in ("iptables", "ip6tables"):
                kw = {"which": self.which} if self.which else {}
                save = find_tool(backend, "save", family, **kw)
                restore = find_tool(backend, "restore", family, **kw)
                if not save or not restore or not save.startswith(f"{family}-{backend}"):
                    continue  # a plain iptables-save is one of the two: only the named tools
                try:
                    tables = parse_save(self.run([save], timeout=15).stdout)
                except CanalError as err:
                    log.debug("%s unusable: %s", save, err)
                    continue
                text = restore_text(FirewallState(), tables)  # nothing desired: ours all go
                if text:
                    chains = sorted({c for t in tables.values() for c in t.chains if c.startswith("CANAL-")})
                    what = f"{family} ({backend}): remove {len(chains)} CANAL chain(s) and the jumps to them"
                    steps.append(Step(what, partial(self._restore, restore, text)))
        return steps

    def _restore(self, tool: str, text: str) -> None:
        check_restore(text)
        self.run([tool, "--noflush", "--wait", "5"], input=text, timeout=30)

    def _ipsets(self) -> list[Step]:
        try:
            text = self.run(["ipset", "save"], timeout=15).stdout
        except CanalError:
            return []
        names = sorted({p[1] for p in (line.split() for line in text.splitlines())
                        if len(p) >= 3 and p[0] == "create" and p[1].startswith("canal-")})
        return [Step(f"destroy ipset {name}", partial(self.run, ["ipset", "destroy", name], timeout=15))
                for name in names]

    def _routes(self) -> list[Step]:
        steps = []
        for proto in RTPROTS:
            shown = self.run(["ip", "route", "show", "table", "all", "proto", str(proto)], timeout=15).stdout
            if shown.strip():
                count = len(shown.strip().splitlines())
                steps.append(Step(f"flush {count} route(s) with protocol {proto}",
                                  partial(self.run, ["ip", "route", "flush", "table", "all", "proto", str(proto)],
                                          timeout=15)))
        # IPv6: the same protocols (the /128s to other hosts' --ipv6 endpoints, direct routes via
        # peers' PublicIPv6, WireGuard's)
        for proto in RTPROTS:
            shown = self.run(["ip", "-6", "route", "show", "table", "all", "proto", str(proto)], timeout=15).stdout
            if shown.strip():
                steps.append(Step(f"flush {len(shown.strip().splitlines())} IPv6 route(s) with protocol {proto}",
                                  partial(self.run, ["ip", "-6", "route", "flush", "table", "all", "proto", str(proto)],
                                          timeout=15)))
        return steps

    def _rules(self) -> list[Step]:
        steps = []
        for family, name in ((["-4"], ""), (["-6"], "IPv6 ")):
            shown = self.run(["ip", *family, "rule", "show", "priority", "900"], timeout=15, check=False).stdout
            if "lookup 25900" in shown:
                steps.append(Step(f"delete the {name}WireGuard mark rule (priority 900, table 25900)",
                                  partial(self.run, ["ip", *family, "rule", "del", "priority", "900", "table", "25900"],
                                          timeout=15, check=False)))
        return steps

    def _links(self) -> list[Step]:
        try:
            names = sorted(os.listdir(self.sys_class_net))
        except OSError:
            names = []
        steps = [Step(f"delete leftover veth {name}", partial(self._del_link, name))
                 for name in names if name.startswith(("cnl", "cnp"))]
        if "flannel-wg" in names and self.flannel_mode != "external":
            steps.append(Step("delete flannel-wg (WireGuard; the key stays in the state directory)",
                              lambda: self._del_link("flannel-wg")))
        device = f"flannel.{self.vni}"
        if device in names:
            if self._owns_device(device):
                steps.append(Step(f"delete {device} (its neighbour and FDB entries go with it)",
                                  lambda: self._del_link(device)))
                if os.path.exists(self.subnet_env):
                    steps.append(Step(f"remove {self.subnet_env}", lambda: _unlink(self.subnet_env)))
            else:
                log.info("%s is flanneld's (external mode): left in place", device)
        device6 = f"flannel-v6.{self.vni}"
        if device6 in names and self._owns_device(device6, v6=True):
            steps.append(Step(f"delete {device6} (IPv6 VXLAN; its entries go with it)", lambda: self._del_link(device6)))
        return steps

    def _owns_device(self, device: str, v6: bool = False) -> bool:
        """Ours unless flanneld's: external mode, or (auto) a MAC that is not our host record's."""
        if self.flannel_mode == "external":
            return False
        if self.flannel_mode == "embedded" or self.store is None or not self.release:
            return self.flannel_mode == "embedded"
        try:
            with open(os.path.join(self.sys_class_net, device, "address")) as handle:
                mac = handle.read().strip().lower()
        except OSError:
            return False
        raw = self.store.get_json(self.keys.host(self.host))
        try:
            record = HostRecord.parse(raw, self.host) if raw is not None else None
        except RecordError:
            record = None
        if record is None:
            return False
        return (v6_mac(record.vtep_mac) if v6 else record.vtep_mac).lower() == mac

    def _del_link(self, name: str) -> None:
        self.run(["ip", "link", "del", name], timeout=15, check=False)

    def _datastore(self) -> list[Step]:
        assert self.store is not None
        store, keys = self.store, self.keys
        steps = []
        for rel, raw in store.list_json(keys.leases).items():
            try:
                lease = Lease.parse(rel, raw)
            except (RecordError, CanalError):
                continue
            if lease.public_ip == self.public_ip:
                key = keys.leases + rel  # as stored (a dual-stack lease's key names both subnets)
                steps.append(Step(f"release subnet lease {lease.subnet} ({key})", partial(self._release, key)))
        hosts = Hosts(store, keys, self.host, self.public_ip)
        records = _records(store)
        # What Hosts._collect removes (no endpoints here: refused above)
        count = sum(1 for prefix, parse in ((keys.networks, network_entry), (keys.routes, route_entry))
                    for r in records(prefix, parse).values() if r.host == self.host)
        count += sum(1 for a in records(keys.addresses, address_entry).values()
                     if a.host == self.host and a.kind == "endpoint" and not a.endpoint)
        if count:
            steps.append(Step(f"remove host {self.host}'s {count} network, route and address record(s)",
                              lambda: hosts._collect(self.host, records)))
        if store.get(keys.host(self.host)) is not None:
            steps.append(Step(f"remove host record {keys.host(self.host)}",
                              lambda: store.txn([], [Delete(keys.host(self.host))])))
        return steps

    def _release(self, key: str) -> None:
        """Delete the key and revoke its etcd lease (nothing else is attached to it)."""
        assert self.store is not None
        entry = self.store.get(key)
        if entry is None:
            return
        self.store.txn([], [Delete(key)])
        if entry.lease:
            self.store.revoke(entry.lease)

    def _remove_unit(self, path: str) -> None:
        self._systemctl("disable", "--now", "canal.service")
        _unlink(path)
        self._systemctl("daemon-reload")

    def _systemctl(self, *args: str) -> None:
        try:
            self.run(["systemctl", *args], timeout=60, check=False)
        except CanalError as err:  # no systemd running: the file is all there is
            log.info("systemctl %s: %s", " ".join(args), err)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
