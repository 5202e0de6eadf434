"""A small HTTP-over-unix-socket client for the plugin's admin API (standard library only)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from canal.errors import BadRequest, CanalError, Conflict, NotFound, Unavailable

# The plugin's status codes back to the error kinds it raised (413: a body over its limit).
_KINDS = {400: BadRequest, 404: NotFound, 409: Conflict, 413: BadRequest, 503: Unavailable}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class AdminClient:
    def __init__(self, socket_path: str, timeout: float = 30):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self._exchange(method, path, body)
        return self._decode(method, path, status, data)

    def text(self, path: str) -> str:
        """GET a plain-text answer (the metrics exposition); errors are JSON as everywhere."""
        status, data = self._exchange("GET", path, None)
        if status >= 400:
            self._decode("GET", path, status, data)  # raises the error the plugin named
        return data.decode("utf-8", "replace")

    @staticmethod
    def _decode(method: str, path: str, status: int, data: bytes) -> Any:
        try:
            decoded = json.loads(data) if data else {}
        except ValueError:
            raise Unavailable(f"{method} {path}: answer is not JSON: {data[:200]!r}") from None
        if status >= 400:
            message = decoded.get("Err", "") if isinstance(decoded, dict) else str(decoded)
            kind = _KINDS.get(status, CanalError)
            raise kind(message or f"{method} {path}: HTTP {status}")
        return decoded

    def _exchange(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = None if body is None else json.dumps(body)
            try:
                conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            except (BrokenPipeError, ConnectionResetError):
                # The plugin refused the body by its size (413) and closed before reading it
                # all: its answer, with the reason, is still there to read.
                pass
            response = conn.getresponse()
            data = response.read()
        except OSError as err:
            raise Unavailable(f"cannot reach the canal plugin at {self.socket_path}: {err}") from err
        finally:
            conn.close()
        return response.status, data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)
