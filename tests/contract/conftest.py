from __future__ import annotations

import pytest
from contract_support import ContractPlugin


@pytest.fixture
def plugin(tmp_path):
    p = ContractPlugin(str(tmp_path / "canal.db"))
    yield p
    p.close()


@pytest.fixture
def client(plugin):
    return plugin.app().test_client()
