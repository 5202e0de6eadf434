from __future__ import annotations

import ipaddress

import pytest
from fakes import FakeLinks

from canal import config
from canal.agent.desired import Snapshot, desired_links
from canal.api.app import create_app
from canal.datastore.keys import Keys
from canal.datastore.local import LocalDatastore
from canal.services.ipam import Ipam
from canal.services.networks import Networks


class ContractPlugin:
    """The real services and datastore; the kernel replaced by a stateful fake."""

    def __init__(self, path: str, scope: str = "local"):
        self.config = config.load({"scope": scope}, {})
        self.store = LocalDatastore(path)
        keys = self.keys = Keys(self.config.etcd_prefix, self.config.flannel_prefix)
        self.links = FakeLinks()
        self.changes = 0
        self.ipam = Ipam(self.store, keys, "h1", lambda: ipaddress.IPv4Network("100.64.7.0/24"))
        self.networks = Networks(self.store, keys, self.ipam, self.links, "h1", lambda: 1450, self._changed)

    def _changed(self, sync: bool) -> None:
        """What the agent does on a change, run inline: reconcile veths with the records."""
        self.changes += 1
        snap = Snapshot("h1", "100.64.0.0/16", self.store.list_json(self.keys.networks), self.store.list_json(self.keys.endpoints))
        links = desired_links(snap)
        self.links.reconcile(links, self.links.orphans(links))

    def status(self) -> dict:
        return {"host": "h1"}


@pytest.fixture
def plugin(tmp_path):
    p = ContractPlugin(str(tmp_path / "canal.db"))
    yield p
    p.store.close()


@pytest.fixture
def client(plugin):
    app = create_app(plugin)
    return app.test_client()
