"""A fault-injecting HTTP proxy in front of an S3 server, for storage-fault tests over real HTTP.

`FaultProxy(upstream)` listens on 127.0.0.1 in a thread and forwards every request to `upstream`
(moto's server) unchanged, except those that a `Rule` matches: they are answered with an S3 error
(`503 SlowDown`, `500 InternalError`, `403 AccessDenied`, ...) without reaching the server. The
client cannot tell the proxy from S3: point `endpoint_url` at `proxy.url`.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "AccessDenied": "Access Denied",
}


@dataclass(slots=True)
class Rule:
    """Answer `status`/`code` to requests with this method whose path contains `key`, `times` times
    (None: always)."""

    method: str
    key: str
    status: int
    code: str
    times: int | None = 1
    hits: list[str] = field(default_factory=list)  # "METHOD /bucket/key?query" of each answered request

    def strikes(self, method: str, path: str) -> bool:
        if method != self.method or self.key not in urllib.parse.unquote(path):
            return False
        if self.times is not None:
            if self.times == 0:
                return False
            self.times -= 1
        self.hits.append(f"{method} {path}")
        return True


class FaultProxy:
    """A proxy to `upstream` (http://host:port) that fails the requests its `rules` match."""

    def __init__(self, upstream: str):
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        host, port = urllib.parse.urlsplit(upstream).netloc.split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rule = proxy._match(self.command, self.path)
                if rule is not None:
                    return self._error(rule)
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _error(self, rule: Rule) -> None:
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{rule.code}</Code>'
                    f"<Message>{_MESSAGES.get(rule.code, rule.code)}</Message>"
                    "<RequestId>proxy</RequestId></Error>"
                ).encode()
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            return next((r for r in self.rules if r.strikes(method, path)), None)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
