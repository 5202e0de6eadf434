"""A Compose project on canal networks, end to end: Debian's docker-compose (1.29) against a
real dockerd with the legacy plugin, one host. Two canal networks, a proxy on both, a web
server on front only and a database on back only: compose creates each container on its
first network and connects the others before it starts, so the proxy's two canal interfaces
are joined before its sandbox exists (unlike `docker network connect` on a running one).

Found with this test (plugin as of 04e0064): both of the proxy's Joins find no sandbox to read
gateways from and get 169.254.1.1, so Docker's hook fails to add the second interface's
route ("routes to [169.254.1.1/32]: file exists") and `up -d` cannot start the proxy. The
same happens with plain `docker create --network front` + `docker network connect back` +
`docker start`."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from e2e_support import CLUSTER, IMAGE, canal_leftovers, clear, start_host, wait_open

from testbed import SimHost, wait_until

PLUGIN = ["--network", CLUSTER, "--log-level", "debug", "--resync-interval", "2"]
PROJECT = "cnltcompose"
NOTHING: dict[str, list[str]] = {"veths": [], "routes": [], "iptables": [], "ipsets": []}


def server(name: str) -> str:
    """A container command answering `hello-NAME` on TCP 80 (as test_multinet's)."""
    return f"sh -c \"while true; do echo hello-{name} | nc -l -p 80; done & sleep 100000\""


def compose_file() -> str:
    services = {"proxy": ["front", "back"], "web": ["front"], "db": ["back"]}
    lines = ['version: "2.4"', "services:"]
    for name, networks in services.items():
        lines += [f"  {name}:", f"    image: {IMAGE}", f"    command: {json.dumps(server(name))}",
                  f"    networks: [{', '.join(networks)}]"]
    lines += ["networks:",
              "  front: {driver: canal, ipam: {driver: canal}}",
              "  back: {driver: canal, ipam: {driver: canal}}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def host(underlay) -> Iterator[SimHost]:
    assert shutil.which("docker-compose"), "docker-compose missing: scripts/test installs it (apt docker-compose)"
    h = start_host(underlay, "cmp1", "198.18.0.1", PLUGIN)
    try:
        yield h
    finally:
        h.close()


class Compose:
    """docker-compose run inside the host (its namespaces, as SimHost runs every command),
    talking to the host's dockerd; the project directory is a temp dir of its own."""

    def __init__(self, host: SimHost, project_dir: Path):
        self.host = host
        self.file = project_dir / "docker-compose.yml"
        self.file.write_text(compose_file())
        self.env = {"DOCKER_HOST": f"unix://{host.docker_sock}",
                    "DOCKER_CONFIG": str(host.workdir / "docker-cli")}

    def __call__(self, *args: str, check: bool = True):
        return self.host.exec(["docker-compose", "--ansi", "never", "-p", PROJECT, "-f", str(self.file), *args],
                              env=self.env, check=check, timeout=180)

    def containers(self) -> dict[str, str]:
        """service -> container name, from the labels compose puts on its containers."""
        out = self.host.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}", "--format",
                               '{{.Label "com.docker.compose.service"}} {{.Names}}').stdout
        return dict(line.split() for line in out.splitlines() if line.strip())


@pytest.fixture
def compose(host) -> Iterator[Compose]:
    project_dir = Path(tempfile.mkdtemp(prefix="cnlt-compose-"))
    try:
        yield Compose(host, project_dir)
    finally:
        try:
            Compose(host, project_dir)("down", "--timeout", "1", check=False)
            if not host.plugin_running():
                host.start_plugin(PLUGIN)
            clear(host)
        finally:
            shutil.rmtree(project_dir, ignore_errors=True)


def fetch(h: SimHost, client: str, address: str, timeout: int = 2) -> str:
    """What `nc` gets from address:80 inside `client` ("" when nothing answers)."""
    proc = h.docker("exec", client, "sh", "-c", f"nc -w {timeout} {address} 80 </dev/null", check=False)
    return proc.stdout.strip()


def networks_of(h: SimHost, container: str) -> dict[str, dict]:
    return h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"]


def check_project(h: SimHost, c: dict[str, str]) -> str:
    """Reachability, isolation and routing of the running project; returns the network that
    got the proxy's default route (Docker's choice)."""
    front, back = f"{PROJECT}_front", f"{PROJECT}_back"
    proxy, web, db = c["proxy"], c["web"], c["db"]
    nets = networks_of(h, proxy)
    assert set(nets) == {front, back}, nets
    web_ip, db_ip = networks_of(h, web)[front]["IPAddress"], networks_of(h, db)[back]["IPAddress"]
    routes = h.docker("exec", proxy, "ip", "route").stdout
    # The proxy reaches both, by address (the positive control for the isolation below) ...
    assert fetch(h, proxy, web_ip) == "hello-web", routes
    assert fetch(h, proxy, db_ip) == "hello-db", routes
    # ... and by service name: Docker's embedded DNS answers on canal networks too.
    assert fetch(h, proxy, "web") == "hello-web"
    assert fetch(h, proxy, "db") == "hello-db"
    # Each server reaches the proxy on its own network's address (replies included) and by name.
    assert fetch(h, web, nets[front]["IPAddress"]) == "hello-proxy"
    assert fetch(h, db, nets[back]["IPAddress"]) == "hello-proxy"
    assert fetch(h, web, "proxy") == "hello-proxy"
    # web and db share no network: closed both ways.
    assert fetch(h, web, db_ip) == ""
    assert fetch(h, db, web_ip) == ""
    # One gateway per canal interface, one default route (Docker picks its network).
    gateways = {name: n["Gateway"] for name, n in nets.items()}
    assert len(set(gateways.values())) == 2, gateways
    default = [line.split() for line in routes.splitlines() if line.startswith("default")]
    assert len(default) == 1, routes
    return next(name for name, gw in gateways.items() if default[0][2] == gw)


def test_compose_project_on_two_canal_networks(host, compose):
    h = host
    started = time.monotonic()
    compose("up", "-d")
    c = compose.containers()
    assert set(c) == {"proxy", "web", "db"}, c
    for name in c.values():
        wait_open(h, name)
    default_net = check_project(h, c)
    print(f"\nproxy's default route: {default_net}; up and checks {time.monotonic() - started:.1f} s")

    # A plugin restart changes nothing the project sees.
    h.stop_plugin()
    h.start_plugin(PLUGIN)
    for name in c.values():
        wait_open(h, name)
    assert check_project(h, c) == default_net

    # down removes everything, and with no canal network left the plugin leaves no trace:
    # no veth, no route, and none of its iptables chains or ipsets either.
    compose("down", "--timeout", "1")
    assert compose.containers() == {}
    assert h.docker("ps", "-aq").stdout.split() == []
    assert h.docker("network", "ls", "--filter", "driver=canal", "-q").stdout.split() == []
    wait_until(lambda: canal_leftovers(h) == NOTHING, timeout=15, what="no canal state left on the host")
    assert canal_leftovers(h) == NOTHING
