"""The `store` fixture runs every datastore-backed test against each backend: the embedded
SQLite store and a real etcd (started once per session on loopback, wiped before each test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from canal.datastore.etcd import EtcdDatastore
from canal.datastore.local import LocalDatastore
from etcd_support import EtcdServer, start_etcd
from testbed.pki import Pki

@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the whole session (started only if an etcd-backed test runs)."""
    server = start_etcd()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def make_etcd() -> Iterator[Callable[[], EtcdServer]]:
    """Private etcd instances for tests that stop, pause or restart their server."""
    servers: list[EtcdServer] = []

    def make() -> EtcdServer:
        servers.append(start_etcd(f"canal-private{len(servers)}"))
        return servers[-1]

    try:
        yield make
    finally:
        for server in servers:
            server.close()


@pytest.fixture(params=["local", "etcd"])
def store(request, tmp_path):
    """Every datastore test runs against each backend."""
    if request.param == "local":
        ds = LocalDatastore(str(tmp_path / "canal.db"))
    else:
        server = request.getfixturevalue("etcd_server")
        if not server.running():
            pytest.fail(f"the session's etcd died:\n{server.log_tail()}", pytrace=False)
        server.wipe()
        ds = EtcdDatastore(server.endpoint, timeout=5.0)
    yield ds
    ds.close()


# ------------------------------------------------------------------ TLS: a throwaway PKI


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """CA, server (127.0.0.1) and client certificates, and another CA's client certificate."""
    return Pki(str(tmp_path_factory.mktemp("canal-pki")))
