"""The busybox test image, built from busybox-static without any registry."""

from __future__ import annotations

import functools
import io
import shutil
import tarfile
import time

from ._util import TestbedError

IMAGE = "canal-test/busybox:latest"

#: Applets linked into /bin; enough for ping/nc/wget probes and shell scripts in tests.
APPLETS = ("sh", "ip", "ping", "nc", "wget", "sleep", "cat", "ls", "hostname", "ifconfig",
           "route", "arp", "nslookup", "true", "false", "echo", "grep", "awk", "head", "seq",
           "timeout", "printf")

#: `docker import --change` instructions: a PATH and a shell as default command.
IMAGE_CHANGES = ('ENV PATH=/bin:/sbin:/usr/bin:/usr/sbin', 'CMD ["/bin/sh"]')


@functools.lru_cache(maxsize=1)
def busybox_rootfs_tar() -> bytes:
    """The image's root filesystem as an in-memory tar (built once per process: ~2 MB,
    no temp files to clean up)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    try:
        data = open(busybox, "rb").read()
    except OSError as exc:
        raise TestbedError(f"busybox not found ({exc}); install busybox-static") from exc
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, *, mode: int = 0o755, kind: bytes = tarfile.DIRTYPE,
                payload: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, now
            info.linkname = link
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
        for d in ("bin", "etc", "proc", "sys", "dev", "root", "var", "usr", "usr/bin"):
            add(d)
        add("tmp", mode=0o1777)
        add("bin/busybox", kind=tarfile.REGTYPE, payload=data)
        for applet in APPLETS:
            add(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        add("etc/passwd", kind=tarfile.REGTYPE, mode=0o644,
            payload=b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/group", kind=tarfile.REGTYPE, mode=0o644, payload=b"root:x:0:\n")
    return buf.getvalue()
