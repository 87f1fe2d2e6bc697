"""Issue 15: OAuth 2.0 as marketing platforms speak it, against loopback token
endpoints that each accept one way of sending the client's secret (Basic,
form fields, a JSON body), extra and secret token parameters, tokens without
expires_in, and an API base URL taken from the token response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emailpers.auth import TokenProvider
from emailpers.campaign import Auth, load_campaign
from emailpers.errors import CampaignError
from emailpers.http import HttpClient

from advanced_servers import Api, Request, Response, running
from conftest import make_campaign, manifest, outcomes, people, report
from conftest import render_html as render
from oauth_servers import OneMethodTokenServer, guard

SECRETS = {
    "T_CLIENT_ID": "cid-SECRET-4e1f",
    "T_CLIENT_SECRET": "cs-SECRET-9a7b",
    "T_MID": "mid-SECRET-5150",
}


@pytest.fixture
def api() -> Iterator[Api]:
    with running(Api()) as server:
        yield server


@pytest.fixture
def rest_api() -> Iterator[Api]:
    """The tenant's REST API, on another port: another origin than the token endpoint."""
    with running(Api()) as server:
        yield server


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def server(api: Api, method: str, **kwargs: Any) -> OneMethodTokenServer:
    return OneMethodTokenServer(
        api, method, client_id=SECRETS["T_CLIENT_ID"], client_secret=SECRETS["T_CLIENT_SECRET"], **kwargs
    )


def auth_table(tokens: OneMethodTokenServer, client_auth: str | None, extra: str = "") -> str:
    line = f'client_auth = "{client_auth}"\n' if client_auth else ""
    return f"""
[auth.crm]
type = "oauth2"
token_url = "{tokens.token_url}"
client_id_env = "T_CLIENT_ID"
client_secret_env = "T_CLIENT_SECRET"
scope = "profile:read"
{line}{extra}
"""


def profile_source(url: str, extra: str = "") -> str:
    return f'\n[sources.profile]\nurl = "{url}"\nauth = "crm"\nretries = 0\n{extra}\n'


SFMC_AUTH = 'token_params_env = { account_id = "T_MID" }\n'
SFMC_SOURCE = 'base_url_from = "rest_instance_url"\n'


def sfmc_campaign(tmp_path: Path, tokens: OneMethodTokenServer, n: int = 6, auth: str = SFMC_AUTH) -> Path:
    """Salesforce Marketing Cloud's shape: a JSON token request with account_id,
    the REST base URL from the token response, only a path in the source."""
    sources = auth_table(tokens, "json", auth) + profile_source("/data/v1/profile/{{ id }}", SFMC_SOURCE)
    return make_campaign(tmp_path, sources, people(n), live=["profile"])


# -- each method against an endpoint that accepts only it -------------------------------


@pytest.mark.parametrize("method", ["basic", "post"])
def test_form_methods_render_live_data_through_an_endpoint_that_accepts_only_them(
    method: str, api: Api, env: None, tmp_path: Path
) -> None:
    tokens = server(api, method)
    served = guard(api, tokens)
    # "basic" is the default: the README's examples without client_auth keep working.
    sources = auth_table(
        tokens, None if method == "basic" else method, 'token_params = { audience = "crm-api", v = 2 }\n'
    )
    campaign = make_campaign(
        tmp_path, sources + profile_source(f"{api.url}/data/v1/profile/{{{{ id }}}}"), people(4), live=["profile"]
    )

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    assert sorted(rid for _, rid in served) == ["u1", "u2", "u3", "u4"]
    assert len(tokens.issued) == 1
    params = tokens.params[0]
    assert (params["audience"], params["v"]) == ("crm-api", "2")
    assert params["scope"] == "profile:read"
    html = (tmp_path / "out" / "messages" / "u2.html").read_text()
    assert '"user": "u2"' in html


