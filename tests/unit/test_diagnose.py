"""`canal diagnose`: the bundle holds what a bug report needs and no credential.

The etcd password (given as a flag value and, separately, in a password file) and the TLS
client key are planted everywhere a careless implementation would carry them: a log line, an
exception, the status's last error, a record. The whole tarball, decompressed, is then
searched for them. Positive control: the same search finds the password when it is planted in
a bundle without redaction, so the test can fail."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile

import pytest

from canal import config, diagnose, logs
from canal.cli import main as cli

PASSWORD = 'Pa55-"never"-in-a-bundle'
FILE_PASSWORD = "file-pa55word-never-shown"
KEY_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7secretkeybody"
KEY = f"-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers = handlers
    root.setLevel(level)


def kernel(argv, **_kw):
    return {"iptables-nft-save": "*filter\n:CANAL-FW-abc - [0:0]\n:DOCKER - [0:0]\n-A FORWARD -j CANAL-FORWARD\n"
            "-A DOCKER -j ACCEPT\nCOMMIT\n",
            "ipset": "create canal-nets hash:net family inet\nadd canal-nets 100.64.0.0/16\ncreate other hash:ip\n",
            }.get(argv[0], f"output of {' '.join(argv)}\n")


NEEDLES = (PASSWORD, json.dumps(PASSWORD)[1:-1], FILE_PASSWORD, KEY_BODY, "urlpass")


def leaks(text: str) -> list[str]:
    """The credentials found in text: the one search both tests use."""
    return [n for n in NEEDLES if n in text]


def members(blob: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def configs(tmp_path):
    key = tmp_path / "client.key"
    key.write_text(KEY)
    cert = tmp_path / "client.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIcert\n-----END CERTIFICATE-----\n")
    ca = tmp_path / "ca.crt"
    ca.write_text(cert.read_text())
    pwfile = tmp_path / "pw"
    pwfile.write_text(FILE_PASSWORD + "\n")
    common = {"datastore": "etcd", "etcd_endpoints": "https://user:urlpass@198.18.0.250:2379",
              "etcd_cafile": str(ca), "etcd_certfile": str(cert), "etcd_keyfile": str(key), "etcd_username": "canal"}
    return (config.load({**common, "etcd_password": PASSWORD}, {}),
            config.load({**common, "etcd_password_file": str(pwfile)}, {}))


def make_bundle(cfg, tmp_path, monkeypatch, secret):
    """The plugin's half as the plugin serves it, the CLI's kernel half, written by the CLI."""
    logs.setup("INFO", "json", diagnose.secret_values(cfg), stream=io.StringIO())
    log = logging.getLogger("canal.test")
    log.warning("etcd refused user canal with password %s", secret)
    log.info("client key read: %s", KEY)
    try:
        raise RuntimeError(f"auth {secret}")
    except RuntimeError:
        log.exception("failed")
    status = {"host": "h1", "last_error": f"Unavailable: bad password {secret}", "health": "unhealthy"}
    records = {"host": {"name": "h1", "note": secret}, "endpoints": {}}
    served = diagnose.plugin_half(cfg, status, records, logs.RING.records())

    class Client:
        def __init__(self, path):
            pass

        def get(self, path):
            assert path == "/canal/v1/diagnose"
            return json.loads(json.dumps(served))  # as it crosses the socket

    monkeypatch.setattr(cli, "AdminClient", Client)
    monkeypatch.setattr(diagnose, "default_run", kernel)
    monkeypatch.setattr(diagnose, "kernel_state", lambda vni: diagnose.__dict__["_kernel"](vni))
    out = tmp_path / "bundle.tar.gz"
    assert cli._diagnose("/nonexistent.sock", str(out), 1) == 0
    return out.read_bytes()


@pytest.fixture(autouse=True)
def fake_kernel(monkeypatch):
    original = diagnose.kernel_state
    monkeypatch.setattr(diagnose, "_kernel", lambda vni: original(vni, run=kernel), raising=False)


def test_bundle_contents_and_no_credential(tmp_path, monkeypatch, restore_root):
    for cfg, secret in zip(configs(tmp_path), (PASSWORD, FILE_PASSWORD)):
        blob = make_bundle(cfg, tmp_path, monkeypatch, secret)
        files = members(blob)
        names = {n.split("/", 1)[1] for n in files}
        assert {"status.json", "settings.json", "records.json", "logs.jsonl", "kernel/ipsets.txt",
                "kernel/iptables-nft.txt", "kernel/routes-proto101.txt", "kernel/flannel.1-fdb.txt",
                "kernel/flannel.1-neigh.txt", "kernel/routes6-proto101.txt", "kernel/routes6.txt",
                "kernel/neigh6-proxy.txt", "kernel/ip6tables-nft.txt"} <= names
        everything = gzip.decompress(blob).decode(errors="replace")  # the raw tar stream, headers too
        assert leaks(everything) == []
        settings = json.loads(files["canal-diagnose/settings.json"])
        assert settings["etcd_password"] in ("(set)", "")
        assert settings["etcd_keyfile"].endswith("client.key")  # the path, never the content
        assert "***@198.18.0.250" in settings["etcd_endpoints"]
        # what a bug report needs is there
        assert "CANAL-FW-abc" in files["canal-diagnose/kernel/iptables-nft.txt"]
        assert "DOCKER -j ACCEPT" not in files["canal-diagnose/kernel/iptables-nft.txt"]
        assert "canal-nets" in files["canal-diagnose/kernel/ipsets.txt"]
        assert "other" not in files["canal-diagnose/kernel/ipsets.txt"]
        assert "etcd refused user canal" in files["canal-diagnose/logs.jsonl"]
        assert json.loads(files["canal-diagnose/status.json"])["host"] == "h1"


def test_positive_control_the_search_finds_a_planted_password():
    """Without redaction the same search finds each credential planted in a bundle."""
    parts = {"status.json": {"last_error": f"bad password {PASSWORD}"}, "logs.jsonl": f"{FILE_PASSWORD} {KEY}",
             "settings.json": "https://user:urlpass@x"}
    everything = gzip.decompress(diagnose.bundle(parts, lambda text: text)).decode(errors="replace")
    assert sorted(leaks(everything)) == sorted(set(NEEDLES) - {PASSWORD})  # JSON escapes its quotes
    assert PASSWORD in gzip.decompress(diagnose.bundle({"a": PASSWORD}, lambda text: text)).decode()


def test_plugin_unreachable_still_gives_the_kernel_half(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(diagnose, "kernel_state", lambda vni: diagnose.__dict__["_kernel"](vni))
    out = tmp_path / "b.tar.gz"
    assert cli._diagnose(str(tmp_path / "no.sock"), str(out), 1) == 0
    # Progress on stderr, step by step; stdout is only the bundle's path, for scripts.
    printed = capsys.readouterr()
    assert printed.out == f"{out}\n"
    assert "the plugin does not answer" in printed.err and "reading the kernel's state" in printed.err
    files = members(out.read_bytes())
    assert "cannot reach the canal plugin" in files["canal-diagnose/plugin-unreachable.txt"]
    assert "canal-diagnose/kernel/ipsets.txt" in files
