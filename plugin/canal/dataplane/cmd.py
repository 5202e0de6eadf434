"""The one wrapper for external commands (iptables, ipset, ...).

Every call has a timeout, because a handler blocked on a hung command blocks Docker with it;
every failure is a CommandFailed carrying argv, rc and output, so logs show exactly what ran.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Sequence

from canal.errors import CommandFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


def run(
    argv: Sequence[str],
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run argv (never through a shell); raise CommandFailed on non-zero exit if check."""
    argv = list(argv)
    try:
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise CommandFailed(argv, None, "", "", reason=f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired as err:
        raise CommandFailed(
            argv, None, _text(err.stdout), _text(err.stderr), reason=f"timed out after {timeout:g}s"
        ) from None
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stdout, proc.stderr)
    log.debug("ran %s rc=%s", argv, proc.returncode)
    return proc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
