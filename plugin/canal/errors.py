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


class CommandFailed(Unavailable):
    """An external command failed; keeps argv, rc and output so logs show exactly what ran."""

    def __init__(self, argv: list[str], rc: int | None, stdout: str, stderr: str, reason: str = ""):
        self.argv = list(argv)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        detail = reason or (stderr.strip() or stdout.strip() or "no output")
        super().__init__(f"command {' '.join(self.argv)!r} failed (rc={rc}): {detail}")
