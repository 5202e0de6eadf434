"""Issue 11: `canal policy explain`, `apply --dry-run` and `stats` against real packets.

For a matrix of flows (four containers, labels, two networks; Allow, Deny, Pass, ports, an
egress policy and a GlobalNetworkPolicy), what explain says is what the kernel does; the dry
run predicts exactly the flows that change when the policies are applied for real, and stores
nothing; the per-rule counters move with the traffic that hit each rule.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from e2e_support import hosted, reset, wait_open
from test_ipv6 import GATEWAY6, in_container
from test_policy import IMAGE, PLUGIN, client, ip, net, pings, policy, server, tcp

from testbed import SimHost, wait_until

PLUGIN_DIR = str(Path(__file__).resolve().parents[2] / "plugin")  # this checkout's CLI, as the plugin's

PORTS = (5432, 8080, 9000)
NAMES = ("db", "web", "batch", "stranger")
PROBES = [("tcp", p) for p in PORTS] + [("icmp", None)]

POLICIES = [
    # batch may not reach db's 9000; anything else from batch skips the later policies (Pass).
    policy("batch-rules", {"order": 10, "selector": "role == 'db'", "ingress": [
        {"action": "Deny", "protocol": "TCP", "source": {"selector": "role == 'batch'"}, "destination": {"ports": [9000]}},
        {"action": "Pass", "source": {"selector": "role == 'batch'"}}]}),
    policy("db-from-web", {"order": 20, "selector": "role == 'db'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'web'"}, "destination": {"ports": [5432, 8080]}}]}),
    policy("db-from-other", {"order": 30, "selector": "role == 'db'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "canal.network == 'other'"},
         "destination": {"ports": [5432]}}]}, network=None),
    # web may not open 8080 anywhere (an egress Deny beats db's ingress Allow).
    policy("web-egress", {"order": 40, "selector": "role == 'web'", "types": ["Egress"], "egress": [
        {"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080]}},
        {"action": "Allow"}]}),
]


@pytest.fixture(scope="module")
def host(underlay):
    with hosted(underlay, "x1", "198.18.0.1", PLUGIN) as h:
        yield h


@pytest.fixture
def h(host):
    yield host
    reset(host, PLUGIN)


def canal(h: SimHost, *args: str, input: str | None = None, raw: bool = False, check: bool = True):
    proc = h.exec([h.plugin_argv()[0], "-m", "canal", *args], input=input, check=check,
                  env={"PYTHONPATH": PLUGIN_DIR})
    return proc if raw or not check else json.loads(proc.stdout)


def apply(h: SimHost, *docs: dict) -> str:
    return canal(h, "policy", "apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), raw=True).stdout


def labelled(h: SimHost, *containers: str) -> None:
    def known():
        rows = canal(h, "endpoint", "list", "-o", "json")
        return set(containers) <= {r["container"] for r in rows if r["labels"] is not None}
    wait_until(known, timeout=10)


def documents() -> str:
    return "\n---\n".join(json.dumps(d) for d in POLICIES)


def setup_matrix(h) -> None:
    net(h, "appnet")
    net(h, "other")
    server(h, "db", "appnet", ["role=db"], ports=PORTS)
    server(h, "web", "appnet", ["role=web"], ports=PORTS)
    server(h, "batch", "appnet", ["role=batch"], ports=PORTS)
    server(h, "stranger", "other", ["role=web"], ports=PORTS)
    labelled(h, *NAMES)


def probe_script(targets: dict[str, str], family: int = 4) -> str:
    """A shell script for one source container: every probe of PROBES to every target
    (name -> address), all at once (each probe is its own flow: another destination or port,
    so none waits on another's 1 s timeout), one line "NAME PROTO PORT 1|0" per probe. A TCP
    probe got through when the answer names its destination (pong-NAME), as in tcp()."""
    ping = "ping -6" if family == 6 else "ping"
    lines = []
    for dst, address in targets.items():
        for proto, port in PROBES:
            if proto == "tcp":
                lines.append(f'(case "$(nc -w 1 {address} {port} </dev/null 2>/dev/null)" in *pong-{dst}*) r=1;; *) r=0;; esac; '
                             f'echo "{dst} tcp {port} $r") &')
            else:
                lines.append(f'(if {ping} -c1 -W1 {address} >/dev/null 2>&1; then r=1; else r=0; fi; echo "{dst} icmp - $r") &')
    lines.append("wait")
    return "\n".join(lines)


def measure(h, family: int = 4) -> dict:
    """(src, dst, proto, port) -> True if the packet got through (real traffic, over IPv4 or
    IPv6): one `docker exec` per source running its probes concurrently; the sources one after
    another, so a server's port never has two callers at once (it answers one at a time)."""
    addresses = {n: (ip6(h, n) if family == 6 else ip(h, n)) for n in NAMES}
    assert all(addresses.values()), addresses
    out = {}
    for src in NAMES:
        targets = {dst: addresses[dst] for dst in NAMES if dst != src}
        proc = h.container_exec(src, "sh", "-c", probe_script(targets, family), timeout=60)
        got = {}
        for line in proc.stdout.splitlines():
            dst, proto, port, result = line.split()
            got[(src, dst, proto, None if port == "-" else int(port))] = result == "1"
        assert len(got) == len(targets) * len(PROBES), (src, proc.stdout, proc.stderr)
        out.update(got)
    return out


def explained(h, src, dst, proto, port, family=None) -> dict:
    return canal(h, *explain_args(src, dst, proto, port, family))


# The canal CLI's own entry point (canal.cli.main.main: argument parsing, the request to the
# plugin, the JSON printed), called once per argv read from stdin, in one interpreter: what a
# matrix of `canal policy explain` runs costs then is the plugin's answers, not ~0.3 s of Python
# start-up per flow. One JSON line out per call: its exit code, stdout and stderr.
CLI_LOOP = r"""
import contextlib, io, json, sys
from canal.cli.main import main
for line in sys.stdin:
    argv, out, err, code = json.loads(line), io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""


def explain_args(src, dst, proto, port, family=None) -> list[str]:
    args = ["policy", "explain", src, dst, "--protocol", proto, "-o", "json"]
    if port is not None:
        args += ["--port", str(port)]
    if family is not None:
        args += ["--family", str(family)]
    return args


def explained_all(h, flows, family=None) -> dict:
    """explained() for each (src, dst, proto, port) of flows, every one through the CLI's main()
    in one process (CLI_LOOP): flow -> the answer."""
    flows = list(flows)
    proc = h.exec([h.plugin_argv()[0], "-c", CLI_LOOP], env={"PYTHONPATH": PLUGIN_DIR}, timeout=120,
                  input="".join(json.dumps(explain_args(*f, family=family)) + "\n" for f in flows))
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(flows), proc.stdout + proc.stderr
    answers = {}
    for flow, result in zip(flows, results):
        assert result["code"] == 0, (flow, result)
        answers[flow] = json.loads(result["stdout"])
    return answers


def test_explain_matches_packets_and_dry_run_predicts_apply(h):
    setup_matrix(h)
    before = measure(h)
    # No policy: the network profile alone (same network in, other network out).
    answers = explained_all(h, before)
    for (src, dst, proto, port), ok in before.items():
        answer = answers[(src, dst, proto, port)]
        assert (answer["verdict"] == "allowed") == ok, (src, dst, proto, port, answer)
    assert before[("web", "db", "tcp", 5432)] and not before[("stranger", "db", "tcp", 5432)]  # positive control

    report = canal(h, "policy", "apply", "--dry-run", "-f", "-", "-o", "json", input=documents())
    assert canal(h, "policy", "list", "-o", "json") == []  # nothing stored
    assert {r["result"] for r in report["results"]} == {"created"}
    selected = {row["container"]: row for row in report["selection"]}
    assert selected["db"]["ingress_now_selected_by"] == ["appnet/batch-rules", "appnet/db-from-web", "global/db-from-other"]
    assert selected["web"]["egress_now_selected_by"] == ["appnet/web-egress"]
    table = canal(h, "policy", "apply", "--dry-run", "-f", "-", input=documents(), raw=True).stdout
    assert "would be created (dry run: nothing stored)" in table and "LOSES web" in table
    assert canal(h, "policy", "list", "-o", "json") == []

    apply(h, *POLICIES)
    labelled(h, *NAMES)
    after = measure(h)
    assert before != after
    predicted = {}
    for flow in report["flows"]:
        src = flow["source"].split(" ")[0]
        dst = flow["destination"].split(" ")[0]
        predicted[(src, dst, flow["protocol"], flow["port"])] = flow["after"]["verdict"] == "allowed"
    assert not report["summary"]["truncated"]
    probed = set(report["summary"]["probes"])
    for key in before:
        proto, port = key[2], key[3]
        if (f"{proto}/{port}" if port is not None else proto) not in probed:
            continue
        if before[key] != after[key]:
            assert predicted.get(key) == after[key], (key, before[key], after[key])
        else:
            assert key not in predicted, (key, predicted[key])

    # What explain says is what the packets did, for every flow of the matrix.
    answers = explained_all(h, after)
    for (src, dst, proto, port), ok in after.items():
        answer = answers[(src, dst, proto, port)]
        assert (answer["verdict"] == "allowed") == ok, (src, dst, proto, port, answer)
        assert answer["consistent"]

    # The deciding rules, each kind of outcome at least once.
    a = explained(h, "web", "db", "tcp", 5432)
    assert (a["ingress"]["policy"], a["ingress"]["rule"], a["ingress"]["action"]) == ("appnet/db-from-web", 0, "Allow")
    assert (a["egress"]["policy"], a["egress"]["rule"]) == ("appnet/web-egress", 1)
    a = explained(h, "web", "db", "tcp", 8080)
    assert a["verdict"] == "denied" and (a["egress"]["policy"], a["egress"]["rule"], a["egress"]["action"]) == (
        "appnet/web-egress", 0, "Deny")
    a = explained(h, "batch", "db", "tcp", 9000)
    assert (a["ingress"]["policy"], a["ingress"]["rule"], a["ingress"]["action"]) == ("appnet/batch-rules", 0, "Deny")
    a = explained(h, "batch", "db", "icmp", None)
    assert a["verdict"] == "allowed" and a["ingress"]["reason"] == "profile-network"
    assert a["ingress"]["matched_on_the_way"] == [{"policy": "appnet/batch-rules", "rule": 1, "action": "Pass"}]
    a = explained(h, "stranger", "db", "tcp", 5432)
    assert (a["ingress"]["policy"], a["ingress"]["action"]) == ("global/db-from-other", "Allow")
    a = explained(h, "web", "db", "tcp", 9000)
    assert a["ingress"]["reason"] == "default-deny"
    a = explained(h, "db", "stranger", "icmp", None)
    assert a["verdict"] == "denied" and a["ingress"]["reason"] == "profile-deny"
    text = canal(h, "policy", "explain", "web", "db", "--port", "8080", raw=True).stdout
    assert text.startswith("DENIED: web ") and "egress" in text and "appnet/web-egress" in text


def test_stats_counters_move_with_traffic(h):
    setup_matrix(h)
    apply(h, *POLICIES)
    labelled(h, *NAMES)

    def counter(stats, policy_key, direction, rule):
        rows = [r for r in stats["rules"] if (r["policy"], r["direction"], r["rule"]) == (policy_key, direction, rule)]
        return rows[0]["packets"] if rows else None

    def wait_stats():
        stats = canal(h, "policy", "stats", "-o", "json")
        return stats if not stats["stale"] else None

    first = wait_stats() or canal(h, "policy", "stats", "-o", "json")
    deny0 = counter(first, "appnet/batch-rules", "Ingress", 0)
    allow0 = counter(first, "appnet/db-from-web", "Ingress", 0)
    assert deny0 is not None and allow0 is not None
    assert not tcp(h, "batch", "db", 9000)
    assert tcp(h, "web", "db", 5432)
    second = canal(h, "policy", "stats", "-o", "json")
    assert counter(second, "appnet/batch-rules", "Ingress", 0) > deny0
    assert counter(second, "appnet/db-from-web", "Ingress", 0) > allow0
    # An implicit outcome is counted too: the isolation profile dropping another network's ping.
    assert not pings(h, "stranger", ip(h, "web"))
    third = canal(h, "policy", "stats", "-o", "json")
    drops = [r for r in third["implicit"] if r["container"] == "web" and r["outcome"] == "profile-deny"]
    assert drops and drops[0]["packets"] > 0
    assert "appnet/batch-rules" in canal(h, "policy", "stats", raw=True).stdout


def test_explain_container_on_two_networks_and_addresses(h, underlay):
    net(h, "appnet")
    net(h, "other")
    h.docker("run", "-d", "--name", "dual", "--network", "appnet", IMAGE, "sleep", "100000")
    h.docker("network", "connect", "other", "dual")
    wait_open(h, "dual")
    client(h, "lone", "other")
    labelled(h, "dual", "lone")
    nets = h.docker_json("inspect", "dual")[0]["NetworkSettings"]["Networks"]
    on_app, on_other = nets["appnet"]["IPAddress"], nets["other"]["IPAddress"]
    a = canal(h, "policy", "explain", "lone", "dual", "-o", "json")
    assert a["destination"]["address"] == on_other and "2 canal endpoints" in a["destination"]["note"]
    assert a["verdict"] == "allowed" and pings(h, "lone", on_other)
    a = canal(h, "policy", "explain", "lone", on_app, "-o", "json")
    assert a["verdict"] == "denied" and a["ingress"]["reason"] == "profile-deny"
    assert not pings(h, "lone", on_app)
    # An address outside Canal: only the canal side's policy is evaluated.
    a = canal(h, "policy", "explain", "lone", underlay.gateway_ip, "-o", "json")
    assert a["ingress"]["evaluated"] is False and a["verdict"] == "allowed"
    assert pings(h, "lone", underlay.gateway_ip)
    # The host's own address: the workload-to-host setting decides, as for packets.
    a = canal(h, "policy", "explain", "lone", h.address, "-o", "json")
    assert "workload-to-host" in a["ingress"]["explanation"]
    assert (a["verdict"] == "allowed") == pings(h, "lone", h.address)
    proc = canal(h, "policy", "explain", "nosuch", "lone", check=False)
    assert proc.returncode == 2 and "'nosuch'" in proc.stderr


# --------------------------------------------------------------------------------------------------
# Issue 13: the same matrix over IPv6 (dual-stack networks), explain's verdicts against packets


def ip6(h, container) -> str:
    networks = h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"]
    address = next(iter(networks.values()))["GlobalIPv6Address"]
    return str(ipaddress.IPv6Address(address)) if address else ""


def tcp6(h, src, dst, port) -> bool:
    out = h.container_exec(src, "sh", "-c", f"nc -w 1 {ip6(h, dst)} {port} </dev/null", check=False, timeout=20).stdout
    return f"pong-{dst}" in out


def pings6(h, src, target) -> bool:
    return h.container_exec(src, "ping", "-6", "-c1", "-W1", target, check=False).returncode == 0


def test_explain_over_ipv6_matches_packets_and_ipv4(h):
    """Dual-stack appnet and other: for every flow of the matrix with the policies applied, the
    kernel decides IPv6 as IPv4, and explain over IPv6 (by name with --family 6, and by address)
    says what the IPv6 packets did. A container of a network without --ipv6 that configures
    IPv6 itself gets nothing through, and explain calls its IPv6 flows closed."""
    net(h, "appnet", "--ipv6", "--subnet", "fd00:6570::/64")
    net(h, "other", "--ipv6", "--subnet", "fd00:6571::/64")
    net(h, "plain")
    server(h, "db", "appnet", ["role=db"], ports=PORTS)
    server(h, "web", "appnet", ["role=web"], ports=PORTS)
    server(h, "batch", "appnet", ["role=batch"], ports=PORTS)
    server(h, "stranger", "other", ["role=web"], ports=PORTS)
    client(h, "old", "plain", ["role=web"])
    apply(h, *POLICIES)
    labelled(h, *NAMES, "old")
    six = {n: ip6(h, n) for n in NAMES}
    pools = [ipaddress.IPv6Network("fd00:6570::/64"), ipaddress.IPv6Network("fd00:6571::/64")]
    assert all(any(ipaddress.IPv6Address(a) in p for p in pools) for a in six.values()), six
    four = measure(h)
    over6 = measure(h, family=6)
    assert over6.keys() == four.keys()
    by_name6, by_name4 = explained_all(h, four, family=6), explained_all(h, four)
    seen = set()
    for (src, dst, proto, port), ok4 in four.items():
        ok6 = over6[(src, dst, proto, port)]
        assert ok6 == ok4, ("the kernel decides IPv6 unlike IPv4", src, dst, proto, port, ok4, ok6)
        by_name = by_name6[(src, dst, proto, port)]
        assert by_name["flow"]["family"] == 6 and by_name["destination"]["address"] == six[dst]
        assert (by_name["verdict"] == "allowed") == ok6, (src, dst, proto, port, by_name)
        assert by_name["consistent"]
        v4 = by_name4[(src, dst, proto, port)]
        assert v4["flow"]["family"] == 4 and v4["verdict"] == by_name["verdict"]
        for d in ("egress", "ingress"):
            assert [by_name[d].get(k) for k in ("reason", "policy", "rule")] == [v4[d].get(k) for k in ("reason", "policy", "rule")]
        seen.add(ok6)
    assert seen == {True, False}  # both outcomes met over IPv6
    a = explained(h, six["web"], six["db"], "tcp", 8080)  # by address: the family follows
    assert a["flow"]["family"] == 6 and a["verdict"] == "denied" and a["egress"]["policy"] == "appnet/web-egress"
    assert "canal-6" in explained(h, "web", "db", "tcp", 5432, family=6)["ingress"]["rule_text"]  # ip6tables' rule

    # A container of a network without --ipv6 gives itself IPv6 and a route: nothing arrives.
    # Control: the same packets from a dual-stack container (db allows web's 5432 over IPv6).
    in_container(h, "old", "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0")
    in_container(h, "old", "ip", "-6", "addr", "replace", "fd00:6570::99/128", "dev", "eth0", "nodad")
    in_container(h, "old", "ip", "-6", "neigh", "replace", GATEWAY6, "lladdr", "ee:ee:ee:ee:ee:ee", "dev", "eth0",
                 "nud", "permanent")
    in_container(h, "old", "ip", "-6", "route", "replace", "default", "via", GATEWAY6, "dev", "eth0")
    assert tcp6(h, "web", "db", 5432) and pings6(h, "batch", six["web"])  # controls
    assert not tcp6(h, "old", "db", 5432) and not pings6(h, "old", six["web"])
    closed = explained(h, "old", six["db"], "tcp", 5432)
    assert closed["verdict"] == "denied" and closed["egress"]["reason"] == "no-ipv6", closed
    assert explained6(h, "db", "old", "icmp", None)["ingress"]["reason"] == "no-ipv6"
    assert explained(h, "old", "db", "tcp", 5432)["flow"]["family"] == 4  # IPv4 is still policy's
    text = canal(h, "policy", "explain", "old", "db", "--port", "5432", "--family", "6", raw=True).stdout
    assert text.startswith("DENIED: old (no IPv6 address)") and "over IPv6" in text and "--ipv6" in text, text

    # A rule on web's IPv6 /128 only: the dry run (probing the port the rule names) predicts the
    # IPv6 flow lost and no IPv4 one; so it is.
    v6_deny = policy("no-web6", {"order": 1, "selector": "role == 'db'", "ingress": [
        {"action": "Deny", "protocol": "TCP", "source": {"nets": [f"{six['web']}/128"]}, "destination": {"ports": [5432]}}]})
    report = canal(h, "policy", "apply", "--dry-run", "-f", "-", "-o", "json", input=json.dumps(v6_deny))
    lost = {(f["source"].split(" ")[0], f["destination"].split(" ")[0], f["protocol"], f["port"], f["family"])
            for f in report["flows"] if f["after"]["verdict"] == "denied"}
    assert ("web", "db", "tcp", 5432, 6) in lost and not any(f[-1] == 4 for f in lost), lost
    apply(h, v6_deny)
    wait_until(lambda: not tcp6(h, "web", "db", 5432), timeout=10, what="web's IPv6 denied")
    assert tcp(h, "web", "db", 5432)  # IPv4 untouched, as predicted


def explained6(h, src, dst, proto, port) -> dict:
    return explained(h, src, dst, proto, port, family=6)