def test_sfmc_json_token_request_with_account_id_and_rest_instance_url(
    api: Api, rest_api: Api, env: None, tmp_path: Path
) -> None:
    tokens = server(
        api, "json", required={"account_id": 514009876}, expires_in=1200, base_url=lambda n: f"{rest_api.url}/"
    )
    served = guard(rest_api, tokens)
    campaign = sfmc_campaign(tmp_path, tokens, auth="token_params = { account_id = 514009876 }\n")

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    # Every data request went to the base the token response named, none to the token host.
    assert sorted(served) == [(rest_api.url, f"u{i}") for i in range(1, 7)]
    assert api.seen("/data/") == []
    assert sorted(r.path for r in rest_api.seen("/data/")) == [f"/data/v1/profile/u{i}" for i in range(1, 7)]
    body = json.loads(api.seen("/oauth/token", "POST")[0].body)
    assert body == {
        "grant_type": "client_credentials", "scope": "profile:read", "account_id": 514009876,
        "client_id": SECRETS["T_CLIENT_ID"], "client_secret": SECRETS["T_CLIENT_SECRET"],
    }  # fmt: skip
    assert f'"server": {rest_api.port}' in (tmp_path / "out" / "messages" / "u1.html").read_text()


def test_cache_and_dedupe_key_on_the_final_url_not_the_path(api: Api, rest_api: Api, env: None, tmp_path: Path) -> None:
    with running(Api()) as moved:
        base = [rest_api.url]
        tokens = server(api, "json", required={"account_id": SECRETS["T_MID"]}, base_url=lambda n: base[0])
        guard(rest_api, tokens)
        guard(moved, tokens)
        campaign = sfmc_campaign(tmp_path, tokens, n=3)
        assert render(campaign, tmp_path / "out1").exit_code == 0

        # The same run again answers from the cache...
        second = render(campaign, tmp_path / "out2")
        assert second.exit_code == 0, second.output
        assert report(tmp_path / "out2")["sources"]["profile"]["cache_hits"] == 3
        assert len(rest_api.seen("/data/")) == 3

        # ...but once the tenant's base URL moves, the same paths are other URLs.
        base[0] = moved.url
        third = render(campaign, tmp_path / "out3")
        assert third.exit_code == 0, third.output
        assert len(moved.seen("/data/")) == 3
        assert f'"server": {moved.port}' in (tmp_path / "out3" / "messages" / "u1.html").read_text()


# -- the wrong method ---------------------------------------------------------------------


