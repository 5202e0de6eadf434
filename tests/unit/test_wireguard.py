"""WireGuard, pure parts: keys and leases at the boundary, peers from the leases, wg's config
text, the fail-closed firewall of encrypted networks, the network option and the key file."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from ipaddress import IPv4Address as A, IPv4Network as N

import pytest
from test_firewall import EP, N1, N2, NET, snap

from canal.agent.desired import ENCRYPT_CHAIN, ENCRYPTED_SET, MARK_CHAIN, desired_firewall, encrypted_ips
from canal.backends import wireguard
from canal.backends.base import BackendConfig, parse_backend
from canal.backends.manager import desired_state
from canal.config import Secret
from canal.dataplane.links import host_ifname
from canal.dataplane.vxlan import HostRoute
from canal.dataplane.wireguard import RT_TABLE_MAIN, WG_TABLE, KeyFile, WgPeer, WgState, config_text
from canal.errors import BadRequest, CommandFailed
from canal.records import Lease, NetworkRecord, RecordError, wg_key

K1 = "YPrMx+AOvB5f/aqi9Wk22FhdeRCkc1Z4tHh8LrWR+hk="
K2 = "LR5eRhAAA39PgpT7Erc4uAyDZPzzquVKcb/hAS8EX3s="
PSK = "oQYZrt2O1P9LdyNV+crzvpNN9Z8WWA9kOBGt6Boxank="
OWN = N("10.1.1.0/24")
ME = Lease(OWN, "198.18.0.1", "", public_key=K1, wg_port=51820, backend_type="wireguard")
P2 = Lease(N("10.1.2.0/24"), "198.18.0.2", "", public_key=K2, wg_port=0, backend_type="wireguard")
NOKEY = Lease(N("10.1.3.0/24"), "198.18.0.3", "", backend_type="wireguard")
CLONE = Lease(N("10.1.4.0/24"), "198.18.0.4", "", public_key=K2, wg_port=51820, backend_type="wireguard")


@pytest.mark.parametrize("bad", ["", "x" * 44, K1[:-1], K1 + "\n", K1[:-2] + "B=", "A" * 43 + "=\nPrivateKey = x", 44])
def test_wg_key_accepts_only_wg_keys(bad):
    assert wg_key(K1) == K1
    with pytest.raises(RecordError):
        wg_key(bad)


def test_lease_parses_flannels_wireguard_data_and_refuses_a_bad_key():
    raw = {"PublicIP": "198.18.0.2", "BackendType": "wireguard", "BackendData": {"PublicKey": K2, "Port": 51820}}
    lease = Lease.parse("10.1.2.0-24", raw)
    assert (lease.public_key, lease.wg_port, lease.vtep_mac) == (K2, 51820, "")
    vx = Lease.parse("10.1.2.0-24", {"PublicIP": "198.18.0.2", "BackendType": "vxlan",
                                      "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:00:00:02", "Port": 8472}})
    assert (vx.public_key, vx.wg_port) == ("", 0)  # vxlan's own fields untouched, no key
    raw["BackendData"]["PublicKey"] = "AAAA\n[Peer]"
    with pytest.raises(RecordError, match="PublicKey"):
        Lease.parse("10.1.2.0-24", raw)


def test_backend_config_wireguard_fields_and_the_psk_stays_masked():
    config = parse_backend({"Type": "wireguard", "PSK": PSK, "ListenPort": 51000, "PersistentKeepaliveInterval": 25})
    assert (config.type, config.listen_port, config.keepalive, config.psk.reveal()) == ("wireguard", 51000, 25, PSK)
    assert PSK not in repr(config)
    config.require_supported()
    with pytest.raises(BadRequest, match="PSK is not a WireGuard key") as err:
        parse_backend({"Type": "wireguard", "PSK": "not-a-key-but-a-secret"})
    assert "not-a-key-but-a-secret" not in str(err.value)


def test_peers_from_leases_fail_closed_and_first_subnet_wins_a_shared_key():
    routes = [HostRoute(A("10.9.0.7"), N("10.1.2.0/24")), HostRoute(A("10.1.2.9"), N("10.1.2.0/24")),
              HostRoute(A("10.9.0.8"), N("10.1.3.0/24"))]
    peers, dsts, problems = wireguard.peers([CLONE, NOKEY, P2, ME], routes, OWN, 51820)
    assert peers == (WgPeer(K2, "198.18.0.2:51820", (N("10.1.2.0/24"), N("10.9.0.7/32"))),)
    assert dsts == (N("10.1.2.0/24"), N("10.9.0.7/32"))  # the keyless peer's /32 is not routed either
    assert any("198.18.0.3" in p and "no WireGuard key" in p for p in problems)
    assert any("198.18.0.4" in p and "key of subnet 10.1.2.0/24" in p for p in problems)


def test_cluster_backend_routes_in_main_and_other_backends_use_the_marked_table():
    config = BackendConfig("wireguard")
    desired = wireguard.desired(config, [ME, P2], [], OWN, ())
    assert desired.vxlan is None and desired.wireguard is not None
    assert (desired.wireguard.table, desired.wireguard.address) == (RT_TABLE_MAIN, A("10.1.1.0"))
    # A vxlan cluster with an encrypted network on this host: the VXLAN peers as before, plus
    # WireGuard peers in their own table.
    vx_me = dataclasses.replace(ME, backend_type="vxlan", vtep_mac="aa:bb:cc:00:00:01")
    vx_p2 = dataclasses.replace(P2, backend_type="vxlan", vtep_mac="aa:bb:cc:00:00:02")
    plain = snap({"n1": NET}, {"e1": EP})
    plain = dataclasses.replace(plain, own_subnet=OWN, leases=(vx_me, vx_p2))
    assert desired_state(BackendConfig("vxlan"), plain, ()).wireguard is None
    secret = dataclasses.replace(plain, networks={k: dataclasses.replace(n, encrypted=True) for k, n in plain.networks.items()})
    desired = desired_state(BackendConfig("vxlan"), secret, ())
    assert desired.vxlan is not None and desired.wireguard is not None
    assert desired.wireguard.table == WG_TABLE and desired.wireguard.routes == (N("10.1.2.0/24"),)


def test_config_text_has_every_peer_and_the_psk_only_there():
    state = WgState(51820, (WgPeer(K2, "198.18.0.2:51820", (N("10.1.2.0/24"), N("10.9.0.7/32"))),),
                    keepalive=25, psk=Secret(PSK))
    text = config_text(state, K1)
    assert text.splitlines() == [
        "[Interface]", f"PrivateKey = {K1}", "ListenPort = 51820", "", "[Peer]", f"PublicKey = {K2}",
        f"PresharedKey = {PSK}", "Endpoint = 198.18.0.2:51820", "AllowedIPs = 10.1.2.0/24, 10.9.0.7/32",
        "PersistentKeepalive = 25",
    ]
    assert PSK not in repr(state) and K1 not in repr(state)


def encrypted_snap(encrypt_all=False):
    nets = {"n1": {**NET, "encrypted": True}, "n2": {**NET, "id": N2, "name": "plain"}}
    eps = {"e1": EP, "e2": {**EP, "id": "e2" * 32, "network": N2, "ip": "100.64.3.3", "mac": "02:42:64:40:03:03"},
           "e3": {**EP, "id": "e3" * 32, "host": "h2", "ip": "100.64.9.2", "mac": "02:42:64:40:09:02"}}
    nets["n3"] = {**NET, "host": "h2"}  # the same network on h2, not encrypted there
    return dataclasses.replace(snap(nets, eps), encrypt_all=encrypt_all)


def test_encrypted_endpoints_fail_closed_first_in_forward():
    s = encrypted_snap()
    assert encrypted_ips(s) == {"100.64.3.2"}
    state = desired_firewall(s)
    sets = {x.name: x for x in state.ipsets}
    assert sets[ENCRYPTED_SET].members == frozenset({"100.64.3.2"})
    veth = host_ifname(EP["id"])
    # First in CANAL-FORWARD: what is marked for the tunnel, and what goes to the local
    # encrypted endpoint's veth, is checked; the plain endpoint's veth is not named.
    forward = state.chains[("filter", "CANAL-FORWARD")]
    assert forward[:2] == [f"-m mark --mark 0x100000/0x100000 -j {ENCRYPT_CHAIN}-OUT", f"-o {veth} -j {ENCRYPT_CHAIN}-IN"]
    assert not any(host_ifname("e2" * 32) in r for r in forward[:3])
    assert state.chains[("filter", f"{ENCRYPT_CHAIN}-OUT")][0] == "-o flannel-wg -j RETURN"
    assert state.chains[("filter", f"{ENCRYPT_CHAIN}-OUT")][-1] == "-j DROP"
    assert state.chains[("filter", f"{ENCRYPT_CHAIN}-IN")][-1] == "-j DROP"
    assert state.chains[("mangle", MARK_CHAIN)][0] == f"-i {veth} -j MARK --set-xmark 0x100000/0x100000"
    # The mark chain is reached from workload interfaces only: the host's other packets skip it.
    assert [j.match for j in state.jumps if j.chain == MARK_CHAIN] == ["-i cnl+"]
    # Cluster-wide wireguard: every endpoint, routed by the main table (no mark).
    everything = desired_firewall(encrypted_snap(encrypt_all=True))
    assert {x.name: x for x in everything.ipsets}[ENCRYPTED_SET].members == frozenset(
        {"100.64.3.2", "100.64.3.3", "100.64.9.2"})
    assert ("mangle", MARK_CHAIN) not in everything.chains
    assert everything.chains[("filter", "CANAL-FORWARD")][:2] == [
        f"-i cnl+ -j {ENCRYPT_CHAIN}-OUT", f"-o cnl+ -j {ENCRYPT_CHAIN}-IN"]
    # No encrypted network: no trace of any of it.
    plain = desired_firewall(snap({"n1": NET}, {"e1": EP}))
    assert ENCRYPTED_SET not in {x.name for x in plain.ipsets}
    assert not any(ENCRYPT_CHAIN in r for r in plain.chains[("filter", "CANAL-FORWARD")])


def test_local_addresses_inside_a_tunnelled_prefix_get_throw_routes():
    state, _ = wireguard.state(BackendConfig("vxlan"), [ME, P2], [], OWN, WG_TABLE, [A("10.1.2.77"), A("10.1.1.5")])
    assert state.throws == (N("10.1.2.77/32"),)  # a --ip from P2's range lives here
    main, _ = wireguard.state(BackendConfig("wireguard"), [ME, P2], [], OWN, RT_TABLE_MAIN, [A("10.1.2.77")])
    assert main.throws == ()  # the main table's /32 veth route is more specific already


def test_network_record_keeps_encrypted_and_old_records_read_as_plain():
    record = NetworkRecord.parse({**NET, "encrypted": True})
    assert record.encrypted and record.to_json()["encrypted"] is True
    assert NetworkRecord.parse(NET).encrypted is False and "encrypted" not in NetworkRecord.parse(NET).to_json()
    with pytest.raises(RecordError, match="encrypted"):
        NetworkRecord.parse({**NET, "encrypted": "yes"})


def fake_wg(argv, input=None, timeout=10):
    real = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if real.returncode:
        raise CommandFailed(argv, real.returncode, real.stdout, real.stderr)
    return real


@pytest.mark.skipif(not os.path.exists("/usr/bin/wg"), reason="wireguard-tools not installed")
def test_key_file_is_private_stable_and_renewed_when_broken(tmp_path):
    keys = KeyFile(str(tmp_path), fake_wg)
    private = keys.private()
    assert stat.S_IMODE(os.stat(keys.path).st_mode) == 0o600
    assert keys.private() == private and wg_key(keys.public()) != private
    with open(keys.path, "w") as handle:
        handle.write("garbage\n")
    assert keys.private() != private  # a file without a key is replaced, not used
    assert keys.renew() != keys.public()
    # Read once per change of the file, and a key restored by hand (in place) is picked up.
    restored = fake_wg(["wg", "genkey"]).stdout.strip()
    with open(keys.path, "w") as handle:
        handle.write(restored + "\n")
    os.utime(keys.path, ns=(1, 1))
    assert keys.private() == restored


def test_network_option_encrypted_as_docker_spells_it():
    from canal.api.protocol import CreateNetwork, parse
    from canal.services.networks import parse_network

    def create(generic):
        return parse_network(parse("CreateNetwork", CreateNetwork, {
            "NetworkID": N1, "Options": {"com.docker.network.generic": generic},
            "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}]}))

    assert create({"encrypted": ""}).encrypted  # `--opt encrypted`, Docker's overlay form
    assert create({"encrypted": "true"}).encrypted and not create({"encrypted": "false"}).encrypted
    assert not create({}).encrypted
    with pytest.raises(BadRequest, match="encrypted"):
        create({"encrypted": "maybe"})


def test_the_backends_desired_state_is_recomputed_only_when_an_input_changes(monkeypatch):
    """DesiredCache (an event pass on a cluster with thousands of route records): the same
    route dicts and equal inputs give the last result; any change recomputes it."""
    from canal.backends import manager
    from canal.records import RouteRecord

    calls = []
    real = manager.desired_state
    monkeypatch.setattr(manager, "desired_state", lambda *a: calls.append(1) or real(*a))
    vx = [dataclasses.replace(x, backend_type="vxlan", vtep_mac=f"aa:bb:cc:00:00:0{i}") for i, x in enumerate((ME, P2))]
    routes = {"10.9.0.7": RouteRecord(A("10.9.0.7"), "h2", N("10.1.2.0/24"))}
    base = dataclasses.replace(snap({"n1": NET}, {"e1": EP}), own_subnet=OWN, leases=tuple(vx), routes=routes)
    cache, config = manager.DesiredCache(), BackendConfig("vxlan")
    first = cache(config, base, ())
    assert N("10.9.0.7/32") in first.vxlan.routes
    assert cache(config, dataclasses.replace(base, leases=tuple(vx)), ()) is first and len(calls) == 1
    # a new route dict (a route record changed), a lease, the backend, encryption: recomputed
    moved = {"10.9.0.7": RouteRecord(A("10.9.0.7"), "h1", OWN)}
    assert N("10.9.0.7/32") not in cache(config, dataclasses.replace(base, routes=moved), ()).vxlan.routes
    assert cache(config, dataclasses.replace(base, leases=tuple(vx[:1])), ()).vxlan.routes == {}
    assert cache(BackendConfig("host-gw"), base, ()).vxlan is None
    secret = dataclasses.replace(base, networks={k: dataclasses.replace(n, encrypted=True) for k, n in base.networks.items()})
    assert cache(config, secret, ()).wireguard is not None
    assert len(calls) == 5
