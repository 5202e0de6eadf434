"""The one wrapper for external commands (iptables, ipset, ...).

Every call has a timeout, because a handler blocked on a hung command blocks Docker with it;
every failure carries argv (and rc and output), so logs show exactly what ran. Failures are
split by what a caller can do about them: CommandFailed (the tool refused: permanent),
CommandTimedOut (transient, an Unavailable) and ToolMissing (install the tool).
"""

from __future__ import annotations

import logging
import subprocess
from typing import Sequence

from canal.errors import CommandFailed, CommandTimedOut, ToolMissing

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


def run(
    argv: Sequence[str],
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run argv (never through a shell); raise CommandFailed on non-zero exit if check.

    A missing binary or a timeout raises even with check=False: the caller asked for a
    result the command never produced."""
    argv = list(argv)
    try:
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise ToolMissing(argv[0], argv) from None
    except subprocess.TimeoutExpired as err:
        log.warning("%s timed out after %gs", argv, timeout)
        raise CommandTimedOut(argv, timeout, _text(err.stdout), _text(err.stderr)) from None
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stdout, proc.stderr)
    log.debug("ran %s rc=%s", argv, proc.returncode)
    return proc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