@pytest.mark.parametrize(("configured", "accepted"), [("basic", "post"), ("post", "json"), ("json", "basic")])
def test_a_wrong_method_stops_the_run_with_an_error_naming_the_method(
    configured: str, accepted: str, api: Api, env: None, tmp_path: Path
) -> None:
    tokens = server(api, accepted)
    guard(api, tokens)
    sources = auth_table(tokens, configured) + profile_source(f"{api.url}/data/v1/profile/{{{{ id }}}}")
    campaign = make_campaign(tmp_path, sources, people(3), live=["profile"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1, result.output
    assert f"Error: [auth.crm] token_url {tokens.token_url}: the token endpoint answered 401 (invalid_client)" in (
        result.stderr
    )
    assert f'to client_auth = "{configured}"' in result.stderr
    assert api.seen("/data/") == []
    # The endpoint echoed our request in error_description; none of it is shown.
    for value in SECRETS.values():
        assert value not in result.output + result.stderr


# -- token lifetime ---------------------------------------------------------------------


def test_a_token_without_expires_in_works_and_is_renewed_on_401(api: Api, env: None, tmp_path: Path) -> None:
    tokens = server(api, "post", expires_in=None)
    served: list[str] = []
    lock = threading.Lock()

    @api.route(r"/data/v1/profile/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        if tokens.check(request) is None:
            return Response(401, {"error": "invalid_token"})
        with lock:
            served.append(match.group(1))
            if len(served) == 3:
                tokens.revoke("tok1")  # the provider ends it early: only a 401 tells us
        return Response(200, {"user": match.group(1)})

    sources = auth_table(tokens, "post") + profile_source(f"{api.url}/data/v1/profile/{{{{ id }}}}", "concurrency = 1")
    campaign = make_campaign(tmp_path, sources, people(6), live=["profile"])

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    assert [t for t, _ in tokens.issued] == ["tok1", "tok2"]
    assert report(tmp_path / "out")["sources"]["profile"]["token_renewals"] == 1


def test_token_lifetime_sets_when_a_token_without_expires_in_is_renewed(api: Api) -> None:
    tokens = OneMethodTokenServer(api, "basic", expires_in=None)
    now = [0.0]
    auth = Auth(
        "oauth2", "[auth.t]", token_url=tokens.token_url, client_id="cid", client_secret="csecret", token_lifetime=100
    )

    async def headers_at(times: list[float]) -> list[str]:
        async with HttpClient(4) as client:
            provider = TokenProvider(auth, client, lambda: now[0])
            out = []
            for t in times:
                now[0] = t
                out.append(await provider.header())
            return out

    # Renewed a tenth of the lifetime before it ends (as with expires_in), not after the default 3600 s.
    assert asyncio.run(headers_at([0, 89, 91, 150])) == ["Bearer tok1", "Bearer tok1", "Bearer tok2", "Bearer tok2"]


# -- the base URL from the token response --------------------------------------------------


def test_a_renewed_token_with_another_base_url_is_used_from_then_on(
    api: Api, rest_api: Api, env: None, tmp_path: Path
) -> None:
    with running(Api()) as moved:
        bases = {1: rest_api.url, 2: moved.url + "/"}
        tokens = server(api, "json", required={"account_id": SECRETS["T_MID"]}, base_url=lambda n: bases[n])
        log: list[tuple[int, str, str]] = []
        lock = threading.Lock()

        def route(target: Api) -> None:
            @target.route(r"/data/v1/profile/(\w+)")
            def _(request: Request, match: re.Match[str]) -> Response:
                token = tokens.check(request)
                with lock:
                    log.append((target.port, match.group(1), token or "refused"))
                    if len(log) == 3:
                        tokens.revoke("tok1")
                return Response(200, {"user": match.group(1)}) if token else Response(401, {})

        route(rest_api)
        route(moved)
        campaign = sfmc_campaign(tmp_path, tokens)

        result = render(campaign, tmp_path / "out", "--concurrency", "1")

        assert result.exit_code == 0, result.output
        assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
        old, new = rest_api.port, moved.port
        # u4 was refused at the old base; its repeat, and every request after it,
        # went to the base the renewed token named.
        assert log == [
            (old, "u1", "tok1"), (old, "u2", "tok1"), (old, "u3", "tok1"), (old, "u4", "refused"),
            (new, "u4", "tok2"), (new, "u5", "tok2"), (new, "u6", "tok2"),
        ]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "problem"),
    [
        ("http://api.example.com/", "must be https://"),
        ("https://user:pw@127.0.0.1/", "must not carry credentials"),
        ("https://127.0.0.1/?x=1", "must not have a query or fragment"),
        ("ftp://127.0.0.1/", "must be an absolute https:// URL"),
        ("/data", "must be an absolute https:// URL"),
        ("https://127.0.0.1\r\nX-Evil: 1/", "control or non-ASCII"),
        (42, "has no rest_instance_url"),
        (None, "has no rest_instance_url"),
    ],
)
def test_the_base_url_is_validated_when_the_token_arrives(
    base: Any, problem: str, api: Api, env: None, tmp_path: Path
) -> None:
    tokens = server(api, "json", base_url=lambda n: base)
    guard(api, tokens)
    campaign = sfmc_campaign(tmp_path, tokens)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1, result.output
    assert f"Error: [auth.crm] token_url {tokens.token_url}: the token endpoint's" in result.stderr
    assert problem in result.stderr
    assert [r.path for r in api.requests] == ["/oauth/token"]
    assert not (tmp_path / "out" / "manifest.jsonl").exists() or manifest(tmp_path / "out") == {}


def test_offline_with_base_url_from_asks_no_token_and_falls_back(api: Api, env: None, tmp_path: Path) -> None:
    tokens = server(api, "json", base_url=lambda n: api.url)
    campaign = sfmc_campaign(tmp_path, tokens, n=2)

    result = render(campaign, tmp_path / "out", "--offline")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"skipped"}
    assert api.requests == []


