"""Fuzz tier fixtures; the invariants and helpers live in fuzz_support."""

from __future__ import annotations

import logging

import pytest
from contract_support import ContractPlugin
from fuzz_support import BODIES, STATUSES, Sender, alive, seed


@pytest.fixture(autouse=True)
def quiet_refusals():
    """Ten thousand refusals logged as warnings cost more than the requests themselves;
    errors (the unexpected-exception handler's) still show."""
    logger = logging.getLogger("canal")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture
def sender(tmp_path):
    plugin = ContractPlugin(str(tmp_path / "canal.db"))
    s = Sender(plugin)
    seed(s)
    yield s
    alive(s)
    plugin.close()


def pytest_terminal_summary(terminalreporter):
    fuzzed = {route: n for route, n in BODIES.items() if not route.startswith("control:")}
    if fuzzed:
        terminalreporter.write_line(
            f"fuzz: {sum(fuzzed.values())} bodies sent over {len(fuzzed)} routes "
            f"(+{sum(BODIES.values()) - sum(fuzzed.values())} in positive controls); answers by status: "
            + ", ".join(f"{code}: {n}" for code, n in sorted(STATUSES.items()))
        )
