"""What `canal serve` needs from the host, checked once before it serves anything.

Without this, a missing tool surfaces late and as someone else's failure: a host without
`conntrack` started fine, and the first `docker rm` made the next pass fail, so an unrelated
`docker run` got a 503. Here every requirement is checked up front and all the gaps are
reported together, in one paragraph naming the Debian package that closes each:

- iptables-save and iptables-restore of the backend `canal serve` will use (package
  `iptables`), and that this backend's iptables-save actually runs on this kernel;
- `ipset` (package `ipset`) and that the kernel answers it;
- `conntrack` (package `conntrack`): departed addresses' connection state is flushed with it;
- the vxlan kernel feature, in multi-host (etcd) mode only;
- the forwarding sysctls under `--sysctl-dir`, writable.

Nothing is changed on the host: tools are looked up and run read-only, sysctls are opened
for writing but never written, and the vxlan probe (only when the vxlan module is not
already loaded) creates a throwaway, never-up link and deletes it again.

`python -m canal.preflight [serve flags]` runs the same check from the command line:
exit 0 when everything is there, 1 with the message on standard error when not.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Optional, Sequence

from canal import config as configmod
from canal.dataplane import cmd
from canal.dataplane.iptables import BACKENDS, find_tool
from canal.dataplane.links import has_ipv6
from canal.errors import CanalError

log = logging.getLogger(__name__)


#: Sysctls that must be writable. ip_forward is written at start; conf/all/forwarding stands
#: for the per-veth conf/<veth>/{forwarding,proxy_arp} written at every Join (those files do
#: not exist yet, and live in the same tree, so the same mount and permissions apply).
FORWARDING_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding")

#: Name of the throwaway vxlan link: not "cnl..." (that prefix is our veths', which the
#: reconciler would take for orphans), and fixed, so a probe killed midway is cleaned by the next.
PROBE_LINK = "canal-vxprobe"
#: The probe's VNI and port: the highest VNI on IANA's port, unlikely to meet a real device (a
#: clash answers EEXIST, which proves vxlan works just as well).
PROBE_VNI = 16777215
PROBE_PORT = 4789

Which = Callable[[str], Optional[str]]
Runner = Callable[..., object]


class PreflightError(CanalError):
    """The host lacks something `canal serve` needs; `problems` lists each gap with its fix.

    Retrying cannot help until the host changes (install the packages, mount the sysctls)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        packages = sorted({p for text in self.problems for p in re.findall(r"apt-get install ([\w.+-]+)", text)})
        message = "canal cannot start: " + "; ".join(self.problems) + "."
        if len(packages) > 1:
            message += f" All at once: apt-get install {' '.join(packages)}."
        super().__init__(message)


def _missing(tool: str, package: str) -> str:
    return f"missing {tool} (apt-get install {package})"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def _runs(argv: list[str], runner: Runner) -> Optional[str]:
    """None if the read-only command argv succeeds, else why not (its first line of output)."""
    try:
        runner(argv, timeout=10, check=True)
    except CanalError as err:  # refused, timed out, vanished: every kind of command error
        if getattr(err, "rc", None) is not None:
            return _first_line(getattr(err, "stderr", "") or getattr(err, "stdout", ""))
        return str(err)
    return None


def iptables_problems(backend: str, which: Which, runner: Runner) -> list[str]:
    """Problems with the iptables tools of the configured backend (auto: any working one).

    For auto, `detect_backend` at start chooses among the backends whose iptables-save runs;
    it is enough here that one backend has both tools and a working iptables-save."""
    backends = [backend] if backend in BACKENDS else list(BACKENDS)
    complete = {}
    for name in backends:
        save, restore = find_tool(name, "save", which=which), find_tool(name, "restore", which=which)
        if save and restore:
            complete[name] = save
    if not complete:
        flavour = f"iptables-{backend}-restore/-save or " if backend in BACKENDS else ""
        return [_missing(f"{flavour}iptables-restore and iptables-save", "iptables")]
    failures = []
    for save in complete.values():
        why = _runs([save], runner)
        if why is None:
            return []
        failures.append(f"{save}: {why}")
    hint = "the kernel lacks nf_tables" if backend == "nft" else (
        "the kernel lacks ip_tables" if backend == "legacy" else "the kernel lacks nf_tables and ip_tables")
    other = " (or choose the other --iptables-backend)" if backend in BACKENDS else ""
    return [f"iptables does not work ({'; '.join(failures)}): {hint}?{other}"]


def ip6tables_problems(backend: str, which: Which, ipv6: Callable[[], bool]) -> list[str]:
    """On a kernel with IPv6, Canal closes IPv6 on its veths with ip6tables of its backend."""
    if not ipv6():
        return []
    backends = [backend] if backend in BACKENDS else list(BACKENDS)
    for name in backends:
        if find_tool(name, "save", "ip6tables", which) and find_tool(name, "restore", "ip6tables", which):
            return []
    return [_missing("ip6tables-restore and ip6tables-save (IPv6 on Canal's veths is closed with them)", "iptables")]


def ipset_problems(which: Which, runner: Runner) -> list[str]:
    if not which("ipset"):
        return [_missing("ipset", "ipset")]
    why = _runs(["ipset", "list", "-n"], runner)
    return [] if why is None else [f"ipset does not work ({why}): the kernel lacks ip_set?"]


def conntrack_problems(which: Which) -> list[str]:
    """Only presence: a failing flush is logged and retried, never fatal; a missing tool
    would fail every flush forever, silently keeping old connections' state alive."""
    return [] if which("conntrack") else [_missing("conntrack", "conntrack")]