# -- load-time checks ---------------------------------------------------------------------


def write(tmp_path: Path, sources: str) -> Path:
    return make_campaign(tmp_path, sources, people(1), live=["profile"])


AUTH = """
[auth.crm]
type = "oauth2"
token_url = "https://auth.example.com/token"
client_id_env = "T_CLIENT_ID"
client_secret_env = "T_CLIENT_SECRET"
"""


@pytest.mark.parametrize(
    ("auth", "source", "message"),
    [
        ('client_auth = "form"', "", "[auth.crm] client_auth must be one of 'basic', 'post', 'json', got 'form'"),
        ('token_params = { client_secret = "x" }', "", "[auth.crm] token_params cannot set 'client_secret'"),
        (
            "token_params = { account_id = 7.5 }",
            "",
            "[auth.crm] token_params value of 'account_id' must be a string or an integer, got 7.5",
        ),
        ('token_params_env = { grant_type = "T_MID" }', "", "[auth.crm] token_params_env cannot set 'grant_type'"),
        (
            'token_params = { account_id = "1" }\ntoken_params_env = { account_id = "T_MID" }',
            "",
            "[auth.crm] token_params_env sets 'account_id', which token_params sets too",
        ),
        (
            'token_params_env = { account_id = "T_UNSET_MID" }',
            "",
            "[auth.crm] token_params_env account_id = 'T_UNSET_MID': environment variable T_UNSET_MID is not set",
        ),
        ("token_lifetime = 0", "", "[auth.crm] token_lifetime must be > 0"),
        (
            "",
            'url = "https://api.example.com/v1/{{ id }}"\nbase_url_from = "rest_instance_url"',
            "[sources.profile] url must be a path starting with a single '/' (base_url_from gives the origin)",
        ),
        (
            "",
            'url = "//evil.example/{{ id }}"\nbase_url_from = "rest_instance_url"',
            "[sources.profile] url must be a path starting with a single '/'",
        ),
        (
            "",
            'url = "{{ host }}/v1"\nbase_url_from = "rest_instance_url"',
            "[sources.profile] url must be a path starting with a single '/'",
        ),
        ("", 'url = "/v1/users"', "[sources.profile] url must be an absolute http(s) URL"),
        (
            "",
            'url = "/v1/{{ id }}"\nbase_url_from = "rest instance"',
            "[sources.profile] base_url_from must name a field",
        ),
    ],
)
def test_oauth_settings_are_checked_at_load(auth: str, source: str, message: str, env: None, tmp_path: Path) -> None:
    source = source or 'url = "/v1/{{ id }}"\nbase_url_from = "rest_instance_url"'
    path = write(tmp_path, f'{AUTH}{auth}\n\n[sources.profile]\n{source}\nauth = "crm"\n')
    with pytest.raises(CampaignError) as caught:
        load_campaign(path)
    assert message in str(caught.value)
    assert re.match(rf"{re.escape(str(path))}:\d+: ", str(caught.value)), "the error names the file and line"


def test_base_url_from_needs_oauth2(env: None, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[sources.profile]\nurl = "/v1/{{ id }}"\nbase_url_from = "rest_instance_url"\n'
        'auth = { type = "bearer", token_env = "T_CLIENT_SECRET" }\n',
    )
    with pytest.raises(CampaignError, match=r"\[sources.profile\] base_url_from needs oauth2 auth"):
        load_campaign(path)


