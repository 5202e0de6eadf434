"""`canal uninstall`'s plan, against a fake kernel (commands recorded) and a real local
datastore: what it removes, what it leaves (other tools' chains, flanneld's device), and
the refusal naming the containers of this host's endpoints."""

from __future__ import annotations

import subprocess

import pytest

from canal.datastore.keys import Keys
from canal.datastore.local import LocalDatastore
from canal.errors import Conflict
from canal.uninstall import Uninstall

SAVE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
:CANAL-FORWARD - [0:0]
:CANAL-FW-abc - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j CANAL-FORWARD
-A DOCKER-USER -j RETURN
-A CANAL-FORWARD -j CANAL-FW-abc
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
:CANAL-NAT - [0:0]
-A POSTROUTING -j CANAL-NAT
COMMIT
"""


class Kernel:
    def __init__(self, save=SAVE, routes="100.64.1.5 dev cnlabc proto 101 scope link\n",
                 sets="create canal-nets hash:net family inet\nadd canal-nets 1.2.3.0/24\ncreate docker-x hash:ip\n"):
        self.calls: list[tuple[list[str], str | None]] = []
        self.save, self.routes, self.sets = save, routes, sets
        self.rules = "900:\tfrom all fwmark 0x100000/0x100000 lookup 25900\n"
        self.rules6 = ""
        self.routes6 = ""

    def __call__(self, argv, input=None, timeout=0, check=True):
        self.calls.append((list(argv), input))
        out = ""
        if argv[0].endswith("-save"):
            out = self.save if argv[0].startswith("iptables-nft") else ""
        elif argv[:2] == ["ipset", "save"]:
            out = self.sets
        elif argv[:3] == ["ip", "route", "show"]:
            out = self.routes if argv[-1] == "101" else ""
        elif argv[:4] == ["ip", "-6", "route", "show"]:
            out = self.routes6 if argv[-1] == "103" else ""
        elif argv[:4] == ["ip", "-4", "rule", "show"]:
            out = self.rules
        elif argv[:4] == ["ip", "-6", "rule", "show"]:
            out = self.rules6
        return subprocess.CompletedProcess(argv, 0, out, "")


def tools(name):
    return name if name.startswith(("iptables-nft", "ip6tables-nft")) else None


@pytest.fixture
def env(tmp_path):
    store = LocalDatastore(str(tmp_path / "db"))
    keys = Keys("/canal/v1", "/coreos.com/network")
    net = tmp_path / "net"
    for name in ("lo", "eth0", "cnlabc123", "flannel.1", "flannel-wg"):
        (net / name).mkdir(parents=True)
    (net / "flannel.1" / "address").write_text("02:00:00:00:00:01\n")
    yield store, keys, net, tmp_path
    store.close()


def plan(env, kernel, **kw):
    store, keys, net, tmp = env
    u = Uninstall("h1", "198.18.0.1", 1, store, keys, run=kernel, which=tools, sys_class_net=str(net),
                  unit=str(tmp / "canal.service"), subnet_env=str(tmp / "subnet.env"), **kw)
    return u.plan()


def test_plan_removes_canal_objects_only(env):
    store, keys, _net, _tmp = env
    store.put(keys.host("h1"), {"vtep_mac": "02:00:00:00:00:01", "public_ip": "198.18.0.1"})
    kernel = Kernel()
    steps = plan(env, kernel)
    whats = [s.what for s in steps]
    assert any("iptables (nft): remove 3 CANAL chain(s)" in w for w in whats), whats
    assert "destroy ipset canal-nets" in whats and not any("docker-x" in w for w in whats)
    assert "flush 1 route(s) with protocol 101" in whats
    assert "delete leftover veth cnlabc123" in whats
    assert any(w.startswith("delete flannel.1") for w in whats)
    assert kernel.calls and all(c[0][0].endswith("-save") or c[0][1] in ("save", "route", "rule")
                                or c[0][1:3] in (["-6", "route"], ["-4", "rule"], ["-6", "rule"]) for c in kernel.calls)
    for step in steps:
        step.apply()
    restore = next(text for argv, text in kernel.calls if argv[0] == "iptables-nft-restore")
    assert "-D FORWARD -j CANAL-FORWARD" in restore and "-X CANAL-FW-abc" in restore
    assert "-D POSTROUTING -j CANAL-NAT" in restore and "DOCKER-USER -j" not in restore
    assert store.get(keys.host("h1")) is None


def test_flanneld_device_is_left_alone(env):
    store, keys, _net, _tmp = env
    store.put(keys.host("h1"), {"vtep_mac": "02:00:00:00:00:99", "public_ip": "198.18.0.1"})
    assert not any("flannel.1" in s.what for s in plan(env, Kernel()))  # auto: another MAC
    external = plan(env, Kernel(), flannel_mode="external")
    assert not any("flannel.1" in s.what or "flannel-wg" in s.what for s in external)


def test_refuses_naming_the_containers(env):
    store, keys, _net, _tmp = env
    endpoint = {"id": "e" * 64, "network": "a" * 64, "host": "h1", "ip": "100.64.1.5", "mac": "02:42:64:40:01:05",
                "mtu": 1450, "container": "c" * 64, "container_name": "web-1"}
    store.put(keys.endpoint("e" * 64), endpoint)
    other = {**endpoint, "id": "f" * 64, "host": "h2", "container_name": "elsewhere"}
    store.put(keys.endpoint("f" * 64), other)
    store.put(keys.endpoint("d" * 64), {"id": "d" * 64, "host": "h1", "ip": "not an address"})
    kernel = Kernel()
    with pytest.raises(Conflict, match="web-1") as err:
        plan(env, kernel)
    assert "elsewhere" not in str(err.value) and "dddddddddddd" in str(err.value)
    assert not [c for c in kernel.calls if not c[0][0].endswith("-save")]  # nothing ran


def test_ipv6_routes_and_the_ipv6_mark_rule_go_too(env):
    kernel = Kernel()
    kernel.routes6 = "fd00:6a:0:1::/64 via 2001:2::1 dev eth0 proto 103 metric 1024 pref medium\n"
    kernel.rules6 = "900:\tfrom all fwmark 0x100000/0x100000 lookup 25900\n"
    steps = {s.what: s for s in plan(env, kernel)}
    assert "flush 1 IPv6 route(s) with protocol 103" in steps
    assert "delete the IPv6 WireGuard mark rule (priority 900, table 25900)" in steps
    assert "delete the WireGuard mark rule (priority 900, table 25900)" in steps
    steps["delete the IPv6 WireGuard mark rule (priority 900, table 25900)"].apply()
    assert kernel.calls[-1][0] == ["ip", "-6", "rule", "del", "priority", "900", "table", "25900"]


def test_nothing_left_is_an_empty_plan(env):
    _store, _keys, net, _tmp = env
    (net / "cnlabc123").rmdir()
    (net / "flannel.1" / "address").unlink()
    (net / "flannel.1").rmdir()
    (net / "flannel-wg").rmdir()
    kernel = Kernel(save="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", routes="", sets="")
    kernel.rules = ""
    assert plan(env, kernel) == []


def test_flannel_v6_device_is_ours_only_with_our_v6_mac(env):
    from canal.services.hosts import v6_mac
    store, keys, net, _tmp = env
    store.put(keys.host("h1"), {"vtep_mac": "02:00:00:00:00:01", "public_ip": "198.18.0.1"})
    (net / "flannel-v6.1").mkdir()
    (net / "flannel-v6.1" / "address").write_text(v6_mac("02:00:00:00:00:01") + "\n")
    assert any(s.what.startswith("delete flannel-v6.1") for s in plan(env, Kernel()))
    (net / "flannel-v6.1" / "address").write_text("aa:bb:cc:00:66:04\n")  # flanneld's
    assert not any("flannel-v6.1" in s.what for s in plan(env, Kernel()))
    assert not any("flannel-v6.1" in s.what for s in plan(env, Kernel(), flannel_mode="external"))
