"""Configuration, declared once: name, type, default, environment variable and description.

Precedence is fixed: command-line flag > environment (`CANAL_*`) > default. Errors name the
setting and where its value came from, because a managed plugin's settings arrive through
`docker plugin set` and a typo there is otherwise invisible.

The etcd password is a `Secret`: its repr and str are masked, so neither repr(Config), a log
line, an error message nor a diagnostic dump can carry it; only `reveal()` gives it out.
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


def _network6(value: str) -> str:
    net = ipaddress.IPv6Network(value, strict=True)
    if net.prefixlen > 120:
        raise ValueError("the cluster's IPv6 network must be /120 or larger")
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


def _optional_ip6(value: str) -> str:
    return str(ipaddress.IPv6Address(value)) if value else ""


def _endpoints(value: str) -> str:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    for part in parts:
        if not part.startswith(("http://", "https://")):
            raise ValueError(f"{part!r} is not an http:// or https:// URL")
    return ",".join(parts)


def _metrics_addr(value: str) -> str:
    from canal.metrics import parse_addr

    return parse_addr(value.strip())


class Secret:
    """A value that must not be shown: masked in repr/str (so in logs, errors and dumps)."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # pickling would be a way around the mask
        raise TypeError("a Secret is not serialisable")


def _setting(
    default: Any, parse: Callable[[str], Any], help: str, flag: bool = True, secret: bool = False
) -> Any:
    return field(
        default=default,
        repr=not secret,
        metadata={"parse": parse, "help": help, "flag": flag, "secret": secret},
    )


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
    etcd_cafile: str = _setting("", str, "CA bundle that signed etcd's server certificate (https endpoints)")
    etcd_certfile: str = _setting("", str, "client certificate for etcd (with --etcd-keyfile)")
    etcd_keyfile: str = _setting("", str, "unencrypted key of --etcd-certfile")
    etcd_username: str = _setting("", str, "etcd user (etcd auth enabled)")
    etcd_password: Secret = _setting(
        Secret(""), Secret, "password of --etcd-username (prefer --etcd-password-file)", secret=True  # noqa: RUF009
    )
    etcd_password_file: str = _setting("", str, "file holding the password of --etcd-username")
    flannel_prefix: str = _setting("/coreos.com/network", str, "flannel's key prefix (config, leases)")
    network: str = _setting("10.1.0.0/16", _network, "cluster network CIDR, flannel-style")
    subnet_len: int = _setting(24, _int_range(8, 30), "prefix length of each host's subnet lease")
    network6: str = _setting(
        "fd00:c0a1::/48", _network6,
        "IPv6 network of --ipv6 canal networks without an IPv6 --subnet (embedded datastore; with etcd, "
        "flannel's EnableIPv6 + IPv6Network)",
    )
    scope: str = _setting("local", _choice("local", "global"), "driver scope (global for Swarm)")
    hostname: str = _setting("", str, "this host's name in the datastore (default: hostname)")
    public_ip: str = _setting("", _optional_ip, "this host's underlay address (default: autodetect)")
    public_ip6: str = _setting(
        "", _optional_ip6,
        "this host's IPv6 underlay address, published as PublicIPv6 in a dual-stack lease "
        "(default: the underlay interface's first global IPv6 address; none: no IPv6 underlay)",
    )
    iface: str = _setting("", str, "underlay interface (default: the one holding public-ip)")
    mtu: int = _setting(0, _int_range(0, 65535), "container MTU (0: underlay MTU minus 50)")
    vxlan_vni: int = _setting(1, _int_range(1, 16777215), "VXLAN network identifier")
    vxlan_port: int = _setting(8472, _int_range(1, 65535), "VXLAN UDP port")
    backend: str = _setting(
        "vxlan", _choice("vxlan", "host-gw", "wireguard"),
        "flannel backend of a network config Canal creates (the embedded datastore's; etcd's config wins if present)",
    )
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
    ipset_refresh_interval: float = _setting(
        0.0, float,
        "seconds between read-backs of every ipset member (Felix's IpsetsRefreshInterval; they grow with the "
        "cluster): 0 = three resync intervals; full passes in between diff the sets against what was last written",
    )
    gc_grace: float = _setting(
        60.0, float, "seconds before an endpoint or address Docker forgot (a lost DeleteEndpoint/ReleaseAddress) is collected"
    )
    host_absence: float = _setting(
        86400.0, float,
        "seconds a host with no lease must stay away (and two lease TTLs) before any host collects its records",
    )
    netns_dir: str = _setting(
        "/var/run/docker/netns", str,
        "where Docker's sandboxes (container network namespaces) are: routes for containers on several canal networks",
    )
    workload_to_host: str = _setting(
        "drop", _choice("drop", "return", "accept"),
        "containers to this host, after their egress policy: drop, return (the host's INPUT rules decide) or accept",
    )
    resolv_conf: str = _setting(
        "/etc/resolv.conf", str, "its nameservers that are this host's own addresses stay open to containers on port 53"
    )
    workers_threads: int = _setting(32, _int_range(1, 512), "threads serving Docker's calls")
    log_level: str = _setting("INFO", _log_level, "debug, info, warning or error")
    log_format: str = _setting("text", _choice("text", "json"), "text, or json: one object per line for log shippers")
    metrics_addr: str = _setting(
        "", _metrics_addr, "HOST:PORT to serve Prometheus metrics on over plain HTTP (/metrics); empty: off",
    )

    @property
    def host_name(self) -> str:
        return self.hostname or socket.gethostname()

    @property
    def db_path(self) -> str:
        return os.path.join(self.state_dir, "canal.db")

    def etcd_password_value(self) -> str:
        """The password, from --etcd-password or read now from --etcd-password-file."""
        if self.etcd_password_file:
            return read_password_file(self.etcd_password_file, "etcd_password_file")
        return self.etcd_password.reveal()


