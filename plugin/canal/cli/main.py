"""`canal` command line: `serve` runs the plugin; the other commands talk to a running one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import traceback
from typing import Any, Callable, Optional

from canal import config as configmod
from canal import health
from canal.cli.client import AdminClient
from canal.errors import BadRequest, CanalError, Conflict, NotFound

log = logging.getLogger("canal")


def _socket_alive(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _check_start(cfg: configmod.Config) -> None:
    from canal import preflight
    from canal.runtime import check_start

    preflight.check(cfg)  # every missing tool or sysctl, in one message, before anything is served
    check_start(cfg)  # refused TLS or credentials, a second host with our name
    if cfg.metrics_addr:
        from canal import metrics

        metrics.check_listen(cfg.metrics_addr)  # a clear refusal now, not a worker failing to boot


def _in_child(check: Callable[[], None]) -> int:
    """Run `check` in a forked child; its exit code (0: passed). gunicorn's master lives as
    long as the plugin: the checks' imports (pyroute2, the datastore and Docker clients, ~20 MB)
    stay out of it, loaded by the worker only. A refusal prints as main() prints it (exit 2)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            check()
            code = 0
        except CanalError as err:
            print(f"canal: {err}", file=sys.stderr)
            code = 2
        except BaseException:  # noqa: BLE001 - reported, then the child's exit code says it
            print("canal: start-up checks failed:", file=sys.stderr)
            traceback.print_exc()
        finally:
            sys.stdout.flush()  # os._exit skips the interpreter's own flush
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def serve(cfg: configmod.Config) -> int:
    from gunicorn.app.base import BaseApplication

    from gunicorn.glogging import Logger as GunicornLogger

    from canal import diagnose, logs

    logs.setup(cfg.log_level, cfg.log_format, diagnose.secret_values(cfg))

    class Glogger(GunicornLogger):  # type: ignore[misc]
        """gunicorn's error log through our handlers (format, ring, redaction)."""

        def setup(self, gcfg: Any) -> None:
            super().setup(gcfg)
            self.error_log.handlers = []
            self.error_log.propagate = True

    if os.path.exists(cfg.socket) and _socket_alive(cfg.socket):
        log.error("another process already serves %s; not starting a second plugin", cfg.socket)
        return 1
    refused = _in_child(lambda: _check_start(cfg))
    if refused:
        return refused
    os.makedirs(os.path.dirname(cfg.socket), exist_ok=True)
    if os.path.exists(cfg.socket):
        log.info("replacing stale socket %s", cfg.socket)
        os.unlink(cfg.socket)

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = {
                "bind": [f"unix:{cfg.socket}"],
                "workers": 1,  # one process: the agent and the handlers share state
                "worker_class": "gthread",
                "threads": cfg.workers_threads,
                "timeout": 120,
                "graceful_timeout": 5,
                "umask": 0o077,  # the socket is root-only
                "loglevel": cfg.log_level.lower(),
                "errorlog": "-",
                "accesslog": None,
                "control_socket_disable": True,
                "logger_class": Glogger,
                "proc_name": "canal",
            }
            for key, value in settings.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self) -> Any:
            from canal.api.app import create_app
            from canal.runtime import Plugin

            plugin = Plugin(cfg)
            plugin.start()
            app = create_app(plugin)
            if cfg.metrics_addr:
                from canal import metrics

                metrics.serve(app.extensions["canal_metrics"], cfg.metrics_addr)
            return app

    Server().run()
    return 0


def _print(data: Any, output: str, columns: list[str] | None = None) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    elif output == "yaml":
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    elif columns is not None and isinstance(data, list):
        _table([[_cell(row.get(c)) for c in columns] for row in data], [c.upper() for c in columns])
    elif isinstance(data, dict):
        width = max((len(str(k)) for k in data), default=0)
        for key, value in data.items():
            if key in ("problems", "warnings", "peers") and isinstance(value, list):
                print(f"{str(key).ljust(width)}  {len(value) or '-'}")
                for item in value:
                    print(f"  {_cell(item)}")
                continue
            if isinstance(value, dict) and value and key == "quarantined":
                # One line each: a record's key and why it was refused (long, never one cell).
                print(f"{str(key).ljust(width)}  {len(value)} record(s) skipped until fixed:")
                for record, why in value.items():
                    print(f"  {record}: {why}")
                continue
            print(f"{str(key).ljust(width)}  {_cell(value)}")
    else:
        print(data)


