"""etcd backend: the Datastore interface mapped 1:1 onto etcd's v3 API via its JSON gateway.

Client: plain `requests` against the v3 JSON gateway (/v3/kv/range, /v3/kv/txn, /v3/lease/*,
/v3/watch), not etcd3gw. etcd3gw speaks the same gateway but hides exactly what this
interface needs: its reads drop the header revision (`list` must return it), its watch is an
unbounded background thread per watcher that never reports compaction (`watch` here is a
bounded long-poll that must), it knows a single endpoint (no failover) and raises its own
exception family. The gateway's JSON is small and stable, so speaking it directly is less
code than working around etcd3gw, and still needs no grpc/protobuf pinning. Needs etcd >= 3.4
(the `/v3` path; 3.3 served it as `/v3beta`).

Failure model: every HTTP request carries the configured timeout (connect and read), and
refused connections, timeouts, 5xx/429 answers and garbage become `Unavailable` naming the
endpoint and the operation. With several endpoints a call moves on to the next one and later
calls start from the one that last worked; nothing is marked dead, so the store recovers by
itself when etcd comes back. One exception: a `txn` that may have reached etcd (the request
was sent, then the answer timed out or was a 5xx) is NOT retried elsewhere, because a guarded
txn replayed after it succeeded reports False ("someone else won") and callers would act on a
lie (double increments, leaked allocations); it raises `Unavailable` saying the outcome is
unknown, and the caller's next read shows the truth.

Security (flanneld's settings): TLS through requests (`verify` = --etcd-cafile, `cert` =
--etcd-certfile + --etcd-keyfile, https:// endpoints), and etcd's own auth through the gateway:
`/v3/auth/authenticate` gives a token, sent as the `Authorization` header on every call,
watches included. A call etcd refuses because the token is invalid (a simple token expires
after etcd's --auth-token-ttl unused) or because the auth store changed under it was refused
before anything was applied, so it is re-authenticated once and retried, txns included. With
--client-cert-auth and auth both on, etcd's gateway refuses client certificates that carry a
Common Name (embed/serve.go): `check()` says so. `check()` runs at start and tells a setting etcd will never
accept (EtcdAccessDenied, naming the setting) from an etcd that is merely down (a warning:
the plugin retries, as before). The password and the token never reach a log or a message.

etcd's own timing shows through, and callers should expect it: expired leases are revoked by
a 500 ms loop (keys outlive their TTL by up to ~0.5 s), and history older than "now" reaches a
watch through etcd's 100 ms watcher-sync loop. A watch already waiting on an etcd that then
hangs (not dies) just runs out the caller's timeout, empty; the next call fails fast.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import requests
import urllib3.exceptions

from canal import metrics
from canal.config import Secret
from canal.datastore.base import (
    Datastore,
    Delete,
    Entry,
    Event,
    Guard,
    Op,
    Put,
    WatchResult,
)
from canal.errors import BadRequest, CanalError, Unavailable

log = logging.getLogger(__name__)

LIST_PAGE = 5000  # keys per range request of a list (a few MB of records at most)
GRPC_NOT_FOUND = 5  # what the gateway reports for an unknown/expired lease
GRPC_PERMISSION_DENIED = 7
#: etcd's answers to a call whose token it no longer accepts; nothing was applied, so the call
#: is retried once with a fresh token. "user name is empty": no token at all (auth enabled
#: after we authenticated, or auth not enabled then).
TOKEN_REFUSED = ("invalid auth token", "revision of auth store is old", "user name is empty")
AUTH_FAILED = "authentication failed"
AUTH_NOT_ENABLED = "authentication is not enabled"


class EtcdRejected(CanalError):
    """etcd understood the request and refused it (4xx): retrying the same call cannot help."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class EtcdAccessDenied(BadRequest):
    """etcd refuses who we are (TLS or user/password) or we refuse etcd's certificate.

    Permanent until a setting changes, so `canal serve` refuses to start with it; the
    message names the setting to fix, never the password.
    """


class _TokenRefused(Exception):
    """A watch refused for its token (internal: watch() re-authenticates once)."""


