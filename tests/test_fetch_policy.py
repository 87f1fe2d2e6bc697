"""The fetch layer's timing and HTTP rules on a fake clock: retry policy
(backoff, jitter, deadline), rate-limit spacing, OAuth renewal margin,
Retry-After, Cache-Control. Each test pins down one piece of arithmetic a
mutation could change without any end-to-end test noticing; the network
parts still go to real loopback servers."""

from __future__ import annotations

import ast
import asyncio
import email.utils
import math
import random
import socket
from pathlib import Path
from typing import Any

import pytest

import emailpers
from emailpers.auth import TokenProvider
from emailpers.cache import ResponseCache
from emailpers.campaign import Auth, load_campaign
from emailpers.errors import BadResponse, FetchTimeout, SourceError, TransientError
from emailpers.fetch import Fetcher
from emailpers.http import ConnectionFailed, HttpClient, parse_max_age, parse_retry_after
from emailpers.pacing import RateLimiter, RetryPolicy, Timing
from emailpers.pipeline import RunOptions, render_campaign

from advanced_servers import Api, running
from conftest import ScriptedAPI, manifest, report, source, write_campaign
from oauth_servers import OneMethodTokenServer


class FakeClock:
    """Time that moves only when someone sleeps (or a test says so)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # still a point where other tasks run

    def timing(self, rng: random.Random | None = None) -> Timing:
        return Timing(clock=self, wall_clock=self, sleep=self.sleep, rng=rng or random.Random(7))


class Fraction(random.Random):
    """A random source whose every draw is `fraction` of the way along."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def random(self) -> float:
        return self.fraction


def policy(clock: FakeClock, rng: random.Random | None = None, **values: Any) -> RetryPolicy:
    settings: dict[str, Any] = {"retries": 3, "deadline": 10.0, "backoff_initial": 1.0, "backoff_max": 8.0}
    settings |= values
    return RetryPolicy(**settings, rng=rng or Fraction(0.5), clock=clock, sleep=clock.sleep)


