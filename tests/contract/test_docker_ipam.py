"""`docker network create -d canal NAME` without `--ipam-driver canal`: on one host (embedded
datastore) Docker's default IPAM hands out the addresses and canal routes them as /32s like its
own; with etcd it is refused, because Docker's per-host IPAM would give two hosts' containers
the same addresses."""

from __future__ import annotations

import json

import pytest
from contract_support import ContractPlugin

from canal.api.protocol import CONTENT_TYPE
from canal.dataplane.links import host_ifname

NET = "7a3d" * 16
EP = "e9c1" * 16
DOCKER_POOL = {"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16", "Gateway": "172.18.0.1/16"}


def call(client, name, body):
    resp = client.post("/" + name, data=json.dumps(body), headers={"Accept": CONTENT_TYPE})
    return resp.status_code, resp.get_json()


@pytest.fixture
def single(tmp_path):
    plugin = ContractPlugin(str(tmp_path / "canal.db"), docker_ipam_allowed=True)
    yield plugin, plugin.app().test_client()
    plugin.close()


def test_dockers_default_ipam_on_a_single_host(single):
    plugin, client = single
    assert call(client, "NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [DOCKER_POOL]})[0] == 200
    assert plugin.networks.network(NET).docker_ipam and plugin.networks.network(NET).pools == ("172.18.0.0/16",)
    status, answer = call(client, "NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "172.18.0.2/16", "MacAddress": ""}})
    assert status == 200, answer
    assert plugin.store.list_json(plugin.keys.addresses) == {}  # Docker's IPAM owns the address
    status, answer = call(client, "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/x"})
    assert status == 200 and answer["Gateway"] == "169.254.1.1"
    assert str(plugin.links.veths[host_ifname(EP)].ip) == "172.18.0.2"
    # Not masqueraded towards its own network: the pool is one of the cluster's networks.
    assert "172.18.0.0/16" in plugin.ipsets.sets["canal-nets"]
    assert call(client, "NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})[0] == 200
    assert call(client, "NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})[0] == 200
    assert plugin.store.get(plugin.keys.endpoint(EP)) is None
    assert call(client, "NetworkDriver.DeleteNetwork", {"NetworkID": NET})[0] == 200


def test_dockers_default_ipam_is_refused_across_hosts(client, plugin):
    """The default plugin double stands for etcd mode here (docker_ipam_allowed=False)."""
    status, answer = call(client, "NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [DOCKER_POOL]})
    assert status == 400
    assert "same addresses" in answer["Err"] and "--ipam-driver canal" in answer["Err"]
    assert plugin.store.list_json(plugin.keys.networks) == {}


def test_canal_and_docker_pools_do_not_mix(single):
    plugin, client = single
    body = {"NetworkID": NET, "IPv4Data": [DOCKER_POOL, {"AddressSpace": "CanalLocal", "Pool": "100.70.0.0/24"}]}
    status, answer = call(client, "NetworkDriver.CreateNetwork", body)
    assert status == 400 and "in one network" in answer["Err"]