def read_password_file(path: str, setting: str = "etcd_password_file") -> str:
    """The file's first line (a trailing newline is no part of a password)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise BadRequest(f"{_flag(setting)}: cannot read {path}: {why}") from None
    password = text.splitlines()[0] if text.strip() else ""
    if not password:
        raise BadRequest(f"{_flag(setting)}: {path} is empty")
    return password


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: Files named by etcd settings: they must exist and be readable when the plugin starts.
_ETCD_FILES = ("etcd_cafile", "etcd_certfile", "etcd_keyfile", "etcd_password_file")


def _readable_file(path: str) -> str | None:
    """Why path cannot be read as a file, or None."""
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        return err.strerror or str(err)
    return None


def validate(cfg: Config, sources: Mapping[str, str] | None = None) -> None:
    """Cross-setting rules, checked at load so a bad combination never reaches a running plugin.

    Unlike flanneld, a CA alone is not ignored (it verifies the server), and TLS settings with
    plain http:// endpoints are an error rather than a silent downgrade.
    """
    sources = sources or {}

    def where(name: str) -> str:
        return f" (from {sources[name]})" if name in sources else ""

    if bool(cfg.etcd_certfile) != bool(cfg.etcd_keyfile):
        given, missing = ("etcd_certfile", "etcd_keyfile") if cfg.etcd_certfile else ("etcd_keyfile", "etcd_certfile")
        raise BadRequest(
            f"{_flag(given)}{where(given)} needs {_flag(missing)}: --etcd-certfile and --etcd-keyfile "
            "go together (a client certificate and its key), or neither"
        )
    for name in _ETCD_FILES:
        path = getattr(cfg, name)
        if path:
            why = _readable_file(path)
            if why:
                raise BadRequest(f"{_flag(name)}{where(name)}: {path}: {why}")
    if cfg.etcd_password and cfg.etcd_password_file:
        raise BadRequest(
            f"--etcd-password{where('etcd_password')} and --etcd-password-file"
            f"{where('etcd_password_file')} exclude each other: give one"
        )
    has_password = bool(cfg.etcd_password) or bool(cfg.etcd_password_file)
    if cfg.etcd_username and not has_password:
        raise BadRequest(
            f"--etcd-username{where('etcd_username')} needs a password: --etcd-password-file "
            "or --etcd-password"
        )
    if has_password and not cfg.etcd_username:
        which = "etcd_password" if cfg.etcd_password else "etcd_password_file"
        raise BadRequest(f"{_flag(which)}{where(which)} needs --etcd-username")
    if cfg.etcd_password_file:
        read_password_file(cfg.etcd_password_file)
    tls = [n for n in ("etcd_cafile", "etcd_certfile") if getattr(cfg, n)]
    plain = [e for e in cfg.etcd_endpoints.split(",") if e.startswith("http://")]
    if tls and plain:
        raise BadRequest(
            f"{_flag(tls[0])}{where(tls[0])} is set but etcd endpoint {plain[0]} is plain http: "
            "use https:// endpoints with TLS settings"
        )


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.metadata.get("flag")]


def _shown_default(f: dataclasses.Field) -> str:
    return "none" if f.metadata.get("secret") else repr(f.default)


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
            help=f"{f.metadata['help']} (env {env_name(f.name)}, default {_shown_default(f)})",
        )


def load(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from flags, then environment, then defaults; the first bad value raises."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in _fields():
        raw, source = flags.get(f.name), "flag --" + f.name.replace("_", "-")
        if raw is None and env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], "environment " + env_name(f.name)
        if raw is None:
            continue
        sources[f.name] = source
        try:
            values[f.name] = f.metadata["parse"](str(raw))
        except ValueError as err:
            shown = "(hidden)" if f.metadata.get("secret") else repr(raw)
            raise BadRequest(f"invalid {f.name} {shown} from {source}: {err}") from None
    cfg = Config(**values)
    validate(cfg, sources)
    return cfg


def describe() -> list[tuple[str, str, str, str]]:
    """(flag, env, default, help) rows, for the README's configuration table."""
    return [
        ("--" + f.name.replace("_", "-"), env_name(f.name), _shown_default(f), f.metadata["help"])
        for f in _fields()
    ]
