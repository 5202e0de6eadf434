"""libnetwork's remote NetworkDriver and IpamDriver protocol: every request and response shape.

One dataclass per request, validated at the boundary: a missing or mistyped field is a
BadRequest naming the call and the field, before any service sees it. Docker sends `null` for
empty maps and lists; those become empty values here so services never test for None.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Type, TypeVar

from canal.errors import BadRequest

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"

T = TypeVar("T")


def _required() -> Any:
    return field(metadata={"required": True})


@dataclass(frozen=True)
class Empty:
    pass


# NetworkDriver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateNetwork:
    NetworkID: str = _required()
    Options: dict = field(default_factory=dict)
    IPv4Data: list = field(default_factory=list)
    IPv6Data: list = field(default_factory=list)


@dataclass(frozen=True)
class AllocateNetwork:
    NetworkID: str = _required()
    Options: dict = field(default_factory=dict)
    IPv4Data: list = field(default_factory=list)
    IPv6Data: list = field(default_factory=list)


@dataclass(frozen=True)
class NetworkRef:
    """DeleteNetwork, FreeNetwork."""

    NetworkID: str = _required()


@dataclass(frozen=True)
class CreateEndpoint:
    NetworkID: str = _required()
    EndpointID: str = _required()
    Interface: dict = field(default_factory=dict)
    Options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EndpointRef:
    """EndpointOperInfo, DeleteEndpoint, Leave, Program/RevokeExternalConnectivity."""

    NetworkID: str = _required()
    EndpointID: str = _required()
    Options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Join:
    NetworkID: str = _required()
    EndpointID: str = _required()
    SandboxKey: str = ""
    Options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Discovery:
    DiscoveryType: int = 0
    DiscoveryData: Any = None


# IpamDriver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPool:
    AddressSpace: str = ""
    Pool: str = ""
    SubPool: str = ""
    Options: dict = field(default_factory=dict)
    V6: bool = False


@dataclass(frozen=True)
class ReleasePool:
    PoolID: str = _required()


@dataclass(frozen=True)
class RequestAddress:
    PoolID: str = _required()
    Address: str = ""
    Options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReleaseAddress:
    PoolID: str = _required()
    Address: str = _required()


_TYPE_NAMES = {str: "a string", dict: "an object", list: "an array", bool: "a boolean", int: "a number"}


def parse(call: str, cls: Type[T], body: Any) -> T:
    """Validate Docker's JSON for `call` into `cls`; raise BadRequest naming the bad field."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest(f"{call}: request body must be a JSON object")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        want = hints[f.name]
        value = body.get(f.name)
        if value is None:
            if f.metadata.get("required"):
                raise BadRequest(f"{call}: missing field {f.name}")
            continue
        if want is not Any and not _is(value, want):
            raise BadRequest(
                f"{call}: field {f.name} must be {_TYPE_NAMES.get(want, want.__name__)}, "
                f"got {type(value).__name__}"
            )
        if want is str and f.metadata.get("required") and not value:
            raise BadRequest(f"{call}: field {f.name} is empty")
        values[f.name] = value
    return cls(**values)


def _is(value: Any, want: type) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


# Responses ----------------------------------------------------------------------------------


def activate() -> dict:
    return {"Implements": ["NetworkDriver", "IpamDriver"]}


def capabilities(scope: str) -> dict:
    return {"Scope": scope, "ConnectivityScope": scope}


def ipam_capabilities() -> dict:
    # State is persistent in the datastore, so Docker need not replay allocations at start;
    # replays are still answered idempotently where Docker sends them anyway.
    return {"RequiresMACAddress": False, "RequiresRequestReplay": False}


def address_spaces(local: str, global_: str) -> dict:
    return {"LocalDefaultAddressSpace": local, "GlobalDefaultAddressSpace": global_}


def pool(pool_id: str, cidr: str, data: dict) -> dict:
    return {"PoolID": pool_id, "Pool": cidr, "Data": data}


def address(cidr: str, data: dict) -> dict:
    return {"Address": cidr, "Data": data}


def join(src_name: str, dst_prefix: str, gateway: str) -> dict:
    """Calico's answer: a link-local gateway made reachable by a connected /32 route."""
    return {
        "InterfaceName": {"SrcName": src_name, "DstPrefix": dst_prefix},
        "Gateway": gateway,
        "StaticRoutes": [{"Destination": f"{gateway}/32", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": False,
    }


def error(message: str) -> dict:
    return {"Err": message}
