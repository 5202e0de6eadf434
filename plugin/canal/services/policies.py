"""Policy resources in the datastore: validated whole, written in one transaction.

A file with one bad document changes nothing (Calico users expect `apply -f` to be all or
nothing); every host's agent compiles what is stored here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from canal.datastore.base import Datastore, Put, dumps
from canal.datastore.keys import Keys
from canal.errors import BadRequest, NotFound
from canal.records import safe
from canal.policy.model import Policy, load_documents

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
        """Stored policies that parse; a malformed one is skipped here (the agent quarantines it,
        closes what its scope could select, and `canal status` lists it)."""
        out = []
        for key, raw in self.store.list_json(self.keys.policies).items():
            try:
                out.append(Policy.from_dict(raw))
            except BadRequest as err:
                log.warning("stored policy %s is malformed: %s", safe(key), err)
        return sorted(out, key=lambda p: p.sort_key)

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
