"""Clients at the HTTP seam, each with HttpClient's interface: record and
replay source responses (`render --record DIR`, `--replay DIR`), log each
request (`-v`).

Record and replay source responses (`render --record DIR`,
`--replay DIR`): CI previews and checks run with no network and no secrets.

A fixture is one JSON file per request, `DIR/<host>/<path>[-<query>].<hash>.json`
(`fixtures/api.shop.example/v1-users-12345-cart.1a2b3c4d.json`): the
recipient's id is in the name wherever the URL carries it. It holds the URL,
the status, the headers that change what emailpers does with an answer, and the
body (as JSON when it parses, else text, else base64), so a person can edit it.

Never in a fixture: a request header (credentials travel there), a response
header outside KEPT_HEADERS (Set-Cookie), an OAuth token request or answer.
The port is not part of a fixture's key: a sample API on a random loopback port
replays under whatever port the campaign names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from multidict import CIMultiDict, CIMultiDictProxy

from emailpers.errors import CampaignError
from emailpers.http import BadBody, HttpClient, Response
from emailpers.output import write_atomic

FIXTURE_VERSION = 1
# Response headers that change what the fetch layer does with an answer.
KEPT_HEADERS = ("Content-Type", "Cache-Control", "Location", "Retry-After", "Age", "Expires")
# What a replayed token endpoint answers: no credential was recorded, none is needed.
REPLAY_TOKEN = {"access_token": "replayed-no-secret", "token_type": "Bearer", "expires_in": 3600}
NO_FIXTURE = "no fixture for this request (record one with --record)"  # the error kind a report counts
_SLUG = re.compile(r"[^A-Za-z0-9._@=+-]+")
_SLUG_MAX = 120


class NoFixture(BadBody):
    """A replayed request that was never recorded: that source's error outcome
    (its fallback), like an API that answered nothing usable."""


def check_fixtures_folder(folder: Path) -> None:
    """Loud and early: without the folder every recipient would quietly get fallbacks."""
    if not folder.is_dir():
        raise CampaignError(f"{folder}: no fixtures folder here; record one with --record {folder}")


def fixture_key(method: str, url: str) -> str:
    """The request as a fixture knows it: method, host (no port), path and query."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return f"{method.upper()} {parts.scheme}://{host}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")


def fixture_path(folder: Path, method: str, url: str) -> Path:
    """Where the fixture of a request lives: readable, and unique by a hash of its key."""
    key = fixture_key(method, url)
    parts = urlsplit(url)
    host = _SLUG.sub("-", (parts.hostname or "host").lower()).strip("-.") or "host"
    tail = parts.path.strip("/") + (f"-{parts.query}" if parts.query else "")
    stem = _SLUG.sub("-", tail).strip("-.")[:_SLUG_MAX] or "root"
    if method.upper() != "GET":
        stem = f"{method.upper()}-{stem}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return folder / host / f"{stem}.{digest}.json"


