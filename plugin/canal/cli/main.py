"""`canal` command line: `serve` runs the plugin; the other commands talk to a running one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import Any

from canal import config as configmod
from canal.cli.client import AdminClient
from canal.errors import CanalError

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


def serve(cfg: configmod.Config) -> int:
    from gunicorn.app.base import BaseApplication

    logging.basicConfig(
        level=cfg.log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d:%(threadName)s] %(message)s",
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # per-message debug noise
    os.makedirs(os.path.dirname(cfg.socket), exist_ok=True)
    if os.path.exists(cfg.socket):
        if _socket_alive(cfg.socket):
            log.error("another process already serves %s; not starting a second plugin", cfg.socket)
            return 1
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
            return create_app(plugin)

    Server().run()
    return 0


def _print(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    elif output == "yaml":
        import yaml

        print(yaml.safe_dump(data, sort_keys=True), end="")
    elif isinstance(data, dict):
        width = max((len(str(k)) for k in data), default=0)
        for key, value in data.items():
            print(f"{str(key).ljust(width)}  {value if not isinstance(value, (dict, list)) else json.dumps(value)}")
    else:
        print(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="canal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the plugin (Docker network + IPAM driver)")
    configmod.add_arguments(serve_p)
    for name, help_text in (("status", "show the running plugin's state"), ("stats", "per-call handling times")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--socket", default=os.environ.get("CANAL_SOCKET", "/run/docker/plugins/canal.sock"))
        cmd.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            sys.exit(serve(configmod.load(vars(args))))
        client = AdminClient(args.socket)
        _print(client.get(f"/canal/v1/{args.command}"), args.output)
    except CanalError as err:
        print(f"canal: {err}", file=sys.stderr)
        sys.exit(2)
