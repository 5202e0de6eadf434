"""Where each record lives in the datastore: the key layout, in one place.

Addresses are keyed by 8 hex digits so that every subnet is a key-prefix range: a pool's
allocations are one prefix query, not a scan of the whole cluster.
"""

from __future__ import annotations

import ipaddress


def ip_hex(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str:
    """8 hex digits for IPv4, 32 for IPv6: the lengths never collide, so one directory holds both."""
    address = ipaddress.ip_address(ip)
    return ("%08x" if address.version == 4 else "%032x") % int(address)


def hex_prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The longest hex key prefix shared by every address of net (whole nibbles only)."""
    return ip_hex(net.network_address)[: net.prefixlen // 4]


def cidr_key(net: ipaddress.IPv4Network | ipaddress.IPv6Network | str) -> str:
    return str(net).replace("/", "-")


class Keys:
    def __init__(self, prefix: str, flannel_prefix: str):
        self.root = prefix.rstrip("/")
        self.flannel = flannel_prefix.rstrip("/")

    # Canal's own records
    def pool(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network | str) -> str:
        return f"{self.root}/ipam/pools/{cidr_key(net)}"

    @property
    def pools(self) -> str:
        return f"{self.root}/ipam/pools/"

    def address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str:
        return f"{self.root}/ipam/addresses/{ip_hex(ip)}"

    @property
    def addresses(self) -> str:
        return f"{self.root}/ipam/addresses/"

    def network(self, host: str, network_id: str) -> str:
        """Per host: a Swarm network has one ID on every node, and each node's record is its own."""
        return f"{self.root}/networks/{host}/{network_id}"

    @property
    def networks(self) -> str:
        return f"{self.root}/networks/"

    def endpoint(self, endpoint_id: str) -> str:
        return f"{self.root}/endpoints/{endpoint_id}"

    @property
    def endpoints(self) -> str:
        return f"{self.root}/endpoints/"

    def route(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str:
        """A /32 owned by a host outside its own subnet, routed to it by every peer."""
        return f"{self.root}/routes/{ip_hex(ip)}"

    @property
    def routes(self) -> str:
        return f"{self.root}/routes/"

    def policy(self, network: str | None, name: str) -> str:
        """Global policies and each network's policies live apart: a network may be named 'global'."""
        scope = "global" if network is None else f"net/{network}"
        return f"{self.root}/policies/{scope}/{name}"

    @property
    def policies(self) -> str:
        return f"{self.root}/policies/"

    def host(self, name: str) -> str:
        return f"{self.root}/hosts/{name}"

    # flannel's schema, shared with real flanneld hosts
    @property
    def flannel_config(self) -> str:
        return f"{self.flannel}/config"

    @property
    def leases(self) -> str:
        return f"{self.flannel}/subnets/"

    def lease(self, net: ipaddress.IPv4Network | str, net6: ipaddress.IPv6Network | None = None) -> str:
        """flannel's MakeSubnetKey: `a.b.c.d-len`, in dual stack `a.b.c.d-len&<v6 address>-len`."""
        key = f"{self.flannel}/subnets/{cidr_key(net)}"
        return key if net6 is None else f"{key}&{net6.network_address.compressed}-{net6.prefixlen}"
