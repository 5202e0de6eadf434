"""The backend config (flannel's `Backend` object, typed) and the desired state every backend computes."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from canal.config import Secret
from canal.dataplane.vxlan import VxlanState
from canal.dataplane.wireguard import WgState
from canal.errors import BadRequest, CanalError
from canal.records import Lease, safe, wg_key

BACKENDS = ("vxlan", "host-gw", "wireguard")  # the flannel backends Canal implements
WG_PORT = 51820  # flannel's and Calico's default ListenPort
WG_MODES = ("auto", "separate", "ipv4", "ipv6")  # flannel's wireguard Mode values


@dataclass(frozen=True)
class BackendConfig:
    """flannel's `Backend` object, checked: `type` is any well-formed flannel backend name (a
    config for a backend Canal lacks still parses, so the cluster network stays usable, and
    `require_supported` names it); the vxlan fields keep flannel's defaults."""

    type: str = "vxlan"
    vni: int = 1
    port: int = 0  # 0: the kernel's default (8472)
    direct_routing: bool = False
    # wireguard: flannel's PSK (a shared secret: masked in repr), ListenPort, keepalive.
    psk: Secret = field(default_factory=Secret)
    listen_port: int = WG_PORT
    keepalive: int = 0
    # flannel's wireguard Mode: Canal has one device for both families in every mode ("auto"'s
    # behaviour); "ipv6" makes the peers' endpoints their PublicIPv6, the others their PublicIP.
    mode: str = "auto"

    def require_supported(self) -> None:
        if self.type not in BACKENDS:
            raise CanalError(
                f"flannel config Backend Type {safe(self.type)} is not supported by Canal "
                f"(supported: {', '.join(BACKENDS)})"
            )


def _ci(mapping: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """flannel decodes the Backend object with Go's encoding/json: keys match case-insensitively."""
    for k, v in mapping.items():
        if k.lower() == key.lower():
            return True, v
    return False, None


def _int(raw: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    found, value = _ci(raw, key)
    if not found or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"flannel config Backend {key} {safe(value)} is not an integer in {lo}..{hi}")
    return value


def parse_backend(raw: Any) -> BackendConfig:
    """flannel's Backend object (absent: flannel's default, udp); errors name the field."""
    if raw is None or raw == {}:
        return BackendConfig(type="udp")
    if not isinstance(raw, dict):
        raise BadRequest(f"flannel config Backend {safe(raw)} is not an object")
    found, kind = _ci(raw, "Type")
    if not found:
        kind = "udp"
    if not isinstance(kind, str) or not re.fullmatch(r"[a-z0-9-]{1,32}", kind):
        raise BadRequest(f"flannel config Backend Type {safe(kind)} is not a backend name")
    found, direct = _ci(raw, "DirectRouting")
    if found and direct is not None and not isinstance(direct, bool):
        raise BadRequest(f"flannel config Backend DirectRouting {safe(direct)} is not true or false")
    found, psk = _ci(raw, "PSK")
    if found and psk:  # never echoed: it is a secret
        try:
            wg_key(psk)
        except BadRequest:
            raise BadRequest("flannel config Backend PSK is not a WireGuard key (wg genpsk)") from None
    has_mode, mode = _ci(raw, "Mode")
    if not has_mode or mode in (None, ""):
        mode = "auto"
    if mode not in WG_MODES:
        raise BadRequest(f"flannel config Backend Mode {safe(mode)} is not one of {', '.join(WG_MODES)}")
    return BackendConfig(
        type=kind,
        vni=_int(raw, "VNI", 1, 1, 16777215),
        port=_int(raw, "Port", 0, 0, 65535),
        direct_routing=bool(direct),
        psk=Secret(psk if found and psk else ""),
        listen_port=_int(raw, "ListenPort", WG_PORT, 1, 65535),
        keepalive=_int(raw, "PersistentKeepaliveInterval", 0, 0, 65535),
        mode=mode,
    )


Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Desired:
    """What the kernel should hold for the peers: the VXLAN device's state (None: no device,
    e.g. host-gw), the direct routes over the underlay in both families (dst -> the peer's
    PublicIP or PublicIPv6, dev = underlay), the WireGuard device's peers and routes (None: no
    device), one problem per peer left out, naming it (shown by `canal status`), and the
    peers (by lease subnet) whose IPv6 is routed directly: their /128s stay off the tunnel."""

    vxlan: VxlanState | None = None
    direct: dict[Net, Address] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    wireguard: WgState | None = None
    direct6_peers: frozenset[ipaddress.IPv4Network] = frozenset()


def by_family(item: tuple[Net, Address]) -> tuple[int, Net]:
    """Sort key for mixed-family routes (Python will not order an IPv4 and an IPv6 network)."""
    return item[0].version, item[0]


def on_link(public_ip: str, underlay: Iterable[Net]) -> bool:
    """True if the address is on one of the underlay interface's own prefixes of its family:
    the same L2 segment, so it can be a gateway (flannel's host-gw requirement, DirectRouting's
    test). PublicIP against the IPv4 prefixes, PublicIPv6 against the IPv6 ones."""
    try:
        address = ipaddress.ip_address(public_ip)
    except ValueError:
        return False
    return any(address.version == net.version and address in net for net in underlay)


@dataclass(frozen=True)
class HostRoute6:
    """A /128 owned by a remote host (its route record), by that host's lease subnet."""

    ip: ipaddress.IPv6Address
    via_subnet: ipaddress.IPv4Network


def group6(host_routes6: Iterable[HostRoute6]) -> dict[ipaddress.IPv4Network, list[ipaddress.IPv6Address]]:
    out: dict[ipaddress.IPv4Network, list[ipaddress.IPv6Address]] = {}
    for route in host_routes6:
        out.setdefault(route.via_subnet, []).append(route.ip)
    return {subnet: sorted(ips) for subnet, ips in out.items()}


def destinations6(lease: Lease, owned: Iterable[ipaddress.IPv6Address]) -> list[ipaddress.IPv6Network]:
    """A peer's IPv6 destinations: its lease's IPv6 subnet and the /128s it owns outside it."""
    out = [lease.subnet6] if lease.subnet6 is not None else []
    subnet6 = lease.subnet6
    out += [ipaddress.IPv6Network(f"{ip}/128") for ip in owned if subnet6 is None or ip not in subnet6]
    return out


def route6_directly(
    lease: Lease, owned: Iterable[ipaddress.IPv6Address], underlay: Iterable[Net], why: str,
    direct: dict[Net, Address], problems: list[str],
) -> bool:
    """The peer's IPv6 destinations via its PublicIPv6 on the underlay, if it is on-link on our
    IPv6 prefixes; else one problem naming the peer. True if routed (or nothing to route)."""
    dests = destinations6(lease, owned)
    if not dests:
        return True
    what = f"peer {lease.public_ip} (IPv6 {dests[0]}{' and more' if len(dests) > 1 else ''}, {lease.backend_type})"
    if not lease.public_ip6:
        problems.append(f"{what}: {why}, but its lease has no PublicIPv6; its IPv6 is not routed")
        return False
    if not on_link(lease.public_ip6, underlay):
        nets = ", ".join(str(n) for n in underlay if n.version == 6) or "none"
        problems.append(f"{what}: {why}, but {lease.public_ip6} is not on the same L2 segment (not on-link "
                        f"on the underlay's IPv6 prefixes: {nets}); its IPv6 is not routed")
        return False
    gateway = ipaddress.IPv6Address(lease.public_ip6)
    for dst in dests:
        direct.setdefault(dst, gateway)
    return True
