from __future__ import annotations

import pytest

from canal.datastore.local import LocalDatastore


@pytest.fixture(params=["local"])
def store(request, tmp_path):
    """Every datastore test runs against each backend (etcd joins in the multi-host tier)."""
    ds = LocalDatastore(str(tmp_path / "canal.db"))
    yield ds
    ds.close()
