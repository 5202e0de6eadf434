"""Policy resources in the datastore: validated whole, written in one transaction.

A file with one bad document changes nothing (Calico users expect `apply -f` to be all or
nothing); every host's agent compiles what is stored here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from canal.datastore.base import Datastore, Put, dumps
from canal.datastore.keys import Keys
from canal.errors import BadRequest, NotFound
from canal.policy import selector as selectors
from canal.policy.compiler import EndpointInfo, effective_labels
from canal.policy.model import Policy, load_documents

if TYPE_CHECKING:
    from canal.agent.desired import Snapshot

log = logging.getLogger(__name__)


class Policies:
    def __init__(self, store: Datastore, keys: Keys, changed: Callable[[bool], None]):
        self.store = store
        self.keys = keys
        self.changed = changed

    def key(self, policy: Policy) -> str:
        return self.keys.policy(policy.network, policy.name)

    def apply(self, text: str) -> list[dict[str, Any]]:
        policies = load_documents(text)
        if not policies:
            raise BadRequest("no policy documents in the input")
        seen: dict[str, int] = {}
        for index, policy in enumerate(policies, 1):
            if self.key(policy) in seen:
                raise BadRequest(f"document {index} ({policy.name}): same policy as document {seen[self.key(policy)]}")
            seen[self.key(policy)] = index
        results = []
        ops = []
        for policy in policies:
            old = self.store.get_json(self.key(policy))
            value = policy.to_dict()
            action = "unchanged" if old == value else ("configured" if old else "created")
            results.append({"policy": policy.key, "kind": policy.kind, "result": action})
            if action != "unchanged":
                ops.append(Put(self.key(policy), dumps(value)))
        if ops:
            self.store.txn([], ops)
            log.info("policies applied: %s", ", ".join(f"{r['policy']} {r['result']}" for r in results))
            self.changed(True)  # in force on this host when the CLI returns
        return results

    def list(self) -> list[Policy]:
        return sorted(
            (Policy.from_dict(v) for v in self.store.list_json(self.keys.policies).values()),
            key=lambda p: p.sort_key,
        )

    def find(self, ref: str) -> Policy:
        """`NAME`, `NETWORK/NAME` or `global/NAME`; a bare NAME must be unambiguous."""
        matches = [p for p in self.list() if ref in (p.key, p.name)]
        if not matches:
            raise NotFound(f"no policy {ref!r}")
        if len(matches) > 1:
            raise BadRequest(f"{ref!r} is ambiguous: say one of {', '.join(p.key for p in matches)}")
        return matches[0]

    def delete(self, ref: str) -> Policy:
        policy = self.find(ref)
        self.store.delete(self.key(policy))
        log.info("policy %s deleted", policy.key)
        self.changed(True)
        return policy


def applied_policies(endpoint: EndpointInfo, policies: list[Policy]) -> list[str]:
    """Keys of the policies selecting `endpoint`, in application order (for `canal endpoint list`)."""
    labels = effective_labels(endpoint)
    if labels is None:
        return []
    return [
        p.key
        for p in policies
        if (p.network is None or p.network == endpoint.network) and selectors.parse(p.selector).matches(labels)
    ]


def endpoint_rows(snap: "Snapshot") -> list[dict[str, Any]]:
    """Every endpoint of the cluster, with what policy sees of it."""
    from canal.agent.desired import network_name

    rows = []
    for ep in sorted(snap.endpoints.values(), key=lambda e: (e["host"], e["ip"])):
        info = EndpointInfo(ep["id"], ep["ip"], network_name(snap, ep), ep["host"], ep.get("labels"))
        rows.append({
            "endpoint": ep["id"][:12],
            "container": ep.get("container_name", ""),
            "network": info.network,
            "host": ep["host"],
            "ip": ep["ip"],
            "labels": ep.get("labels"),
            "policies": applied_policies(info, list(snap.policies)) if ep.get("joined") else [],
        })
    return rows
