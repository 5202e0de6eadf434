"""Who owns what: run ids, the live-object registry, exit hooks and leftover cleanup.

Every name the test bed creates carries ``cnlt<pid>`` (pid of the owning Python
process), so a later run can tell leftovers of a dead run from a run still going on
in parallel and remove only the former.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, List, Optional, Protocol

from ._util import (PREFIX, all_pids, cgroup_dirs, cgroup_pids, cmdline, kill_pids, log, ns_id,
                    pid_alive, pid_starttime, pids_in_namespaces, remove_cgroups, run)

#: Where run directories go; short on purpose (unix socket paths must stay < 108 bytes).
TMP_BASE = Path(os.environ.get("CNLT_TMPDIR", "/tmp"))
NETNS_DIR = Path("/run/netns")
OWNER_FILE = "owner"


class Closable(Protocol):
    def close(self) -> None: ...


_lock = threading.RLock()
_live: List[Closable] = []
_hooks_pid: Optional[int] = None
_counter = itertools.count(1)
_signalled = False


def new_run_id() -> str:
    """A fresh run id ``cnlt<pid>`` (``cnlt<pid>r<n>`` for further runs in this process)."""
    while True:
        n = next(_counter)
        rid = f"{PREFIX}{os.getpid()}" + ("" if n == 1 else f"r{n}")
        if not (TMP_BASE / rid).exists() and not (NETNS_DIR / f"{rid}-ul").exists():
            return rid


def run_pid(name: str, prefix: str = PREFIX) -> Optional[int]:
    """Owner pid encoded in a test bed name (``cnlt1234-h1`` -> 1234), None if not ours."""
    m = re.match(re.escape(prefix) + r"(\d+)(?:r\d+)?(?:[-_.]|$)", name)
    return int(m.group(1)) if m else None


def make_run_dir(run_id: str) -> Path:
    """Create the run directory and record the owner (pid + start time) in it."""
    path = TMP_BASE / run_id
    path.mkdir(mode=0o755, parents=False, exist_ok=False)
    (path / OWNER_FILE).write_text(f"{os.getpid()} {pid_starttime(os.getpid())}\n")
    return path


def _owner_alive(pid: int, run_dir: Optional[Path]) -> bool:
    """True if the process that created a run is still running (pid reuse aware)."""
    if not pid_alive(pid):
        return False
    if run_dir is not None:
        try:
            _, start = (run_dir / OWNER_FILE).read_text().split()
            return start == str(pid_starttime(pid))
        except (OSError, ValueError):
            pass
    return True


# --------------------------------------------------------------------------- registry

def register(obj: Closable) -> None:
    """Track obj so a crash, Ctrl-C or SIGTERM still closes it (see close_all)."""
    with _lock:
        _install_hooks()
        _live.append(obj)


def unregister(obj: Closable) -> None:
    with _lock:
        if obj in _live:
            _live.remove(obj)


def live_objects() -> List[Closable]:
    with _lock:
        return list(_live)


def close_all() -> None:
    """Close every live test bed object, newest first; never raises."""
    if _hooks_pid != os.getpid():  # a forked child must not tear down its parent's bed
        return
    while True:
        with _lock:
            if not _live:
                return
            obj = _live.pop()
        try:
            obj.close()
        except BaseException as exc:  # keep cleaning up whatever happens
            log.error("cleanup of %r failed: %r", obj, exc)


def _on_signal(signum: int, frame: Any) -> None:
    """First SIGTERM/SIGHUP: unwind like Ctrl-C (test runners stop, finally blocks and
    fixture finalizers run, atexit closes the rest); later ones are ignored so the
    cleanup itself is not interrupted."""
    global _signalled
    if _signalled:
        return
    _signalled = True
    print(f"testbed: got signal {signum}, cleaning up", file=sys.stderr, flush=True)
    raise KeyboardInterrupt(f"signal {signum}")


def _install_hooks() -> None:
    global _hooks_pid
    if _hooks_pid == os.getpid():
        return
    _hooks_pid = os.getpid()
    atexit.register(close_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):  # never clobber someone's handler
                signal.signal(sig, _on_signal)


# --------------------------------------------------------------------------- leftovers

def cleanup_leftovers(prefix: str = PREFIX, *, include_live: bool = False,
                      dry_run: bool = False) -> List[str]:
    """Remove what crashed earlier runs left: processes, cgroups, namespaces, temp dirs.

    A run is a leftover when the process whose pid is in its name (``cnlt<pid>...``) is
    gone; runs of live processes (e.g. a parallel test session) are kept unless
    ``include_live``.  Returns a list of what was (or, with ``dry_run``, would be) done.
    """
    done: List[str] = []

    def stale(name: str, run_dir: Optional[Path] = None) -> bool:
        pid = run_pid(name, prefix)
        if pid is None:
            return False
        if pid == os.getpid() and not include_live:
            return False
        return include_live or not _owner_alive(pid, run_dir)

    run_dirs = {}
    if TMP_BASE.is_dir():
        for d in TMP_BASE.iterdir():
            if d.is_dir() and not d.is_symlink() and run_pid(d.name, prefix) is not None:
                run_dirs[d.name] = d

    def run_dir_of(name: str) -> Optional[Path]:
        m = re.match(re.escape(prefix) + r"\d+(?:r\d+)?", name)
        return run_dirs.get(m.group(0)) if m else None

    netns = []
    if NETNS_DIR.is_dir():
        netns = sorted(n.name for n in NETNS_DIR.iterdir()
                       if n.name.startswith(prefix) and stale(n.name, run_dir_of(n.name)))
    dirs = sorted(d for name, d in run_dirs.items() if stale(name, d))

    cgroup_names = set()
    for top in [Path("/sys/fs/cgroup"), *_subdirs(Path("/sys/fs/cgroup"))]:
        cgroup_names |= {p.name for p in _subdirs(top) if p.name.startswith(prefix)}
    cgroups = [cg for name in sorted(cgroup_names) if stale(name, run_dir_of(name))
               for cg in cgroup_dirs(name)]

    token_re = re.compile(re.escape(prefix) + r"\d+(?:r\d+)?")
    tokens = {m.group(0) for m in (token_re.match(n) for n in
                                   [*netns, *(d.name for d in dirs), *cgroup_names]) if m}
    tokens = {t for t in tokens if stale(t, run_dirs.get(t))}

    # Processes: in a stale netns, in a stale cgroup, or naming a stale run's paths/names
    # on their command line; plus all sharing a mount namespace with the netns ones
    # (the per-host holder's private /run).  Never ourselves or our ancestors.
    ns_ids = {i for i in (ns_id(str(NETNS_DIR / n)) for n in netns) if i}
    in_netns = set(pids_in_namespaces(net=ns_ids))
    mnt_ids = {i for i in (ns_id(f"/proc/{p}/ns/mnt") for p in in_netns) if i}
    mnt_ids -= {ns_id("/proc/1/ns/mnt"), ns_id("/proc/self/ns/mnt")}
    pids = in_netns | set(pids_in_namespaces(mnt=mnt_ids)) | set(cgroup_pids(cgroups))
    if tokens:
        by_name = re.compile("|".join(rf"(?:/|\b){re.escape(t)}(?:[-/_.]|\s|$)"
                                      for t in sorted(tokens)))
        pids |= {p for p in all_pids() if by_name.search(cmdline(p))}
    pids -= _ancestors()

    for pid in sorted(pids):
        done.append(f"kill {pid} {cmdline(pid)[:120]}")
    if not dry_run and pids:
        left = kill_pids(pids)
        if left:
            done.append(f"WARNING: still alive after SIGKILL: {left}")
    for cg in cgroups:
        done.append(f"rmdir cgroup {cg}")
    if not dry_run:
        for cg in remove_cgroups(cgroups):
            done.append(f"WARNING: cgroup not removable: {cg}")
    for name in netns:
        done.append(f"ip netns delete {name}")
        if not dry_run:
            res = run(["ip", "netns", "delete", name], check=False, timeout=30)
            if res.returncode != 0:
                done.append(f"WARNING: {res.stderr.strip()}")
    for d in dirs:
        done.append(f"rm -rf {d}")
        if not dry_run:
            shutil.rmtree(d, ignore_errors=True)
            if d.exists():
                done.append(f"WARNING: could not remove {d}")
    return done


def _subdirs(path: Path) -> List[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _ancestors() -> set:
    """Our pid and our parents' (a shell running the cleanup may mention a run id)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found