# -- backoff and jitter ----------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    clock = FakeClock()
    half = policy(clock, Fraction(0.5))
    # Caps 1, 2, 4, 8, then backoff_max: the wait is the drawn fraction of the cap.
    assert [half.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy(clock, Fraction(0.0)).backoff(3) == 0.0
    assert policy(clock, Fraction(0.999)).backoff(20) == pytest.approx(7.992)


def test_jitter_spreads_waits_over_the_whole_range() -> None:
    seeded = policy(FakeClock(), random.Random(42))
    draws = [seeded.backoff(4) for _ in range(200)]  # cap 8
    assert all(0 <= d <= 8 for d in draws)
    assert min(draws) < 0.5 and max(draws) > 7.5  # not a fixed wait, not half the range


# -- when to give up ---------------------------------------------------------------------


def test_retry_after_wins_over_backoff_and_only_transient_errors_are_retried() -> None:
    p = policy(FakeClock())
    assert p.wait(1, TransientError("HTTP 429", 429, retry_after=3.0), elapsed=0.0) == 3.0
    assert p.wait(1, TransientError("HTTP 500", 500), elapsed=0.0) == 0.5
    assert p.wait(2, FetchTimeout("no answer"), elapsed=0.0) == 1.0
    assert p.wait(1, BadResponse("HTTP 404", 404), elapsed=0.0) is None
    assert p.wait(3, TransientError("HTTP 500", 500), elapsed=0.0) == 2.0
    assert p.wait(4, TransientError("HTTP 500", 500), elapsed=0.0) is None  # retries = 3: four attempts in all


def test_a_wait_ending_exactly_at_the_deadline_is_taken() -> None:
    p = policy(FakeClock(), deadline=1.0)
    assert p.wait(1, TransientError("HTTP 503", 503, retry_after=0.25), elapsed=0.75) == 0.25
    assert p.wait(1, TransientError("HTTP 503", 503, retry_after=0.25), elapsed=0.76) is None


def test_the_deadline_counts_from_the_first_attempt_on_the_clock() -> None:
    clock = FakeClock()
    p = policy(clock, retries=10, deadline=1.0)
    calls: list[float] = []

    async def attempt(number: int) -> str:
        calls.append(clock.now - 1000.0)
        clock.now += 0.25  # the attempt itself takes time
        raise TransientError("HTTP 503", 503, retry_after=0.25)

    tried = asyncio.run(p.run(attempt))
    # The second attempt fails at 0.75: its wait ends at 1.0, exactly the deadline,
    # and is taken; the third fails at 1.25, past it.
    assert calls == [0.0, 0.5, 1.0]
    assert tried.attempts == 3
    assert isinstance(tried.error, TransientError) and tried.value is None
    assert clock.slept == [0.25, 0.25]


def test_run_returns_the_value_with_the_attempts_it_took() -> None:
    clock = FakeClock()
    failures: list[SourceError] = [FetchTimeout("no answer"), TransientError("HTTP 502", 502)]

    async def attempt(number: int) -> int:
        if failures:
            raise failures.pop(0)
        return number

    tried = asyncio.run(policy(clock, Fraction(1.0)).run(attempt))
    assert (tried.value, tried.attempts, tried.error) == (3, 3, None)
    assert clock.slept == [1.0, 2.0]


# -- rate limits and tokens ----------------------------------------------------------------


def test_rate_limiter_spaces_requests_one_interval_apart() -> None:
    clock = FakeClock(now=0.0)
    slept: list[float] = []

    async def record(seconds: float) -> None:  # concurrent callers: the clock does not move
        slept.append(seconds)

    limiter = RateLimiter(4.0, clock, record)

    async def main() -> None:
        for _ in range(3):
            await limiter.wait()
        clock.now = 10.0  # idle for long: the next request goes at once, the one after waits again
        await limiter.wait()
        await limiter.wait()

    asyncio.run(main())
    assert slept == [0.25, 0.5, 0.25]


@pytest.mark.parametrize(("expires_in", "renew_at"), [(600, 570.0), (100, 90.0)])
def test_a_token_is_renewed_at_the_margin_before_it_expires(expires_in: float, renew_at: float) -> None:
    """The margin is 30 s, or a tenth of a shorter lifetime; renewal is due
    the moment the margin begins."""
    with running(Api()) as server:
        tokens = OneMethodTokenServer(server, "basic", expires_in=expires_in)
        auth = Auth("oauth2", "[auth.t]", token_url=tokens.token_url, client_id="cid", client_secret="csecret")
        clock = FakeClock(now=0.0)

        async def headers_at(times: list[float]) -> list[str]:
            async with HttpClient(4) as client:
                provider = TokenProvider(auth, client, clock)
                out = []
                for t in times:
                    clock.now = t
                    out.append(await provider.header())
                return out

        got = asyncio.run(headers_at([0.0, renew_at - 0.001, renew_at, renew_at + 1]))
    assert got == ["Bearer tok1", "Bearer tok1", "Bearer tok2", "Bearer tok2"]


# -- Retry-After and Cache-Control -----------------------------------------------------------


def test_retry_after_as_seconds_or_a_date() -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    then = email.utils.parsedate_to_datetime(date).timestamp()
    assert parse_retry_after(date, then - 12) == 12.0
    assert parse_retry_after(date, then + 60) == 0.0  # a date in the past: go now
    assert parse_retry_after(" 120 ", then) == 120.0
    for junk in ("", None, "soon", "²", "-5", "1.5", "Wed, 99 Oct 2015 07:28:00 GMT"):
        assert parse_retry_after(junk, then) is None, junk


def test_cache_control_private_is_not_stored_and_s_maxage_counts() -> None:
    assert parse_max_age("private, max-age=60") == (False, 60.0)
    assert parse_max_age("Private") == (False, None)
    assert parse_max_age("max-age=600, s-maxage=5") == (True, 5.0)
    assert parse_max_age('s-maxage="30"') == (True, 30.0)
    assert parse_max_age("public, max-age=20") == (True, 20.0)
    assert parse_max_age("no-store") == (False, None)
    assert parse_max_age("max-age=²") == (True, None)


def fetch_once(api: ScriptedAPI, tmp_path: Path, headers: dict[str, str]) -> ResponseCache:
    api.serve("/shop/r1", {"products": ["kettle"]}, headers=headers)
    path = write_campaign(tmp_path / "c", sources={"shop": source(f"{api.url}/shop/{{{{ id }}}}", cache_ttl=600)})
    cache = ResponseCache(tmp_path / "cache")

    async def main() -> str:
        async with HttpClient(4) as client:
            fetcher = Fetcher(load_campaign(path), client, cache, timing=FakeClock().timing())
            return (await fetcher.fetch("shop", {"id": "r1"})).outcome

    assert asyncio.run(main()) == "live"
    return cache


def test_a_private_answer_is_not_written_to_the_shared_cache(api: ScriptedAPI, tmp_path: Path) -> None:
    assert fetch_once(api, tmp_path, {"Cache-Control": "private, max-age=60"}).entries() == []


def test_s_maxage_bounds_how_long_an_answer_is_fresh(api: ScriptedAPI, tmp_path: Path) -> None:
    [entry] = fetch_once(api, tmp_path, {"Cache-Control": "max-age=300, s-maxage=5"}).entries()
    assert entry.fresh_for == 5.0


# -- the seams: nothing above http.py knows aiohttp; timing through the entry point ------------


def test_only_http_py_imports_aiohttp() -> None:
    package = Path(emailpers.__file__).parent
    importers = set()
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "aiohttp" for name in names):
                importers.add(module.name)
    assert importers == {"http.py"}


