"""The start-up check: each requirement missing on its own, all of them at once, and none.

The logic runs against injected collaborators (which, runner, vxlan support, a sysctl tree in
tmp_path); the parts that meet the kernel — opening sysctls for writing, the vxlan probe, the
command line — run for real inside throwaway network namespaces (`cnlt<pid>-pf<n>`, found by
the test bed's leftover cleanup after a crash). The only sysctl written is a throwaway
namespace's ip_forward, and the machine's own namespace is never entered.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from canal import config as configmod
from canal import preflight
from canal.errors import CanalError, CommandFailed
from canal.preflight import PROBE_LINK, PROBE_PORT, PROBE_VNI, PreflightError

REPO = Path(__file__).resolve().parents[2]
EVERY_TOOL = {
    "iptables-nft-save", "iptables-nft-restore", "iptables-legacy-save", "iptables-legacy-restore",
    "iptables-save", "iptables-restore", "ipset", "conntrack",
    "ip6tables-nft-save", "ip6tables-nft-restore", "ip6tables-legacy-save", "ip6tables-legacy-restore",
}
_counter = itertools.count()


class FakeHost:
    """Tools on PATH, commands that fail, and a vxlan answer: everything check() asks."""

    def __init__(self, tools: set[str] = EVERY_TOOL, failing: dict[str, str] | None = None,
                 vxlan: str | None = None, ipv6: bool = False) -> None:
        self.ipv6 = ipv6
        self.tools = set(tools)
        self.failing = failing or {}
        self.vxlan_answer = vxlan
        self.ran: list[list[str]] = []
        self.vxlan_asked = 0

    def which(self, name: str) -> str | None:
        return f"/usr/sbin/{name}" if name in self.tools else None

    def runner(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        self.ran.append(list(argv))
        if argv[0] not in self.tools:
            raise CommandFailed(argv, None, "", "", reason=f"{argv[0]} is not installed")
        if argv[0] in self.failing:
            raise CommandFailed(argv, 1, "", self.failing[argv[0]] + "\nmore detail\n")
        return subprocess.CompletedProcess(argv, 0, "", "")

    def vxlan(self) -> str | None:
        self.vxlan_asked += 1
        return self.vxlan_answer

    def problems(self, cfg: configmod.Config) -> list[str]:
        return preflight.problems(cfg, which=self.which, runner=self.runner, vxlan=self.vxlan,
                                  ipv6=lambda: self.ipv6)

    def check(self, cfg: configmod.Config) -> None:
        preflight.check(cfg, which=self.which, runner=self.runner, vxlan=self.vxlan, ipv6=lambda: self.ipv6)


@pytest.fixture
def sysctls(tmp_path: Path) -> Path:
    """A sysctl tree holding the forwarding files, as /proc/sys would."""
    root = tmp_path / "sys"
    for key in preflight.FORWARDING_SYSCTLS:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text("0\n")
    return root


def cfg(sysctl_dir: Path, **values: str) -> configmod.Config:
    return configmod.load({"sysctl_dir": str(sysctl_dir), **values}, environ={})


# ------------------------------------------------------------------------------ logic


def test_everything_present_passes_and_writes_nothing(sysctls: Path) -> None:
    host = FakeHost()
    host.check(cfg(sysctls, datastore="etcd"))
    assert host.problems(cfg(sysctls)) == []
    assert host.vxlan_asked == 1  # etcd mode only
    assert ["iptables-nft-save"] in host.ran and ["ipset", "list", "-n"] in host.ran
    assert all((sysctls / key).read_text() == "0\n" for key in preflight.FORWARDING_SYSCTLS)


def test_missing_conntrack_names_the_package(sysctls: Path) -> None:
    host = FakeHost(EVERY_TOOL - {"conntrack"})
    with pytest.raises(PreflightError) as err:
        host.check(cfg(sysctls))
    assert err.value.problems == ["missing conntrack (apt-get install conntrack)"]
    assert str(err.value) == "canal cannot start: missing conntrack (apt-get install conntrack)."
    assert isinstance(err.value, CanalError)


def test_ip6tables_needed_only_where_the_kernel_has_ipv6(sysctls: Path) -> None:
    without = EVERY_TOOL - {t for t in EVERY_TOOL if t.startswith("ip6tables")}
    assert FakeHost(without, ipv6=True).problems(cfg(sysctls)) == [
        "missing ip6tables-restore and ip6tables-save (IPv6 on Canal's veths is closed with them) "
        "(apt-get install iptables)"
    ]
    assert FakeHost(without, ipv6=False).problems(cfg(sysctls)) == []
    assert FakeHost(EVERY_TOOL, ipv6=True).problems(cfg(sysctls)) == []


def test_missing_ipset(sysctls: Path) -> None:
    assert FakeHost(EVERY_TOOL - {"ipset"}).problems(cfg(sysctls)) == ["missing ipset (apt-get install ipset)"]


def test_ipset_without_kernel_support(sysctls: Path) -> None:
    host = FakeHost(failing={"ipset": "ipset v7.17: Cannot open session to kernel."})
    assert host.problems(cfg(sysctls)) == [
        "ipset does not work (ipset v7.17: Cannot open session to kernel.): the kernel lacks ip_set?"
    ]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_missing_iptables_of_the_chosen_backend(sysctls: Path, backend: str) -> None:
    other = "legacy" if backend == "nft" else "nft"
    tools = {"ipset", "conntrack", f"iptables-{other}-save", f"iptables-{other}-restore"}
    found = FakeHost(tools).problems(cfg(sysctls, iptables_backend=backend))
    assert found == [
        f"missing iptables-{backend}-restore/-save or iptables-restore and iptables-save (apt-get install iptables)"
    ]


def test_restore_alone_missing_is_missing(sysctls: Path) -> None:
    tools = EVERY_TOOL - {"iptables-nft-restore", "iptables-restore"}
    assert "apt-get install iptables" in FakeHost(tools).problems(cfg(sysctls, iptables_backend="nft"))[0]


def test_plain_iptables_names_serve_a_backend(sysctls: Path) -> None:
    """As dataplane.iptables._binary does: iptables-save stands in for iptables-nft-save."""
    host = FakeHost({"iptables-save", "iptables-restore", "ipset", "conntrack"})
    assert host.problems(cfg(sysctls, iptables_backend="nft")) == []
    assert ["iptables-save"] in host.ran


def test_auto_backend_needs_one_working_backend(sysctls: Path) -> None:
    tools = {"iptables-legacy-save", "iptables-legacy-restore", "ipset", "conntrack"}
    assert FakeHost(tools).problems(cfg(sysctls)) == []
    none = FakeHost({"ipset", "conntrack"}).problems(cfg(sysctls))
    assert none == ["missing iptables-restore and iptables-save (apt-get install iptables)"]


def test_auto_backend_falls_back_to_the_one_that_runs(sysctls: Path) -> None:
    """nft tools installed but the kernel refuses them: legacy works, so does canal."""
    tools = EVERY_TOOL - {"iptables-save", "iptables-restore"}
    host = FakeHost(tools, failing={"iptables-nft-save": "iptables-nft-save: Protocol not supported"})
    assert host.problems(cfg(sysctls)) == []
    assert host.ran[:2] == [["iptables-nft-save"], ["iptables-legacy-save"]]


def test_chosen_backend_that_does_not_run(sysctls: Path) -> None:
    host = FakeHost(failing={"iptables-nft-save": "iptables-nft-save: Protocol not supported"})
    found = host.problems(cfg(sysctls, iptables_backend="nft"))
    assert found == [
        "iptables does not work (iptables-nft-save: iptables-nft-save: Protocol not supported): the kernel"
        " lacks nf_tables? (or choose the other --iptables-backend)"
    ]


def test_vxlan_missing_matters_only_across_hosts(sysctls: Path) -> None:
    host = FakeHost(vxlan="the kernel cannot create a vxlan link: (95, 'Operation not supported')")
    assert host.problems(cfg(sysctls)) == [] and host.vxlan_asked == 0  # one host: no tunnel
    found = host.problems(cfg(sysctls, datastore="etcd"))
    assert len(found) == 1 and found[0].startswith("missing the vxlan kernel feature, needed with --datastore etcd")
    assert "Operation not supported" in found[0] and "modprobe vxlan" in found[0]


def test_vxlan_support_prefers_the_loaded_module(tmp_path: Path) -> None:
    probes: list[int] = []

    def probe() -> str | None:
        probes.append(1)
        return "no"

    (tmp_path / "vxlan").mkdir()
    assert preflight.vxlan_support(str(tmp_path / "vxlan"), probe) is None and probes == []
    assert preflight.vxlan_support(str(tmp_path / "absent"), probe) == "no" and probes == [1]


def test_sysctl_files_missing(tmp_path: Path) -> None:
    """A --sysctl-dir that holds no sysctls: the managed plugin without its sysctl mount."""
    found = FakeHost().problems(cfg(tmp_path / "host" / "proc" / "sys"))
    assert [p.split(" (")[0] for p in found] == [
        f"sysctl net.ipv4.ip_forward is not writable at {tmp_path}/host/proc/sys/net/ipv4/ip_forward",
        f"sysctl net.ipv4.conf.all.forwarding is not writable at {tmp_path}/host/proc/sys/net/ipv4/conf/all/forwarding",
    ]
    assert "No such file or directory" in found[0]
    assert found[-1].endswith("CANAL_SYSCTL_DIR=/host/proc/sys)")


def test_everything_missing_is_one_paragraph(tmp_path: Path) -> None:
    host = FakeHost(set(), vxlan="the kernel cannot create a vxlan link: (95, 'Operation not supported')")
    with pytest.raises(PreflightError) as err:
        host.check(cfg(tmp_path / "nowhere", datastore="etcd"))
    text = str(err.value)
    assert len(err.value.problems) == 6  # iptables, ipset, conntrack, vxlan, two sysctls
    assert "\n" not in text and text.startswith("canal cannot start: missing iptables-restore")
    for part in ("(apt-get install conntrack)", "(apt-get install ipset)", "(apt-get install iptables)",
                 "vxlan", "net.ipv4.ip_forward"):
        assert part in text
    assert text.endswith("All at once: apt-get install conntrack ipset iptables.")


# ------------------------------------------------------------------------------ real kernel


def sh(*argv: str, check: bool = True, timeout: float = 30, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> rc {proc.returncode}: {proc.stderr.strip()}")
    return proc


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """Factory of fresh namespaces; all deleted at teardown, also when the test fails."""
    if os.geteuid() != 0:
        pytest.fail("the preflight kernel tests need root (network namespaces); run them as root", pytrace=False)
    made: list[str] = []

    def make() -> str:
        name = f"cnlt{os.getpid()}-pf{next(_counter)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    errors = [p.stderr for p in (sh("ip", "netns", "delete", n, check=False) for n in reversed(made)) if p.returncode]
    assert not errors, errors


def py_in(ns: str, code: str, *prefix: str) -> str:
    """Run Python code in netns `ns` (nsenter, not `ip netns exec`, which remounts /sys)."""
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *prefix, sys.executable, "-c",
              "from canal import preflight as p\n" + code).stdout.strip()


def links(ns: str) -> list[str]:
    return sorted(line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-n", ns, "-o", "link").stdout.splitlines())


def test_enable_forwarding_names_a_wrong_sysctl_dir(sysctls: Path, tmp_path: Path) -> None:
    from canal.dataplane.links import enable_forwarding
    from canal.errors import Unavailable

    enable_forwarding(str(sysctls))
    assert (sysctls / "net/ipv4/ip_forward").read_text() == "1"
    with pytest.raises(Unavailable, match=r"is --sysctl-dir '.*/nowhere' right\? the managed plugin uses /host/proc/sys"):
        enable_forwarding(str(tmp_path / "nowhere"))


def test_writable_opens_without_writing(sysctls: Path) -> None:
    target = sysctls / preflight.FORWARDING_SYSCTLS[0]
    assert preflight.writable(str(target)) is None
    assert target.read_text() == "0\n"
    assert preflight.writable(str(sysctls / "absent")) == "No such file or directory"
    assert preflight.writable(str(sysctls)) == "Is a directory"


def test_managed_plugin_layout_read_only_proc_sys_writable_host_mount(netns: Callable[[], str], tmp_path: Path) -> None:
    """As Docker runs a managed plugin: /proc/sys read-only, the host's /proc/sys/net bound
    rw at /host/proc/sys/net. The read-only tree is refused (real EROFS, seen by open()), the
    mount passes, and enable_forwarding writes through it (in a private mount namespace of a
    throwaway netns: its ip_forward is the only value written)."""
    ns = netns()
    host = tmp_path / "host" / "proc" / "sys"
    (host / "net").mkdir(parents=True)
    script = (
        f"mount --bind /proc/sys/net {host}/net && mount --bind /proc/sys /proc/sys && "
        f"mount -o remount,bind,ro /proc/sys && exec \"$@\""
    )
    out = py_in(
        ns,
        "import json\n"
        "from canal.dataplane.links import enable_forwarding\n"
        "from canal.errors import Unavailable\n"
        f"found = [p.sysctl_problems('/proc/sys'), p.sysctl_problems({str(host)!r})]\n"
        "try:\n"
        "    enable_forwarding('/proc/sys')\n"
        "    found.append('written')\n"
        "except Unavailable as err:\n"
        "    found.append(str(err))\n"
        f"enable_forwarding({str(host)!r})\n"  # the plugin's own step at start, through the mount
        "found.append(open('/proc/sys/net/ipv4/ip_forward').read().strip())\n"
        "print(json.dumps(found))",
        "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
    )
    read_only, mounted, refused, forwarding = json.loads(out.splitlines()[-1])
    assert len(read_only) == 2 and all("(Read-only file system)" in p for p in read_only), read_only
    assert mounted == []
    assert "net.ipv4.ip_forward=1" in refused and "Read-only file system" in refused, refused
    assert "the managed plugin mounts the host's /proc/sys/net rw at /host/proc/sys/net" in refused
    assert forwarding == "1"  # written in the throwaway namespace only
    # Control: the same tree before the read-only remount passes.
    assert json.loads(py_in(ns, "import json; print(json.dumps(p.sysctl_problems('/proc/sys')))")) == []


def test_vxlan_probe_leaves_nothing_behind(netns: Callable[[], str]) -> None:
    ns = netns()
    before = links(ns)
    assert py_in(ns, "print(p.probe_vxlan_link())") == "None"
    assert py_in(ns, "print(p.vxlan_support('/nonexistent'))") == "None"  # forced to probe
    assert links(ns) == before


def test_vxlan_probe_negative_control_unknown_kind(netns: Callable[[], str]) -> None:
    """The probe can fail: a kind this kernel has no driver for is reported, not ignored."""
    ns = netns()
    out = py_in(ns, "print(p.probe_vxlan_link('canalnope'))")
    assert out == "the kernel cannot create a canalnope link: (95, 'Operation not supported')"
    assert PROBE_LINK not in links(ns)


def test_vxlan_probe_removes_a_stale_probe_and_spares_real_devices(netns: Callable[[], str]) -> None:
    """A probe killed midway left its link; a real device holds the probe's VNI and port."""
    ns = netns()
    vxlan = ["type", "vxlan", "id", str(PROBE_VNI), "dstport", str(PROBE_PORT)]
    sh("ip", "-n", ns, "link", "add", PROBE_LINK, *vxlan)
    assert py_in(ns, "print(p.probe_vxlan_link())") == "None"
    assert PROBE_LINK not in links(ns)
    sh("ip", "-n", ns, "link", "add", "vxreal", *vxlan)
    assert py_in(ns, "print(p.probe_vxlan_link())") == "None"  # EEXIST on the VNI: vxlan is there
    assert PROBE_LINK not in links(ns) and "vxreal" in links(ns)


def test_module_entry_point_exit_codes(netns: Callable[[], str], tmp_path: Path) -> None:
    """`python -m canal.preflight`: 1 and the paragraph when something is missing, 2 for a bad
    setting, 0 when all is there (the last two in the same throwaway namespace)."""
    ns = netns()
    base = ["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-m", "canal.preflight"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugin")}
    missing = sh(*base, "--sysctl-dir", str(tmp_path / "nowhere"), check=False, env=env)
    assert missing.returncode == 1, missing
    assert missing.stderr.startswith("canal cannot start: sysctl net.ipv4.ip_forward is not writable")
    bad = sh(*base, "--iptables-backend", "nope", check=False, env=env)
    assert bad.returncode == 2 and "iptables_backend 'nope' from flag --iptables-backend" in bad.stderr
    ok = sh(*base, check=False, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == "canal preflight: ok", ok