def _cell(value: Any) -> str:
    if value is None:
        return "<unknown>"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _policy_row(doc: dict) -> dict:
    meta, spec = doc["metadata"], doc["spec"]
    return {
        "name": meta["name"],
        "kind": doc["kind"],
        "network": meta.get("network", "(all)"),
        "order": spec.get("order", "-"),
        "selector": spec.get("selector") or "all()",
        "types": spec.get("types"),
    }


def _port(rows: list[dict], container: str, port: Optional[str], output: str) -> int:
    """`docker port`'s output for a canal container (on this host: published ports are local)."""
    mine = [r for r in rows if container in (r.get("container"), r.get("container_id")) or (
        len(container) >= 3 and str(r.get("container_id", "")).startswith(container))]
    if not mine:
        raise NotFound(f"no canal endpoint of container {container!r} on this cluster")
    lines = [b for r in mine for b in r.get("ports", [])]
    if port:
        wanted = port if "/" in port else f"{port}/tcp"
        lines = [b.split(" -> ", 1)[1] for b in lines if b.split(" -> ", 1)[0] == wanted]
        if not lines:
            raise NotFound(f"no public port '{wanted}' published for {container}")
    if output == "table":
        for line in lines:
            print(line)
    else:
        _print(lines, output)
    return 0


def _party(side: dict) -> str:
    if side.get("endpoint") is None:
        return f"{side['address']} (not a canal endpoint)"
    name = side.get("container") or side["endpoint"]
    return f"{name} {side['address'] or '(no IPv6 address)'} on {side['network']}@{side['host']}"


def _print_explain(answer: dict) -> None:
    flow = answer["flow"]
    what = flow["protocol"] + (f"/{flow['port']}" if flow["port"] is not None else "")
    print(f"{answer['verdict'].upper()}: {_party(answer['source'])} -> {_party(answer['destination'])}, {what}"
          + f" over IPv{flow.get('family', 4)}" + (" through a published port" if flow["published"] else ""))
    for side in ("source", "destination"):
        if answer[side].get("note"):
            print(f"  note: {answer[side]['note']}")
    for direction in ("egress", "ingress"):
        d = answer[direction]
        if not d["evaluated"]:
            print(f"  {direction}: {d['explanation']}")
            continue
        print(f"  {direction} ({d['host']}): {d['verdict']}: {d['explanation']}")
        for hop in d.get("matched_on_the_way", []):
            print(f"    passed through {hop['action']} rule {hop['rule']} of {hop['policy']}")
        if d.get("chain"):
            print(f"    rule: -A {d['chain']} {d['rule_text']}")
    if answer.get("hint"):
        print(f"  hint: {answer['hint']}")


