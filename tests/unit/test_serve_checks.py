"""canal serve's start-up checks run in a child: a refusal reaches the user as main() prints
errors, and what the checks load or change stays out of gunicorn's long-lived master."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


SERVE = """
import sys
from canal import config as configmod
from canal.cli import main
from canal.errors import CanalError
cfg = configmod.load({"sysctl_dir": sys.argv[1] + "/no-sysctls", "socket": sys.argv[1] + "/canal.sock"}, environ={})
if sys.argv[2] == "serve":
    print("rc", main.serve(cfg))
else:  # control: the same checks in this process
    try:
        main._check_start(cfg)
    except CanalError:
        print("rc refused")
print("loaded", sorted(m for m in ("canal.preflight", "canal.runtime", "pyroute2") if m in sys.modules))
"""


def test_serve_refuses_from_the_child_and_the_master_never_loads_the_checks(tmp_path):
    """Exit 2 with the refusal, and the checks' modules (pyroute2 and the rest: ~20 MB in a
    process that lives as long as the plugin) never loaded in serve's own process."""
    plugin = str(Path(main.__file__).resolve().parents[2])

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", SERVE, str(tmp_path), mode], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": plugin})

    served = run("serve")
    assert "rc 2" in served.stdout and "sysctl net.ipv4.ip_forward is not writable" in served.stderr, served
    assert "loaded []" in served.stdout, served.stdout
    control = run("inline")
    assert "rc refused" in control.stdout and "'canal.preflight'" in control.stdout, control
