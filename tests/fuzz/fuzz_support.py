"""Fuzz tier helpers (imported by name; a conftest is not a module to import from):
generated hostile bodies against every route of the plugin's HTTP API, through
the contract tier's plugin double (real Flask app, services and datastore; fake kernel).

Invariants checked on every body (see `Sender.send`): no answer >= 500, every error is
{"Err": non-empty text}, a refused call (4xx) leaves the datastore byte-identical, and the
plugin still answers a full valid conversation afterwards. Runs are deterministic
(hypothesis derandomize) so CI is stable; the number of bodies sent is counted and asserted,
so the tier cannot pass by generating nothing.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

from contract_support import ContractPlugin

from canal.api.protocol import CONTENT_TYPE

NET = "7a3d" * 16
EP = "e9c1" * 16
POOL = "100.70.0.0/24"
POLICY = {
    "apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "web", "network": "appnet"},
    "spec": {"selector": "role == 'web'", "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]},
}

BODIES: Counter = Counter()  # route -> bodies sent, for the count assertions and the summary
STATUSES: Counter = Counter()  # 200/400/... -> answers, to see the bodies reach past the parser


class Sender:
    def __init__(self, plugin: ContractPlugin):
        self.plugin = plugin
        self.client = plugin.app().test_client()

    def send(self, method: str, path: str, data: bytes | str | None, route: str = "",
             chunked: bool = False) -> tuple[int, Any]:
        """One request (`chunked`: without a Content-Length, as a chunked body arrives);
        asserts the invariants and returns (status, JSON answer)."""
        before = self.plugin.dump()
        if chunked:
            raw = data.encode() if isinstance(data, str) else (data or b"")
            resp = self.client.open(path, method=method, input_stream=io.BytesIO(raw),
                                    headers={"Accept": CONTENT_TYPE, "Transfer-Encoding": "chunked"},
                                    environ_overrides={"wsgi.input_terminated": True})
        else:
            resp = self.client.open(path, method=method, data=data, headers={"Accept": CONTENT_TYPE})
        BODIES[route or path] += 1
        if not route.startswith("control:"):
            STATUSES[resp.status_code] += 1
        answer = resp.get_json(silent=True)
        shown = data if not isinstance(data, (str, bytes)) or len(data) < 400 else data[:400]
        assert resp.status_code < 500, (method, path, shown, resp.status_code, answer)
        if resp.status_code >= 400:
            assert isinstance(answer, dict) and set(answer) == {"Err"}, (path, shown, answer)
            assert isinstance(answer["Err"], str) and answer["Err"], (path, shown, answer)
            assert self.plugin.dump() == before, ("refused call changed the datastore", path, shown, answer)
        return resp.status_code, answer

    def post(self, call: str, body: Any) -> tuple[int, Any]:
        return self.send("POST", "/" + call, json.dumps(body), call)


def seed(s: Sender) -> None:
    """A network with a user pool, a gateway, a joined endpoint and a policy: fuzzed calls
    naming these IDs reach the services' deeper paths, not only the 404s."""

    def ok(call: str, body: Any) -> Any:
        status, answer = s.post(call, body)
        assert status == 200, (call, answer)
        return answer

    pool = ok("IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": POOL, "SubPool": "", "Options": {}, "V6": False})
    ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "100.70.0.1", "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    ok("NetworkDriver.CreateNetwork", {"NetworkID": NET, "Options": {"com.docker.network.generic": {"network": "appnet"}},
                                      "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": POOL, "Gateway": "100.70.0.1/24"}], "IPv6Data": []})
    addr = ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}})["Address"]
    ok("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "MacAddress": ""}, "Options": {}})
    ok("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/1", "Options": {}})
    status, answer = s.send("POST", "/canal/v1/policies", json.dumps({"documents": json.dumps(POLICY)}))
    assert status == 200, answer


def alive(s: Sender) -> None:
    """The plugin still serves a whole valid conversation after the fuzzing."""
    net, ep = "5" * 64, "6" * 64
    for call, body in (
        ("Plugin.Activate", None),
        ("IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": "", "SubPool": "", "Options": {}, "V6": False}),
        ("NetworkDriver.CreateNetwork", {"NetworkID": net, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}]}),
    ):
        status, answer = s.post(call, body)
        assert status == 200, (call, answer)
    status, answer = s.post("IpamDriver.RequestAddress", {"PoolID": "canal-default"})
    if status == 409:  # the fuzzing may have used up this host's subnet: that is allowed
        return
    assert status == 200, answer
    for call, body in (
        ("NetworkDriver.CreateEndpoint", {"NetworkID": net, "EndpointID": ep, "Interface": {"Address": answer["Address"]}}),
        ("NetworkDriver.Join", {"NetworkID": net, "EndpointID": ep, "SandboxKey": "/var/run/docker/netns/2"}),
        ("NetworkDriver.Leave", {"NetworkID": net, "EndpointID": ep}),
        ("NetworkDriver.DeleteEndpoint", {"NetworkID": net, "EndpointID": ep}),
        ("NetworkDriver.DeleteNetwork", {"NetworkID": net}),
    ):
        status, answer = s.post(call, body)
        assert status == 200, (call, answer)



__all__ = ["STATUSES", "BODIES", "EP", "NET", "POLICY", "POOL", "Sender", "alive", "seed"]
