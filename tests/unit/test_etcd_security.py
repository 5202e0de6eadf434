"""etcd over TLS (client certificates) and with etcd's own auth, against real etcd servers.

Each server is started by the test on 127.0.0.1 with a PKI made by the openssl CLI (see the
`pki` fixture): one serving https with --client-cert-auth, one with auth enabled (root and a
`canal` user limited to Canal's prefixes) and a 1 s --auth-token-ttl so token expiry happens
within a test. Every refusal test has its positive control: the same server accepts the right
settings, so the refusal comes from the protection, not from a broken bed.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import requests
from canal.config import Config, Secret
from canal.datastore.base import Delete, Guard, Put, open_datastore
from canal.datastore.etcd import EtcdAccessDenied, EtcdDatastore
from canal.errors import BadRequest, Unavailable
from etcd_support import EtcdServer, free_ports, start_etcd
from testbed.pki import Pki

PASSWORD = "s3cret-Pa55-never-logged"
PREFIXES = ["/canal/v1", "/coreos.com/network"]
TOKEN_TTL = 1  # seconds: etcd's simple tokens expire this long after their last use


@pytest.fixture(scope="module")
def tls_etcd(pki: Pki):
    server = start_etcd("canal-tls", pki=pki, client_cert_auth=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def auth_etcd():
    server = start_etcd("canal-auth", extra_args=("--auth-token-ttl", str(TOKEN_TTL)))
    server.enable_auth("root-" + PASSWORD, {"canal": (PASSWORD, PREFIXES), "outsider": (PASSWORD, ["/elsewhere/"])})
    yield server
    server.close()


def tls_store(server: EtcdServer, pki: Pki, **overrides) -> EtcdDatastore:
    settings = {"cafile": pki.ca, "certfile": pki.client_cert, "keyfile": pki.client_key, **overrides}
    return EtcdDatastore(server.endpoint, timeout=3, **settings)


def contract_subset(store: EtcdDatastore, prefix: str) -> None:
    """put/get/txn/watch/lease through the store: every call etcd must accept."""
    _, start = store.list(prefix)
    assert store.create(prefix + "/a", {"n": 1})
    assert not store.create(prefix + "/a", {"n": 2})  # guarded: absent only
    entry = store.get(prefix + "/a")
    assert entry is not None and entry.json() == {"n": 1}
    assert store.txn([Guard(prefix + "/a", entry.mod_revision)], [Put(prefix + "/a", '{"n":3}'), Put(prefix + "/b", "{}")])
    lease = store.grant(30)
    assert store.keepalive(lease)
    store.put(prefix + "/leased", {"x": 1}, lease=lease)
    assert store.get(prefix + "/leased").lease == lease
    store.revoke(lease)
    assert store.get(prefix + "/leased") is None
    store.txn([], [Delete(prefix + "/b")])
    result = store.watch(prefix + "/", start + 1, timeout=5)
    kinds = [(e.kind, e.key) for e in result.events]
    assert ("put", prefix + "/a") in kinds and ("delete", prefix + "/b") in kinds, kinds
    entries, _ = store.list(prefix + "/")
    assert [e.key for e in entries] == [prefix + "/a"]
    store.delete(prefix + "/a")


# ------------------------------------------------------------------------------ TLS


def test_tls_with_the_right_certificates_serves_the_datastore_contract(tls_etcd, pki):
    store = tls_store(tls_etcd, pki)
    try:
        store.check(PREFIXES)
        contract_subset(store, "/canal/v1/tls")
    finally:
        store.close()


def test_open_datastore_takes_the_tls_settings_from_the_config(tls_etcd, pki):
    cfg = Config(datastore="etcd", etcd_endpoints=tls_etcd.endpoint, etcd_cafile=pki.ca,
                 etcd_certfile=pki.client_cert, etcd_keyfile=pki.client_key)
    store = open_datastore(cfg)
    try:
        assert store.create("/canal/v1/opened", 1) and store.get("/canal/v1/opened") is not None
        store.delete("/canal/v1/opened")
    finally:
        store.close()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # the control's
def test_wrong_ca_is_refused_naming_cafile(tls_etcd, pki):
    store = tls_store(tls_etcd, pki, cafile=pki.other_ca)
    try:
        with pytest.raises(EtcdAccessDenied, match="--etcd-cafile") as err:
            store.check(PREFIXES)
        assert "not trusted" in str(err.value)
        # At run time the same failure is an outage of that endpoint, named the same way.
        with pytest.raises(Unavailable, match="--etcd-cafile"):
            store.get("/canal/v1/x")
    finally:
        store.close()
    # Positive control: the server answers the same client when it does not verify.
    resp = requests.post(tls_etcd.endpoint + "/v3/kv/range", json={"key": "eA=="}, timeout=5,
                         verify=False, cert=(pki.client_cert, pki.client_key))
    assert resp.status_code == 200


def test_missing_client_certificate_is_refused_naming_certfile(tls_etcd, pki):
    store = tls_store(tls_etcd, pki, certfile="", keyfile="")
    try:
        with pytest.raises(EtcdAccessDenied, match="--etcd-certfile"):
            store.check(PREFIXES)
    finally:
        store.close()
    # Positive control: a TLS etcd without --client-cert-auth takes the same client.
    lax = start_etcd("canal-tls-lax", pki=pki, client_cert_auth=False)
    try:
        store = EtcdDatastore(lax.endpoint, timeout=3, cafile=pki.ca)
        store.check(PREFIXES)
        assert store.get("/canal/v1/x") is None
        store.close()
    finally:
        lax.close()


def test_client_certificate_of_another_ca_is_refused_naming_certfile(tls_etcd, pki):
    store = tls_store(tls_etcd, pki, certfile=pki.other_client_cert, keyfile=pki.other_client_key)
    try:
        with pytest.raises(EtcdAccessDenied, match="--etcd-certfile") as err:
            store.check(PREFIXES)
        assert "refused our client certificate" in str(err.value)
    finally:
        store.close()


def test_plain_http_against_the_tls_etcd_fails(tls_etcd, pki):
    """Positive control of the whole TLS setup: without TLS nothing gets through."""
    plain = tls_etcd.endpoint.replace("https://", "http://")
    with pytest.raises(requests.ConnectionError):  # etcd hangs up on it
        requests.post(plain + "/v3/kv/range", json={"key": "eA=="}, timeout=5)
    store = EtcdDatastore(plain, timeout=3)
    try:
        with pytest.raises(EtcdAccessDenied, match="https://"):
            store.check(PREFIXES)
        with pytest.raises(Unavailable):
            store.get("/canal/v1/x")
    finally:
        store.close()


def test_https_against_a_plain_etcd_is_refused_naming_endpoints(make_etcd, pki):
    plain = make_etcd()
    store = EtcdDatastore(plain.endpoint.replace("http://", "https://"), timeout=3, cafile=pki.ca)
    try:
        with pytest.raises(EtcdAccessDenied, match="--etcd-endpoints"):
            store.check(PREFIXES)
    finally:
        store.close()


def test_unreachable_tls_etcd_does_not_refuse_the_start(pki, caplog):
    (port,) = free_ports(1)  # nothing listens there
    store = EtcdDatastore(f"https://127.0.0.1:{port}", timeout=2, cafile=pki.ca,
                          certfile=pki.client_cert, keyfile=pki.client_key)
    try:
        with caplog.at_level(logging.WARNING):
            store.check(PREFIXES)  # no exception: the plugin starts and retries
        assert "starting anyway" in caplog.text
        with pytest.raises(Unavailable):
            store.get("/canal/v1/x")
    finally:
        store.close()


def test_unreachable_endpoint_beside_a_refusing_one_still_refuses(tls_etcd, pki):
    (port,) = free_ports(1)
    store = EtcdDatastore(f"https://127.0.0.1:{port},{tls_etcd.endpoint}", timeout=2, cafile=pki.other_ca,
                          certfile=pki.client_cert, keyfile=pki.client_key)
    try:
        with pytest.raises(EtcdAccessDenied, match="--etcd-cafile"):
            store.check(PREFIXES)
    finally:
        store.close()


def test_encrypted_or_mismatched_key_is_refused_at_construction(pki):
    with pytest.raises(BadRequest, match="--etcd-keyfile .* encrypted"):
        EtcdDatastore("https://127.0.0.1:1", cafile=pki.ca, certfile=pki.client_cert, keyfile=pki.encrypted_key)
    with pytest.raises(BadRequest, match="--etcd-certfile .* matching key"):
        EtcdDatastore("https://127.0.0.1:1", cafile=pki.ca, certfile=pki.client_cert, keyfile=pki.server_key)
    with pytest.raises(BadRequest, match="--etcd-cafile"):
        EtcdDatastore("https://127.0.0.1:1", cafile=pki.client_key)
    # Positive control: the unencrypted, matching pair loads.
    EtcdDatastore("https://127.0.0.1:1", cafile=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key).close()


# ------------------------------------------------------------------------------ auth


def auth_store(server: EtcdServer, password: str = PASSWORD, user: str = "canal") -> EtcdDatastore:
    return EtcdDatastore(server.endpoint, timeout=3, username=user, password=Secret(password))


def test_auth_with_the_right_password_serves_the_datastore_contract(auth_etcd):
    store = auth_store(auth_etcd)
    try:
        store.check(PREFIXES)
        contract_subset(store, "/canal/v1/auth")
    finally:
        store.close()


def test_wrong_password_is_refused_naming_the_settings(auth_etcd, caplog):
    store = auth_store(auth_etcd, password="not-" + PASSWORD)
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(EtcdAccessDenied) as err:
            store.check(PREFIXES)
        assert "--etcd-username" in str(err.value) and "--etcd-password" in str(err.value)
        assert PASSWORD not in str(err.value) and PASSWORD not in caplog.text
        with pytest.raises(EtcdAccessDenied):  # and at run time, permanently
            store.get("/canal/v1/x")
    finally:
        store.close()


def test_no_credentials_against_an_auth_etcd_is_refused_naming_username(auth_etcd):
    store = EtcdDatastore(auth_etcd.endpoint, timeout=3)
    try:
        with pytest.raises(EtcdAccessDenied, match="--etcd-username"):
            store.check(PREFIXES)
    finally:
        store.close()


def test_user_without_permission_on_the_prefixes_is_refused(auth_etcd):
    store = auth_store(auth_etcd, user="outsider")
    try:
        with pytest.raises(EtcdAccessDenied, match="may not read /canal/v1"):
            store.check(PREFIXES)
    finally:
        store.close()


def test_expired_token_is_renewed_for_reads_txns_watches_and_leases(auth_etcd, caplog):
    store = auth_store(auth_etcd)
    try:
        _, start = store.list("/canal/v1/ttl/")
        first = store._current_token()
        time.sleep(TOKEN_TTL + 2.5)  # etcd drops simple tokens unused for --auth-token-ttl
        # Positive control: etcd really refuses the old token now.
        stale = requests.post(auth_etcd.endpoint + "/v3/kv/range", json={"key": "eA=="},
                              headers={"Authorization": first}, timeout=5)
        assert stale.status_code != 200 and "invalid auth token" in stale.text
        with caplog.at_level(logging.DEBUG, logger="canal.datastore.etcd"):
            assert store.create("/canal/v1/ttl/a", 1)  # a txn: refused before applying, retried
        assert store._current_token() != first
        assert "authenticated as canal" in caplog.text
        entry = store.get("/canal/v1/ttl/a")
        assert entry is not None and entry.create_revision == entry.mod_revision  # applied once
        time.sleep(TOKEN_TTL + 2.5)
        result = store.watch("/canal/v1/ttl/", start + 1, timeout=5)
        assert [e.key for e in result.events] == ["/canal/v1/ttl/a"]
        time.sleep(TOKEN_TTL + 2.5)
        lease = store.grant(30)
        time.sleep(TOKEN_TTL + 2.5)
        assert store.keepalive(lease)
        store.revoke(lease)
        store.delete("/canal/v1/ttl/a")
    finally:
        store.close()


def test_a_waiting_watch_gets_events_written_after_its_token_expired(auth_etcd):
    """A watch created with a valid token keeps streaming: etcd checks the token at creation."""
    store = auth_store(auth_etcd)
    writer = auth_store(auth_etcd)
    try:
        _, start = store.list("/canal/v1/long/")
        timer = threading.Timer(TOKEN_TTL + 2.5, lambda: writer.put("/canal/v1/long/k", 1))
        timer.start()
        try:
            result = store.watch("/canal/v1/long/", start + 1, timeout=15)
        finally:
            timer.join()
        assert [e.key for e in result.events] == ["/canal/v1/long/k"]
        store.delete("/canal/v1/long/k")
    finally:
        store.close()
        writer.close()


def test_password_never_in_logs_repr_or_errors(auth_etcd, caplog):
    cfg = Config(datastore="etcd", etcd_endpoints=auth_etcd.endpoint, etcd_username="canal",
                 etcd_password=Secret(PASSWORD))
    with caplog.at_level(logging.DEBUG):
        store = open_datastore(cfg)
        try:
            contract_subset(store, "/canal/v1/secret")
            shown = [repr(cfg), str(cfg), repr(store), repr(cfg.etcd_password), f"{cfg.etcd_password}"]
        finally:
            store.close()
        bad = Config(datastore="etcd", etcd_endpoints=auth_etcd.endpoint, etcd_username="canal",
                     etcd_password=Secret(PASSWORD + "x"))
        with pytest.raises(EtcdAccessDenied) as refused:
            open_datastore(bad)
        shown += [str(refused.value), repr(bad)]
    for text in [*shown, caplog.text]:
        assert PASSWORD not in text
    # Positive control: the checks above would see it; the value is really in there.
    assert cfg.etcd_password.reveal() == PASSWORD
    logging.getLogger("canal.test").warning("leak %s", cfg.etcd_password.reveal())
    assert PASSWORD in caplog.text


def test_password_file_is_read_and_used(auth_etcd, tmp_path):
    path = tmp_path / "etcd-password"
    path.write_text(PASSWORD + "\n")  # the trailing newline of `echo` is no part of it
    path.chmod(0o600)
    cfg = Config(datastore="etcd", etcd_endpoints=auth_etcd.endpoint, etcd_username="canal",
                 etcd_password_file=str(path))
    store = open_datastore(cfg)
    try:
        assert store.get("/canal/v1/nothing") is None
    finally:
        store.close()


def test_credentials_work_before_and_after_etcd_turns_auth_on(make_etcd, caplog):
    """Credentials given while etcd has auth off are not an error (calls go without a token);
    once an operator enables auth, the next call authenticates by itself."""
    server = make_etcd()
    store = auth_store(server)
    try:
        with caplog.at_level(logging.WARNING):
            store.check(PREFIXES)
            assert store.create("/canal/v1/before", 1)
        assert "auth is not enabled" in caplog.text
        server.enable_auth("root-" + PASSWORD, {"canal": (PASSWORD, PREFIXES)})
        # Positive control: etcd now refuses calls without a token.
        anonymous = EtcdDatastore(server.endpoint, timeout=3)
        with pytest.raises(EtcdAccessDenied, match="--etcd-username"):
            anonymous.check(PREFIXES)
        anonymous.close()
        assert store.get("/canal/v1/before").json() == 1
        assert store.create("/canal/v1/after", 2)
    finally:
        store.close()


def test_tls_and_auth_together_need_a_client_certificate_without_common_name(pki):
    """etcd's JSON gateway refuses a client certificate with a Common Name once auth is on
    (with --client-cert-auth): refused at start with what to do; a CN-less one works."""
    server = start_etcd("canal-tls-auth", pki=pki, client_cert_auth=True)
    try:
        server.enable_auth("root-" + PASSWORD, {"canal": (PASSWORD, PREFIXES)})
        with_cn = tls_store(server, pki, username="canal", password=PASSWORD)
        try:
            with pytest.raises(EtcdAccessDenied, match="--etcd-certfile without a CN"):
                with_cn.check(PREFIXES)
        finally:
            with_cn.close()
        store = tls_store(server, pki, certfile=pki.nocn_client_cert, keyfile=pki.nocn_client_key,
                          username="canal", password=PASSWORD)
        try:
            store.check(PREFIXES)
            contract_subset(store, "/canal/v1/both")
        finally:
            store.close()
        # Positive control: the same certificate without the password is refused by RBAC.
        anonymous = tls_store(server, pki, certfile=pki.nocn_client_cert, keyfile=pki.nocn_client_key)
        try:
            with pytest.raises(EtcdAccessDenied, match="--etcd-username"):
                anonymous.check(PREFIXES)
        finally:
            anonymous.close()
    finally:
        server.close()


def test_threads_refused_together_share_one_new_token(auth_etcd, caplog):
    """Eight threads meet the expired token at once: one authenticates, all succeed."""
    store = auth_store(auth_etcd)
    try:
        assert store.get("/canal/v1/shared") is None
        time.sleep(TOKEN_TTL + 2.5)
        results: list = []
        errors: list = []

        def read() -> None:
            try:
                results.append(store.get("/canal/v1/shared"))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        with caplog.at_level(logging.DEBUG, logger="canal.datastore.etcd"):
            threads = [threading.Thread(target=read) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert not errors and results == [None] * 8
        assert caplog.text.count("authenticated as canal") == 1
    finally:
        store.close()