def _print_dry_run(report: dict) -> None:
    for row in report["results"]:
        print(f"{row['kind']} {row['policy']} would be {row['result']} (dry run: nothing stored)")
    for row in report["selection"]:
        name = row.get("container") or row["endpoint"]
        for key, label in (("now_selected_by", "now selected by"), ("no_longer_selected_by", "no longer selected by")):
            for direction in ("egress", "ingress"):
                if row.get(f"{direction}_{key}"):
                    print(f"  {name} ({row['address']}): {direction} {label} {', '.join(row[f'{direction}_{key}'])}")
    for flow in report["flows"]:
        what = flow["protocol"] + (f"/{flow['port']}" if flow["port"] is not None else "")
        after = flow["after"]
        why = "; ".join(
            f"{d} {after[d]['verdict']} ({after[d].get('policy') or ''}{'' if after[d].get('rule') is None else ' rule ' + str(after[d]['rule'])}"
            f"{'' if after[d].get('policy') else after[d]['reason']})"
            for d in ("egress", "ingress") if d in after)
        six = " over IPv6" if flow.get("family") == 6 else ""
        print(f"  {'GAINS' if after['verdict'] == 'allowed' else 'LOSES'} {flow['source']} -> {flow['destination']} {what}{six}: {why}")
    s = report["summary"]
    print(f"{s['flows_gained']} flow(s) gained, {s['flows_lost']} lost among {s['endpoints']} endpoint(s)"
          f" (probes: {', '.join(s['probes'])}){'; listing cut at ' + str(s['listed']) if s['listed'] < s['flows_gained'] + s['flows_lost'] else ''}"
          f"{'; evaluation limit reached, summary partial' if s['truncated'] else ''}")


def _print_stats(stats: dict) -> None:
    _print([{**r, "rule": f"{r['direction'].lower()}[{r['rule']}]"} for r in stats["rules"]], "table",
           ["policy", "rule", "action", "packets", "bytes"])
    if stats["implicit"]:
        print()
        _print(stats["implicit"], "table", ["container", "address", "direction", "outcome", "packets", "bytes"])
    if stats["stale"]:
        print(f"\nnot yet programmed as compiled (counters skipped): {', '.join(stats['stale'])}")


def _read_file(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path) as handle:
            return handle.read()
    except OSError as err:
        raise BadRequest(f"cannot read {path}: {err.strerror}") from None


def _progress(message: str) -> None:
    """A step of a long operation, on stderr (stdout stays the result, for scripts)."""
    print(f"canal: {message}", file=sys.stderr, flush=True)


def _diagnose(socket_path: str, output: str, vni: int) -> int:
    """The plugin's half if it answers (else the error, in the bundle), the kernel's always."""
    import time

    from canal import diagnose, logs

    parts: dict[str, Any] = {}
    host = socket.gethostname()
    _progress("reading the plugin's status, settings, records and recent logs")
    try:
        data = AdminClient(socket_path).get("/canal/v1/diagnose")
        host = str(data.get("status", {}).get("host") or host)
        for name in ("status", "settings", "records"):
            parts[f"{name}.json"] = data.get(name)
        parts["logs.jsonl"] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in data.get("logs", []))
    except CanalError as err:
        parts["plugin-unreachable.txt"] = f"{err}\n"
        _progress(f"the plugin does not answer ({err}): the bundle holds the kernel's state only")
    _progress("reading the kernel's state: iptables, ipsets, routes, links, neighbour and FDB entries")
    parts.update(diagnose.kernel_state(vni))
    _progress(f"redacting and writing {len(parts)} parts")
    secrets = [v for k, v in os.environ.items() if k == "CANAL_ETCD_PASSWORD" and v]
    data_bytes = diagnose.bundle(parts, logs.Redactor(secrets))
    path = output or f"canal-diagnose-{host}-{time.strftime('%Y%m%dT%H%M%S')}.tar.gz"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data_bytes)
    print(path)
    return 0


