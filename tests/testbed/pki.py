"""A throwaway PKI for TLS tests, made with the openssl CLI: files only, in one directory.

A CA with a server certificate (for the given IP addresses) and client certificates (with and
without a Common Name), plus a
second, unrelated CA with its own client certificate (the "other CA" of rejection tests) and
the client key encrypted (etcd clients need unencrypted keys). EC P-256 keys: quick to make.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from testbed._util import TestbedError


def openssl(*args: str, cwd: str) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise TestbedError(f"openssl {' '.join(args)}: {res.stderr}")


class Pki:
    def __init__(self, dir: str, ips: Sequence[str] = ("127.0.0.1",), client_cn: str = "canal") -> None:
        if not shutil.which("openssl"):
            raise TestbedError("the openssl CLI is missing: apt-get install openssl")
        self.dir = str(dir)
        self.ca, self.ca_key = self._ca("canal-test-ca")
        san = ",".join([*(f"IP:{ip}" for ip in ips), "DNS:localhost"])
        # clientAuth too: etcd's gateway dials its own gRPC port with the server certificate.
        self.server_cert, self.server_key = self._leaf(
            "server", ips[0], self.ca, self.ca_key,
            f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth",
        )
        self.client_cert, self.client_key = self._leaf(
            "client", client_cn, self.ca, self.ca_key, "extendedKeyUsage=clientAuth"
        )
        # No Common Name: what etcd's JSON gateway wants once auth is on with --client-cert-auth.
        self.nocn_client_cert, self.nocn_client_key = self._leaf(
            "nocn-client", "", self.ca, self.ca_key, "extendedKeyUsage=clientAuth"
        )
        self.other_ca, other_ca_key = self._ca("canal-test-other-ca")
        self.other_client_cert, self.other_client_key = self._leaf(
            "other-client", client_cn, self.other_ca, other_ca_key, "extendedKeyUsage=clientAuth"
        )
        self.encrypted_key = os.path.join(self.dir, "client-encrypted.key")
        openssl("pkey", "-in", self.client_key, "-aes256", "-passout", "pass:secret-passphrase",
                "-out", self.encrypted_key, cwd=self.dir)

    def _ca(self, name: str) -> tuple[str, str]:
        crt, key = os.path.join(self.dir, f"{name}.crt"), os.path.join(self.dir, f"{name}.key")
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN={name}", cwd=self.dir)
        return crt, key

    def _leaf(self, name: str, cn: str, ca: str, ca_key: str, extensions: str) -> tuple[str, str]:
        crt, key = os.path.join(self.dir, f"{name}.crt"), os.path.join(self.dir, f"{name}.key")
        csr, ext = os.path.join(self.dir, f"{name}.csr"), os.path.join(self.dir, f"{name}.ext")
        with open(ext, "w") as handle:
            handle.write(extensions + "\n")
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", key, "-out", csr, "-subj", f"/CN={cn}" if cn else "/O=canal", cwd=self.dir)
        openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                "-out", crt, "-days", "2", "-extfile", ext, cwd=self.dir)
        return crt, key
