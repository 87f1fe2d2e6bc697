"""Loopback HTTP servers for the source tests: routes are plain functions, and
every request is recorded with its arrival time, so tests can assert what the
API saw (how many calls, how far apart, how many at once, which token).

Only the standard library, bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def free_port() -> int:
    """A port on 127.0.0.1 free a moment ago, for a server that cannot take port 0
    (aiosmtpd's Controller connects to the port it was given; redis-server is told one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackServer(ThreadingHTTPServer):
    # The stdlib's listen backlog of 5 drops connections when a run opens 32 at
    # once; the client then waits ~1 s for a SYN-ACK retransmit and times out.
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping a kept-alive connection is normal; the stdlib would
        # print its traceback into the stderr of the CliRunner under test.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Request:
    method: str
    path: str
    raw_query: str
    query: dict[str, list[str]]  # decoded, as a server framework would see it
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival


@dataclass
class Response:
    status: int = 200
    body: Any = field(default_factory=dict)  # bytes as is, anything else as JSON
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to hold the answer (the request stays "in flight")


Handler = Callable[[Request, "re.Match[str]"], Response]


class Api:
    """A threaded loopback server. `route(pattern)` registers a handler for a
    method and a path regex; unrouted paths answer 404."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        api = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._handle(self)

            def do_POST(self) -> None:
                api._handle(self)

        self.server = LoopbackServer(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def route(self, pattern: str, method: str = "GET") -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes.append((method, re.compile(pattern), handler))
            return handler

        return register

    def echo(self, pattern: str, group: int = 1, headers: dict[str, str] | None = None, delay: float = 0.0) -> None:
        """GET `pattern` answers 200 `{"user": <the pattern's group>}`."""

        @self.route(pattern)
        def _(request: Request, match: re.Match[str]) -> Response:
            return Response(200, {"user": match.group(group)}, dict(headers or {}), delay)

    def seen(self, pattern: str = "", method: str = "GET") -> list[Request]:
        """Recorded requests whose path matches `pattern` (re.search)."""
        with self.lock:
            return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        at, wall = time.monotonic(), time.time()
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        parts = urlsplit(h.path)
        request = Request(
            h.command, parts.path, parts.query, parse_qs(parts.query),
            {k.lower(): v for k, v in h.headers.items()}, body, at, wall,
        )
        with self.lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = Response(404, {"error": "no such route"})
            for method, pattern, handler in self.routes:
                match = pattern.fullmatch(parts.path)
                if method == h.command and match:
                    response = handler(request, match)
                    break
            if response.delay:
                time.sleep(response.delay)
        finally:
            with self.lock:
                self.in_flight -= 1
        payload = response.body if isinstance(response.body, bytes) else json.dumps(response.body).encode()
        try:
            h.send_response(response.status)
            headers = {"Content-Type": "application/json", **response.headers}
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextmanager
def running(api: Api) -> Iterator[Api]:
    api.thread.start()
    try:
        yield api
    finally:
        api.server.shutdown()
        api.server.server_close()


class TokenServer:
    """OAuth 2.0 client-credentials endpoint plus an API that checks the tokens.

    Tokens expire after `expires_in` seconds (checked at the API, so a client
    that does not renew in time gets 401s); `revoke()` makes the API refuse a
    token it issued before its expiry (renew-on-401)."""

    def __init__(self, api: Api, *, client_id: str = "cid", client_secret: str = "csecret",
                 expires_in: float = 60, fail_with: int | None = None, prefix: str = "tok",
                 refuse_within: float = 0.0) -> None:
        self.api = api
        self.refuse_within = refuse_within  # refuse tokens this close to expiry (clocks and latency differ)
        self.prefix = prefix
        self.client_id, self.client_secret = client_id, client_secret
        self.expires_in = expires_in
        self.fail_with = fail_with
        self.issued: list[tuple[str, float]] = []  # (token, monotonic time issued)
        self.revoked: set[str] = set()
        self.refused: list[str] = []  # tokens the API answered 401 to
        self.single_use = False  # True: the API revokes each token after one request
        api.route(r"/oauth/token", "POST")(self._token)

    @property
    def token_url(self) -> str:
        return f"{self.api.url}/oauth/token"

    def _token(self, request: Request, _: re.Match[str]) -> Response:
        import base64

        if self.fail_with is not None:
            return Response(self.fail_with, {"error": "invalid_client"})
        form = parse_qs(request.body.decode())
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("authorization") != expected or form.get("grant_type") != ["client_credentials"]:
            return Response(401, {"error": "invalid_client"})
        with self.api.lock:
            token = f"{self.prefix}{len(self.issued) + 1}"
            self.issued.append((token, time.monotonic()))
        return Response(200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in})

    def check(self, request: Request) -> str | None:
        """The valid token the request carries, or None (the API answers 401)."""
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ")
        with self.api.lock:
            issued = dict(self.issued)
            ok = (header.startswith("Bearer ") and token in issued and token not in self.revoked
                  and request.at < issued[token] + self.expires_in - self.refuse_within)
            if not ok:
                self.refused.append(token)
            elif self.single_use:
                self.revoked.add(token)
        return token if ok else None

    def revoke(self, token: str) -> None:
        with self.api.lock:
            self.revoked.add(token)
