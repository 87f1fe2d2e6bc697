"""Shards as separate processes sharing a real redis-server (--backend): one
rate limit, one OAuth token, one cache, one error guard, measured at a
loopback API. Each test starts its own redis-server on a free loopback port."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emailpers.shards import shard_of

from advanced_servers import Api, Request, Response, TokenServer, free_port, running
from conftest import make_campaign, people, render, source, write_campaign

pytest.importorskip("redis", reason="the redis client is the emailpers[redis] extra: pip install -e '.[test]'")
if shutil.which("redis-server") is None:
    pytest.skip("no redis-server on PATH (Debian: apt-get install redis-server; .ci/run installs it)",
                allow_module_level=True)

SHARDS = 4
RATE = 20  # requests per second for source shop, over all shards
ROWS = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": f"N{i}"} for i in range(60)]
TEMPLATE = """<html><body><p>Hi {{ first_name }},</p>
{% live "shop" %}<p>Cart: {{ shop.products|join(", ") }}</p>{% fallback %}<p>See what is new.</p>{% endlive %}
{% live "promo" %}<p>{{ promo.text }}</p>{% fallback %}<p>No promo.</p>{% endlive %}
</body></html>
"""
SECRETS = {"SHOP_CLIENT_ID": "cid", "SHOP_CLIENT_SECRET": "csecret"}


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_redis(port: int | None = None) -> RedisServer:
    import redis

    port = port or free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    for _ in range(200):  # until it accepts connections (not a timing assertion)
        try:
            client.ping()
            return RedisServer(port, process)
        except redis.ConnectionError:
            if process.poll() is not None:
                break
            time.sleep(0.025)
    process.kill()
    pytest.skip(f"redis-server did not start on 127.0.0.1:{port}")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


class ShopApi:
    """/cart/<id> (needs a token from /oauth/token) and /promo (the same URL for everyone)."""

    def __init__(self, api: Api, *, cart_status: int = 200, cart_delay: float = 0.0, hold_carts: bool = False,
                 hold_promo: bool = False) -> None:
        self.api = api
        # Shards start seconds apart on a busy machine. hold_carts: hold /cart answers until
        # every shard has asked one, so that they surely run at once; hold_promo: hold the
        # /promo answer until then, so that every shard needs it while it is in flight.
        self.all_shards = threading.Event()
        self.hold_carts, self.hold_promo = hold_carts, hold_promo
        self.shards_seen: set[int] = set()
        self.tokens = TokenServer(api, expires_in=3600)
        self.cart_status, self.cart_delay = cart_status, cart_delay
        api.route(r"/cart/(\w+)")(self._cart)
        api.route(r"/promo")(self._promo)

    def _promo(self, request: Request, match: re.Match[str]) -> Response:
        if self.hold_promo:
            self.all_shards.wait(timeout=60)
        return Response(200, {"text": "10% off"}, {"Cache-Control": "max-age=60"})

    def _cart(self, request: Request, match: re.Match[str]) -> Response:
        if self.tokens.check(request) is None:
            return Response(401, {"error": "invalid_token"})
        with self.api.lock:
            self.shards_seen.add(shard_of(match.group(1), SHARDS))
            if len(self.shards_seen) == SHARDS:
                self.all_shards.set()
        if self.hold_carts:
            self.all_shards.wait(timeout=60)
        if self.cart_status != 200:
            return Response(self.cart_status, {"error": "down"})
        return Response(200, {"products": [f"Mug for {match.group(1)}"]}, delay=self.cart_delay)

    def carts(self) -> list[Request]:
        return self.api.seen(r"^/cart/")


@pytest.fixture
def shop() -> Iterator[ShopApi]:
    api = Api()
    with running(api):
        yield ShopApi(api)


def campaign_for(
    folder: Path, shop: ShopApi, rows: list[dict[str, Any]] = ROWS, rate: int = RATE, concurrency: int = 8
) -> Path:
    auth = (f'{{ type = "oauth2", token_url = "{shop.tokens.token_url}", client_id_env = "SHOP_CLIENT_ID", '
            'client_secret_env = "SHOP_CLIENT_SECRET" }')
    path = write_campaign(
        folder, template=TEMPLATE, recipients=rows,
        # A held /promo answer must not time out while the last shard is still starting on a busy
        # machine (seen in CI: the first request timed out, so three shards asked /promo themselves).
        sources={"promo": source(shop.api.url + "/promo", cache_ttl=60, timeout=60, deadline=90)},
    )  # fmt: skip
    shop_table = source(shop.api.url + "/cart/{{ id }}", rate_limit=rate, concurrency=concurrency, cache_ttl=0)
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in shop_table.items())
    path.write_text(path.read_text() + f"\n[sources.shop]\n{lines}auth = {auth}\n", encoding="utf-8")
    return path


def start_shard(campaign: Path, out: Path, k: int, backend: str, *args: str, run: int = 0) -> subprocess.Popen[str]:
    # Each shard (and each run of it) with a cache folder of its own, as on machines of their own:
    # only the backend can share an answer.
    cache = out.parent / f"disk-cache-{k}-{run}"
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out), "--workers", "0",
               "--no-progress", "--shard", f"{k}/{SHARDS}", "--backend", backend, "--cache-dir", str(cache), *args]
    return subprocess.Popen(command, env={**os.environ, **SECRETS}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_shards(campaign: Path, out: Path, backend: str, *args: str) -> list[tuple[int, str, str]]:
    processes = [start_shard(campaign, out, k, backend, *args) for k in range(SHARDS)]
    return [(p.wait(timeout=120), *p.communicate()) for p in processes]


def journal_ids(out: Path, k: int) -> list[str]:
    path = out / "shards" / f"{k}-of-{SHARDS}.jsonl"
    if not path.exists():
        return []
    # Read while the shard may be appending: a line without its newline yet is not there yet.
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line)["id"] for line in lines]


def most_in_one_second(times: list[float]) -> int:
    """The most arrivals in any window [t, t + 1 s)."""
    times = sorted(times)
    j, best = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def test_four_shard_processes_share_one_rate_limit_token_and_cache(
    redis_server: RedisServer, shop: ShopApi, tmp_path: Path
) -> None:
    shop.hold_promo = True
    campaign = campaign_for(tmp_path / "c", shop)
    out = tmp_path / "out"
    results = run_shards(campaign, out, redis_server.url)
    assert [code for code, _, _ in results] == [0] * SHARDS, results

    # The union of the journals: every recipient exactly once, each in its own shard's.
    union = [i for k in range(SHARDS) for i in journal_ids(out, k)]
    assert sorted(union) == sorted(r["id"] for r in ROWS)
    for k in range(SHARDS):
        assert all(shard_of(i, SHARDS) == k for i in journal_ids(out, k))
    # At the API: the global rate limit over any 1-second window, one token for all, one /promo fetch.
    carts = shop.carts()
    assert len(carts) == len(ROWS)
    assert most_in_one_second([r.at for r in carts]) <= RATE
    assert len(shop.api.seen("/oauth/token", "POST")) == 1
    # /promo, the same URL for everyone, was answered only once all shards needed it:
    # the others waited for the first shard's request instead of asking too.
    assert len(shop.api.seen(r"^/promo$")) == 1
    promo_hits = sum(json.loads((out / "shards" / f"{k}-of-{SHARDS}.report.json").read_text())["sources"]["promo"]
                     ["requests"] for k in range(SHARDS))  # fmt: skip
    assert promo_hits == 1  # the shards that needed it after the first did not fetch it

    status = subprocess.run([sys.executable, "-m", "emailpers", "status", str(out)], capture_output=True, text=True)
    assert status.returncode == 0, status.stdout
    assert f"overall: {len(ROWS)} recipients: rendered {len(ROWS)}   (exit 0)" in status.stdout


def test_a_shard_killed_with_sigkill_resumes_only_its_share(
    redis_server: RedisServer, shop: ShopApi, tmp_path: Path
) -> None:
    rows = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": "N"} for i in range(160)]
    campaign = campaign_for(tmp_path / "c", shop, rows, rate=10)
    out = tmp_path / "out"
    share = {r["id"] for r in rows if shard_of(r["id"], SHARDS) == 1}
    process = start_shard(campaign, out, 1, redis_server.url)
    deadline = time.monotonic() + 60
    while len(journal_ids(out, 1)) < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = set(journal_ids(out, 1))
    assert 5 <= len(done_before) < len(share)
    asked_before = len(shop.carts())

    rerun = start_shard(campaign, out, 1, redis_server.url, run=1)
    assert rerun.wait(timeout=120) == 0, rerun.communicate()
    # The rerun (with a disk cache of its own) took /promo from the shared cache.
    assert len(shop.api.seen(r"^/promo$")) == 1
    again = {r.path.removeprefix("/cart/") for r in shop.carts()[asked_before:]}
    assert again and again <= share - done_before  # only its own share, and only what it had not finished
    assert sorted(journal_ids(out, 1)) == sorted(share)  # each of its recipients exactly once
    assert not any(journal_ids(out, k) for k in (0, 2, 3))
    assert len(shop.api.seen("/oauth/token", "POST")) == 1  # the rerun reused the token in Redis


def test_an_outage_trips_every_shards_guard(redis_server: RedisServer, tmp_path: Path) -> None:
    api = Api()
    with running(api):
        shop = ShopApi(api, cart_status=503, hold_carts=True)
        campaign = campaign_for(tmp_path / "c", shop, ROWS[:56], rate=200, concurrency=32)
        results = run_shards(campaign, tmp_path / "out", redis_server.url, "--concurrency", "2")
    # Each shard alone has fewer recipients than the guard's minimum of 20 fetches:
    # only the window they share can stop them all.
    assert max(sum(shard_of(r["id"], SHARDS) == k for r in ROWS[:56]) for k in range(SHARDS)) < 20
    for code, _, stderr in results:
        assert code == 4, results
        assert "source 'shop':" in stderr
    assert len(api.seen(r"^/cart/")) < 56


def test_redis_down_at_start_names_it_without_the_password(tmp_path: Path, shop: ShopApi) -> None:
    campaign = campaign_for(tmp_path / "c", shop)
    port = free_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    result = start_shard(campaign, tmp_path / "out", 0, url)
    code, (stdout, stderr) = result.wait(timeout=60), result.communicate()
    assert code == 1
    assert stderr.startswith(f"Error: cannot reach the backend redis://:***@127.0.0.1:{port}/0: ")
    assert "hunter2" not in stdout + stderr
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert shop.api.requests == []


def test_redis_lost_mid_run_stops_the_shard_and_a_rerun_resumes(shop: ShopApi, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": "N"} for i in range(160)]
    campaign = campaign_for(tmp_path / "c", shop, rows, rate=10)
    out = tmp_path / "out"
    server = start_redis()
    try:
        process = start_shard(campaign, out, 2, server.url)
        deadline = time.monotonic() + 60
        while len(journal_ids(out, 2)) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        server.stop()
        code, (_, stderr) = process.wait(timeout=60), process.communicate()
        assert code == 1, stderr
        assert f"lost the backend {server.url} mid-run" in stderr
        done_before = journal_ids(out, 2)
        share = {r["id"] for r in rows if shard_of(r["id"], SHARDS) == 2}
        assert 3 <= len(done_before) < len(share)  # it stopped: no going on with limits of its own

        server = start_redis(server.port)
        rerun = start_shard(campaign, out, 2, server.url)
        assert rerun.wait(timeout=120) == 0, rerun.communicate()
        assert sorted(journal_ids(out, 2)) == sorted(share)
    finally:
        server.stop()


def test_record_with_a_backend_asks_the_api_not_the_shared_cache(redis_server: RedisServer, tmp_path: Path) -> None:
    api, answer = Api(), {"text": "before"}

    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(200, dict(answer))

    with running(api):
        users = f'[sources.users]\nurl = "{api.url}/v1/users/{{{{ id }}}}"\n'
        campaign = make_campaign(tmp_path, users, people(2), live=["users"])
        assert render(campaign, tmp_path / "warm", "--backend", redis_server.url).exit_code == 0  # cached in Redis
        answer["text"] = "after"

        result = render(campaign, tmp_path / "out", "--backend", redis_server.url, "--record", tmp_path / "fixtures")

    assert result.exit_code == 0, result.output
    # Fixtures record what the API answers now: the cache is neither read nor written.
    assert len(api.seen("/v1/users/")) == 4
    recorded = [p.read_text() for p in (tmp_path / "fixtures").rglob("*") if p.is_file()]
    assert sum("after" in text for text in recorded) == 2 and not any("before" in text for text in recorded)


def test_with_a_backend_the_guard_judges_the_window_all_shards_share_not_its_own(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    api, status = Api(), [200]

    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(status[0], {"user": match.group(1)})

    with running(api):
        users = f'[sources.users]\nurl = "{api.url}/v1/users/{{{{ id }}}}"\nretries = 0\ncache_ttl = 0\n'
        (tmp_path / "first").mkdir()
        (tmp_path / "second").mkdir()
        first = make_campaign(tmp_path / "first", users, people(150), live=["users"])
        assert render(first, tmp_path / "out1", "--backend", redis_server.url).exit_code == 0
        status[0] = 503
        second = make_campaign(tmp_path / "second", users, people(60), live=["users"])

        result = render(second, tmp_path / "out2", "--backend", redis_server.url)

    # The shared window's last 200 fetches: 140 answered, 60 failed (30%, under 50%). This
    # run's own 60 all failed, but its own window is not the one that judges (README, Shards).
    assert len(api.seen("/v1/users/")) == 210
    assert result.exit_code == 0, result.output


def test_a_sources_concurrency_holds_over_every_shard(redis_server: RedisServer, tmp_path: Path) -> None:
    api, in_flight, most = Api(), [0], [0]

    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        with api.lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)
        with api.lock:  # counted out before the answer is written: never more than really in flight
            in_flight[0] -= 1
        return Response(200, {"user": match.group(1)})

    with running(api):
        campaign = write_campaign(tmp_path / "c", template="<p>{{ users.user }}</p>", recipients=ROWS,
                                  sources={"users": source(api.url + "/v1/users/{{ id }}", concurrency=3, cache_ttl=0)})
        results = run_shards(campaign, tmp_path / "out", redis_server.url)

    assert [code for code, _, _ in results] == [0] * SHARDS, results
    # Each shard alone may have 3 in flight; together they may not either (12 without the shared cap).
    assert len(api.seen("/v1/users/")) == len(ROWS) and 1 < most[0] <= 3, most
