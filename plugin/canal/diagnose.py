"""`canal diagnose`: a tar.gz for bug reports.

Two halves: the plugin's (status, settings, this host's records, recent logs; served over the
socket by GET /canal/v1/diagnose) and the kernel's (Canal's iptables chains and ipsets, routes,
the VXLAN device's neighbours and FDB), collected by the CLI on the host itself, so a bundle
is made even when the plugin is down.

Secrets never enter it: settings are listed by value except Secret fields (shown as "(set)")
and files (their paths only: a key or certificate file is never read here); URL credentials
are masked; and every part passes the Redactor (known secret values, PEM private keys) as it
is written, the last line of defence.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
import time
from typing import Any, Callable, Mapping, Optional

from canal.config import Config
from canal.dataplane.cmd import run as run_cmd
from canal.errors import CanalError
from canal.logs import MASK, Redactor

Run = Callable[[list[str]], str]
_URL_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")


def settings(cfg: Config) -> dict[str, Any]:
    """Every setting, secrets as "(set)"/"" and URL credentials masked."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("secret"):
            out[f.name] = "(set)" if value else ""
        elif isinstance(value, str):
            out[f.name] = _URL_CREDENTIALS.sub(rf"\1{MASK}@", value)
        else:
            out[f.name] = value
    return out


def secret_values(cfg: Config) -> list[str]:
    """The values to scrub from logs and bundles: the etcd password, from the flag or its file."""
    values = [cfg.etcd_password.reveal()]
    try:
        values.append(cfg.etcd_password_value())
    except CanalError:
        pass  # unreadable now: then it cannot leak from here either
    return [v for v in values if v]


def plugin_half(cfg: Config, status: dict[str, Any], records: dict[str, Any],
                log_records: list[dict[str, Any]]) -> dict[str, Any]:
    """What GET /canal/v1/diagnose answers: redacted as a whole before it leaves the plugin."""
    data = {"status": status, "settings": settings(cfg), "records": records, "logs": log_records}
    secrets = secret_values(cfg)
    redact = Redactor(secrets + [json.dumps(v)[1:-1] for v in secrets])  # also as JSON escapes them
    return dict(json.loads(redact(json.dumps(data, default=str))))


def _tool_output(run: Run, argv: list[str]) -> str:
    try:
        return run(argv)
    except (CanalError, OSError) as err:
        return f"# {' '.join(argv)} failed: {err}\n"


def _ours(text: str, marker: str) -> str:
    """iptables-save text cut to table headers, Canal's chains and the jumps to them."""
    keep = [line for line in text.splitlines() if line.startswith(("*", "COMMIT")) or marker in line]
    return "\n".join(keep) + "\n"


def default_run(argv: list[str]) -> str:
    return run_cmd(argv, timeout=20).stdout


def kernel_state(vni: int, run: Run = default_run, backends: tuple[str, ...] = ("nft", "legacy")) -> dict[str, str]:
    """Canal's objects in this host's kernel, one text per file of the bundle."""
    device = f"flannel.{vni}"
    parts: dict[str, str] = {}
    for backend in backends:
        for family in ("iptables", "ip6tables"):
            text = _tool_output(run, [f"{family}-{backend}-save"])
            parts[f"kernel/{family}-{backend}.txt"] = _ours(text, "CANAL")
    sets = _tool_output(run, ["ipset", "save"])
    parts["kernel/ipsets.txt"] = "\n".join(
        line for line in sets.splitlines() if len(line.split()) > 1 and line.split()[1].startswith("canal-")) + "\n"
    parts["kernel/routes-proto101.txt"] = _tool_output(run, ["ip", "route", "show", "proto", "101"])
    parts["kernel/routes-proto102.txt"] = _tool_output(run, ["ip", "route", "show", "proto", "102"])
    parts["kernel/routes.txt"] = _tool_output(run, ["ip", "route", "show", "table", "all"])
    # IPv6: the endpoints' /128s (proto 101), remote ones, every table; proxy NDP entries.
    parts["kernel/routes6-proto101.txt"] = _tool_output(run, ["ip", "-6", "route", "show", "proto", "101"])
    parts["kernel/routes6-proto102.txt"] = _tool_output(run, ["ip", "-6", "route", "show", "proto", "102"])
    parts["kernel/routes6.txt"] = _tool_output(run, ["ip", "-6", "route", "show", "table", "all"])
    parts["kernel/neigh6-proxy.txt"] = _tool_output(run, ["ip", "-6", "neigh", "show", "proxy"])
    parts["kernel/links.txt"] = _tool_output(run, ["ip", "-d", "-o", "link", "show"])
    parts[f"kernel/{device}-neigh.txt"] = _tool_output(run, ["ip", "neigh", "show", "dev", device])
    parts[f"kernel/{device}-fdb.txt"] = _tool_output(run, ["bridge", "fdb", "show", "dev", device])
    return parts


def bundle(parts: Mapping[str, Any], redact: Callable[[str], str], now: Optional[float] = None) -> bytes:
    """The tar.gz: each part (text, or data written as JSON) redacted on its way in."""
    buffer = io.BytesIO()
    stamp = time.time() if now is None else now
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, value in parts.items():
            text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True, default=str)
            data = redact(text).encode()
            info = tarfile.TarInfo(f"canal-diagnose/{name}")
            info.size, info.mtime, info.mode = len(data), int(stamp), 0o600
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
