"""Issue 3, source features, against real loopback servers: OAuth tokens,
Retry-After, rate limits, per-source concurrency, dedupe, batching,
Cache-Control and stale-if-error, body and redirect limits, the cache
commands, and --max-error-rate.

Timing assertions are lower bounds measured at the server (a client that is
too eager fails them); nothing asserts that emailpers is fast.
"""

from __future__ import annotations

import asyncio
import email.utils
import gc
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emailpers.campaign import load_campaign
from emailpers.fetch import Fetcher
from emailpers.pipeline import make_client

from advanced_servers import Api, Request, Response, TokenServer, running
from conftest import CITIES, invoke, make_campaign, manifest, outcomes, people, report
from conftest import render_html as render

SOURCE_KEYS = {
    "requests", "cache_hits", "dedupe_hits", "batches", "retries", "errors", "status_429",
    "stale", "token_renewals", "fallbacks", "latency_ms",
}  # fmt: skip


# -- fixtures and helpers ----------------------------------------------------------


@pytest.fixture
def api() -> Iterator[Api]:
    with running(Api()) as server:
        yield server


@pytest.fixture
def other_api() -> Iterator[Api]:
    """A second server: same host, another port, so another origin."""
    with running(Api()) as server:
        yield server


def user_of(request: Request) -> str:
    return request.path.rsplit("/", 1)[-1]


# -- auth ------------------------------------------------------------------------------


def oauth_sources(api: Api, tokens: TokenServer, extra: str = "", names: tuple[str, ...] = ("profile", "orders")) -> str:
    """Sources on /v1/<name>/<id>, all with `auth = "shop"`: one [auth.shop] table."""
    auth = f"""
[auth.shop]
type = "oauth2"
token_url = "{tokens.token_url}"
client_id_env = "SHOP_CLIENT_ID"
client_secret_env = "SHOP_CLIENT_SECRET"
scope = "users:read"
"""
    return auth + "".join(
        f'\n[sources.{n}]\nurl = "{api.url}/v1/{n}/{{{{ id }}}}"\nauth = "shop"\nretries = 0\n{extra}\n' for n in names
    )


@pytest.fixture
def oauth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_CLIENT_ID", "cid")
    monkeypatch.setenv("SHOP_CLIENT_SECRET", "csecret")