class _Failed(Exception):
    """One endpoint failed one request; `sent` says whether etcd may have acted on it.

    `tls` is set when the failure was TLS refusing the connection (wrong CA, rejected client
    certificate, https spoken to plain http): a configuration problem, not an outage.
    """

    def __init__(self, reason: str, sent: bool, verb: str = "unreachable", tls: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.verb = verb
        self.tls = tls


def _b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode("utf-8", errors="replace")  # foreign binary values


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """(key, range_end) covering every key that starts with prefix, as etcd's clients do."""
    start = prefix.encode("utf-8") or b"\0"  # etcd refuses an empty key; "\0".."\0" is all keys
    end = bytearray(prefix.encode("utf-8"))
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return start, b"\0"
    end[-1] += 1
    return start, bytes(end)


def _chain(err: BaseException) -> list[BaseException]:
    """Everything err wraps: requests -> MaxRetryError -> SSLError/NewConnectionError -> OSError."""
    chain: list[BaseException] = []
    stack: list[Any] = [err]
    while stack:
        cur = stack.pop()
        if isinstance(cur, BaseException) and all(cur is not c for c in chain):
            chain.append(cur)
            stack.extend([getattr(cur, "reason", None), cur.__cause__, cur.__context__, *cur.args])
    return chain


#: OpenSSL reasons of a TLS alert by which the server refuses our client certificate.
_CLIENT_CERT_REFUSED = ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", "BAD_CERTIFICATE", "UNKNOWN_CA",
                        "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_EXPIRED",
                        "CERTIFICATE_REVOKED", "ACCESS_DENIED", "DECRYPT_ERROR")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL")


def _tls_problem(err: BaseException, client_cert: bool) -> str | None:
    """What TLS refused, naming the setting to fix; None if err is not a TLS failure."""
    chain = _chain(err)
    for cur in chain:
        if isinstance(cur, ssl.SSLCertVerificationError):
            why = cur.verify_message or cur.reason or "not verified"
            return f"etcd's server certificate is not trusted ({why}): check --etcd-cafile"
    for cur in chain:
        if isinstance(cur, ssl.SSLError):
            reason = str(cur.reason or "").upper() or str(cur)[:100]
            if any(r in reason for r in _CLIENT_CERT_REFUSED):
                if client_cert:
                    return f"etcd refused our client certificate ({reason}): check --etcd-certfile/--etcd-keyfile"
                return (f"etcd requires a client certificate ({reason}): set --etcd-certfile and "
                        "--etcd-keyfile")
            if any(r in reason for r in _NOT_TLS):
                return f"the endpoint does not speak TLS ({reason}): check --etcd-endpoints"
            return f"TLS failed ({reason}): check --etcd-cafile, --etcd-certfile and --etcd-keyfile"
    return None


def _reason(err: BaseException, timeout: float) -> str:
    """A one-line cause: requests' own messages are nested reprs several hundred chars long."""
    chain = _chain(err)
    refused = (urllib3.exceptions.NewConnectionError, ConnectionError)
    if any(isinstance(c, refused) for c in chain):
        pass  # a refused/reset connection is not a timeout, whatever its class hierarchy says
    elif any(isinstance(c, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)) for c in chain):
        return f"no connection within {timeout:g} s"
    elif any(
        isinstance(c, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError))
        for c in chain
    ):
        return f"no answer within {timeout:g} s"
    for cur in chain:
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror  # "Connection refused", "Name or service not known", ...
    return f"{type(err).__name__}: {str(err)[:200]}"


def _never_sent(err: requests.RequestException) -> bool:
    """True when the connection was never established, so etcd cannot have seen the request."""
    if isinstance(err, requests.ConnectTimeout):
        return True
    inner = err.args[0] if err.args else None
    reason = getattr(inner, "reason", inner)
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _error_text(error: Any) -> str:
    """The gateway reports errors inside streams as a string or as {"message": ...}."""
    return str(error.get("message") or error) if isinstance(error, dict) else str(error)


def _int(value: Any) -> int:
    return int(value or 0)  # the gateway writes int64 as strings and omits zeros


def _token_refused(err: EtcdRejected) -> bool:
    return any(t in str(err) for t in TOKEN_REFUSED)


