"""Errors typed by behaviour, so callers (and the HTTP layer) branch on kind, not on text.

Every error the plugin raises on purpose is a CanalError; the API maps each kind to a status
code once (see canal.api.app). Library exceptions are translated into these at the edge.
"""

from __future__ import annotations


class CanalError(Exception):
    """Base class: `str(err)` is the message a user sees, so it names what was wrong."""

    status = 500


class BadRequest(CanalError):
    """The caller sent something malformed or invalid; retrying the same request cannot help."""

    status = 400


class NotFound(CanalError):
    """The request names an object (network, endpoint, pool, policy) that does not exist."""

    status = 404


class Conflict(CanalError):
    """The request is valid but collides with existing state (address in use, overlapping pool)."""

    status = 409


class Exhausted(Conflict):
    """A pool or the cluster network has no free address/subnet left."""


class Unavailable(CanalError):
    """A dependency (datastore, kernel, Docker) failed or timed out; the same call may work later."""

    status = 503


class CommandError(CanalError):
    """Base of what can go wrong running an external command (iptables, ipset, conntrack);
    keeps argv so logs show exactly what ran. Catch this for "any command trouble"."""

    def __init__(self, argv: list[str], message: str):
        self.argv = list(argv)
        super().__init__(message)


class CommandFailed(CommandError):
    """The command ran and refused (non-zero exit, e.g. a malformed iptables-restore input):
    permanent, retrying the same input fails the same way, so a 500 carrying the cause."""

    status = 500

    def __init__(self, argv: list[str], rc: int | None, stdout: str, stderr: str, reason: str = ""):
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        detail = reason or (stderr.strip() or stdout.strip() or "no output")
        super().__init__(argv, f"command {' '.join(argv)!r} failed (rc={rc}): {detail}")


class CommandTimedOut(CommandError, Unavailable):
    """The command did not finish in time (xtables lock held, kernel busy): transient, 503."""

    status = 503

    def __init__(self, argv: list[str], timeout: float, stdout: str = "", stderr: str = ""):
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(argv, f"command {' '.join(argv)!r} timed out after {timeout:g}s")


class ToolMissing(CommandError):
    """A binary the plugin needs is not installed: nothing works until an admin installs it."""

    status = 500

    def __init__(self, tool: str, argv: list[str] | None = None, hint: str = ""):
        self.tool = tool
        message = f"{tool} is not installed" + (f": {hint}" if hint else "")
        super().__init__(argv or [tool], message)


class UnsafeInput(CanalError):
    """A value about to reach a kernel tool's input (iptables-restore, ipset restore) is
    malformed — a record that bypassed validation. Refused rather than interpreted."""

    status = 500