def test_a_refused_connection_is_our_own_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there

    async def main() -> None:
        async with HttpClient(2) as client:
            await client.get(f"http://127.0.0.1:{port}/x", {}, max_bytes=100)

    with pytest.raises(ConnectionFailed) as caught:
        asyncio.run(main())
    assert caught.value.kind.startswith("Client")  # aiohttp's class, named, not raised


def test_render_campaign_retries_on_the_timing_it_is_given(api: ScriptedAPI, tmp_path: Path) -> None:
    """Two 503s that each ask for 30 s, then an answer: the run sleeps a
    minute on the fake clock, none on the real one."""
    api.serve(
        "/shop/r1", {"products": ["kettle"]}, fail_times=2, fail_status=503, fail_headers={"Retry-After": "30"}
    )
    shop = source(f"{api.url}/shop/{{{{ id }}}}", retries=3, deadline=100)
    campaign = load_campaign(write_campaign(tmp_path / "c", sources={"shop": shop}))
    clock = FakeClock()
    out = tmp_path / "out"

    render_campaign(campaign, RunOptions(out=out, workers=0, use_cache=False), timing=clock.timing())

    assert clock.slept == [30.0, 30.0]
    entry = manifest(out)["r1"]
    assert entry["status"] == "rendered"
    assert entry["sources"]["shop"]["outcome"] == "live" and entry["sources"]["shop"]["attempts"] == 3
    assert report(out)["sources"]["shop"]["retries"] == 2
    assert math.isclose(entry["sources"]["shop"]["ms"], 60_000, rel_tol=0.01)  # measured on the fake clock


# -- the environment -------------------------------------------------------------------------


def test_secrets_come_from_the_environment_passed_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOP_TOKEN", raising=False)
    shop = source("https://api.example/shop/{{ id }}", auth={"type": "bearer", "token_env": "SHOP_TOKEN"})
    path = write_campaign(tmp_path / "c", sources={"shop": shop})
    campaign = load_campaign(path, env={"SHOP_TOKEN": "s3cret"})
    auth = campaign.sources["shop"].auth
    assert auth is not None and auth.secret == "s3cret"
    monkeypatch.setenv("SHOP_TOKEN", "from-the-process")
    with pytest.raises(emailpers.errors.CampaignError, match="SHOP_TOKEN is not set"):
        load_campaign(path, env={})


# -- the cache reads back what it wrote --------------------------------------------------------


