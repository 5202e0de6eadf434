"""Helpers shared by the end-to-end modules (imported by name: `from e2e_support import ...`;
a conftest is not a module to import from)."""

from __future__ import annotations

from testbed import IMAGE, SimHost, Underlay

CLUSTER = "100.64.0.0/16"
# A short full-resync period, so repair of tampered state is seen within a test's patience.
PLUGIN_ARGS = ["--network", CLUSTER, "--log-level", "debug", "--resync-interval", "5"]


def start_host(ul: Underlay, name: str, ip: str, plugin_args: list[str]) -> SimHost:
    host = SimHost(ul, name, ip)
    # Also on Docker's default socket (in the host's private /run), where the plugin looks.
    host.start_dockerd(["-H", "unix:///run/docker.sock"])
    host.load_image()
    host.start_plugin(plugin_args)
    return host


def canal_leftovers(host: SimHost) -> dict[str, list[str]]:
    """Everything of ours still in the host's kernel."""
    links = [l.split(":")[1].strip().split("@")[0] for l in host.ip("-o", "link").stdout.splitlines()]
    routes = host.ip("route", "show", "proto", "101").stdout.split("\n")
    chains = [l for l in host.exec(["iptables-nft-save"]).stdout.splitlines() if "CANAL" in l]
    sets = host.exec(["ipset", "list", "-n"]).stdout.split()
    return {
        "veths": [l for l in links if l.startswith(("cnl", "cnp"))],
        "routes": [r for r in routes if r.strip()],
        "iptables": chains,
        "ipsets": [s for s in sets if s.startswith("canal-")],
    }


def clear(host: SimHost, driver: str = "canal") -> None:
    """Remove every container and canal network of a host (through Docker, as a user would),
    then check the plugin logged no unexpected exception while the test ran."""
    ids = host.docker("ps", "-aq").stdout.split()
    if ids:
        host.docker("rm", "-f", *ids)
    nets = host.docker("network", "ls", "--filter", f"driver={driver}", "-q").stdout.split()
    if nets:
        host.docker("network", "rm", *nets)
    log = host.plugin_log.read_text(errors="replace") if host.plugin_log.exists() else ""
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]


__all__ = ["CLUSTER", "IMAGE", "PLUGIN_ARGS", "canal_leftovers", "clear", "start_host"]
