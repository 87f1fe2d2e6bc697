"""The fetch path against a real loopback server: retries, timeouts, final
errors, the cache, --offline, --no-cache and how recipient values reach the URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest

from conftest import ScriptedAPI, eml_of, manifest, parts, render, report, source, write_campaign

CART = "/users/{{ id }}/cart"


def one_source(tmp_path: Path, api: ScriptedAPI, **keys: object) -> Path:
    return write_campaign(tmp_path / "campaign", sources={"shop": source(api.url + CART, **keys)})


def shop_of(out: Path, rid: str = "r1") -> dict[str, object]:
    entry = manifest(out)[rid]
    fetched = dict(entry["sources"]["shop"])
    assert isinstance(fetched.pop("ms"), float)
    return fetched


def test_retry_then_success(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["Desk Lamp"]}, fail_times=2)
    campaign = one_source(tmp_path, api, retries=3)
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert api.count("/users/r1/cart") == 3
    assert shop_of(out) == {"outcome": "live", "attempts": 3, "status_code": 200}
    assert manifest(out)["r1"]["status"] == "rendered"
    assert "<p>Cart: Desk Lamp</p>" in parts(eml_of(out, manifest(out)["r1"]))["html"]
    shop = report(out)["sources"]["shop"]
    assert (shop["requests"], shop["retries"], shop["errors"], shop["fallbacks"]) == (3, 2, 0, 0)


def test_429_with_retry_after_is_retried(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["Mug"]}, fail_times=1, fail_status=429, fail_headers={"Retry-After": "0"})
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api, retries=1), out)

    assert result.exit_code == 0, result.output
    assert shop_of(out) == {"outcome": "live", "attempts": 2, "status_code": 200}
    assert report(out)["sources"]["shop"]["status_429"] == 1


def test_timeout_then_fallback(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["Too late"]}, delay=1.0)
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api, timeout=0.2, retries=1), out)

    assert result.exit_code == 0, result.output
    assert api.count("/users/r1/cart") == 2
    assert shop_of(out) == {"outcome": "timeout", "attempts": 2, "status_code": None, "error": "no answer within 0.2s"}
    entry = manifest(out)["r1"]
    assert entry["status"] == "fallback"
    assert entry["fallback_blocks"] == [
        {"template": "email.html.j2", "line": 3, "sources": ["shop"], "reason": "shop: no answer within 0.2s"}
    ]
    html = parts(eml_of(out, entry))["html"]
    assert "<p>See what is new.</p>" in html
    assert "Too late" not in html
    assert report(out)["sources"]["shop"]["top_errors"] == {"no answer within 0.2s": 1}


def test_500_then_fallback_after_all_retries(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"error": "down"}, status=500)
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api, retries=2), out)

    assert result.exit_code == 0, result.output
    assert api.count("/users/r1/cart") == 3
    assert shop_of(out) == {"outcome": "error", "attempts": 3, "status_code": 500, "error": "HTTP 500"}
    assert manifest(out)["r1"]["status"] == "fallback"
    assert manifest(out)["r1"]["fallback_blocks"][0]["reason"] == "shop: HTTP 500"


def test_non_json_2xx_is_a_final_failure(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", b"<html>maintenance</html>", headers={"Content-Type": "text/html"})
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api, retries=3), out)

    assert result.exit_code == 0, result.output
    assert api.count("/users/r1/cart") == 1
    assert shop_of(out) == {
        "outcome": "error", "attempts": 1, "status_code": 200, "error": "HTTP 200 but the body is not JSON",
    }
    assert manifest(out)["r1"]["status"] == "fallback"


def test_404_is_final_exactly_one_attempt(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"error": "no such user"}, status=404)
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api, retries=3), out)

    assert result.exit_code == 0, result.output
    assert api.count() == 1
    assert shop_of(out) == {"outcome": "error", "attempts": 1, "status_code": 404, "error": "HTTP 404"}
    assert report(out)["sources"]["shop"]["retries"] == 0


def test_oversized_response_is_refused(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["x" * 5000]})
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api, max_bytes=1000), out)

    assert result.exit_code == 0, result.output
    assert shop_of(out)["error"] == "response larger than max_bytes (1000 bytes)"
    assert manifest(out)["r1"]["status"] == "fallback"


# -- the cache -----------------------------------------------------------------------


def test_second_run_reads_the_cache(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["Kettle"]})
    campaign = one_source(tmp_path, api, cache_ttl=300)

    first = render(campaign, tmp_path / "out1")
    second = render(campaign, tmp_path / "out2")

    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    assert api.count() == 1
    assert (campaign.parent / ".emailpers-cache").is_dir()
    assert shop_of(tmp_path / "out1")["outcome"] == "live"
    assert shop_of(tmp_path / "out2") == {"outcome": "cache", "attempts": 0, "status_code": None}
    assert manifest(tmp_path / "out2")["r1"]["status"] == "rendered"
    assert "<p>Cart: Kettle</p>" in parts(eml_of(tmp_path / "out2", manifest(tmp_path / "out2")["r1"]))["html"]
    shop = report(tmp_path / "out2")["sources"]["shop"]
    assert (shop["requests"], shop["cache_hits"]) == (0, 1)


def test_cache_dir_option_and_ttl_zero(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["Kettle"]})
    cache_dir = tmp_path / "my-cache"

    campaign = one_source(tmp_path, api, cache_ttl=300)
    assert render(campaign, tmp_path / "out1", "--cache-dir", cache_dir).exit_code == 0
    assert render(campaign, tmp_path / "out2", "--cache-dir", cache_dir).exit_code == 0
    assert cache_dir.is_dir() and not (campaign.parent / ".emailpers-cache").exists()
    assert api.count() == 1

    uncached = one_source(tmp_path / "other", api, cache_ttl=0)
    assert render(uncached, tmp_path / "out3").exit_code == 0
    assert render(uncached, tmp_path / "out4").exit_code == 0
    assert api.count() == 3


def test_no_store_responses_are_not_cached(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["Kettle"]}, headers={"Cache-Control": "no-store"})
    campaign = one_source(tmp_path, api)

    render(campaign, tmp_path / "out1")
    render(campaign, tmp_path / "out2")

    assert api.count() == 2
    assert shop_of(tmp_path / "out2")["outcome"] == "live"


def test_no_cache_neither_reads_nor_writes(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {"products": ["Kettle"]})
    campaign = one_source(tmp_path, api)

    first = render(campaign, tmp_path / "out1", "--no-cache")
    second = render(campaign, tmp_path / "out2", "--no-cache")

    assert (first.exit_code, second.exit_code) == (0, 0)
    assert api.count() == 2
    assert not (campaign.parent / ".emailpers-cache").exists()
    assert shop_of(tmp_path / "out2")["outcome"] == "live"


def test_stale_if_error_serves_an_expired_entry(api: ScriptedAPI, tmp_path: Path) -> None:
    import time

    cart = api.serve("/users/r1/cart", {"products": ["Old kettle"]})
    campaign = one_source(tmp_path, api, cache_ttl=0.2, stale_if_error=60)
    assert render(campaign, tmp_path / "out1").exit_code == 0
    time.sleep(0.3)
    cart.status, cart.body = 500, {"error": "down"}

    result = render(campaign, tmp_path / "out2")

    assert result.exit_code == 0, result.output
    assert api.count() == 2
    assert shop_of(tmp_path / "out2")["outcome"] == "stale"
    entry = manifest(tmp_path / "out2")["r1"]
    assert entry["status"] == "rendered"
    assert "<p>Cart: Old kettle</p>" in parts(eml_of(tmp_path / "out2", entry))["html"]


# -- --offline -------------------------------------------------------------------------


def test_offline_uses_the_cache_and_never_the_network(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Kettle"]})
    people = [
        {"id": "r1", "email": "r1@example.com", "first_name": "Ann"},
        {"id": "r2", "email": "r2@example.com", "first_name": "Bob"},
    ]
    campaign = write_campaign(tmp_path / "campaign", recipients=people,
                              sources={"shop": source(api.url + CART)})
    only_r1 = tmp_path / "only-r1.jsonl"
    only_r1.write_text('{"id": "r1", "email": "r1@example.com", "first_name": "Ann"}\n')
    assert render(campaign, tmp_path / "warm", "--recipients", only_r1).exit_code == 0
    assert api.count() == 1

    result = render(campaign, tmp_path / "out", "--offline")

    assert result.exit_code == 0, result.output
    assert api.count() == 1  # nothing new reached the server
    entries = manifest(tmp_path / "out")
    assert shop_of(tmp_path / "out", "r1")["outcome"] == "cache"
    assert entries["r1"]["status"] == "rendered"
    assert shop_of(tmp_path / "out", "r2") == {
        "outcome": "skipped", "attempts": 0, "status_code": None, "error": "offline and not in the cache",
    }
    assert entries["r2"]["status"] == "fallback"
    assert entries["r2"]["fallback_blocks"][0]["reason"] == "shop: offline and not in the cache"


def test_offline_without_a_cache_sends_nothing(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Kettle"]})
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api), out, "--offline")

    assert result.exit_code == 0, result.output
    assert api.requests == []
    assert manifest(out)["r1"]["status"] == "fallback"


def test_offline_does_not_even_fetch_an_oauth_token(api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAILPERS_TEST_CLIENT_ID", "cid")
    monkeypatch.setenv("EMAILPERS_TEST_CLIENT_SECRET", "csecret")
    api.serve("/oauth/token", {"access_token": "t", "expires_in": 60})
    auth = {"type": "oauth2", "token_url": api.url + "/oauth/token",
            "client_id_env": "EMAILPERS_TEST_CLIENT_ID", "client_secret_env": "EMAILPERS_TEST_CLIENT_SECRET"}
    out = tmp_path / "out"

    result = render(one_source(tmp_path, api, auth=auth), out, "--offline")

    assert result.exit_code == 0, result.output
    assert api.requests == []
    assert shop_of(out)["outcome"] == "skipped"


def test_offline_and_no_cache_together_is_a_usage_error(api: ScriptedAPI, tmp_path: Path) -> None:
    result = render(one_source(tmp_path, api), tmp_path / "out", "--offline", "--no-cache")

    assert result.exit_code == 2
    assert "--offline reads the cache; it cannot be combined with --no-cache" in result.stderr
    assert api.requests == []


# -- recipient values in URLs ----------------------------------------------------------

# Each value fills exactly one path segment: everything but letters, digits
# and "-_~" is percent-encoded, dots included, as the server must receive it.
HOSTILE_IDS = {
    "../admin?x=1#y": "%2E%2E%2Fadmin%3Fx%3D1%23y",
    "a/b": "a%2Fb",
    "a b&c=d": "a%20b%26c%3Dd",
    "@evil.example:80": "%40evil%2Eexample%3A80",
    "50%": "50%25",
    "Zoë": "Zo%C3%AB",
    "%2e%2e": "%252e%252e",
    "...": "%2E%2E%2E",
}


def test_recipient_values_are_percent_encoded_into_one_path_segment(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", lambda request: {"products": [request.path]})
    api.serve("/cart", {"products": ["SOMEONE ELSE'S CART"]})
    api.serve("/users/cart", {"products": ["SOMEONE ELSE'S CART"]})
    people = [{"id": rid, "email": f"u{i}@example.com", "first_name": "X"} for i, rid in enumerate(HOSTILE_IDS)]
    campaign = write_campaign(tmp_path / "campaign", recipients=people, sources={"shop": source(api.url + CART)})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    # Every request reached this server (host and port unchanged), each at its own exact path.
    assert sorted(r.path for r in api.requests) == sorted(f"/users/{seg}/cart" for seg in HOSTILE_IDS.values())
    assert all(r.raw_query == "" for r in api.requests)
    assert all(r.headers["host"] == api.url.removeprefix("http://") for r in api.requests)
    assert sorted(unquote(r.path.split("/")[2]) for r in api.requests) == sorted(HOSTILE_IDS)
    entries = manifest(out)
    assert {rid: e["status"] for rid, e in entries.items()} == dict.fromkeys(HOSTILE_IDS, "rendered")
    html = parts(eml_of(out, entries["../admin?x=1#y"]))["html"]
    assert "<p>Cart: /users/%2E%2E%2Fadmin%3Fx%3D1%23y/cart</p>" in html


@pytest.mark.parametrize("rid", ["..", "."])
def test_a_value_that_is_only_a_dot_segment_is_refused_not_sent(api: ScriptedAPI, tmp_path: Path, rid: str) -> None:
    people = [{"id": rid, "email": "dots@example.com", "first_name": "X"}]
    campaign = write_campaign(tmp_path / "campaign", recipients=people, sources={"shop": source(api.url + CART)})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert api.requests == []
    entry = manifest(out)[rid]
    assert entry["status"] == "fallback"
    assert entry["sources"]["shop"]["outcome"] == "error"
    assert "could be read as a path step" in entry["sources"]["shop"]["error"]


def test_query_values_are_encoded(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/search", {"products": ["Kettle"]})
    people = [{"id": "r1", "email": "r1@example.com", "first_name": "X", "city": "Köln&admin=1#frag"}]
    campaign = write_campaign(tmp_path / "campaign", recipients=people,
                              sources={"shop": source(api.url + "/search?city={{ city }}&v=1")})

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    (request,) = api.requests
    assert request.path == "/search"
    assert parse_qs(request.raw_query) == {"city": ["Köln&admin=1#frag"], "v": ["1"]}


def test_missing_url_field_is_a_fallback_not_a_request(api: ScriptedAPI, tmp_path: Path) -> None:
    # "account" is a column (r2 has it), so the load check lets it through; r1 lacks it.
    people = [{"id": "r1", "email": "r1@example.com", "first_name": "Ann"},
              {"id": "r2", "email": "r2@example.com", "first_name": "Bo", "account": "a2"}]
    campaign = write_campaign(tmp_path / "campaign", recipients=people,
                              sources={"shop": source(api.url + "/users/{{ account }}/cart")})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert [r.path for r in api.requests] == ["/users/a2/cart"]
    fetched = shop_of(out)
    assert fetched["outcome"] == "error" and "account" in str(fetched["error"])
    assert manifest(out)["r1"]["status"] == "fallback"


def test_auth_and_source_headers_reach_the_server(api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAILPERS_TEST_TOKEN", "token-value")
    api.serve("/users/r1/cart", {"products": []})
    campaign = one_source(tmp_path, api, headers={"Accept": "application/json", "X-Trace": "t1"},
                          auth={"type": "bearer", "token_env": "EMAILPERS_TEST_TOKEN"})

    assert render(campaign, tmp_path / "out").exit_code == 0

    (request,) = api.requests
    assert request.headers["authorization"] == "Bearer token-value"
    assert (request.headers["accept"], request.headers["x-trace"]) == ("application/json", "t1")
