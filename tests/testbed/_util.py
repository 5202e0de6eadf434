"""Small process and namespace helpers shared by the test bed modules.

Everything here is about running commands with a timeout and finding or killing
processes by the namespaces they live in; nothing here creates resources.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

log = logging.getLogger("testbed")

#: Prefix of every resource name the test bed creates (netns, interfaces, dirs, cgroups).
PREFIX = "cnlt"

#: Plugin protocol content type that dockerd sends; answering it proves the plugin is up.
PLUGIN_MIMETYPE = "application/vnd.docker.plugins.v1.2+json"


class TestbedError(RuntimeError):
    """The test bed could not build or drive what was asked (not a product failure)."""

    __test__ = False  # not a pytest test class despite the name


class CommandFailed(TestbedError):
    """An external command failed; keeps argv, rc, stdout and stderr for the report."""

    def __init__(self, argv: Sequence[str], returncode: Optional[int], stdout: Any, stderr: Any,
                 note: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = note or f"exit status {returncode}"
        err = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
        out = stdout.decode(errors="replace") if isinstance(stdout, bytes) else (stdout or "")
        detail = (err.strip() or out.strip())[-2000:]
        super().__init__(f"{' '.join(self.argv)}: {what}" + (f"\n{detail}" if detail else ""))


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60,
        env: Optional[Mapping[str, str]] = None, input: Any = None,
        text: bool = True, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run argv to completion with a hard timeout (every call in the test bed has one).

    ``env`` adds to (not replaces) the caller's environment.  Raises CommandFailed on a
    non-zero exit when ``check`` and on a timeout always (the child is killed first).
    """
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, env=full_env,
                              input=input, text=text, cwd=cwd, stdin=None if input is not None
                              else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, None, exc.stdout, exc.stderr,
                            note=f"timed out after {timeout} s") from None
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; TestbedError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TestbedError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def log_tail(path: os.PathLike | str, lines: int = 40) -> str:
    """Last lines of a log file, for error messages that explain a failed start."""
    try:
        data = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(data[-lines:])


# --------------------------------------------------------------------------- processes

def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (zombies hold no namespaces or sockets)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def pid_starttime(pid: int) -> Optional[int]:
    """Kernel start time of pid (clock ticks since boot); tells a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def all_pids() -> list[int]:
    """Every pid currently in /proc, except our own."""
    me = os.getpid()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != me]


def ns_id(path: str) -> Optional[Tuple[int, int]]:
    """(st_dev, st_ino) identifying a namespace file such as /run/netns/X or /proc/P/ns/net."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_namespaces(net: Iterable[Tuple[int, int]] = (),
                       mnt: Iterable[Tuple[int, int]] = ()) -> list[int]:
    """Pids whose network or mount namespace is one of those given (like `ip netns pids`)."""
    net, mnt = set(net), set(mnt)
    found = []
    for pid in all_pids():
        if (net and ns_id(f"/proc/{pid}/ns/net") in net) or \
           (mnt and ns_id(f"/proc/{pid}/ns/mnt") in mnt):
            found.append(pid)
    return found


def cmdline(pid: int) -> str:
    """Space-joined command line of pid, '' if it is gone or a kernel thread."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL, timeout: float = 10) -> list[int]:
    """Signal pids and wait until they are gone; returns those still alive at the timeout."""
    pids = [p for p in set(pids) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def stop_popen(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM,
               timeout: float = 20, group: bool = True) -> None:
    """Stop a Popen child (its whole process group if ``group``), escalating to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    def send(s: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, s)
            else:
                proc.send_signal(s)
        except ProcessLookupError:
            pass
    send(sig)
    try:
        proc.wait(timeout=timeout if sig != signal.SIGKILL else 10)
        if group:  # leftover group members (workers) get no grace
            send(signal.SIGKILL)
        return
    except subprocess.TimeoutExpired:
        log.warning("pid %s ignored signal %s for %s s; killing", proc.pid, sig, timeout)
    send(signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("pid %s survived SIGKILL", proc.pid)


# --------------------------------------------------------------------------- cgroups

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dirs(name: str) -> list[Path]:
    """Top-level cgroup directories called ``name`` in every mounted hierarchy (v1 and v2)."""
    found = []
    if (CGROUP_ROOT / name).is_dir():
        found.append(CGROUP_ROOT / name)
    try:
        for hier in CGROUP_ROOT.iterdir():
            cand = hier / name
            if hier.is_dir() and not hier.is_symlink() and cand.is_dir():
                found.append(cand)
    except OSError:
        pass
    return found


def cgroup_pids(dirs: Iterable[Path]) -> list[int]:
    """All pids in the given cgroup subtrees."""
    pids: set[int] = set()
    for top in dirs:
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split())
            except (OSError, ValueError):
                pass
    return sorted(pids)


def remove_cgroups(dirs: Iterable[Path]) -> list[Path]:
    """rmdir cgroup subtrees bottom-up (only empty cgroups can go); returns what stayed."""
    left = []
    for top in dirs:
        subdirs = sorted((p for p in top.rglob("*") if p.is_dir()),
                         key=lambda p: len(p.parts), reverse=True)
        for d in [*subdirs, top]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last task is still exiting
                    time.sleep(0.02)
        if top.exists():
            left.append(top)
    return left


# --------------------------------------------------------------------------- HTTP over unix

class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: how dockerd talks to its API and to plugins."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def unix_http(path: str, method: str, url: str, body: Optional[bytes] = None,
              headers: Optional[Mapping[str, str]] = None,
              timeout: float = 5) -> Tuple[int, bytes]:
    """One HTTP request over a unix socket; returns (status, body). Raises OSError."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer on {path}: {exc!r}") from exc
    finally:
        conn.close()


def plugin_post(sock_path: str, method: str, payload: Any = None,
                timeout: float = 10) -> Tuple[int, Any]:
    """POST /<method> the way dockerd does (JSON body, plugin content type).

    ``payload`` None sends an empty body, as dockerd does for Plugin.Activate.
    Returns (status, decoded JSON or raw text).
    """
    body = b"" if payload is None else json.dumps(payload).encode()
    status, raw = unix_http(sock_path, "POST", "/" + method, body=body,
                            headers={"Accept": PLUGIN_MIMETYPE, "Content-Type": PLUGIN_MIMETYPE},
                            timeout=timeout)
    try:
        return status, json.loads(raw.decode() or "null")
    except ValueError:
        return status, raw.decode(errors="replace")


def spawn(argv: Sequence[str], log_path: os.PathLike | str,
          env: Optional[Mapping[str, str]] = None, **kwargs: Any) -> subprocess.Popen:
    """Start a long-running process in its own session (so its group can be killed), logging
    stdout+stderr to ``log_path`` (appended, so restarts keep earlier output)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "ab", buffering=0) as logf:
        logf.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True, **kwargs)


CLONE_NEWNET = 0x40000000


def enter_netns(path: str) -> None:
    """Move the calling thread (the process, if single-threaded) into the network namespace
    at `path`: benchmarks read a host's kernel state directly, not through an nsenter each."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