def encode_fixture(method: str, url: str, response: Response) -> bytes:
    body: dict[str, Any]
    try:
        # Kept as the parsed value, readable and editable: what a run uses of
        # a JSON body is its value, not its spacing.
        body = {"json": json.loads(response.body)}
    except (ValueError, UnicodeDecodeError, RecursionError):
        try:
            body = {"text": response.body.decode("utf-8")}
        except UnicodeDecodeError:
            body = {"base64": base64.b64encode(response.body).decode("ascii")}
    headers = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
    record = {"version": FIXTURE_VERSION, "request": fixture_key(method, url), "status": response.status,
              "headers": headers, **body}
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def decode_fixture(path: Path) -> Response:
    """A fixture file as the Response it stands for; a file a person broke is a
    NoFixture naming the file and what is wrong. `{"timeout": true}` stands for
    a request that never got an answer: it raises TimeoutError, as the wait would."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        timeout = isinstance(record, dict) and record.get("timeout") is True
    except (OSError, ValueError) as exc:
        raise NoFixture(f"unusable fixture: {path}: {exc}") from None
    if timeout:
        raise TimeoutError
    try:
        status = record["status"]
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status number, got {status!r}")
        if "json" in record:
            body = json.dumps(record["json"]).encode()
        elif "text" in record:
            body = str(record["text"]).encode("utf-8")
        elif "base64" in record:
            body = base64.b64decode(record["base64"], validate=True)
        else:
            raise ValueError('no body: give "json", "text" or "base64"')
        headers = CIMultiDict({str(k): str(v) for k, v in dict(record.get("headers") or {}).items()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NoFixture(f"unusable fixture: {path}: {exc}") from None
    return Response(status, CIMultiDictProxy(headers), body)


def _token_response() -> Response:
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
    return Response(200, headers, json.dumps(REPLAY_TOKEN).encode())


class RecordingClient(HttpClient):
    """Wraps the real client (a subclass, so the fetch layer takes it as one); writes a fixture for every GET answer received
    (the last answer wins when a request is retried). Token POSTs pass through
    unrecorded: their request and answer are credentials."""

    def __init__(self, client: HttpClient, folder: Path) -> None:
        super().__init__(max_connections=1)
        self.client = client
        self.folder = folder
        self.recorded = 0

    async def get(self, url: str, headers: Mapping[str, str], *, max_bytes: int) -> Response:
        response = await self.client.get(url, headers, max_bytes=max_bytes)
        path = fixture_path(self.folder, "GET", url)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, encode_fixture("GET", url, response))
        self.recorded += 1
        return response

    async def post(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json_body: object = None,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int,
    ) -> Response:
        return await self.client.post(
            url, form=form, json_body=json_body, headers=headers, timeout=timeout, max_bytes=max_bytes
        )

    async def close(self) -> None:
        await self.client.close()



class ReplayClient(HttpClient):
    """Serves fixture files; opens no connection (its pool is never created). A GET with no fixture is a
    NoFixture (counted in the source's errors); a token POST gets a placeholder
    token, so no secret is needed."""

    def __init__(self, folder: Path) -> None:
        super().__init__(max_connections=1)
        check_fixtures_folder(folder)
        self.folder = folder
        self.replayed = 0
        self.missing: list[str] = []

    async def get(self, url: str, headers: Mapping[str, str], *, max_bytes: int) -> Response:
        path = fixture_path(self.folder, "GET", url)
        if not path.is_file():
            self.missing.append(str(path))
            raise NoFixture(f"{NO_FIXTURE}: {path}")
        response = decode_fixture(path)
        if len(response.body) > max_bytes:
            raise NoFixture(f"fixture larger than the source's max_bytes ({max_bytes} bytes): {path}")
        self.replayed += 1
        return response

    async def post(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json_body: object = None,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int,
    ) -> Response:
        return _token_response()

    async def close(self) -> None:
        pass


class LoggingClient(HttpClient):
    """Wraps a client; tells `log` each request's method, URL (no userinfo;
    credentials travel in headers, which are never shown), status and time
    (`-v`). A request that got no answer is logged with its error."""

    def __init__(self, client: HttpClient, log: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_connections=1)
        self.client = client
        self.log = log
        self.clock = clock

    def _line(self, method: str, url: str, started: float, outcome: str) -> None:
        parts = urlsplit(url)
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self.log(f"{method} {shown} {outcome} {(self.clock() - started) * 1000:.0f}ms")

    async def get(self, url: str, headers: Mapping[str, str], *, max_bytes: int) -> Response:
        started = self.clock()
        try:
            response = await self.client.get(url, headers, max_bytes=max_bytes)
        except BaseException as exc:
            self._line("GET", url, started, type(exc).__name__)
            raise
        self._line("GET", url, started, str(response.status))
        return response

    async def post(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json_body: object = None,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int,
    ) -> Response:
        started = self.clock()
        try:
            response = await self.client.post(
                url, form=form, json_body=json_body, headers=headers, timeout=timeout, max_bytes=max_bytes
            )
        except BaseException as exc:
            self._line("POST", url, started, type(exc).__name__)
            raise
        self._line("POST", url, started, str(response.status))
        return response

    async def close(self) -> None:
        await self.client.close()
