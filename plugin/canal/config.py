"""Configuration, declared once: name, type, default, environment variable and description.

Precedence is fixed: command-line flag > environment (`CANAL_*`) > default. Errors name the
setting and where its value came from, because a managed plugin's settings arrive through
`docker plugin set` and a typo there is otherwise invisible.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from canal.errors import BadRequest


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected one of debug, info, warning, error")
    return level


def _network(value: str) -> str:
    net = ipaddress.IPv4Network(value, strict=True)
    if net.prefixlen > 28:
        raise ValueError("the cluster network must be /28 or larger")
    return str(net)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not lo <= number <= hi:
            raise ValueError(f"expected a number from {lo} to {hi}")
        return number

    return parse


def _optional_ip(value: str) -> str:
    return str(ipaddress.IPv4Address(value)) if value else ""


def _endpoints(value: str) -> str:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    for part in parts:
        if not part.startswith(("http://", "https://")):
            raise ValueError(f"{part!r} is not an http:// or https:// URL")
    return ",".join(parts)


def _setting(default: Any, parse: Callable[[str], Any], help: str, flag: bool = True) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help, "flag": flag})


@dataclass(frozen=True)
class Config:
    """Every setting of the plugin. Field name `foo_bar` ↔ flag `--foo-bar` ↔ env `CANAL_FOO_BAR`."""

    socket: str = _setting("/run/docker/plugins/canal.sock", str, "unix socket Docker talks to")
    state_dir: str = _setting("/var/lib/canal", str, "directory for the embedded datastore")
    sysctl_dir: str = _setting(
        "/proc/sys", str, "where sysctls are written (the managed plugin: the host's, mounted rw)"
    )
    datastore: str = _setting("local", _choice("local", "etcd"), "datastore backend")
    etcd_endpoints: str = _setting("http://127.0.0.1:2379", _endpoints, "etcd URLs, comma-separated")
    etcd_prefix: str = _setting("/canal/v1", str, "key prefix for Canal's own records in etcd")
    etcd_timeout: float = _setting(5.0, float, "seconds before an etcd request fails")
    flannel_prefix: str = _setting("/coreos.com/network", str, "flannel's key prefix (config, leases)")
    network: str = _setting("10.1.0.0/16", _network, "cluster network CIDR, flannel-style")
    subnet_len: int = _setting(24, _int_range(8, 30), "prefix length of each host's subnet lease")
    scope: str = _setting("local", _choice("local", "global"), "driver scope (global for Swarm)")
    hostname: str = _setting("", str, "this host's name in the datastore (default: hostname)")
    public_ip: str = _setting("", _optional_ip, "this host's underlay address (default: autodetect)")
    iface: str = _setting("", str, "underlay interface (default: the one holding public-ip)")
    mtu: int = _setting(0, _int_range(0, 65535), "container MTU (0: underlay MTU minus 50)")
    vxlan_vni: int = _setting(1, _int_range(1, 16777215), "VXLAN network identifier")
    vxlan_port: int = _setting(8472, _int_range(1, 65535), "VXLAN UDP port")
    flannel_mode: str = _setting(
        "auto", _choice("auto", "embedded", "external"), "manage the VXLAN device, or leave it to flanneld"
    )
    iptables_backend: str = _setting(
        "auto", _choice("auto", "nft", "legacy"), "iptables flavour (auto: the one Docker uses)"
    )
    lease_ttl: int = _setting(86400, _int_range(5, 86400 * 365), "seconds a host's subnet lease lives unrenewed")
    docker_host: str = _setting(
        "unix:///var/run/docker.sock", str, "Docker API, read lazily for network names and labels"
    )
    resync_interval: float = _setting(30.0, float, "seconds between full dataplane re-checks")
    workers_threads: int = _setting(32, _int_range(1, 512), "threads serving Docker's calls")
    log_level: str = _setting("INFO", _log_level, "debug, info, warning or error")

    @property
    def host_name(self) -> str:
        return self.hostname or socket.gethostname()

    @property
    def db_path(self) -> str:
        return os.path.join(self.state_dir, "canal.db")


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.metadata.get("flag")]


def env_name(name: str) -> str:
    return "CANAL_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting; defaults stay None so the environment can fill them in."""
    for f in _fields():
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})",
        )


def load(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from flags, then environment, then defaults; the first bad value raises."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in _fields():
        raw, source = flags.get(f.name), "flag --" + f.name.replace("_", "-")
        if raw is None and env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], "environment " + env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](str(raw))
        except ValueError as err:
            raise BadRequest(f"invalid {f.name} {raw!r} from {source}: {err}") from None
    return Config(**values)


def describe() -> list[tuple[str, str, str, str]]:
    """(flag, env, default, help) rows, for the README's configuration table."""
    return [
        ("--" + f.name.replace("_", "-"), env_name(f.name), repr(f.default), f.metadata["help"])
        for f in _fields()
    ]
