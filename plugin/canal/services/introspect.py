"""Policy introspection for the admin API: explain a flow, dry-run an apply, per-rule counters.

Thin over canal.agent.explain (pure, over the compiled rules); this layer only validates the
request, reads the snapshot the agent would compile, and (for stats) the kernel's counters.
A dry run never writes: it parses the documents exactly as `apply` does and stops there.
"""

from __future__ import annotations

from typing import Any, Callable

from canal.agent import explain as ex
from canal.agent.desired import Snapshot, ipv6_networks_here
from canal.errors import BadRequest
from canal.policy.model import load_documents

EXPLAIN_FIELDS = ("src", "dst", "protocol", "port", "published", "family")


class PolicyIntrospection:
    def __init__(self, snapshot: Callable[[], Snapshot], counters: Callable[[], str],
                 local_addresses: Callable[[], set[str]] = set, counters6: Callable[[], str] = str):
        self.snapshot = snapshot
        self.counters = counters  # iptables-save -c -t filter of this host
        self.counters6 = counters6  # the same of ip6tables ("": none)
        self.local_addresses = local_addresses  # this host's own addresses, IPv4 and IPv6

    def explain(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest("explain: body must be an object {src, dst, protocol?, port?, published?, family?}")
        unknown = sorted(set(body) - set(EXPLAIN_FIELDS))
        if unknown:
            raise BadRequest(f"explain: unknown field(s) {', '.join(map(str, unknown))}; expected {', '.join(EXPLAIN_FIELDS)}")
        for name in ("src", "dst"):
            if not isinstance(body.get(name), str) or not body[name]:
                raise BadRequest(f"explain: {name} must be a container name or ID, or an IPv4 or IPv6 address")
        protocol = body.get("protocol")
        if protocol is not None and not isinstance(protocol, str):
            raise BadRequest("explain: protocol must be tcp, udp or icmp")
        port = body.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
            raise BadRequest("explain: port must be an integer 0-65535")
        published = body.get("published", False)
        if not isinstance(published, bool):
            raise BadRequest("explain: published must be true or false")
        family = body.get("family")
        if family is not None and (isinstance(family, bool) or family not in (4, 6)):
            raise BadRequest("explain: family must be 4 or 6")
        return ex.explain(self.snapshot(), body["src"], body["dst"], protocol, port, published,
                          frozenset(self.local_addresses()), family)

    def dry_run(self, text: str) -> dict[str, Any]:
        policies = load_documents(text)
        if not policies:
            raise BadRequest("no policy documents in the input")
        keys = [p.key for p in policies]
        for index, key in enumerate(keys, 1):
            if keys.index(key) + 1 != index:
                raise BadRequest(f"document {index} ({key}): same policy as document {keys.index(key) + 1}")
        return ex.dry_run(self.snapshot(), policies)

    def stats(self) -> dict[str, Any]:
        """Both families' counters, summed per rule and outcome (IPv6's only with an --ipv6
        network here: without one ip6tables holds no policy chains)."""
        snap = self.snapshot()
        four = ex.policy_stats(snap, self.counters())
        if not ipv6_networks_here(snap):
            return four
        return ex.merge_stats(four, ex.policy_stats(snap, self.counters6(), family=6))