def test_a_cache_that_started_empty_returns_what_it_wrote_after_a_flush(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache")
    cache.set("k1", data={"n": 1}, fresh_for=60, keep_for=60, source="shop", url="https://api.example/1")
    entry = cache.get("k1")
    assert entry is not None and entry.data == {"n": 1}  # still in the write buffer
    cache.flush()
    entry = cache.get("k1")
    assert entry is not None and entry.data == {"n": 1}  # committed: read back from SQLite
    assert cache.get("k2") is None
    cache.close()


def test_a_shared_entry_is_read_from_sqlite_once_and_never_outlives_its_freshness(tmp_path: Path) -> None:
    """Decoded entries stay in memory (weather by city: one key, thousands of
    recipients), but a newer write replaces them and past fresh the database
    decides again, so stale-if-error and expiry mean what they meant."""
    now = [1000.0]
    writer = ResponseCache(tmp_path / "cache", clock=lambda: now[0])
    writer.set("city", data={"t": 1}, fresh_for=60, keep_for=600, source="weather", url="https://api.example/w")
    writer.close()
    cache = ResponseCache(tmp_path / "cache", clock=lambda: now[0])
    reads: list[str] = []
    get = cache._cache.get

    def counted(key: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(key)
        return get(key, *args, **kwargs)

    cache._cache.get = counted
    for _ in range(100):
        entry = cache.get("city")
        assert entry is not None and entry.data == {"t": 1}
    assert reads == ["city"]

    cache.set("city", data={"t": 2}, fresh_for=60, keep_for=600, source="weather", url="https://api.example/w")
    cache.flush()
    entry = cache.get("city")
    assert entry is not None and entry.data == {"t": 2}  # the write, not the decoded copy
    now[0] += 61  # past fresh: read again, and given as it is, stale
    entry = cache.get("city")
    assert entry is not None and not entry.is_fresh(now[0]) and reads[-1] == "city" and len(reads) == 3
    cache.close()


def test_a_cold_cache_holds_nothing_per_key_it_wrote(tmp_path: Path) -> None:
    """What a cache that started empty remembers of its writes (so a cold run
    skips lookups that all miss) is a fixed-size sketch, not a set that grew
    ~60 bytes a key: 59 MB of the main process at a million recipients."""
    import tracemalloc

    cache = ResponseCache(tmp_path / "cache")
    data = {"items": ["kettle"]}
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for n in range(30_000):
            cache.set(f"k{n}", data=data, fresh_for=60, keep_for=60, source="shop", url="https://api.example/x")
        cache.flush()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 500_000, grown  # the set of hashes: ~2 MB here
    assert cache.get("k29999") is not None and cache.get("k30000") is None
    cache.close()


def test_the_decoded_entries_are_bounded_by_count_and_bytes(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache")
    for i in range(cache.RECENT_ENTRIES + 50):
        cache.set(f"k{i}", data={"n": i}, fresh_for=60, keep_for=60, source="shop", url=f"https://api.example/{i}")
    big = "x" * (cache.RECENT_BYTES // 3)
    for i in range(4):
        cache.set(f"big{i}", data=big, fresh_for=60, keep_for=60, source="shop", url=f"https://api.example/b{i}")
    cache.flush()
    for i in range(cache.RECENT_ENTRIES + 50):
        assert cache.get(f"k{i}") is not None
    assert len(cache._recent) == cache.RECENT_ENTRIES
    for i in range(4):
        assert cache.get(f"big{i}") is not None
    assert cache._recent.used <= cache.RECENT_BYTES and len(cache._recent) < cache.RECENT_ENTRIES
    cache.close()


def test_an_entry_cleared_by_source_is_gone_from_memory_too(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache")
    for name in ("shop", "weather"):
        cache.set(name, data={"from": name}, fresh_for=60, keep_for=60, source=name, url="https://api.example/")
    cache.flush()

    assert cache.clear("shop") == 1

    assert cache.get("shop") is None  # clearing read it to learn its source: it must not stay decoded in memory
    entry = cache.get("weather")
    assert entry is not None and entry.data == {"from": "weather"}
    cache.close()