def _check_tls_files(cafile: str, certfile: str, keyfile: str) -> None:
    """Load the files as TLS will, now: a wrong file or an encrypted key is a setting error
    at start, not an opaque failure of every call (OpenSSL would even prompt for a passphrase)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (ssl.SSLError, OSError) as err:
            raise BadRequest(f"--etcd-cafile {cafile}: not a PEM CA certificate ({err})") from None
    if certfile:
        def no_passphrase() -> bytes:
            raise BadRequest(f"--etcd-keyfile {keyfile}: the key is encrypted; etcd clients need an unencrypted key")

        try:
            ctx.load_cert_chain(certfile, keyfile, password=no_passphrase)
        except (ssl.SSLError, OSError) as err:
            raise BadRequest(
                f"--etcd-certfile {certfile} / --etcd-keyfile {keyfile}: not a PEM certificate and its "
                f"matching key ({getattr(err, 'reason', None) or err})"
            ) from None


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(
        key=_unb64(kv["key"]),
        value=_unb64(kv.get("value")),
        mod_revision=_int(kv.get("mod_revision")),
        create_revision=_int(kv.get("create_revision")),
        lease=_int(kv.get("lease")),
    )


class EtcdDatastore(Datastore):
    """Thread-safe: one shared requests.Session (urllib3's pool is thread-safe and etcd sets no
    cookies), so threads that come and go do not each leak a connection pool."""

    metrics_backend = "etcd"

    def __init__(
        self,
        endpoints: str,
        timeout: float = 5.0,
        *,
        cafile: str = "",
        certfile: str = "",
        keyfile: str = "",
        username: str = "",
        password: str | Secret = "",
    ):
        self.endpoints = [e.strip().rstrip("/") for e in endpoints.split(",") if e.strip()]
        if not self.endpoints:
            raise BadRequest(f"no etcd endpoint in {endpoints!r}")
        if timeout <= 0:
            raise BadRequest(f"etcd timeout must be positive, not {timeout}")
        if bool(certfile) != bool(keyfile):
            raise BadRequest("--etcd-certfile and --etcd-keyfile go together, or neither")
        self._password = password if isinstance(password, Secret) else Secret(password)
        if bool(username) != bool(self._password):
            raise BadRequest("--etcd-username and its password go together, or neither")
        self.timeout = float(timeout)
        self.username = username
        self.cert = (certfile, keyfile) if certfile else None
        self.cafile = cafile
        _check_tls_files(cafile, certfile, keyfile)
        self._lock = threading.Lock()
        self._preferred = 0  # index of the endpoint that last worked
        self._auth_lock = threading.Lock()
        self._token: str | None = None  # None: not authenticated yet, or auth is off in etcd
        self._authenticated = False  # True once etcd answered (with a token or "auth is off")
        self._session = requests.Session()
        # etcd is cluster-internal: an HTTP(S)_PROXY inherited from the host must not capture
        # its traffic (nor .netrc add credentials). A private CA can still come from the env.
        self._session.trust_env = False
        self._session.verify = (
            cafile or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or True
        )
        if self.cert:
            self._session.cert = self.cert
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=len(self.endpoints), pool_maxsize=64, max_retries=0
        )
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if username and any(e.startswith("http://") for e in self.endpoints):
            log.warning(
                "etcd user %s authenticates over plain http (%s): the password crosses the network "
                "in clear; use https:// endpoints", username, ",".join(self.endpoints),
            )

    def __repr__(self) -> str:
        auth = f", user={self.username!r}" if self.username else ""
        tls = ", client-cert" if self.cert else ""
        return f"EtcdDatastore({','.join(self.endpoints)!r}{tls}{auth})"

    # Transport ----------------------------------------------------------------------------

    def _rotation(self) -> list[int]:
        with self._lock:
            first = self._preferred
        n = len(self.endpoints)
        return [(first + i) % n for i in range(n)]

    def _worked(self, index: int) -> None:
        with self._lock:
            self._preferred = index

    def _broke(self, index: int) -> None:
        with self._lock:
            if self._preferred == index:  # don't skip past a healthy one another thread found
                self._preferred = (index + 1) % len(self.endpoints)

    def _failure(self, err: BaseException, sent: bool) -> _Failed:
        tls = _tls_problem(err, client_cert=self.cert is not None)
        return _Failed(tls or _reason(err, self.timeout), sent=sent, verb="TLS failed" if tls else "unreachable",
                       tls=tls)

    def _check(self, resp: requests.Response, endpoint: str, op: str) -> None:
        """Raise for a non-200 answer: 5xx/429 are etcd being unwell, other codes a refusal."""
        if resp.status_code == 200:
            return
        try:
            body = resp.json()
            message, code = body.get("message") or body.get("error") or "", _int(body.get("code"))
        except (ValueError, AttributeError):
            body, message, code = None, resp.text[:200].strip(), 0
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Failed(f"HTTP {resp.status_code}: {message}", sent=True, verb="unavailable")
        if not isinstance(body, dict) or not message:
            tls = None
            if "HTTP request to an HTTPS server" in str(message):
                tls = "etcd serves https here: use https:// in --etcd-endpoints (and --etcd-cafile)"
            elif "CommonName of client" in str(message):
                # etcd's guard (embed/serve.go): with --client-cert-auth and auth enabled, its
                # JSON gateway refuses any client certificate that carries a Common Name.
                tls = (f"etcd refuses client certificates with a Common Name on its JSON gateway once "
                       f"auth is enabled ({message!r}): issue --etcd-certfile without a CN "
                       "(e.g. subject /O=canal); the user comes from --etcd-username")
            # Not etcd's gateway speaking (a proxy, a web server, etcd < 3.4 without /v3):
            # nothing was applied, so another endpoint may be tried.
            raise _Failed(
                tls or f"HTTP {resp.status_code} {message!r} is not an answer of etcd's v3 JSON gateway "
                "(etcd >= 3.4 needed)",
                sent=False,
                verb="unusable",
                tls=tls,
            )
        raise EtcdRejected(f"etcd {endpoint} rejected {op}: {message} (HTTP {resp.status_code})", code)

    def _headers(self, token: str | None) -> dict[str, str] | None:
        return {"Authorization": token} if token else None

    def _post(
        self, endpoint: str, op: str, path: str, body: dict[str, Any], token: str | None
    ) -> list[dict[str, Any]]:
        """One request to one endpoint: its JSON messages, or _Failed / EtcdRejected."""
        try:
            resp = self._session.post(
                endpoint + path, json=body, headers=self._headers(token),
                timeout=(self.timeout, self.timeout),
            )
        except requests.RequestException as err:
            raise self._failure(err, sent=not _never_sent(err)) from err
        self._check(resp, endpoint, op)
        try:
            messages = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
        except ValueError as err:
            raise _Failed(f"unparsable answer {resp.text[:100]!r}", sent=True) from err
        if not messages:
            raise _Failed("empty answer", sent=True)
        for message in messages:
            if message.get("error"):  # a streaming RPC failing after its 200 header
                error = message["error"]
                text = _error_text(error)
                if any(t in text for t in TOKEN_REFUSED):
                    code = _int(error.get("grpc_code") or error.get("code")) if isinstance(error, dict) else 0
                    raise EtcdRejected(f"etcd {endpoint} rejected {op}: {text}", code)
                raise _Failed(text, sent=True, verb="unavailable")
        return messages

    def _call(
        self, op: str, path: str, body: dict[str, Any], idempotent: bool = True
    ) -> list[dict[str, Any]]:
        """POST body to the first endpoint that answers; the answer's JSON messages.

        Streaming RPCs (lease keepalive) answer with one JSON object per line, unary ones
        with one object: both come back as a list. With etcd auth, a call refused for its
        token is retried once with a new one: etcd refused it before applying anything.
        """
        token = self._current_token()
        try:
            return self._call_with(op, path, body, idempotent, token)
        except EtcdRejected as err:
            if not self.username or not _token_refused(err):
                raise
        return self._call_with(op, path, body, idempotent, self._reauthenticate(token))

    def _call_with(
        self, op: str, path: str, body: dict[str, Any], idempotent: bool, token: str | None
    ) -> list[dict[str, Any]]:
        failures: list[str] = []
        for index in self._rotation():
            endpoint = self.endpoints[index]
            try:
                messages = self._post(endpoint, op, path, body, token)
                self._worked(index)
                return messages
            except _Failed as failure:
                self._broke(index)
                failures.append(f"etcd {endpoint} {failure.verb} during {op}: {failure.reason}")
                if failure.sent and not idempotent:
                    failures[-1] += " (it may or may not have been applied)"
                    break
        raise Unavailable("; ".join(failures))

    # Authentication -----------------------------------------------------------------------

    def _current_token(self) -> str | None:
        if not self.username:
            return None
        with self._auth_lock:
            if not self._authenticated:
                self._token = self._authenticate()
                self._authenticated = True
            return self._token

    def _reauthenticate(self, stale: str | None) -> str | None:
        """A new token, unless another thread already replaced the stale one."""
        with self._auth_lock:
            if self._token == stale:  # None too: etcd had auth off and has turned it on
                self._token = self._authenticate()
                self._authenticated = True
            return self._token

    def _authenticate(self, endpoint: str | None = None) -> str | None:
        """A token for username/password (None if etcd has auth off); the password stays here."""
        body = {"name": self.username, "password": self._password.reveal()}
        try:
            if endpoint is None:
                answer = self._call_with("authenticate", "/v3/auth/authenticate", body, True, None)[0]
            else:
                answer = self._post(endpoint, "authenticate", "/v3/auth/authenticate", body, None)[0]
        except EtcdRejected as err:
            if AUTH_NOT_ENABLED in str(err):
                log.warning("etcd auth is not enabled: user %s is not needed, calls go without a token",
                            self.username)
                return None
            if AUTH_FAILED in str(err):
                raise EtcdAccessDenied(
                    f"etcd refused user {self.username!r}: wrong --etcd-username or password "
                    "(--etcd-password / --etcd-password-file)"
                ) from None
            raise
        token = answer.get("token")
        if not token:
            raise Unavailable(f"etcd authenticated user {self.username!r} but gave no token")
        log.debug("etcd: authenticated as %s", self.username)
        return str(token)

    # Start-up check -----------------------------------------------------------------------

    def check(self, prefixes: Sequence[str] = ()) -> None:
        """Refuse what etcd will never accept; let an etcd that is merely down be.

        Every endpoint is tried once: TLS refused either way (CA, client certificate, http vs
        https), a wrong user or password, or a user that may not read `prefixes` raises
        EtcdAccessDenied naming the setting. Endpoints that do not answer are only logged:
        the plugin starts and retries, as it always has.
        """
        refused: list[str] = []
        down: list[str] = []
        for endpoint in self.endpoints:
            try:
                self._probe(endpoint, prefixes)
            except EtcdAccessDenied as err:
                refused.append(f"etcd {endpoint}: {err}")
            except EtcdRejected as err:
                refused.append(str(err))
            except _Failed as failure:
                if failure.verb == "unusable":  # an HTTP answer, but a refusal or not etcd's
                    refused.append(f"etcd {endpoint}: {failure.tls or failure.reason + ': check --etcd-endpoints'}")
                elif endpoint.startswith("https://") and self._speaks_http(endpoint):
                    refused.append(
                        f"etcd {endpoint}: the endpoint speaks plain http, not TLS: check "
                        "--etcd-endpoints (or serve etcd with --cert-file/--key-file)"
                    )
                elif failure.tls:
                    verdict = self._diagnose_tls(endpoint)
                    if verdict is None:  # the same files work now, or etcd went away: transient
                        down.append(f"etcd {endpoint} {failure.verb}: {failure.reason}")
                    else:
                        refused.append(f"etcd {endpoint}: {verdict or failure.tls}")
                elif endpoint.startswith("http://") and self._speaks_tls(endpoint):
                    # etcd's TLS port just hangs up on plain http: ask it for a TLS handshake.
                    refused.append(
                        f"etcd {endpoint}: the endpoint speaks TLS: use https:// in --etcd-endpoints "
                        "(and --etcd-cafile)"
                    )
                else:
                    down.append(f"etcd {endpoint} {failure.verb}: {failure.reason}")
        if refused:
            raise EtcdAccessDenied("; ".join(refused))
        if down:
            log.warning("%s; starting anyway, calls will retry", "; ".join(down))

    def _speaks_tls(self, endpoint: str) -> bool:
        """True when endpoint's port answers a TLS handshake (certificate not verified: this
        only tells a TLS port from a plain one, nothing is sent over it)."""
        parsed = urllib3.util.parse_url(endpoint)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            address = (parsed.host, parsed.port or 80)
            with socket.create_connection(address, timeout=self.timeout) as sock, ctx.wrap_socket(
                sock, server_hostname=parsed.host
            ):
                return True
        except ssl.SSLError as err:  # an alert (e.g. "certificate required") is TLS speaking too
            return not any(r in str(err.reason or "").upper() for r in _NOT_TLS)
        except (OSError, ValueError):
            return False

    def _diagnose_tls(self, endpoint: str) -> str | None:
        """Which TLS setting etcd refused ("" if it cannot tell which); None if TLS works now.

        With TLS 1.3 the server judges our certificate after the handshake and sends its alert
        as it hangs up, so a client that is writing its request often sees only EOF. Here the
        handshake is redone with the same files and nothing is written: the alert is read.
        """
        parsed = urllib3.util.parse_url(endpoint)
        try:
            ctx = ssl.create_default_context(cafile=self.cafile or None)
            if self.cert:
                ctx.load_cert_chain(*self.cert)
            address = (parsed.host, parsed.port or 443)
            with socket.create_connection(address, timeout=self.timeout) as sock, ctx.wrap_socket(
                sock, server_hostname=parsed.host
            ) as tls:
                tls.settimeout(min(self.timeout, 2.0))
                tls.recv(1)  # an accepted client waits here for its own request: timeout
        except ssl.SSLError as err:
            found = _tls_problem(err, client_cert=self.cert is not None) or ""
            return "" if found.startswith("TLS failed") else found  # "": refused, no better words
        except (OSError, ValueError):
            return None  # timeout (the server accepted us and waits) or no connection
        return None

    def _speaks_http(self, endpoint: str) -> bool:
        """True when endpoint's port answers plain HTTP (GET /version: no credentials sent)."""
        try:
            self._session.get("http://" + endpoint[len("https://"):] + "/version", timeout=self.timeout,
                         allow_redirects=False)
            return True
        except requests.RequestException:
            return False

    def _probe(self, endpoint: str, prefixes: Sequence[str]) -> None:
        token = self._authenticate(endpoint) if self.username else None
        if self.username:
            with self._auth_lock:
                self._token, self._authenticated = token, True
        for prefix in prefixes or ["/"]:
            key, range_end = _prefix_range(prefix)
            body = {"key": _b64(key), "range_end": _b64(range_end), "limit": "1", "keys_only": True}
            try:
                self._post(endpoint, "check", "/v3/kv/range", body, token)
            except EtcdRejected as err:
                if err.code == GRPC_PERMISSION_DENIED or "permission denied" in str(err):
                    raise EtcdAccessDenied(
                        f"etcd user {self.username!r} may not read {prefix}: grant it a role with "
                        "readwrite on that prefix, or fix --etcd-username"
                    ) from None
                if "user name is empty" in str(err):
                    raise EtcdAccessDenied(
                        "etcd has auth enabled: set --etcd-username and --etcd-password-file"
                    ) from None
                raise

    # Reads --------------------------------------------------------------------------------

    def _range(self, op: str, key: bytes, range_end: bytes | None = None, keys_only: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if keys_only:
            body["keys_only"] = True
        return self._call(op, "/v3/kv/range", body)[0]

    @metrics.datastore_request("get")
    def get(self, key: str) -> Entry | None:
        kvs = self._range("get", key.encode("utf-8")).get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    @metrics.datastore_request("list")
    def list(self, prefix: str, page: int = LIST_PAGE) -> tuple[list[Entry], int]:
        """Every key under prefix at one revision, read in pages: one range of 100,000 records
        outlasts the request timeout on a busy etcd (and a restarted plugin waited minutes for
        the retry); etcd's docs ask for paginated ranges. The pages are pinned to the first
        one's revision, so together they are one consistent snapshot."""
        key, range_end = _prefix_range(prefix)
        entries: list[Entry] = []
        revision = 0
        while True:
            body: dict[str, Any] = {"key": _b64(key), "range_end": _b64(range_end), "limit": str(page)}
            if revision:
                body["revision"] = str(revision)
            answer = self._call("list", "/v3/kv/range", body)[0]
            kvs = answer.get("kvs") or []
            revision = revision or _int(answer.get("header", {}).get("revision"))
            entries.extend(_entry(kv) for kv in kvs)
            if not answer.get("more") or not kvs:
                break
            key = base64.b64decode(kvs[-1]["key"]) + b"\0"  # the next key after the page's last
        entries.sort(key=lambda e: e.key)  # etcd already sorts by key bytes; keep the promise local
        return entries, revision

    @metrics.datastore_request("list_keys")
    def list_keys(self, prefix: str) -> tuple[str, ...]:
        answer = self._range("list_keys", *_prefix_range(prefix), keys_only=True)
        return tuple(sorted(_unb64(kv["key"]) for kv in answer.get("kvs") or []))

    # Transactions -------------------------------------------------------------------------

    @metrics.datastore_request("txn")
    def txn(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        compare = []
        for guard in guards:
            if guard.mod_revision == 0:  # "absent": an absent key has version 0
                compare.append(
                    {"key": _b64(guard.key), "target": "VERSION", "result": "EQUAL", "version": "0"}
                )
            else:
                compare.append(
                    {
                        "key": _b64(guard.key),
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": str(guard.mod_revision),
                    }
                )
        success: list[dict[str, Any]] = []
        for op in ops:
            if isinstance(op, Put):
                put = {"key": _b64(op.key), "value": _b64(op.value)}
                if op.lease:
                    put["lease"] = str(op.lease)
                success.append({"request_put": put})
            elif isinstance(op, Delete):
                success.append({"request_delete_range": {"key": _b64(op.key)}})
            else:
                raise TypeError(f"not a datastore op: {op!r}")
        try:
            answer = self._call(
                "txn", "/v3/kv/txn", {"compare": compare, "success": success}, idempotent=False
            )[0]
        except EtcdRejected as err:
            if err.code == GRPC_NOT_FOUND:
                leases = sorted({op.lease for op in ops if isinstance(op, Put) and op.lease})
                raise Unavailable(f"lease {', '.join(map(str, leases))} has expired: {err}") from err
            raise
        applied = bool(answer.get("succeeded"))
        if applied and ops:
            self._committed(_int(answer.get("header", {}).get("revision")), ops)
        return applied

    # Leases -------------------------------------------------------------------------------

    @metrics.datastore_request("grant")
    def grant(self, ttl: int) -> int:
        # Not idempotent, but a duplicate grant after a failover only leaves a lease that expires.
        answer = self._call("grant", "/v3/lease/grant", {"TTL": str(ttl)})[0]
        lease = _int(answer.get("ID"))
        if not lease:
            raise Unavailable(f"etcd granted no lease: {answer}")
        return lease

    @metrics.datastore_request("keepalive")
    def keepalive(self, lease: int) -> bool:
        messages = self._call("keepalive", "/v3/lease/keepalive", {"ID": str(lease)})
        return _int(messages[0].get("result", {}).get("TTL")) > 0  # TTL 0: lease gone

    @metrics.datastore_request("revoke")
    def revoke(self, lease: int) -> None:
        try:
            self._call("revoke", "/v3/lease/revoke", {"ID": str(lease)})
        except EtcdRejected as err:
            if err.code != GRPC_NOT_FOUND:  # already expired or revoked: the goal is reached
                raise

    # Watch --------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, timeout: float) -> WatchResult:
        """Long-poll one etcd watch stream until the first events or the deadline.

        Compaction is checked first with a range at start_revision (etcd itself only reports
        it from its ~100 ms watcher-sync loop, which a short timeout would miss). An empty
        result returns start_revision - 1: events may still be in flight at the deadline, so
        it never claims more than it saw. With events, the resume point is the last event's
        revision (etcd cuts batches at revision boundaries), not the header's.
        """
        stream = self.watch_stream(prefix, start_revision, timeout)
        try:
            return next(stream)
        finally:
            stream.close()  # drops the connection, which cancels the watch inside etcd

    def watch_stream(self, prefix: str, start_revision: int, timeout: float) -> Generator[WatchResult, None, None]:
        """watch(), kept open until the deadline: each batch as it comes, on one connection
        (the mirror's watch was re-created after every batch, two requests each: under churn
        that was most of a host's etcd requests and a round trip added to every event). Ends
        at the deadline, with an empty result if nothing came."""
        deadline = time.monotonic() + max(timeout, 0.0)
        key, range_end = _prefix_range(prefix)
        if start_revision > 0:
            compacted = self._compacted_at(key, start_revision)
            if compacted is not None:
                yield WatchResult([], compacted, compacted=True)
                return
        body = {
            "create_request": {
                "key": _b64(key),
                "range_end": _b64(range_end),
                "start_revision": str(start_revision),
            }
        }
        failures: list[str] = []
        token = self._current_token()
        for index in self._rotation():
            endpoint = self.endpoints[index]
            delivered = False
            try:
                try:
                    for result in self._watch_batches(endpoint, body, start_revision, deadline, token):
                        delivered = True
                        yield result
                except _TokenRefused:
                    if delivered:
                        raise
                    token = self._reauthenticate(token)
                    for result in self._watch_batches(endpoint, body, start_revision, deadline, token):
                        delivered = True
                        yield result
                self._worked(index)
                return
            except _TokenRefused as refused:  # twice in a row: the user really may not watch
                raise EtcdRejected(f"etcd {endpoint} rejected watch: {refused}", GRPC_PERMISSION_DENIED) from None
            except _Failed as failure:
                self._broke(index)
                failures.append(f"etcd {endpoint} {failure.verb} during watch: {failure.reason}")
                if delivered:  # the caller has events from this stream: it resumes, not we
                    break
        raise Unavailable("; ".join(failures))

    def _compacted_at(self, key: bytes, revision: int) -> int | None:
        """The current revision if `revision` is compacted away, else None."""
        try:
            self._call(
                "watch",
                "/v3/kv/range",
                {"key": _b64(key), "revision": str(revision), "limit": "1", "keys_only": True},
            )
            return None
        except EtcdRejected as err:
            if "compacted" in str(err):
                return _int(self._range("watch", key).get("header", {}).get("revision"))
            if "future revision" in str(err):
                return None  # nothing to compact yet: the watch waits for it
            raise

    def _watch_batches(
        self, endpoint: str, body: dict[str, Any], start: int, deadline: float, token: str | None
    ) -> Iterator[WatchResult]:
        try:
            resp = self._session.post(
                endpoint + "/v3/watch", json=body, stream=True, headers=self._headers(token),
                timeout=(self.timeout, self.timeout),
            )
        except requests.RequestException as err:
            raise self._failure(err, sent=True) from err
        try:
            try:
                self._check(resp, endpoint, "watch")
            except EtcdRejected as err:
                if self.username and _token_refused(err):
                    raise _TokenRefused(str(err)) from None
                raise
            created_at: int | None = None
            events: list[Event] = []

            def created() -> bool:
                return created_at is not None

            delivered = False
            for message in self._messages(resp, created, deadline):
                if message is None:  # the deadline
                    if not delivered:
                        yield WatchResult([], max(0, min(start - 1, created_at or 0)))
                    return
                if message.get("error"):
                    text = _error_text(message["error"])
                    if self.username and any(t in text for t in TOKEN_REFUSED):
                        raise _TokenRefused(text)
                    raise _Failed(text, sent=True, verb="unavailable")
                result = message.get("result", {})
                revision = _int(result.get("header", {}).get("revision"))
                if result.get("created"):
                    created_at = revision
                if _int(result.get("compact_revision")):
                    yield WatchResult([], created_at or revision, compacted=True)
                    return
                if result.get("canceled"):
                    reason = result.get("cancel_reason", "")
                    # etcd checks the token when the watch is created and cancels it with
                    # "permission denied" when it no longer accepts it: one retry, new token.
                    if self.username and ("permission denied" in reason or any(t in reason for t in TOKEN_REFUSED)):
                        raise _TokenRefused(reason)
                    raise _Failed(f"watch canceled: {reason}", sent=True)
                for ev in result.get("events") or []:
                    kv = ev["kv"]
                    kind = "delete" if ev.get("type") == "DELETE" else "put"
                    events.append(
                        Event(kind, _unb64(kv["key"]), _unb64(kv.get("value")), _int(kv.get("mod_revision")))
                    )
                if events and message.get("_last_buffered", True):
                    yield WatchResult(events, events[-1].revision)
                    delivered, events = True, []
            raise _Failed("watch stream ended", sent=True)
        finally:
            resp.close()  # drops the connection, which cancels the watch inside etcd

    def _messages(
        self, resp: requests.Response, waiting: Callable[[], bool], deadline: float
    ) -> Iterator[dict[str, Any] | None]:
        """JSON messages from a gateway stream; None once the deadline passes while `waiting()`.

        Until the watch is created each read gets the request timeout (etcd must answer);
        afterwards reads get whatever is left of the caller's wait. Messages already
        received are all yielded before the next read, flagged `_last_buffered` on the last
        one, so a batch that arrived together is returned together.
        """
        chunks = resp.raw.stream(None, decode_content=True)
        buffer = b""
        while True:
            lines = buffer.split(b"\n")
            buffer = lines.pop()
            complete = [line for line in lines if line.strip()]
            for i, line in enumerate(complete):
                try:
                    message = json.loads(line)
                except ValueError as err:
                    raise _Failed(f"unparsable watch message {line[:100]!r}", sent=True) from err
                message["_last_buffered"] = i == len(complete) - 1
                yield message
            if waiting():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    yield None
                    return
                self._set_read_timeout(resp, remaining)
            try:
                buffer += next(chunks)
            except StopIteration:
                if buffer.strip():
                    buffer += b"\n"
                    continue
                raise _Failed("watch stream ended", sent=True) from None
            except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as err:
                if waiting():
                    yield None
                    return
                raise self._failure(err, sent=True) from err
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as err:
                raise self._failure(err, sent=True) from err

    @staticmethod
    def _set_read_timeout(resp: requests.Response, seconds: float) -> None:
        """Shorten the socket timeout of a streaming answer to the time left to wait."""
        conn = getattr(resp.raw, "connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(max(seconds, 0.001))

    def close(self) -> None:
        self._session.close()
