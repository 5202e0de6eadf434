"""Command failures by kind, from the real command wrapper to the HTTP answer: a command that
refuses its input is a permanent 500 carrying the cause, a timeout a transient 503, a missing
binary a 500 naming the tool. Docker shows the message; an operator must be able to act on it."""

from __future__ import annotations

import json

import pytest
from contract_support import CheckedIptables

from canal.dataplane import cmd
from canal.errors import CommandError, CommandFailed, CommandTimedOut, ToolMissing, Unavailable

NET = "7a3d" * 16
CREATE = {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}]}


def test_kinds_from_the_real_wrapper():
    with pytest.raises(CommandFailed) as failed:
        cmd.run(["sh", "-c", "echo 'iptables-restore: line 3 failed' >&2; exit 2"])
    assert failed.value.status == 500 and failed.value.rc == 2
    assert "line 3 failed" in str(failed.value) and not isinstance(failed.value, Unavailable)
    with pytest.raises(CommandTimedOut) as timed_out:
        cmd.run(["sleep", "5"], timeout=0.2)
    assert timed_out.value.status == 503 and isinstance(timed_out.value, Unavailable)
    with pytest.raises(ToolMissing) as missing:
        cmd.run(["canal-no-such-tool", "--version"], check=False)
    assert missing.value.status == 500 and missing.value.tool == "canal-no-such-tool"
    assert "canal-no-such-tool is not installed" in str(missing.value)
    assert all(isinstance(e.value, CommandError) for e in (failed, timed_out, missing))


class CommandIptables(CheckedIptables):
    """iptables-restore replaced by a real command that behaves as `argv` does."""

    def __init__(self, argv: list[str], timeout: float = 5):
        super().__init__()
        self.argv = argv
        self.timeout = timeout

    def restore(self, text: str) -> None:
        cmd.run(self.argv, input=text, timeout=self.timeout)


@pytest.mark.parametrize("argv, timeout, status, text", [
    (["sh", "-c", "cat >/dev/null; echo 'iptables-restore: line 2 failed' >&2; exit 1"], 5, 500, "line 2 failed"),
    (["sleep", "5"], 0.2, 503, "timed out after 0.2s"),
    (["iptables-canal-missing-restore"], 5, 500, "iptables-canal-missing-restore is not installed"),
])
def test_http_status_by_kind(client, plugin, argv, timeout, status, text):
    plugin.firewall.iptables = CommandIptables(argv, timeout)
    resp = client.post("/NetworkDriver.CreateNetwork", data=json.dumps(CREATE))
    assert resp.status_code == status and text in resp.get_json()["Err"], resp.get_json()


def test_positive_control_a_working_command_answers_200(client, plugin):
    plugin.firewall.iptables = CommandIptables(["sh", "-c", "cat >/dev/null"])
    assert client.post("/NetworkDriver.CreateNetwork", data=json.dumps(CREATE)).status_code == 200
