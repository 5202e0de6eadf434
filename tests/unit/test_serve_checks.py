"""canal serve's start-up checks run in a child: a refusal reaches the user as main() prints
errors, and what the checks load or change stays out of gunicorn's long-lived master."""

from __future__ import annotations

from canal.cli import main
from canal.errors import CanalError

_touched: list[str] = []


def test_a_refusal_in_the_child_is_printed_and_exits_2(capfd):
    def refuse() -> None:
        raise CanalError("datastore refused our certificate (--etcd-cert)")

    assert main._in_child(refuse) == 2
    assert "canal: datastore refused our certificate (--etcd-cert)" in capfd.readouterr().err


def test_passing_checks_exit_0_and_leave_the_parent_as_it_was():
    def check() -> None:
        _touched.append("loaded")  # as an import would fill sys.modules

    assert main._in_child(check) == 0
    assert _touched == []  # control below: the same call in this process changes it
    check()
    assert _touched == ["loaded"]


def test_an_unexpected_failure_is_exit_1(capfd):
    def broken() -> None:
        raise RuntimeError("bug")

    assert main._in_child(broken) == 1
    assert "RuntimeError: bug" in capfd.readouterr().err
