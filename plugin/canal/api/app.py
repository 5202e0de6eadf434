"""The Flask app: thin handlers (parse → service → answer) and one error handler.

Every answer is JSON with Docker's plugin content type; every error is a 4xx/5xx with
{"Err": message} — the one shape both driver types accept. Bodies are bounded (MAX_BODY → 413,
nesting and number sizes → 400, see protocol.decode) before any handler runs.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from typing import Any, Callable

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from canal import metrics
from canal.api import protocol as p
from canal.errors import BadRequest, CanalError
from canal.records import EndpointRecord
from canal.services.ipam import GLOBAL_SPACE, LOCAL_SPACE
from canal.services.networks import JoinResult

log = logging.getLogger(__name__)

Handler = Callable[[Any], dict]


class CallStats:
    """Handling time per call (last 2,000 of each), for `canal stats` and the benchmark."""

    def __init__(self, keep: int = 2000):
        self._samples: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))
        self._counts: dict[str, int] = defaultdict(int)
        self._errors: dict[str, int] = defaultdict(int)

    def record(self, call: str, seconds: float, ok: bool) -> None:
        self._samples[call].append(seconds)
        self._counts[call] += 1
        if not ok:
            self._errors[call] += 1

    def summary(self, last: int = 0) -> dict[str, dict[str, float]]:
        """p50/p99/max per call over the kept samples, or only the `last` ones of each (a
        benchmark's window between two checkpoints)."""
        out = {}
        for call, samples in sorted(self._samples.items()):
            ordered = sorted(list(samples)[-last:] if last > 0 else samples)
            out[call] = {
                "count": self._counts[call],
                "errors": self._errors[call],
                "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
                "max_ms": round(ordered[-1] * 1000, 3),
            }
        return out


def _body() -> bytes:
    """The request body, at most MAX_BODY bytes, else 413. A Content-Length over the limit is
    refused by Flask (MAX_CONTENT_LENGTH) before reading; a chunked body has none, and
    werkzeug would silently cut it at the limit — a prefix that may parse as a different
    request — so it is read here and refused whole when longer."""
    if request.content_length is None and request.environ.get("wsgi.input_terminated"):
        data = request.environ["wsgi.input"].read(p.MAX_BODY + 1)
        if len(data) > p.MAX_BODY:
            raise RequestEntityTooLarge()
        return data
    return request.get_data()


def _answer(body: dict, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Content-Type"] = p.CONTENT_TYPE
    return response


def create_app(plugin: Any) -> Flask:
    """`plugin` is a canal.runtime.Plugin (or a test double with the same services)."""
    app = Flask("canal")
    app.config["MAX_CONTENT_LENGTH"] = p.MAX_BODY
    stats = CallStats()
    app.extensions["canal_stats"] = stats
    registry = metrics.registry_for(plugin)
    app.extensions["canal_metrics"] = registry
    nets = plugin.networks
    ipam = plugin.ipam
    scope = plugin.config.scope

    def route(call: str, cls: type | None, handler: Callable[..., dict]) -> None:
        seconds = metrics.API_CALL_SECONDS.labels(call)  # bound once: one observe() per call

        def view() -> Response:
            started = time.perf_counter()
            ok = False
            try:
                body = p.decode(call, _body())
                result = handler(p.parse(call, cls, body)) if cls else handler()
                ok = True
                return _answer(result)
            except Exception as err:
                metrics.API_CALL_ERRORS.labels(call, *metrics.error_kind(err)).inc()
                raise
            finally:
                elapsed = time.perf_counter() - started
                stats.record(call, elapsed, ok)
                seconds.observe(elapsed)

        app.add_url_rule("/" + call, call, view, methods=["POST"])

    # Handshake
    route("Plugin.Activate", None, p.activate)

    # NetworkDriver
    route("NetworkDriver.GetCapabilities", None, lambda: p.capabilities(scope))
    route("NetworkDriver.CreateNetwork", p.CreateNetwork, lambda r: nets.create_network(r) or {})
    route("NetworkDriver.DeleteNetwork", p.NetworkRef, lambda r: nets.delete_network(r.NetworkID) or {})
    route("NetworkDriver.AllocateNetwork", p.AllocateNetwork, lambda r: {"Options": dict(r.Options)})
    route("NetworkDriver.FreeNetwork", p.NetworkRef, lambda r: {})
    route("NetworkDriver.CreateEndpoint", p.CreateEndpoint, nets.create_endpoint)
    route(
        "NetworkDriver.EndpointOperInfo",
        p.EndpointRef,
        lambda r: {"Value": _oper_info(nets.endpoint(r.NetworkID, r.EndpointID))},
    )
    route("NetworkDriver.DeleteEndpoint", p.EndpointRef, lambda r: nets.delete_endpoint(r.NetworkID, r.EndpointID) or {})
    route(
        "NetworkDriver.Join",
        p.Join,
        lambda r: _join_answer(nets.join(r.NetworkID, r.EndpointID, r.SandboxKey)),
    )
    route("NetworkDriver.Leave", p.EndpointRef, lambda r: nets.leave(r.NetworkID, r.EndpointID) or {})
    route("NetworkDriver.DiscoverNew", p.Discovery, lambda r: {})
    route("NetworkDriver.DiscoverDelete", p.Discovery, lambda r: {})
    ports = plugin.ports
    route(
        "NetworkDriver.ProgramExternalConnectivity",
        p.ExternalConnectivity,
        lambda r: ports.program(r.NetworkID, r.EndpointID, r.requests) and {} or {},
    )
    route("NetworkDriver.RevokeExternalConnectivity", p.ExternalConnectivity,
          lambda r: ports.revoke(r.NetworkID, r.EndpointID) or {})

    # IpamDriver
    route("IpamDriver.GetCapabilities", None, p.ipam_capabilities)
    route("IpamDriver.GetDefaultAddressSpaces", None, lambda: p.address_spaces(LOCAL_SPACE, GLOBAL_SPACE))
    route(
        "IpamDriver.RequestPool",
        p.RequestPool,
        lambda r: p.pool(*ipam.request_pool(r.AddressSpace, r.Pool, r.SubPool, r.Options, r.V6)),
    )
    route("IpamDriver.ReleasePool", p.ReleasePool, lambda r: ipam.release_pool(r.PoolID) or {})
    route(
        "IpamDriver.RequestAddress",
        p.RequestAddress,
        lambda r: p.address(*ipam.request_address(r.PoolID, r.Address, r.Options)),
    )
    route("IpamDriver.ReleaseAddress", p.ReleaseAddress, lambda r: ipam.release_address(r.PoolID, r.Address) or {})

    # Admin API for the canal CLI (same root-only socket)
    @app.get("/canal/v1/status")
    def status() -> Response:
        return _answer(plugin.status())

    @app.get("/canal/v1/diagnose")
    def diagnostics() -> Response:
        return _answer(plugin.diagnostics())

    @app.get("/canal/v1/stats")
    def call_stats() -> Response:
        last = request.args.get("last", "0")
        if not last.isdigit():
            raise BadRequest(f"stats: last must be a non-negative integer, got {last!r:.40}")
        return _answer(stats.summary(int(last)))

    @app.get("/canal/v1/metrics")
    def metrics_text() -> Response:
        return Response(metrics.exposition(registry), content_type=metrics.CONTENT_TYPE)

    @app.post("/canal/v1/policies")
    def apply_policies() -> Response:
        body = p.decode("POST /canal/v1/policies", _body())
        if not isinstance(body, dict) or not isinstance(body.get("documents"), str):
            raise BadRequest('POST /canal/v1/policies: body must be {"documents": "<YAML or JSON text>"}')
        return _answer({"results": plugin.policies.apply(body["documents"])})

    @app.get("/canal/v1/policies")
    def list_policies() -> Response:
        return _answer({"policies": [p.to_dict() for p in plugin.policies.list()]})

    @app.get("/canal/v1/policies/<path:ref>")
    def get_policy(ref: str) -> Response:
        return _answer(plugin.policies.find(ref).to_dict())

    @app.delete("/canal/v1/policies/<path:ref>")
    def delete_policy(ref: str) -> Response:
        return _answer({"deleted": plugin.policies.delete(ref).key})

    # Policy introspection (canal.services.introspect): computed from the compiled rules.
    @app.post("/canal/v1/policies/dry-run")
    def dry_run_policies() -> Response:
        body = p.decode("POST /canal/v1/policies/dry-run", _body())
        if not isinstance(body, dict) or not isinstance(body.get("documents"), str):
            raise BadRequest('POST /canal/v1/policies/dry-run: body must be {"documents": "<YAML or JSON text>"}')
        return _answer(plugin.introspection.dry_run(body["documents"]))

    @app.post("/canal/v1/explain")
    def explain_flow() -> Response:
        return _answer(plugin.introspection.explain(p.decode("POST /canal/v1/explain", _body())))

    @app.get("/canal/v1/policy-stats")
    def policy_stats() -> Response:
        return _answer(plugin.introspection.stats())

    @app.post("/canal/v1/encryption/rotate")
    def rotate_key() -> Response:
        return _answer(plugin.rotate_key())

    @app.get("/canal/v1/endpoints")
    def list_endpoints() -> Response:
        return _answer({"endpoints": plugin.endpoint_list()})

    @app.errorhandler(CanalError)
    def canal_error(err: CanalError) -> Response:
        log.warning("%r %s: %s", request.path, type(err).__name__, err)
        return _answer(p.error(str(err)), err.status)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        message = f"{request.method} {request.path}: {err.name}"
        if err.code == 404:
            message = f"unknown call {request.path!r}"
        elif err.code == 413:
            message = f"{request.method} {request.path}: request body larger than {p.MAX_BODY} bytes"
        return _answer(p.error(message), err.code or 500)

    @app.errorhandler(Exception)
    def unexpected(err: Exception) -> Response:
        log.exception("%s failed unexpectedly", request.path)
        return _answer(p.error(f"internal error in {request.path}: {type(err).__name__}: {err}"), 500)

    return app


def _oper_info(record: EndpointRecord) -> dict:
    return {"ip": str(record.ip), **({"ip6": str(record.ip6)} if record.ip6 else {}), "mac": record.mac, "host": record.host, "joined": record.joined,
            "ports": [str(b) for b in record.ports]}


def _join_answer(result: JoinResult) -> dict:
    return p.join(result.src_name, result.dst_prefix, result.gateway, [str(r) for r in result.routes], result.gateway6)