def _uninstall(cfg: configmod.Config, dry_run: bool) -> int:
    """Exit 0 when done (or planned, with --dry-run), 1 when refused, 2 on an error."""
    from canal.dataplane import links as linkmod
    from canal.datastore.base import open_datastore
    from canal.datastore.keys import Keys
    from canal.uninstall import Uninstall

    if _socket_alive(cfg.socket):
        print(f"canal: the plugin is running (it answers at {cfg.socket}): stop it first "
              "(systemctl stop canal, or docker plugin disable for the managed plugin)", file=sys.stderr)
        return 1
    store = open_datastore(cfg)
    try:
        _iface, public_ip, _mtu = linkmod.underlay(cfg.iface, cfg.public_ip)
        plan = Uninstall(cfg.host_name, public_ip, cfg.vxlan_vni, store, Keys(cfg.etcd_prefix, cfg.flannel_prefix),
                         cfg.flannel_mode, release=cfg.datastore == "etcd")
        try:
            steps = plan.plan()
        except Conflict as err:
            print(f"canal: refused: {err}", file=sys.stderr)
            return 1
        if not steps:
            print("nothing of canal left on this host")
        for step in steps:
            print(("would " if dry_run else "") + step.what)
            if not dry_run:
                step.apply()
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="canal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the plugin (Docker network + IPAM driver)")
    configmod.add_arguments(serve_p)

    def client_args(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--socket", default=os.environ.get("CANAL_SOCKET", "/run/docker/plugins/canal.sock"),
                         help="the plugin's socket (env CANAL_SOCKET)")
        cmd.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    for name, help_text in (("status", "show the running plugin's state"), ("stats", "per-call handling times")):
        client_args(sub.add_parser(name, help=help_text))
    metrics_p = sub.add_parser("metrics", help="the plugin's Prometheus metrics, in the text exposition format")
    metrics_p.add_argument("--socket", default=os.environ.get("CANAL_SOCKET", "/run/docker/plugins/canal.sock"),
                           help="the plugin's socket (env CANAL_SOCKET)")
    policy = sub.add_parser("policy", help="label policies").add_subparsers(dest="verb", required=True)
    apply_p = policy.add_parser("apply", help="create or update the policies in a YAML/JSON file")
    apply_p.add_argument("-f", "--filename", required=True, help="file, or - for standard input")
    apply_p.add_argument("--dry-run", action="store_true",
                         help="store nothing: show which endpoints and flows the change would affect")
    client_args(apply_p)
    explain_p = policy.add_parser("explain", help="why a flow is allowed or denied, from the compiled rules")
    explain_p.add_argument("src", help="container name or ID, or an IPv4 or IPv6 address")
    explain_p.add_argument("dst", help="container name or ID, or an IPv4 or IPv6 address")
    explain_p.add_argument("--family", type=int, choices=(4, 6),
                           help="IP version of a flow between containers given by name (default 4; an address decides)")
    explain_p.add_argument("--port", type=int, help="destination port (tcp/udp)")
    explain_p.add_argument("--protocol", choices=("tcp", "udp", "icmp"),
                           help="default: tcp with --port, else icmp (echo request)")
    explain_p.add_argument("--published", action="store_true",
                           help="the client comes through DST's published host port (Docker's DNAT)")
    client_args(explain_p)
    client_args(policy.add_parser("stats", help="packets and bytes per policy rule on this host (kernel counters)"))
    client_args(policy.add_parser("list", help="list policies"))
    for verb in ("get", "delete"):
        cmd = policy.add_parser(verb, help=f"{verb} one policy: NAME, NETWORK/NAME or global/NAME")
        cmd.add_argument("name")
        client_args(cmd)
    encryption = sub.add_parser("encryption", help="WireGuard between hosts").add_subparsers(dest="verb", required=True)
    client_args(encryption.add_parser("rotate", help="a new key for this host (peers follow; flows survive)"))
    client_args(encryption.add_parser("status", help="this host's device, public key and peers' handshakes"))
    endpoint = sub.add_parser("endpoint", help="endpoints").add_subparsers(dest="verb", required=True)
    client_args(endpoint.add_parser("list", help="every endpoint of the cluster, with labels and policies"))

    port_p = sub.add_parser("port", help="published ports of a container, as `docker port` prints them "
                            "(Docker cannot show a remote driver's: see the README)")
    port_p.add_argument("container", help="name or ID (prefix)")
    port_p.add_argument("port", nargs="?", help="PORT[/PROTO]: only this one")
    client_args(port_p)

    diag = sub.add_parser("diagnose", help="write a tar.gz for bug reports (secrets redacted)")
    diag.add_argument("--socket", default=os.environ.get("CANAL_SOCKET", "/run/docker/plugins/canal.sock"),
                      help="the plugin's socket (env CANAL_SOCKET)")
    diag.add_argument("-o", "--output", default="", help="the file to write (default canal-diagnose-HOST-TIME.tar.gz)")
    diag.add_argument("--vxlan-vni", type=int, default=int(os.environ.get("CANAL_VXLAN_VNI", "1")),
                      help="VNI of Canal's VXLAN device, whose neighbours and FDB are included (env CANAL_VXLAN_VNI)")
    uninstall_p = sub.add_parser("uninstall", help="remove everything Canal owns on this host (plugin stopped; "
                                 "same settings as canal serve)")
    configmod.add_arguments(uninstall_p)
    uninstall_p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            sys.exit(serve(configmod.load(vars(args))))
        if args.command == "uninstall":
            sys.exit(_uninstall(configmod.load({k: v for k, v in vars(args).items() if k != "dry_run"}),
                                args.dry_run))
        if args.command == "diagnose":
            sys.exit(_diagnose(args.socket, args.output, args.vxlan_vni))
        client = AdminClient(args.socket)
        if args.command == "metrics":
            sys.stdout.write(client.text("/canal/v1/metrics"))
        elif args.command == "status":
            status = client.get("/canal/v1/status")
            _print(status, args.output)
            sys.exit(health.exit_code(status))
        elif args.command == "stats":
            _print(client.get(f"/canal/v1/{args.command}"), args.output)
        elif args.command == "port":
            sys.exit(_port(client.get("/canal/v1/endpoints")["endpoints"], args.container, args.port, args.output))
        elif args.command == "encryption" and args.verb == "rotate":
            _print(client.post("/canal/v1/encryption/rotate", {}), args.output)
        elif args.command == "encryption":
            backend = client.get("/canal/v1/status").get("backend") or {}
            device = backend.get("encryption")
            if device is None:
                print("no WireGuard device on this host (no encrypted network, backend not wireguard)")
            else:
                _print(device, args.output)
        elif args.command == "endpoint":
            columns = ["container", "network", "host", "ip", "ip6", "state", "labels", "policies"]
            _print(client.get("/canal/v1/endpoints")["endpoints"], args.output, columns)
        elif args.verb == "apply" and args.dry_run:
            _progress("evaluating the flows between known endpoints before and after (nothing is stored)")
            report = client.post("/canal/v1/policies/dry-run", {"documents": _read_file(args.filename)})
            _print_dry_run(report) if args.output == "table" else _print(report, args.output)
        elif args.verb == "explain":
            body = {"src": args.src, "dst": args.dst, "protocol": args.protocol, "port": args.port,
                    "published": args.published, "family": args.family}
            answer = client.post("/canal/v1/explain", {k: v for k, v in body.items() if v is not None})
            _print_explain(answer) if args.output == "table" else _print(answer, args.output)
        elif args.verb == "stats":
            stats = client.get("/canal/v1/policy-stats")
            _print_stats(stats) if args.output == "table" else _print(stats, args.output)
        elif args.verb == "apply":
            _progress("storing the policies; each is in force on this host when this returns")
            results = client.post("/canal/v1/policies", {"documents": _read_file(args.filename)})["results"]
            if args.output == "table":
                for row in results:
                    print(f"{row['kind']} {row['policy']} {row['result']}")
            else:
                _print(results, args.output)
        elif args.verb == "list":
            docs = client.get("/canal/v1/policies")["policies"]
            if args.output == "table":
                _print([_policy_row(d) for d in docs], "table", ["name", "kind", "network", "order", "selector", "types"])
            else:
                _print(docs, args.output)
        elif args.verb == "get":
            doc = client.get(f"/canal/v1/policies/{args.name}")
            _print(doc, "yaml" if args.output == "table" else args.output)
        elif args.verb == "delete":
            print(f"deleted {client.request('DELETE', f'/canal/v1/policies/{args.name}')['deleted']}")
    except CanalError as err:
        print(f"canal: {err}", file=sys.stderr)
        sys.exit(2)
