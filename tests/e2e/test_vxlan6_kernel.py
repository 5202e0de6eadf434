"""The flannel-v6.<VNI> applier (canal.dataplane.vxlan6) against the real kernel, in a network
namespace of its own (`unshare -n`: everything dies with it): the device as flanneld makes it,
peers converged both ways, stale entries removed, foreign routes left alone, a changed local
address recreating the device."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from testbed import REPO

PRELUDE = f"""
import ipaddress, json, subprocess, sys
sys.path.insert(0, {str(REPO / "plugin")!r})
from canal.dataplane.vxlan6 import Vxlan6, Vxlan6State

def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

def j(*argv):
    return json.loads(sh(*argv) or "[]")

sh("ip", "link", "set", "lo", "up")
sh("ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
sh("ip", "link", "set", "ul0", "up")
for a in ("2001:2::1/64", "2001:2::9/64"):
    sh("ip", "-6", "addr", "add", a, "dev", "ul0", "nodad")
A = ipaddress.IPv6Address
N = ipaddress.IPv6Network
"""


def in_netns(body: str) -> dict:
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flannel_v6_device_and_peers_converge():
    out = in_netns("""
        v = Vxlan6()
        v.ensure_device(1, 8472, "2001:2::1", "ul0", "02:00:00:66:00:01", 1430, A("fd00:64:0:1::"))
        link = j("ip", "-j", "-d", "link", "show", "flannel-v6.1")[0]
        info = link["linkinfo"]["info_data"]
        addrs = [(a["local"], a["prefixlen"]) for a in j("ip", "-j", "-6", "addr", "show", "dev", "flannel-v6.1")[0]["addr_info"]
                 if not a["local"].startswith("fe80")]
        two = Vxlan6State(A("fd00:64:0:1::"),
                          {A("fd00:64:0:2::"): "02:00:00:66:00:02", A("fd00:64:0:3::"): "02:00:00:66:00:03"},
                          {"02:00:00:66:00:02": A("2001:2::2"), "02:00:00:66:00:03": A("2001:2::3")},
                          {N("fd00:64:0:2::/64"): A("fd00:64:0:2::"), N("fd00:64:0:3::/64"): A("fd00:64:0:3::"),
                           N("fd00:6569::5/128"): A("fd00:64:0:2::")})
        v.apply(1, two)
        v.apply(1, two)  # idempotent
        # Someone else's route on the device (not ours by protocol): left alone.
        sh("ip", "-6", "route", "add", "fd00:99::/64", "dev", "flannel-v6.1", "proto", "static")
        def state():
            routes = {r["dst"]: (r.get("gateway"), r.get("flags", []), r.get("protocol"))
                      for r in j("ip", "-j", "-6", "route", "show", "dev", "flannel-v6.1") if r.get("protocol") != "kernel"}
            neigh = {n["dst"]: (n.get("lladdr"), n.get("state")) for n in j("ip", "-j", "-6", "neigh", "show", "dev", "flannel-v6.1")}
            fdb = sorted((e["mac"], e["dst"]) for e in j("bridge", "-j", "fdb", "show", "dev", "flannel-v6.1") if e.get("dst"))
            return routes, neigh, fdb
        r2, n2, f2 = state()
        one = Vxlan6State(A("fd00:64:0:1::"), {A("fd00:64:0:2::"): "02:00:00:66:00:02"},
                          {"02:00:00:66:00:02": A("2001:2::2")}, {N("fd00:64:0:2::/64"): A("fd00:64:0:2::")})
        v.apply(1, one)
        r1, n1, f1 = state()
        index = link["ifindex"]
        v.ensure_device(1, 8472, "2001:2::9", "ul0", "02:00:00:66:00:01", 1430, A("fd00:64:0:1::"))
        moved = j("ip", "-j", "-d", "link", "show", "flannel-v6.1")[0]
        v.delete_device(1)
        gone = subprocess.run(["ip", "link", "show", "flannel-v6.1"], capture_output=True).returncode
        print(json.dumps({"info": info, "mtu": link["mtu"], "mac": link["address"], "addrs": addrs,
                          "r2": r2, "n2": n2, "f2": f2, "r1": r1, "n1": n1, "f1": f1,
                          "recreated": moved["ifindex"] != index, "local": moved["linkinfo"]["info_data"].get("local", moved["linkinfo"]["info_data"].get("local6")),
                          "gone": gone}))
    """)
    info = out["info"]
    assert info["id"] == 1 and info["port"] == 8472 and info.get("local", info.get("local6")) == "2001:2::1", info
    assert not info.get("learning")
    assert out["mtu"] == 1430 and out["mac"] == "02:00:00:66:00:01"
    assert out["addrs"] == [["fd00:64:0:1::", 128]]
    r2 = out["r2"]
    assert r2["fd00:64:0:2::/64"][0] == "fd00:64:0:2::" and "onlink" in r2["fd00:64:0:2::/64"][1]
    assert r2["fd00:64:0:3::/64"][0] == "fd00:64:0:3::"
    assert r2["fd00:6569::5"][0] == "fd00:64:0:2::"
    assert out["n2"]["fd00:64:0:3::"] == ["02:00:00:66:00:03", ["PERMANENT"]]
    assert out["f2"] == [["02:00:00:66:00:02", "2001:2::2"], ["02:00:00:66:00:03", "2001:2::3"]]
    # Converged down to one peer: its entries stay, the other's and the /128 are gone, the
    # foreign route stays.
    assert set(out["r1"]) == {"fd00:64:0:2::/64", "fd00:99::/64"}
    assert "fd00:64:0:3::" not in out["n1"] and out["n1"]["fd00:64:0:2::"][0] == "02:00:00:66:00:02"
    assert out["f1"] == [["02:00:00:66:00:02", "2001:2::2"]]
    assert out["recreated"] and out["local"] == "2001:2::9"
    assert out["gone"] != 0