def guarded(api: Api, tokens: TokenServer) -> None:
    """/v1/<kind>/<id> answers 200 only with a valid token."""

    @api.route(r"/v1/(profile|orders)/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        if tokens.check(request) is None:
            return Response(401, {"error": "invalid_token"})
        return Response(200, {"kind": match.group(1), "user": match.group(2)})


def test_oauth2_one_token_shared_by_all_requests_and_sources(api: Api, oauth_env: None, tmp_path: Path) -> None:
    tokens = TokenServer(api, expires_in=600)
    guarded(api, tokens)
    campaign = make_campaign(tmp_path, oauth_sources(api, tokens), people(20), live=["profile", "orders"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert len(tokens.issued) == 1
    token_calls = api.seen("/oauth/token", "POST")
    assert len(token_calls) == 1
    assert "scope=users%3Aread" in token_calls[0].body.decode()
    data_calls = api.seen("/v1/")
    assert len(data_calls) == 40
    assert {r.headers["authorization"] for r in data_calls} == {"Bearer tok1"}
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    assert set(outcomes(tmp_path / "out", "orders").values()) == {"live"}
    assert report(tmp_path / "out")["sources"]["profile"]["token_renewals"] == 0


def test_oauth2_token_renewed_before_it_expires(api: Api, oauth_env: None, tmp_path: Path) -> None:
    # Tokens live 2 s; 30 recipients at 10 requests/s take ~3 s, so the run
    # outlives the first token. No request may reach the API with an expired
    # token, nor one in its last 0.1 s: renewal must come before the expiry.
    tokens = TokenServer(api, expires_in=2, refuse_within=0.1)
    guarded(api, tokens)
    sources = oauth_sources(api, tokens, "rate_limit = 10", names=("profile",))
    campaign = make_campaign(tmp_path, sources, people(30), live=["profile"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    calls = api.seen("/v1/profile/")
    assert len(calls) == 30, "a request was repeated: some token was refused"
    assert tokens.refused == []
    span = calls[-1].at - calls[0].at
    assert span >= 2.0
    assert len(tokens.issued) >= 2
    # Renewed per lifetime, not per request.
    assert len(tokens.issued) <= span / 1.5 + 2
    assert report(tmp_path / "out")["sources"]["profile"]["token_renewals"] == len(tokens.issued) - 1


def test_oauth2_token_renewed_once_on_401_then_request_retried(api: Api, oauth_env: None, tmp_path: Path) -> None:
    tokens = TokenServer(api, expires_in=600)
    served = []

    @api.route(r"/v1/profile/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        token = tokens.check(request)
        if token is None:
            return Response(401, {"error": "invalid_token"})
        with api.lock:
            served.append(token)
            if len(served) == 5:
                tokens.revoked.add("tok1")  # the provider revokes it early
        return Response(200, {"user": match.group(1)}, delay=0.02)

    sources = f"""
[sources.profile]
url = "{api.url}/v1/profile/{{{{ id }}}}"
auth = {{ type = "oauth2", token_url = "{tokens.token_url}", client_id_env = "SHOP_CLIENT_ID", client_secret_env = "SHOP_CLIENT_SECRET" }}
retries = 0
concurrency = 4
"""
    campaign = make_campaign(tmp_path, sources, people(20), live=["profile"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    # retries = 0, yet no recipient failed: a 401 renews the token and repeats the request.
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    assert [t for t, _ in tokens.issued] == ["tok1", "tok2"], "one renewal, shared by the concurrent 401s"
    assert tokens.refused and set(tokens.refused) == {"tok1"}
    assert len(served) == 20
    assert report(tmp_path / "out")["sources"]["profile"]["token_renewals"] == 1


def test_oauth2_401_after_renewal_counts_as_failed(api: Api, oauth_env: None, tmp_path: Path) -> None:
    tokens = TokenServer(api, expires_in=600)

    @api.route(r"/v1/profile/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        if tokens.check(request) is None or match.group(1) == "u2":
            return Response(401, {"error": "invalid_token"})
        return Response(200, {"user": match.group(1)})

    sources = f"""
[sources.profile]
url = "{api.url}/v1/profile/{{{{ id }}}}"
auth = {{ type = "oauth2", token_url = "{tokens.token_url}", client_id_env = "SHOP_CLIENT_ID", client_secret_env = "SHOP_CLIENT_SECRET" }}
retries = 3
backoff_initial = 0.01
concurrency = 1
"""
    campaign = make_campaign(tmp_path, sources, people(3), live=["profile"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    entry = manifest(tmp_path / "out")["u2"]
    assert entry["status"] == "fallback"
    assert entry["sources"]["profile"]["outcome"] == "error"
    assert entry["sources"]["profile"]["status_code"] == 401
    # Once with the old token, once with the renewed one; a 401 is not retried further.
    assert len(api.seen("/v1/profile/u2")) == 2
    assert len(tokens.issued) == 2
    assert outcomes(tmp_path / "out", "profile")["u3"] == "live"


def test_token_endpoint_failure_stops_the_run_with_a_clear_error(api: Api, oauth_env: None, tmp_path: Path) -> None:
    tokens = TokenServer(api, fail_with=401)
    guarded(api, tokens)
    campaign = make_campaign(tmp_path, oauth_sources(api, tokens), people(10), live=["profile", "orders"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1, result.output
    assert "Error:" in result.stderr
    assert tokens.token_url in result.stderr
    assert "401" in result.stderr
    assert api.seen("/v1/") == []
    # Not a run of fallback emails.
    out = tmp_path / "out"
    assert list(out.glob("messages/*")) == []
    assert not (out / "manifest.jsonl").exists() or manifest(out) == {}


def test_auth_table_and_inline_auth_of_the_same_name_get_their_own_tokens(
    api: Api, other_api: Api, oauth_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CRM_CLIENT_ID", "cid2")
    monkeypatch.setenv("CRM_CLIENT_SECRET", "csecret2")
    shop = TokenServer(api, prefix="shop")
    crm = TokenServer(other_api, prefix="crm", client_id="cid2", client_secret="csecret2")

    @api.route(r"/v1/(profile|orders)/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        tokens = crm if match.group(1) == "profile" else shop
        if tokens.check(request) is None:
            return Response(401, {"error": "invalid_token"})
        return Response(200, {"user": match.group(2)})

    # [auth.profile] is shared by name; the source called profile has auth of its own.
    sources = f"""
[auth.profile]
type = "oauth2"
token_url = "{shop.token_url}"
client_id_env = "SHOP_CLIENT_ID"
client_secret_env = "SHOP_CLIENT_SECRET"

[sources.profile]
url = "{api.url}/v1/profile/{{{{ id }}}}"
auth = {{ type = "oauth2", token_url = "{crm.token_url}", client_id_env = "CRM_CLIENT_ID", client_secret_env = "CRM_CLIENT_SECRET" }}
retries = 0

[sources.orders]
url = "{api.url}/v1/orders/{{{{ id }}}}"
auth = "profile"
retries = 0
"""
    campaign = make_campaign(tmp_path, sources, people(4), live=["profile", "orders"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    assert set(outcomes(tmp_path / "out", "orders").values()) == {"live"}
    assert (len(shop.issued), len(crm.issued)) == (1, 1)


def test_request_repeated_after_401_waits_for_the_rate_limit(api: Api, oauth_env: None, tmp_path: Path) -> None:
    tokens = TokenServer(api, expires_in=600)
    tokens.single_use = True  # every recipient's first try gets a 401, then renews and repeats
    guarded(api, tokens)
    sources = oauth_sources(api, tokens, "rate_limit = 10\nconcurrency = 1", names=("profile",))
    campaign = make_campaign(tmp_path, sources, people(8), live=["profile"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    calls = api.seen("/v1/profile/")
    assert len(calls) == 15  # 1 + 7 x (401, repeat)
    # 15 requests at 10/s: 14 gaps of 100 ms, the repeats included.
    assert calls[-1].at - calls[0].at >= 1.2
    assert report(tmp_path / "out")["sources"]["profile"]["requests"] == 15


def test_token_endpoint_failure_with_a_batched_source_is_one_clean_error(
    api: Api, oauth_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = TokenServer(api, fail_with=500)
    sources = f"""
[sources.users]
url = "{api.url}/v1/users/{{{{ id }}}}"
auth = {{ type = "oauth2", token_url = "{tokens.token_url}", client_id_env = "SHOP_CLIENT_ID", client_secret_env = "SHOP_CLIENT_SECRET" }}
batch = {{ url = "{api.url}/v1/users?ids={{{{ ids|join(',') }}}}", size = 10, items = "users", key = "user_id" }}
"""
    campaign = make_campaign(tmp_path, sources, people(25), live=["users"])

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        result = render(campaign, tmp_path / "out")
        gc.collect()  # an unretrieved task exception is logged when the task is collected

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and tokens.token_url in result.stderr
    assert [r.getMessage() for r in caplog.records] == []


def test_static_auth_kinds_send_their_headers(api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("T_BEARER", "b-secret")
    monkeypatch.setenv("T_KEY", "k-secret")
    monkeypatch.setenv("T_USER", "alice")
    monkeypatch.setenv("T_PASS", "p:ss")

    @api.route(r"/v1/(\w+)/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(200, {"ok": True})

    sources = f"""
[sources.bearer]
url = "{api.url}/v1/bearer/{{{{ id }}}}"
auth = {{ type = "bearer", token_env = "T_BEARER" }}

[sources.key]
url = "{api.url}/v1/key/{{{{ id }}}}"
auth = {{ type = "header", name = "X-API-Key", value_env = "T_KEY" }}

[sources.basic]
url = "{api.url}/v1/basic/{{{{ id }}}}"
auth = {{ type = "basic", username_env = "T_USER", password_env = "T_PASS" }}
"""
    campaign = make_campaign(tmp_path, sources, people(1), live=["bearer", "key", "basic"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert api.seen("/v1/bearer/")[0].headers["authorization"] == "Bearer b-secret"
    assert api.seen("/v1/key/")[0].headers["x-api-key"] == "k-secret"
    assert api.seen("/v1/basic/")[0].headers["authorization"] == "Basic YWxpY2U6cDpzcw=="  # alice:p:ss

    monkeypatch.delenv("T_PASS")
    result = render(campaign, tmp_path / "out2")
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "T_PASS is not set" in result.stderr


# -- Retry-After, backoff, deadline ------------------------------------------------------


def flaky_once(api: Api, status: int, retry_after: str | Any) -> None:
    """/v1/users/<id>: the first call answers `status` with Retry-After, then 200."""

    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        if len(api.seen(request.path)) == 1:
            value = retry_after() if callable(retry_after) else retry_after
            return Response(status, {"error": "slow down"}, {"Retry-After": value})
        return Response(200, {"user": match.group(1)})


def users_source(api: Api, extra: str = "") -> str:
    return f'[sources.users]\nurl = "{api.url}/v1/users/{{{{ id }}}}"\n{extra}\n'


def test_retry_after_seconds_on_429_sets_the_wait(api: Api, tmp_path: Path) -> None:
    flaky_once(api, 429, "1")
    campaign = make_campaign(tmp_path, users_source(api, "backoff_initial = 0.01\nbackoff_max = 0.01"), people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    first, second = api.seen("/v1/users/u1")
    assert second.at - first.at >= 0.98  # Retry-After, not the 0.01 s backoff
    entry = manifest(tmp_path / "out")["u1"]["sources"]["users"]
    assert (entry["outcome"], entry["attempts"]) == ("live", 2)
    stats = report(tmp_path / "out")["sources"]["users"]
    assert (stats["status_429"], stats["retries"], stats["requests"]) == (1, 1, 2)


def test_retry_after_http_date_on_503_sets_the_wait(api: Api, tmp_path: Path) -> None:
    dates: list[float] = []

    def in_two_seconds() -> str:
        when = int(time.time()) + 2  # HTTP dates have whole seconds: a wait of 1-2 s
        dates.append(when)
        return email.utils.formatdate(when, usegmt=True)

    flaky_once(api, 503, in_two_seconds)
    campaign = make_campaign(tmp_path, users_source(api, "backoff_initial = 0.01\nbackoff_max = 0.01"), people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    first, second = api.seen("/v1/users/u1")
    assert second.wall >= dates[0] - 0.05, "came back before the Retry-After date"
    assert second.at - first.at >= 0.9
    assert manifest(tmp_path / "out")["u1"]["sources"]["users"]["outcome"] == "live"


def test_retry_after_beyond_the_deadline_is_not_waited_for(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(429, {"error": "later"}, {"Retry-After": "30"})

    campaign = make_campaign(tmp_path, users_source(api, "deadline = 2"), people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert len(api.seen("/v1/users/")) == 1
    entry = manifest(tmp_path / "out")["u1"]
    assert entry["status"] == "fallback"
    assert (entry["sources"]["users"]["outcome"], entry["sources"]["users"]["status_code"]) == ("error", 429)
    assert report(tmp_path / "out")["sources"]["users"]["status_429"] == 1


def test_retries_stop_at_the_deadline(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(503, {"error": "maintenance"}, {"Retry-After": "1"})

    # Attempts at 0 s, 1 s, 2 s; a fourth at 3 s would pass the 2.5 s budget.
    campaign = make_campaign(tmp_path, users_source(api, "retries = 10\ndeadline = 2.5"), people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    calls = api.seen("/v1/users/")
    assert len(calls) == 3
    assert calls[2].at - calls[0].at >= 1.95
    users = manifest(tmp_path / "out")["u1"]["sources"]["users"]
    assert (users["outcome"], users["status_code"], users["attempts"]) == ("error", 503, 3)


def test_server_errors_retried_with_backoff_then_succeed(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        if len(api.seen(request.path)) <= 2:
            return Response(500, {"error": "boom"})
        return Response(200, {"user": match.group(1)})

    campaign = make_campaign(tmp_path, users_source(api, "retries = 2\nbackoff_initial = 0.01"), people(2), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "users").values()) == {"live"}
    assert len(api.seen("/v1/users/")) == 6
    assert report(tmp_path / "out")["sources"]["users"]["retries"] == 4


# -- rate limit, concurrency, dedupe ------------------------------------------------------


def test_rate_limit_is_shared_by_concurrent_fetches(api: Api, tmp_path: Path) -> None:
    api.echo(r"/v1/users/(\w+)")

    campaign = make_campaign(tmp_path, users_source(api, "rate_limit = 20"), people(30), live=["users"])

    result = render(campaign, tmp_path / "out", "--concurrency", "32")

    assert result.exit_code == 0, result.output
    calls = api.seen("/v1/users/")
    assert len(calls) == 30
    # 30 requests at 20/s: 29 gaps of 50 ms.
    assert calls[-1].at - calls[0].at >= 1.35


def test_per_source_concurrency_overrides_the_global_one(api: Api, other_api: Api, tmp_path: Path) -> None:
    for server in (api, other_api):

        server.echo(r"/v1/users/(\w+)", delay=0.1)

    sources = users_source(api, "concurrency = 3") + f'[sources.other]\nurl = "{other_api.url}/v1/users/{{{{ id }}}}"\n'
    campaign = make_campaign(tmp_path, sources, people(24), live=["users", "other"])

    result = render(campaign, tmp_path / "out", "--concurrency", "16")

    assert result.exit_code == 0, result.output
    assert len(api.seen("/v1/users/")) == 24
    assert api.max_in_flight <= 3
    assert api.max_in_flight >= 2
    # The other source is held only by --concurrency.
    assert other_api.max_in_flight > 3


@pytest.mark.parametrize("cache_flag", [[], ["--no-cache"]], ids=["cache", "no-cache"])
def test_identical_requests_are_sent_once(api: Api, tmp_path: Path, cache_flag: list[str]) -> None:
    @api.route(r"/v1/weather/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(200, {"city": match.group(1), "temp_c": len(match.group(1))}, delay=0.05)

    sources = f'[sources.weather]\nurl = "{api.url}/v1/weather/{{{{ city }}}}"\n'
    campaign = make_campaign(tmp_path, sources, people(40), live=["weather"])

    # A small window, so later recipients arrive after the first answers are in.
    result = render(campaign, tmp_path / "out", "--concurrency", "2", *cache_flag)

    assert result.exit_code == 0, result.output
    calls = api.seen("/v1/weather/")
    assert sorted(user_of(r) for r in calls) == sorted(CITIES)
    assert set(outcomes(tmp_path / "out", "weather").values()) <= {"live", "cache"}
    html = (tmp_path / "out" / "messages" / "u4.html").read_text()  # u4 lives in Lagos
    assert "Lagos" in html
    stats = report(tmp_path / "out")["sources"]["weather"]
    assert stats["requests"] == 3
    assert stats["dedupe_hits"] + stats["cache_hits"] == 37


def test_report_has_every_source_figure(api: Api, tmp_path: Path) -> None:
    api.echo(r"/v1/users/(\w+)")

    campaign = make_campaign(tmp_path, users_source(api), people(5), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    stats = report(tmp_path / "out")["sources"]["users"]
    assert SOURCE_KEYS <= set(stats)
    assert set(stats["latency_ms"]) == {"p50", "p95", "p99", "max"}
    lat = stats["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert stats["requests"] == 5


# -- batching -----------------------------------------------------------------------------


def batch_sources(api: Api, size: int = 10, extra: str = "") -> str:
    return f"""
[sources.users]
url = "{api.url}/v1/users/{{{{ id }}}}"
batch = {{ url = "{api.url}/v1/users?ids={{{{ ids|join(',') }}}}", size = {size}, items = "users", key = "user_id" }}
{extra}
"""


def batch_endpoint(api: Api, missing: set[str]) -> list[list[str]]:
    carried: list[list[str]] = []

    @api.route(r"/v1/users")
    def _(request: Request, match: re.Match[str]) -> Response:
        ids = request.query["ids"][0].split(",")
        carried.append(ids)
        return Response(200, {"users": [{"user_id": i, "points": int(i[1:]) * 10} for i in ids if i not in missing]})

    return carried


def test_batches_carry_up_to_size_ids_and_cover_everyone_once(api: Api, tmp_path: Path) -> None:
    carried = batch_endpoint(api, missing={"u7"})
    campaign = make_campaign(tmp_path, batch_sources(api), people(25), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert len(carried) == 3
    assert sorted(len(ids) for ids in carried) == [5, 10, 10]
    every = [i for ids in carried for i in ids]
    assert sorted(every) == sorted(p["id"] for p in people(25))
    assert "%2C" in api.seen("/v1/users")[0].raw_query  # the comma is a template value, so it is encoded
    assert api.seen("/v1/users/") == []  # no per-recipient requests

    entries = manifest(tmp_path / "out")
    assert entries["u7"]["sources"]["users"]["outcome"] == "error"
    assert "u7" in entries["u7"]["sources"]["users"]["error"]
    assert entries["u7"]["status"] == "fallback"
    assert [b["sources"] for b in entries["u7"]["fallback_blocks"]] == [["users"]]
    assert {e["status"] for rid, e in entries.items() if rid != "u7"} == {"rendered"}
    # Each recipient got its own object from the list.
    assert '"points": 120' in (tmp_path / "out" / "messages" / "u12.html").read_text()
    stats = report(tmp_path / "out")["sources"]["users"]
    assert stats["batches"] == 3
    assert stats["errors"] == 1


def test_batch_leaves_after_linger_when_the_stream_is_slow(api: Api, tmp_path: Path) -> None:
    carried = batch_endpoint(api, missing=set())
    campaign = load_campaign(make_campaign(tmp_path, batch_sources(api, extra=""), people(3), live=["users"]))

    async def main() -> list[str]:
        async with make_client(8) as client:
            fetcher = Fetcher(campaign, client, None)
            tasks = []
            for person in people(3):
                tasks.append(asyncio.create_task(fetcher.fetch("users", person)))
                await asyncio.sleep(0.3)  # far longer than the 0.05 s linger
            return [r.outcome for r in await asyncio.gather(*tasks)]

    assert asyncio.run(main()) == ["live", "live", "live"]
    assert carried == [["u1"], ["u2"], ["u3"]]


# -- Cache-Control, stale-if-error, cache commands ------------------------------------------


def test_cache_control_max_age_and_no_store_force_a_refetch(api: Api, tmp_path: Path) -> None:
    headers = {"maxage0": {"Cache-Control": "max-age=0"}, "nostore": {"Cache-Control": "no-store"},
               "nocache": {"Cache-Control": "no-cache"}, "plain": {}}

    @api.route(r"/v1/(\w+)/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(200, {"user": match.group(2)}, headers[match.group(1)])

    sources = "".join(f'[sources.{n}]\nurl = "{api.url}/v1/{n}/{{{{ id }}}}"\ncache_ttl = 300\n' for n in headers)
    campaign = make_campaign(tmp_path, sources, people(3), live=list(headers))

    assert render(campaign, tmp_path / "out1").exit_code == 0
    result = render(campaign, tmp_path / "out2")

    assert result.exit_code == 0, result.output
    for name in ("maxage0", "nostore", "nocache"):
        assert len(api.seen(f"/v1/{name}/")) == 6, name
        assert set(outcomes(tmp_path / "out2", name).values()) == {"live"}
    assert len(api.seen("/v1/plain/")) == 3
    assert set(outcomes(tmp_path / "out2", "plain").values()) == {"cache"}


def test_cache_control_max_age_lowers_the_ttl(api: Api, tmp_path: Path) -> None:
    api.echo(r"/v1/users/(\w+)", headers={"Cache-Control": "public, max-age=2"})

    campaign = make_campaign(tmp_path, users_source(api, "cache_ttl = 300"), people(2), live=["users"])

    assert render(campaign, tmp_path / "out1").exit_code == 0
    stored_by = time.monotonic()
    assert render(campaign, tmp_path / "out2").exit_code == 0
    assert set(outcomes(tmp_path / "out2", "users").values()) == {"cache"}
    time.sleep(max(0.0, stored_by + 2.2 - time.monotonic()))
    assert render(campaign, tmp_path / "out3").exit_code == 0

    assert set(outcomes(tmp_path / "out3", "users").values()) == {"live"}
    assert len(api.seen("/v1/users/")) == 4


def test_stale_data_used_when_the_api_goes_down_after_cache_warm(tmp_path: Path) -> None:
    api = Api()

    @api.route(r"/v1/(\w+)/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(200, {"user": match.group(2), "points": 42})

    with running(api):
        sources = (
            f'[sources.kept]\nurl = "{api.url}/v1/kept/{{{{ id }}}}"\ncache_ttl = 1\nstale_if_error = 3600\nretries = 0\n\n'
            f'[sources.plain]\nurl = "{api.url}/v1/plain/{{{{ id }}}}"\ncache_ttl = 1\nretries = 0\n\n'
            f'[sources.brief]\nurl = "{api.url}/v1/brief/{{{{ id }}}}"\ncache_ttl = 1\nstale_if_error = 0.1\nretries = 0\n'
        )
        campaign = make_campaign(tmp_path, sources, people(4), live=["kept", "plain", "brief"])
        warm = invoke("cache", "warm", str(campaign), "--no-progress")
        assert warm.exit_code == 0, warm.output
        assert len(api.seen("/v1/")) == 12
    # The API is down now (connection refused), and the entries are past cache_ttl.
    time.sleep(1.2)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    entries = manifest(tmp_path / "out")
    assert {e["sources"]["kept"]["outcome"] for e in entries.values()} == {"stale"}
    assert {e["sources"]["plain"]["outcome"] for e in entries.values()} == {"error"}
    # Expired more than stale_if_error ago: too old to stand in.
    assert {e["sources"]["brief"]["outcome"] for e in entries.values()} == {"error"}
    assert {tuple(b["sources"]) for e in entries.values() for b in e["fallback_blocks"]} == {("plain",), ("brief",)}
    assert "42" in (tmp_path / "out" / "messages" / "u1.html").read_text()
    stats = report(tmp_path / "out")["sources"]
    assert stats["kept"]["stale"] == 4
    assert stats["kept"]["errors"] == 0
    assert stats["plain"]["errors"] == 4


def test_cache_warm_stats_and_clear(api: Api, tmp_path: Path) -> None:
    api.echo(r"/v1/(\w+)/(\w+)", group=2)

    sources = "".join(f'[sources.{n}]\nurl = "{api.url}/v1/{n}/{{{{ id }}}}"\n' for n in ("cart", "loyalty"))
    campaign = make_campaign(tmp_path, sources, people(5), live=["cart", "loyalty"])

    warm = invoke("cache", "warm", str(campaign), "--no-progress")
    assert warm.exit_code == 0, warm.output
    assert "source cart: 5 requests" in warm.output
    assert not (tmp_path / "out").exists()

    stats = invoke("cache", "stats", str(campaign), "--json")
    assert stats.exit_code == 0, stats.output
    figures = json.loads(stats.output)
    assert figures["entries"] == 10
    assert figures["sources"]["cart"]["entries"] == 5
    assert figures["sources"]["cart"]["fresh"] == 5
    assert figures["directory"] == str(tmp_path / ".emailpers-cache")

    text = invoke("cache", "stats", str(campaign))
    assert text.exit_code == 0
    assert "10 entries" in text.output
    assert "  cart: 5 entries (5 fresh)" in text.output

    # A render after the warm reads the cache.
    assert render(campaign, tmp_path / "out").exit_code == 0
    assert len(api.seen("/v1/")) == 10
    assert set(outcomes(tmp_path / "out", "cart").values()) == {"cache"}

    cleared = invoke("cache", "clear", str(campaign), "--source", "loyalty")
    assert cleared.exit_code == 0, cleared.output
    assert cleared.output.strip() == "Removed 5 cached responses of source loyalty."
    assert set(json.loads(invoke("cache", "stats", str(campaign), "--json").output)["sources"]) == {"cart"}

    unknown = invoke("cache", "clear", str(campaign), "--source", "nope")
    assert unknown.exit_code == 2
    assert "'nope' is not a source of this campaign" in unknown.output

    assert invoke("cache", "clear", str(campaign)).output.strip() == "Removed 5 cached responses."
    assert json.loads(invoke("cache", "stats", str(campaign), "--json").output)["entries"] == 0


# -- limits: body size, http, redirects ----------------------------------------------------


def test_body_larger_than_max_bytes_is_an_error_for_that_recipient(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        size = 5000 if match.group(1) == "u2" else 10
        return Response(200, {"user": match.group(1), "pad": "x" * size})

    campaign = make_campaign(tmp_path, users_source(api, "max_bytes = 1000\nretries = 0"), people(3), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    entries = manifest(tmp_path / "out")
    assert entries["u2"]["sources"]["users"]["outcome"] == "error"
    assert "max_bytes" in entries["u2"]["sources"]["users"]["error"]
    assert entries["u2"]["status"] == "fallback"
    assert {entries["u1"]["status"], entries["u3"]["status"]} == {"rendered"}


def test_default_max_bytes_is_one_mebibyte(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(200, b'"' + b"x" * (1024 * 1024) + b'"')

    campaign = make_campaign(tmp_path, users_source(api, "retries = 0"), people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "max_bytes (1048576 bytes)" in manifest(tmp_path / "out")["u1"]["sources"]["users"]["error"]


def test_plain_http_to_a_remote_host_is_refused_at_load(tmp_path: Path) -> None:
    sources = '[sources.users]\nurl = "http://api.example.com/v1/users/{{ id }}"\n'
    campaign = make_campaign(tmp_path, sources, people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "campaign.toml:" in result.stderr
    assert "[sources.users] url" in result.stderr
    assert "api.example.com" in result.stderr
    assert "allow_insecure_http = true" in result.stderr
    assert not (tmp_path / "out").exists()

    campaign.write_text(campaign.read_text() + "allow_insecure_http = true\n")
    assert load_campaign(campaign).sources["users"].allow_insecure_http is True


def test_redirects_are_not_followed_by_default(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/old/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(302, {}, {"Location": f"/v1/new/{match.group(1)}"})

    api.echo(r"/v1/new/(\w+)")

    sources = f'[sources.users]\nurl = "{api.url}/v1/old/{{{{ id }}}}"\nretries = 0\n'
    campaign = make_campaign(tmp_path, sources, people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    users = manifest(tmp_path / "out")["u1"]["sources"]["users"]
    assert (users["outcome"], users["status_code"]) == ("error", 302)
    assert "follow_redirects" in users["error"]
    assert api.seen("/v1/new/") == []

    campaign.write_text(campaign.read_text() + "follow_redirects = true\n")
    result = render(campaign, tmp_path / "out2", "--no-cache")

    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "out2")["u1"]["sources"]["users"]["outcome"] == "live"
    assert len(api.seen("/v1/new/u1")) == 1


def test_redirect_to_another_origin_is_refused(api: Api, other_api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/old/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        # Same host name, another port: another origin, which could be anything.
        return Response(307, {}, {"Location": f"{other_api.url}/v1/new/{match.group(1)}"})

    other_api.echo(r"/v1/new/(\w+)")

    sources = f'[sources.users]\nurl = "{api.url}/v1/old/{{{{ id }}}}"\nretries = 0\nfollow_redirects = true\n'
    campaign = make_campaign(tmp_path, sources, people(1), live=["users"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    users = manifest(tmp_path / "out")["u1"]["sources"]["users"]
    assert users["outcome"] == "error"
    assert "another host" in users["error"]
    assert other_api.requests == []


# -- --max-error-rate -----------------------------------------------------------------------


def test_max_error_rate_stops_early_with_exit_4_and_a_rerun_resumes(api: Api, tmp_path: Path) -> None:
    healthy = threading.Event()

    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        if healthy.is_set():
            return Response(200, {"user": match.group(1)})
        return Response(500, {"error": "database down"})

    campaign = make_campaign(tmp_path, users_source(api, "retries = 0"), people(80), live=["users"])
    out = tmp_path / "out"

    result = render(campaign, out, "--max-error-rate", "0.5", "--concurrency", "2")

    assert result.exit_code == 4, result.output
    assert "Error:" in result.stderr
    assert "source 'users'" in result.stderr
    assert "most common error: HTTP 500" in result.stderr
    first = manifest(out)
    assert 15 <= len(first) < 80
    assert {e["status"] for e in first.values()} == {"fallback"}
    assert report(out)["stopped"]
    before = len(api.seen("/v1/users/"))
    assert before < 80

    healthy.set()
    result = render(campaign, out, "--max-error-rate", "0.5", "--concurrency", "2")

    assert result.exit_code == 0, result.output
    assert f"resumed: {len(first)} already done" in result.output
    final = manifest(out)
    assert set(final) == {p["id"] for p in people(80)}
    assert {rid: e["status"] for rid, e in final.items() if rid in first} == {rid: "fallback" for rid in first}
    assert {e["status"] for rid, e in final.items() if rid not in first} == {"rendered"}
    # Recipients done by the first run were not fetched again.
    again = {user_of(r) for r in api.seen("/v1/users/")[before:]}
    assert again == set(final) - set(first)


def test_max_error_rate_not_exceeded_runs_to_the_end(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/users/u(\d+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        if int(match.group(1)) % 3 == 0:
            return Response(500, {"error": "boom"})
        return Response(200, {"user": match.group(1)})

    campaign = make_campaign(tmp_path, users_source(api, "retries = 0"), people(30), live=["users"])

    result = render(campaign, tmp_path / "out", "--max-error-rate", "0.5")

    assert result.exit_code == 0, result.output
    statuses = [e["status"] for e in manifest(tmp_path / "out").values()]
    assert (statuses.count("rendered"), statuses.count("fallback")) == (20, 10)
    assert report(tmp_path / "out")["sources"]["users"]["fallbacks"] == 10
