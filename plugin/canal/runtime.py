"""Wiring: builds every collaborator from the Config once, in the serving process.

Nothing is built at import time; tests build a Plugin with fakes where they need to.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
from typing import Any

from canal.agent.agent import Agent
from canal.agent.desired import Snapshot
from canal.config import Config
from canal.datastore.base import Datastore, open_datastore
from canal.datastore.keys import Keys
from canal.dataplane import links as linkmod
from canal.dataplane.firewall import Firewall
from canal.dataplane.iptables import Iptables, detect_backend
from canal.errors import Unavailable
from canal.services.ipam import Ipam
from canal.services.networks import Networks
from canal.services.subnets import Lease, SubnetManager

log = logging.getLogger(__name__)


def random_mac() -> str:
    """A locally administered unicast MAC, as flannel gives its VXLAN device."""
    octets = [random.randint(0, 255) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


class Plugin:
    def __init__(self, config: Config, store: Datastore | None = None):
        self.config = config
        self.host = config.host_name
        self.store = store or open_datastore(config)
        self.keys = Keys(config.etcd_prefix, config.flannel_prefix)
        self.iface, self.public_ip, self.underlay_mtu = linkmod.underlay(config.iface, config.public_ip)
        self.subnets = SubnetManager(
            self.store, self.keys, config.network, config.subnet_len, config.vxlan_vni, config.vxlan_port
        )
        self._lease_lock = threading.Lock()
        self.lease: Lease | None = None
        self.links = linkmod.Links()
        self.ipam = Ipam(self.store, self.keys, self.host, self.host_subnet)
        self.networks = Networks(
            self.store, self.keys, self.ipam, self.links, self.host, self.default_mtu, self._changed
        )
        backend = detect_backend(config.iptables_backend)
        log.info(
            "host %s: underlay %s (%s, mtu %d), iptables %s, datastore %s",
            self.host, self.public_ip, self.iface, self.underlay_mtu, backend, config.datastore,
        )
        self.agent = Agent(
            self.snapshot,
            self.links,
            Firewall(Iptables(backend)),
            config.resync_interval,
            periodic=self.renew_lease,
        )

    def start(self) -> None:
        linkmod.enable_forwarding()
        try:
            self.host_subnet()
        except Exception as err:  # Docker calls still get answers; IPAM retries the lease
            log.error("could not lease a host subnet yet: %s", err)
        self.agent.start()
        self.agent.trigger()

    def stop(self) -> None:
        self.agent.stop()
        self.links.close()
        self.store.close()

    def _changed(self, sync: bool) -> None:
        if sync and not self.agent.trigger(wait=10):
            raise Unavailable(f"the dataplane could not be programmed: {self.agent.last_error or 'timed out'}")
        if not sync:
            self.agent.trigger()

    # Host subnet lease ----------------------------------------------------------------------

    def _host_record(self) -> dict[str, Any]:
        def fill(record: Any) -> Any:
            record = dict(record or {})
            record.setdefault("vtep_mac", random_mac())
            return record

        return self.store.update(self.keys.host(self.host), fill)

    def host_subnet(self) -> ipaddress.IPv4Network:
        with self._lease_lock:
            if self.lease is None:
                record = self._host_record()
                self.lease = self.subnets.acquire(self.public_ip, record["vtep_mac"], record.get("subnet"))
                if record.get("subnet") != str(self.lease.subnet):
                    self.store.update(self.keys.host(self.host), lambda r: {**(r or {}), "subnet": str(self.lease.subnet)})  # type: ignore[union-attr]
                log.info("host %s owns subnet %s", self.host, self.lease.subnet)
            return self.lease.subnet

    def renew_lease(self) -> None:
        with self._lease_lock:
            if self.lease is not None:
                self.lease = self.subnets.renew(self.lease)

    def default_mtu(self) -> int:
        return self.config.mtu or max(576, self.underlay_mtu - 50)

    def status(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "public_ip": self.public_ip,
            "subnet": str(self.lease.subnet) if self.lease else None,
            "datastore": self.config.datastore,
            "scope": self.config.scope,
            "mtu": self.default_mtu(),
            "last_error": self.agent.last_error,
            "endpoints": len(self.networks.local_endpoints()),
        }

    # Snapshot for the agent -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(
            host=self.host,
            cluster_network=self.subnets.network_config().network.with_prefixlen,
            networks=self.store.list_json(self.keys.networks),
            endpoints=self.store.list_json(self.keys.endpoints),
        )
