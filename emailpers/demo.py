"""`emailpers demo`: a sample API on a loopback port, the sample campaign
rendered against it, cold and then warm.

The sample API serves `sample_data/api.json` with realistic latency and the
deliberate failures listed there; it checks the credentials the campaign
sends, so the demo exercises auth too. It also serves `/amp/cart`, the
open-time endpoint an AMP part's `amp_url(...)` links point at (see amp.py).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from emailpers.amp import cors_headers, verify_request
from emailpers.campaign import Campaign, load_campaign
from emailpers.errors import CampaignError
from emailpers.fixtures import encode_fixture, fixture_key, fixture_path
from emailpers.http import Response
from emailpers.pipeline import RunOptions, render_campaign
from emailpers.report import Report

DEMO_TOKEN = "demo-token-not-a-secret"
DEMO_KEY = "demo-key-not-a-secret"
DEMO_AMP_KEY = "demo-amp-key-not-a-secret"  # the sample campaign's amp_key_env value
DEMO_SENDER = "news@shop.example"  # the sample campaign's From address: AMP answers only its emails
DEMO_CAMPAIGN = "cart-reminder"
_ROUTE = re.compile(r"^/v1/users/([^/]+)/(cart|loyalty)$")


def project_root() -> Path:
    """The folder holding templates/ and sample_data/: the checkout (a run
    from it, or an editable install), else the copy installed inside the
    package (pyproject.toml maps them there)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, here / "sample_campaign"):
        if (candidate / "templates" / "campaign.toml").is_file() and (candidate / "sample_data").is_dir():
            return candidate
    raise CampaignError(
        f"the sample campaign (templates/campaign.toml, sample_data/) is missing from {here / 'sample_campaign'}; "
        "reinstall emailpers"
    )


def answer(users: dict[str, Any], user_id: str, kind: str) -> tuple[int, Any]:
    """The status and body of a user's cart or loyalty answer, once it succeeds."""
    user = users.get(user_id)
    if user is None:
        return 404, {"error": f"no user {user_id}"}
    if kind == "cart":
        return 200, {k: v for k, v in user.items() if k not in ("loyalty_points", "tier")}
    return 200, {"user_id": user_id, "points": user["loyalty_points"], "tier": user["tier"]}


class _Server(ThreadingHTTPServer):
    # The stdlib's listen backlog of 5 drops connections when the run opens 32
    # at once: the client waits ~1 s for a retransmit and reports a timeout.
    request_queue_size = 128
    daemon_threads = True


