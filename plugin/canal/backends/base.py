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
from canal.records import safe, wg_key

BACKENDS = ("vxlan", "host-gw", "wireguard")  # the flannel backends Canal implements
WG_PORT = 51820  # flannel's and Calico's default ListenPort


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
    return BackendConfig(
        type=kind,
        vni=_int(raw, "VNI", 1, 1, 16777215),
        port=_int(raw, "Port", 0, 0, 65535),
        direct_routing=bool(direct),
        psk=Secret(psk if found and psk else ""),
        listen_port=_int(raw, "ListenPort", WG_PORT, 1, 65535),
        keepalive=_int(raw, "PersistentKeepaliveInterval", 0, 0, 65535),
    )


@dataclass(frozen=True)
class Desired:
    """What the kernel should hold for the peers: the VXLAN device's state (None: no device,
    e.g. host-gw), the direct routes over the underlay (dst -> peer public IP, dev = underlay),
    the WireGuard device's peers and routes (None: no device), and one problem per peer left
    out, naming it (shown by `canal status`)."""

    vxlan: VxlanState | None = None
    direct: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    wireguard: WgState | None = None


def on_link(public_ip: str, underlay: Iterable[ipaddress.IPv4Network]) -> bool:
    """True if the address is on one of the underlay interface's own prefixes: the same L2
    segment, so it can be a gateway (flannel's host-gw requirement, DirectRouting's test)."""
    try:
        address = ipaddress.IPv4Address(public_ip)
    except ValueError:
        return False
    return any(address in net for net in underlay)
