"""Campaign validation: every mistake stops the run before it starts, with one
`Error:` line naming the file, the line and the key (exit 1)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emailpers.campaign import DEFAULT_TIMEOUT, is_loopback, load_campaign
from emailpers.errors import CampaignError

from conftest import render, source, write_campaign

CAMPAIGN_KEYS = (
    "amp_key_env, amp_template, amp_token_ttl, fallback_template, from, headers, name, preheader, render_deadline, "
    "subject, template, text_template, unsubscribe"
)


def line_of(path: Path, text: str) -> int:
    (number,) = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if text in line]
    return number


def assert_refused(campaign: Path, out: Path, expected: str) -> None:
    """The run stops with exactly `Error: <expected>` on stderr, exit 1, nothing written."""
    result = render(campaign, out)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == f"Error: {expected}\n"
    assert not out.exists()


def test_unknown_key(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"colour": "red"})
    assert_refused(campaign, tmp_path / "out",
                   f"{campaign}:{line_of(campaign, 'colour')}: [campaign] colour unknown key; known keys: {CAMPAIGN_KEYS}")


def test_unknown_source_key(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": source("https://api.example.com/{{ id }}", tiemout=1)})
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: {campaign}:{line_of(campaign, 'tiemout')}: [sources.shop] tiemout unknown key "
        "(did you mean 'timeout'?); known keys: "
    )
    assert result.stderr.count("\n") == 1


def test_unknown_top_level_table(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", extra="\n[sauces.shop]\nurl = 'x'\n")
    assert_refused(campaign, tmp_path / "out",
                   f"{campaign}:{line_of(campaign, 'sauces')}: campaign file sauces unknown key (did you mean 'sources'?); "
                   "known keys: auth, campaign, preview, recipients, run, send, sources")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("timeout", "fast", "must be a number, got 'fast'"),
        ("retries", True, "must be an integer, got True"),
        ("retries", 1.5, "must be an integer, got 1.5"),
        ("timeout", 0, "must be > 0, got 0"),
        ("retries", -1, "must be >= 0, got -1"),
        ("required", "yes", "must be true or false, got 'yes'"),
        ("headers", {"X-N": 1}, "value of 'X-N' must be a string, got 1"),
    ],
)
def test_wrong_type_or_range(tmp_path: Path, key: str, value: object, message: str) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": {"url": "https://api.example.com/{{ id }}", key: value}})
    assert_refused(campaign, tmp_path / "out", f"{campaign}:{line_of(campaign, f'{key} =')}: [sources.shop] {key} {message}")


def test_missing_template_file(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"template": "nowhere.mjml.j2"})
    root = campaign.parent
    assert_refused(
        campaign, tmp_path / "out",
        f"{campaign}:{line_of(campaign, 'nowhere')}: [campaign] template file not found: {root / 'nowhere.mjml.j2'}; "
        f"check the path (relative to {root})",
    )


def test_missing_required_key(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"subject": None})
    assert_refused(campaign, tmp_path / "out", f"{campaign}:1: [campaign] subject is required")


def test_template_outside_the_campaign_folder(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.html.j2").write_text("<p>x</p>\n")
    campaign = write_campaign(tmp_path / "c", campaign={"template": "../elsewhere.html.j2"})
    assert_refused(campaign, tmp_path / "out",
                   f"{campaign}:{line_of(campaign, 'elsewhere')}: [campaign] template must be inside the campaign "
                   f"folder {campaign.parent}")


def test_unset_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMAILPERS_TEST_UNSET", raising=False)
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(
        "https://api.example.com/{{ id }}", auth={"type": "bearer", "token_env": "EMAILPERS_TEST_UNSET"})})
    assert_refused(
        campaign, tmp_path / "out",
        f"{campaign}:{line_of(campaign, 'auth =')}: [sources.shop] auth token_env environment variable "
        "EMAILPERS_TEST_UNSET is not set; export it before running",
    )


def test_unset_env_variable_in_a_named_auth_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMAILPERS_TEST_UNSET", raising=False)
    campaign = write_campaign(
        tmp_path / "c", sources={"shop": source("https://api.example.com/{{ id }}", auth="shopauth")},
        extra='\n[auth.shopauth]\ntype = "header"\nname = "X-Key"\nvalue_env = "EMAILPERS_TEST_UNSET"\n',
    )
    assert_refused(
        campaign, tmp_path / "out",
        f"{campaign}:{line_of(campaign, 'value_env')}: [auth.shopauth] value_env environment variable "
        "EMAILPERS_TEST_UNSET is not set; export it before running",
    )


def test_undefined_auth_name(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": source("https://api.example.com/{{ id }}", auth="nope")})
    assert_refused(campaign, tmp_path / "out",
                   f"{campaign}:{line_of(campaign, 'auth =')}: [sources.shop] auth names [auth.nope], which is not "
                   "defined (none defined)")


def test_plain_http_for_a_remote_host(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": source("http://api.example.com/users/{{ id }}")})
    assert_refused(
        campaign, tmp_path / "out",
        f"{campaign}:{line_of(campaign, 'url =')}: [sources.shop] url uses plain http:// for api.example.com; "
        "use https://, or set allow_insecure_http = true in the source",
    )


def test_plain_http_allowed_for_loopback_or_when_asked(tmp_path: Path) -> None:
    for url, keys in [("http://127.0.0.1:9/u/{{ id }}", {}), ("http://localhost/u/{{ id }}", {}),
                      ("http://api.example.com/u/{{ id }}", {"allow_insecure_http": True})]:
        campaign = write_campaign(tmp_path / "c", sources={"shop": source(url, **keys)})
        assert load_campaign(campaign).sources["shop"].url == url


@pytest.mark.parametrize("url", [
    "https://{{ host }}/users/{{ id }}",
    "https://{{ id }}.api.example.com/users",
    "https://api.example.com:{{ port }}/users",
    "https://api.example.com{{ path }}",
    "https://api%2Eexample.com/users/{{ id }}",
])
def test_templated_origin_is_refused(tmp_path: Path, url: str) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(url)})
    assert_refused(
        campaign, tmp_path / "out",
        f"{campaign}:{line_of(campaign, 'url =')}: [sources.shop] url must not template the scheme, host or port; "
        "put {{ }} in the path or query only",
    )


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://api.example.com/x", "must be an absolute http(s) URL, got 'ftp://api.example.com/x'"),
    ("/users/list", "must be an absolute http(s) URL, got '/users/list'"),
    ("https://user:pw@api.example.com/x", "must not carry credentials; use auth = { ... } with *_env keys"),
])
def test_bad_urls(tmp_path: Path, url: str, message: str) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(url)})
    assert_refused(campaign, tmp_path / "out", f"{campaign}:{line_of(campaign, 'url =')}: [sources.shop] url {message}")


def test_source_name_must_be_an_identifier(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"my-shop": source("https://api.example.com/{{ id }}")})
    assert_refused(campaign, tmp_path / "out",
                   f"{campaign}:{line_of(campaign, '[sources.')}: [sources.my-shop] name must be a template "
                   "identifier (letters, digits, _), so templates can use it")


def test_not_toml(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", extra="\nthis is = = not toml\n")
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {campaign}: not valid TOML: ")
    assert result.stderr.count("\n") == 1


def test_missing_campaign_or_recipient_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert_refused(missing, tmp_path / "out", f"{missing}: cannot read campaign file: No such file or directory")

    campaign = write_campaign(tmp_path / "c")
    (campaign.parent / "recipients.jsonl").unlink()
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {campaign}:{line_of(campaign, 'path =')}: [recipients] path file not found")

    other = tmp_path / "people.txt"
    other.write_text("id,email\n")
    result = render(campaign, tmp_path / "out", "--recipients", other)
    assert result.exit_code == 1
    # --recipients named the file: the error points at it, not at the campaign's path line.
    assert result.stderr == (
        f"Error: {other}: a recipient file must be .csv, .tsv or .jsonl (any case), optionally gzipped (.csv.gz)"
        " (given by --recipients)\n"
    )


def test_from_needs_an_address(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"from": "Shop"})
    assert_refused(campaign, tmp_path / "out",
                   f"{campaign}:{line_of(campaign, 'from =')}: [campaign] from has no email address: 'Shop'; "
                   "write it as 'Name <user@domain>'")


def test_loaded_campaign_is_frozen_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAILPERS_TEST_TOKEN", "t0k")
    campaign_file = write_campaign(tmp_path / "c", sources={"shop": {
        "url": "https://api.example.com/users/{{ id }}", "auth": {"type": "bearer", "token_env": "EMAILPERS_TEST_TOKEN"},
    }})

    campaign = load_campaign(campaign_file)

    shop = campaign.sources["shop"]
    assert (shop.timeout, shop.retries, shop.cache_ttl, shop.required) == (DEFAULT_TIMEOUT, 3, 300, False)
    assert shop.auth is not None and shop.auth.secret == "t0k"
    assert "t0k" not in repr(campaign)
    assert campaign.template == campaign_file.parent / "email.html.j2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        campaign.name = "other"  # type: ignore[misc]


def test_load_campaign_raises_campaign_error(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"name": 42})
    with pytest.raises(CampaignError, match=r":2: \[campaign\] name must be a string, got 42$"):
        load_campaign(campaign)


@pytest.mark.parametrize(("name", "message"), [
    ("To", "cannot set 'To': emailpers writes that header itself"),
    ("subject", "cannot set 'subject': emailpers writes that header itself"),
    ("Content-Type", "cannot set 'Content-Type': emailpers writes that header itself"),
    ("X Campaign", "'X Campaign' is not a header name (printable ASCII, no space or ':')"),
    ("X-A:B", "'X-A:B' is not a header name (printable ASCII, no space or ':')"),
    ("X-A\r\nBcc", "'X-A\\r\\nBcc' is not a header name (printable ASCII, no space or ':')"),
])
def test_extra_headers_cannot_break_the_message(tmp_path: Path, name: str, message: str) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"headers": {"X-Ok": "1", name: "value"}})
    assert_refused(campaign, tmp_path / "out", f"{campaign}:{line_of(campaign, 'headers =')}: [campaign] headers {message}")


def test_loopback_is_this_machine_by_address_not_by_a_list_of_spellings() -> None:
    assert all(is_loopback(h) for h in ("localhost", "LocalHost", "127.0.0.1", "127.0.0.2", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in (None, "example.com", "127.0.0.1.example.com", "10.0.0.1", "::2", ""))