def test_secret_token_params_stay_out_of_repr(env: None, tmp_path: Path) -> None:
    path = write(
        tmp_path, f'{AUTH}{SFMC_AUTH}\n[sources.profile]\nurl = "/v1/{{{{ id }}}}"\n{SFMC_SOURCE}auth = "crm"\n'
    )
    auth = load_campaign(path).sources["profile"].auth
    assert auth is not None and auth.secret_token_params == (("account_id", SECRETS["T_MID"]),)
    assert SECRETS["T_MID"] not in repr(auth) and SECRETS["T_CLIENT_SECRET"] not in repr(auth)


# -- secrets ----------------------------------------------------------------------------


def test_secrets_and_secret_token_params_appear_in_no_file_and_no_output(
    api: Api, rest_api: Api, env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's and asyncio's included
    tokens = server(
        api, "json", required={"account_id": SECRETS["T_MID"]}, prefix="AT-7c1d-", base_url=lambda n: rest_api.url
    )
    guard(rest_api, tokens)
    campaign = sfmc_campaign(tmp_path, tokens, n=4)

    runs = [render(campaign, tmp_path / "out"), render(campaign, tmp_path / "out-eml", "--format", "eml")]
    tokens.single_use = True  # every request gets a 401 and renews the token
    runs.append(render(campaign, tmp_path / "out", "--fresh", "--no-cache"))
    tokens.fail_with = 401
    runs.append(render(campaign, tmp_path / "out-failed", "--no-cache"))  # a token endpoint refusing us

    assert [r.exit_code for r in runs] == [0, 0, 0, 1], runs[-1].output
    assert len(tokens.issued) >= 4  # one per run, and renewals in the third
    needles = [v.encode() for v in SECRETS.values()] + [t.encode() for t, _ in tokens.issued]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(".emailpers-cache" in p.parts for p in written) and any(p.suffix == ".eml" for p in written)
    for path in written:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle!r} is in {path}"
    for run in runs:
        for needle in needles:
            assert needle.decode() not in run.output + run.stderr
    for needle in needles:
        assert needle.decode() not in caplog.text


def test_a_batched_source_takes_its_base_url_from_the_token_too(
    api: Api, rest_api: Api, env: None, tmp_path: Path
) -> None:
    tokens = server(api, "json", base_url=lambda n: rest_api.url)

    @rest_api.route(r"/data/v1/profiles")
    def _(request: Request, match: re.Match[str]) -> Response:
        if tokens.check(request) is None:
            return Response(401, {})
        return Response(200, {"items": [{"id": i, "user": i} for i in request.query["ids"][0].split(",")]})

    batch = "batch = { url = \"/data/v1/profiles?ids={{ ids|join(',') }}\", size = 10, items = \"items\", key = \"id\" }"
    campaign = make_campaign(
        tmp_path,
        auth_table(tokens, "json") + profile_source("/data/v1/profile/{{ id }}", f"{SFMC_SOURCE}{batch}\n"),
        people(4),
        live=["profile"],
    )

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert set(outcomes(tmp_path / "out", "profile").values()) == {"live"}
    assert len(rest_api.seen("/data/v1/profiles")) == 1
    assert api.seen("/data/") == []


def test_the_readme_marketing_cloud_and_mailchimp_examples_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    sfmc = next(b for b in blocks if "[auth.sfmc]" in b)
    mailchimp = next(b for b in blocks if "api.mailchimp.com" in b)
    for name in ("SFMC_CLIENT_ID", "SFMC_CLIENT_SECRET", "MAILCHIMP_USER", "MAILCHIMP_API_KEY"):
        monkeypatch.setenv(name, "x")

    profile = load_campaign(make_campaign(tmp_path, sfmc, people(1), live=["profile"])).sources["profile"]
    member = load_campaign(make_campaign(tmp_path, mailchimp, people(1), live=["member"])).sources["member"]

    assert profile.base_url_from == "rest_instance_url" and profile.url.startswith("/data/v1/")
    assert profile.auth is not None and profile.auth.client_auth == "json"
    assert dict(profile.auth.token_params) == {"account_id": 514009876}
    assert member.auth is not None and member.auth.kind == "basic"