class SampleAPI:
    """A threaded HTTP server on 127.0.0.1 serving the fixtures."""

    def __init__(self, fixtures: dict[str, Any], slow_seconds: float = 1.5) -> None:
        self.users: dict[str, Any] = fixtures["users"]
        self.behaviours: dict[str, str] = fixtures.get("behaviours", {})
        self.latency = tuple(fixtures.get("latency_ms", (20, 80)))
        self.slow_seconds = slow_seconds
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                api.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SampleAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path, _, query = request.path.partition("?")
        if path == "/amp/cart":
            return self.amp_cart(request, query)
        match = _ROUTE.match(request.path)
        if match is None:
            return self._send(request, 404, {"error": "not found"})
        user_id, kind = match.groups()
        expected = ("Authorization", f"Bearer {DEMO_TOKEN}") if kind == "cart" else ("X-API-Key", DEMO_KEY)
        if request.headers.get(expected[0]) != expected[1]:
            return self._send(request, 401, {"error": "bad credentials"})
        with self._lock:
            hits = self.hits[f"{kind}/{user_id}"] = self.hits.get(f"{kind}/{user_id}", 0) + 1
        behaviour = self.behaviours.get(user_id) if kind == "cart" else None
        time.sleep(random.uniform(*self.latency) / 1000)
        if behaviour == "slow":
            time.sleep(self.slow_seconds)
        if behaviour == "error500" or (behaviour == "flaky" and hits == 1):
            return self._send(request, 500, {"error": "internal error"})
        self._send(request, *answer(self.users, user_id, kind))

    def amp_cart(self, request: BaseHTTPRequestHandler, query: str) -> None:
        """The open-time endpoint: the cart of the recipient the link was signed
        for, as amp-list wants it ({"items": [...]}), with AMP for Email's CORS headers."""
        cors = cors_headers(dict(request.headers.items()), query, DEMO_SENDER)
        if cors is None:
            return self._send(request, 403, {"error": f"only emails from {DEMO_SENDER}"})
        user_id = verify_request(DEMO_AMP_KEY.encode(), query, campaign=DEMO_CAMPAIGN)
        user = self.users.get(user_id or "")
        if user is None:
            return self._send(request, 403, {"error": "invalid or expired link"}, cors)
        self._send(request, 200, {"items": [{"name": item} for item in user["cart_items"]]}, cors)

    def _send(self, request: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            request.send_response(status)
            for name, value in (headers or {}).items():
                request.send_header(name, value)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to do


def point_at(campaign: Campaign, origin: str) -> Campaign:
    """The campaign with every source URL's origin replaced by `origin`."""
    sources = {
        name: replace(source, url=re.sub(r"^https?://[^/]+", origin, source.url))
        for name, source in campaign.sources.items()
    }
    return replace(campaign, sources=sources)


def run_demo(out: Path) -> Iterator[tuple[str, Report, Path]]:
    """Render the sample campaign twice: cold into `out`, then on the warm
    cache into `out/warm-run`. Yields (title, report, folder) per run."""
    root = project_root()
    # The sample API checks these; the campaign reads them from this environment
    # rather than the process's, which the demo leaves as it found it.
    env = {"SHOP_API_TOKEN": DEMO_TOKEN, "SHOP_API_KEY": DEMO_KEY}
    fixtures = json.loads((root / "sample_data" / "api.json").read_text(encoding="utf-8"))
    cache_dir = out / ".emailpers-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    with SampleAPI(fixtures) as api:
        campaign = point_at(load_campaign(root / "templates" / "campaign.toml", env=env), api.origin)
        runs = (("Run 1: cold cache", out), ("Run 2: same campaign on the warm cache", out / "warm-run"))
        for title, folder in runs:
            options = RunOptions(out=folder, cache_dir=cache_dir, fresh=True, workers=0)
            yield title, render_campaign(campaign, options), folder


def write_fixtures(campaign: Campaign, data: dict[str, Any], folder: Path) -> list[Path]:
    """The sample API's answers as fixtures under the campaign's own URLs
    (what `render --record` would save there): a user whose API is slow
    gets a timeout fixture, one that always fails a 500."""
    written = []
    behaviours: dict[str, str] = data.get("behaviours", {})
    for source in campaign.sources.values():
        kind = source.url.rstrip("/").rpartition("/")[2]
        for user_id in data["users"]:
            behaviour = behaviours.get(user_id) if kind == "cart" else None
            url = source.url.replace("{{ id }}", user_id)
            target = fixture_path(folder, "GET", url)
            target.parent.mkdir(parents=True, exist_ok=True)
            if behaviour == "slow":  # answers after the timeout: replayed as a timeout
                target.write_text(json.dumps({"request": fixture_key("GET", url), "timeout": True}, indent=2) + "\n")
                written.append(target)
                continue
            status, body = (500, {"error": "internal error"}) if behaviour == "error500" else answer(
                data["users"], user_id, kind)
            response = Response(status, CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"})),
                                json.dumps(body).encode())
            target.write_bytes(encode_fixture("GET", url, response))
            written.append(target)
    return written


def serve_copy(api: SampleAPI, folder: Path) -> Path:
    """A copy of the sample campaign in `folder` whose URLs point at `api`,
    for trying commands by hand (`demo --serve`); returns its campaign file."""
    root = project_root()
    for name in ("templates", "sample_data"):
        shutil.rmtree(folder / name, ignore_errors=True)
        shutil.copytree(root / name, folder / name, ignore=shutil.ignore_patterns("fixtures"))
    path = folder / "templates" / "campaign.toml"
    text = path.read_text(encoding="utf-8").replace("https://api.shop.example", api.origin)
    # Its fixtures answer for api.shop.example, not for this API: check and preview go live here.
    text = text.replace('fixtures = "../sample_data/fixtures"\n', "")
    path.write_text(text, encoding="utf-8")
    return path