def writable(path: str) -> Optional[str]:
    """None if `path` can be opened for writing, else why not. Opening does not write: a
    sysctl's value changes only on write(). Unlike os.access, open() asks everything a real
    write would meet: a read-only mount (Docker mounts a plugin's /proc/sys so), LSMs, and
    the sysctl's own permission check in the caller's namespaces."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    return None


def sysctl_problems(sysctl_dir: str, check_writable: Callable[[str], Optional[str]] = writable) -> list[str]:
    """The forwarding sysctls under `sysctl_dir` must be writable. The managed plugin sets
    CANAL_SYSCTL_DIR=/host/proc/sys where the host's /proc/sys/net is bind-mounted rw
    (config.json's `sysctl` mount): /host/proc/sys/net/ipv4/ip_forward is then the host's own."""
    problems = []
    for key in FORWARDING_SYSCTLS:
        path = os.path.join(sysctl_dir, key)
        why = check_writable(path)
        if why is not None:
            problems.append(f"sysctl {key.replace('/', '.')} is not writable at {path} ({why})")
    if problems:
        problems[-1] += (
            ": canal writes forwarding and proxy ARP sysctls; run it as root with a writable"
            " /proc/sys/net (managed plugin: the host's /proc/sys/net mounted rw at"
            " /host/proc/sys/net and CANAL_SYSCTL_DIR=/host/proc/sys)"
        )
    return problems


def probe_vxlan_link(kind: str = "vxlan") -> Optional[str]:
    """None if this kernel creates a vxlan link, else why not. Creates PROBE_LINK (never set
    up, so it binds no UDP port and carries nothing) in the current network namespace and
    deletes it; asking for the link kind also makes the kernel autoload the module. (`kind`
    exists for the tests' negative control.)"""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def delete(ipr: IPRoute) -> Optional[NetlinkError]:
        try:
            ipr.link("del", ifname=PROBE_LINK)
        except NetlinkError as err:
            if err.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return err
        return None

    with IPRoute() as ipr:
        delete(ipr)  # what a probe killed between add and del left
        try:
            ipr.link("add", ifname=PROBE_LINK, kind=kind, vxlan_id=PROBE_VNI, vxlan_port=PROBE_PORT,
                     vxlan_learning=0)
        except NetlinkError as err:
            if err.code == errno.EEXIST:  # only vxlan itself can refuse a clashing VNI
                return None
            if err.code == errno.EPERM:
                return f"cannot probe for vxlan: {err} (canal needs CAP_NET_ADMIN)"
            return f"the kernel cannot create a {kind} link: {err}"
        failed = delete(ipr)
        if failed is not None:
            log.warning("vxlan probe: could not delete the throwaway link %s: %s", PROBE_LINK, failed)
    return None


def vxlan_support(sys_module: str = "/sys/module/vxlan", probe: Callable[[], Optional[str]] = probe_vxlan_link) -> Optional[str]:
    """None if the kernel has vxlan. A loaded module shows in /sys/module and needs no probe;
    otherwise (not loaded yet, or built in without a /sys/module entry) a throwaway link
    decides, as /sys/module alone would wrongly refuse both."""
    if os.path.isdir(sys_module):
        return None
    return probe()


def vxlan_problems(datastore: str, support: Callable[[], Optional[str]] = vxlan_support) -> list[str]:
    if datastore != "etcd":  # one host: no tunnel
        return []
    why = support()
    if why is None:
        return []
    return [f"missing the vxlan kernel feature, needed with --datastore etcd ({why}): load it with"
            " modprobe vxlan; Debian ships it in linux-image-$(uname -r)"]


def problems(
    config: configmod.Config,
    *,
    which: Which = shutil.which,
    runner: Runner = cmd.run,
    vxlan: Callable[[], Optional[str]] = vxlan_support,
    check_writable: Callable[[str], Optional[str]] = writable,
    ipv6: Callable[[], bool] = has_ipv6,
) -> list[str]:
    """Every gap between this host and what `config` needs, each with its fix; [] if none."""
    found = [
        *iptables_problems(config.iptables_backend, which, runner),
        *ip6tables_problems(config.iptables_backend, which, ipv6),
        *ipset_problems(which, runner),
        *conntrack_problems(which),
        *vxlan_problems(config.datastore, vxlan),
        *sysctl_problems(config.sysctl_dir, check_writable),
    ]
    return found


def check(config: configmod.Config, **collaborators: Any) -> None:
    """Raise PreflightError naming everything missing; return quietly when nothing is.
    `collaborators` are problems()'s (tests pass fakes)."""
    found = problems(config, **collaborators)
    if found:
        raise PreflightError(found)
    log.info(
        "preflight ok: iptables (%s), ipset, conntrack, sysctls under %s%s",
        config.iptables_backend, config.sysctl_dir, ", vxlan" if config.datastore == "etcd" else "",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m canal.preflight`: the serve flags and CANAL_* variables, checked."""
    parser = argparse.ArgumentParser(
        prog="python -m canal.preflight",
        description="check that this host has what `canal serve` needs (same flags and CANAL_* variables)",
    )
    configmod.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = configmod.load(vars(args))
        check(cfg)
    except PreflightError as err:
        print(err, file=sys.stderr)
        return 1
    except CanalError as err:
        print(f"canal preflight: {err}", file=sys.stderr)
        return 2
    print("canal preflight: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
