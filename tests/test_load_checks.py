"""Mistakes visible at load time stop the run at load time: before any request,
one `Error:` line naming the file, the line and what to do, exit 1, nothing
written, the API never asked. And data that is present but empty (null,
blank) is missing, never printed as "None" or as nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import ScriptedAPI, eml_of, invoke, manifest, parts, render, source, write_campaign


def line_of(path: Path, text: str) -> int:
    (number,) = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if text in line]
    return number


def refused(campaign: Path, out: Path, api: ScriptedAPI | None = None) -> str:
    """Run render; assert it stopped before anything: exit 1, one line on
    stderr, no output folder, no request. Return the message."""
    result = render(campaign, out)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()
    if api is not None:
        assert api.count() == 0
    return result.stderr[len("Error: ") : -1]


def test_unknown_live_source_stops_at_load_with_a_guess(api: ScriptedAPI, tmp_path: Path) -> None:
    template = '<p>Hi</p>\n\n{% live "wether" %}<p>{{ weather.sky }}</p>{% fallback %}<p>Hello.</p>{% endlive %}\n'
    campaign = write_campaign(tmp_path / "c", template=template,
                              sources={"weather": source(api.url + "/w/{{ id }}"), "shop": source(api.url + "/s")})

    message = refused(campaign, tmp_path / "out", api)

    assert message == (
        f"{campaign.parent / 'email.html.j2'}:3: {{% live %}} names unknown source 'wether' "
        "(did you mean 'weather'?); the campaign's sources: shop, weather"
    )


def test_unknown_live_source_in_an_included_template(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", template="<p>Hi</p>{% include 'block.html' %}",
                              files={"block.html": '\n{% live "cart" %}x{% endlive %}'})
    message = refused(campaign, tmp_path / "out")
    assert message.startswith(f"{campaign.parent / 'block.html'}:2: {{% live %}} names unknown source 'cart'; ")


def test_unknown_name_in_a_template_stops_at_load(api: ScriptedAPI, tmp_path: Path) -> None:
    template = "<p>Hi</p>\n<p>Dear {{ frist_name }}</p>\n"
    campaign = write_campaign(tmp_path / "c", template=template, sources={"shop": source(api.url + "/s/{{ id }}")})

    message = refused(campaign, tmp_path / "out", api)

    assert message == (
        f"{campaign.parent / 'email.html.j2'}:2: {{{{ frist_name }}}} is not a recipient column, a source or a "
        "built-in (did you mean 'first_name'?); the recipient columns: id, email, first_name"
    )


def test_unknown_name_from_a_csv_header(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients_file="people.csv",
                              recipients=[{"id": "r1", "email": "r1@example.com", "FirstName": "Ann"}],
                              template="<p>Hi</p>", campaign={"subject": "Hello {{ first_name }}"})
    message = refused(campaign, tmp_path / "out")
    assert message == (
        f"{campaign}:{line_of(campaign, 'subject')}: [campaign] subject: {{{{ first_name }}}} is not a recipient "
        "column, a source or a built-in (did you mean 'FirstName'?); the recipient columns: id, email, FirstName"
    )


def test_names_a_template_sets_itself_and_built_ins_are_known(tmp_path: Path) -> None:
    template = (
        "{% if first_name %}{% set greeting = 'Hi' %}{% endif %}"
        "{% for i in range(2) %}{{ loop.index }}{% endfor %}{{ recipient.email }}{{ preheader }}"
        "{% macro m(x) %}{{ x }}{% endmacro %}{{ m(greeting|default('Hello')) }}"
    )
    campaign = write_campaign(tmp_path / "c", template=template)
    assert render(campaign, tmp_path / "out").exit_code == 0


def test_a_column_only_some_jsonl_lines_have_is_known(tmp_path: Path) -> None:
    people = [{"id": "r1", "email": "r1@example.com"}, {"id": "r2", "email": "r2@example.com", "first_name": "Bo"}]
    campaign = write_campaign(tmp_path / "c", recipients=people,
                              template="<p>{{ first_name|default('there') }}</p>", campaign={"subject": "Hi"})
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    assert "<p>there</p>" in parts(eml_of(out, manifest(out)["r1"]))["html"]


@pytest.mark.parametrize("key", ["url", "batch"])
def test_syntax_error_in_a_source_url_stops_at_load(api: ScriptedAPI, tmp_path: Path, key: str) -> None:
    bad = api.url + "/s/{{ id }"
    if key == "url":
        shop = source(bad)
        where = "[sources.shop] url"
    else:
        shop = source(api.url + "/s/{{ id }}", batch={"url": bad, "items": "items", "key": "id"})
        where = "[sources.shop] batch url"
    campaign = write_campaign(tmp_path / "c", sources={"shop": shop})

    message = refused(campaign, tmp_path / "out", api)

    assert message == (
        f"{campaign}:{line_of(campaign, '[sources.shop]') + 1 if key == 'url' else line_of(campaign, 'batch')}: "
        f"{where} template syntax error: unexpected '}}'; the URL is {bad!r}"
    )


def test_cache_warm_checks_source_urls_too(api: ScriptedAPI, tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/s/{{ id")})
    result = invoke("cache", "warm", campaign, "--no-progress")
    assert result.exit_code == 1
    assert "[sources.shop] url template syntax error" in result.stderr
    assert api.count() == 0


@pytest.mark.parametrize("command", ["render", "cache warm"])
def test_unknown_name_in_a_source_url_stops_at_load(api: ScriptedAPI, tmp_path: Path, command: str) -> None:
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/s/{{ idd }}")})
    out = tmp_path / "out"
    if command == "render":
        message = refused(campaign, out, api)
    else:
        result = invoke("cache", "warm", campaign, "--no-progress")
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        message = result.stderr[len("Error: ") : -1]
    assert message == (
        f"{campaign}:{line_of(campaign, '/s/{{ idd }}')}: [sources.shop] url: {{{{ idd }}}} is not a recipient column "
        "(did you mean 'id'?); the recipient columns: id, email, first_name"
    )
    assert api.count() == 0


def test_a_batch_url_sees_only_ids(api: ScriptedAPI, tmp_path: Path) -> None:
    shop = source(api.url + "/s/{{ id }}", batch={"url": api.url + "/s?ids={{ id|join(',') }}", "items": "i", "key": "id"})
    campaign = write_campaign(tmp_path / "c", sources={"shop": shop})
    message = refused(campaign, tmp_path / "out", api)
    assert message == (
        f"{campaign}:{line_of(campaign, 'batch')}: [sources.shop] batch url: {{{{ id }}}} is not a recipient column "
        "(did you mean 'ids'?); it sees only ids"
    )


@pytest.mark.parametrize(
    ("extra", "key", "line", "guess"),
    [
        ("[sources.shop]\nurl = 'https://x.example/{{ id }}'\ntimout = 1\n", "[sources.shop] timout", "timout", "timeout"),
        ("[auth.a]\ntype = 'bearer'\ntoken_evn = 'X'\n", "[auth.a] token_evn", "token_evn", "token_env"),
        ("[recipient]\npath = 'x.csv'\n", "campaign file recipient", "[recipient]", "recipients"),
    ],
)
def test_unknown_key_anywhere_with_its_line_and_a_guess(
    tmp_path: Path, extra: str, key: str, line: str, guess: str
) -> None:
    campaign = write_campaign(tmp_path / "c", extra="\n" + extra)
    message = refused(campaign, tmp_path / "out")
    assert message.startswith(f"{campaign}:{line_of(campaign, line)}: {key} unknown key (did you mean {guess!r}?); ")


# -- data that is present but empty ------------------------------------------------------

BLANKS: list[Any] = [None, "", "   "]


@pytest.mark.parametrize("blank", BLANKS)
def test_a_blank_field_takes_the_default(tmp_path: Path, blank: Any) -> None:
    people = [{"id": "r1", "email": "r1@example.com", "first_name": blank}]
    campaign = write_campaign(tmp_path / "c", recipients=people, campaign={"subject": "Hello {{ first_name|default('there') }}"},
                              template="<p>{% if first_name %}Dear {{ first_name }}{% else %}Hello{% endif %}</p>")
    out = tmp_path / "out"

    assert render(campaign, out).exit_code == 0

    message = eml_of(out, manifest(out)["r1"])
    assert message["Subject"] == "Hello there"
    assert "<p>Hello</p>" in parts(message)["html"]


@pytest.mark.parametrize("blank", BLANKS)
def test_a_bare_blank_field_fails_that_recipient(tmp_path: Path, blank: Any) -> None:
    people = [{"id": "ok", "email": "ok@example.com", "first_name": "Ann"},
              {"id": "blank", "email": "b@example.com", "first_name": blank}]
    campaign = write_campaign(tmp_path / "c", recipients=people, template="<p>Hello {{ first_name }}</p>")
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 3, result.output
    entries = manifest(out)
    assert entries["ok"]["status"] == "rendered"
    assert entries["blank"]["status"] == "failed"
    assert entries["blank"]["error"] == "subject: 'first_name' is empty (null or blank)"


def test_a_blank_csv_cell_is_missing(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients_file="people.csv",
                              recipients="id,email,first_name\nr1,r1@example.com,\n",
                              campaign={"subject": "Hi {{ first_name|default('there') }}"})
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 3
    assert manifest(out)["r1"]["error"] == "email.html.j2: 'first_name' is empty (null or blank)"


@pytest.mark.parametrize("blank", BLANKS)
def test_a_blank_api_value_inside_a_live_block_falls_back(api: ScriptedAPI, tmp_path: Path, blank: Any) -> None:
    api.serve("/shop/r1", {"city": blank, "name": "Mug"})
    template = (
        '{% live "shop" %}<p>Delivering to {{ shop.city }}</p>{% fallback %}<p>Free delivery.</p>{% endlive %}'
        '<p>{{ shop.city|default("your door") }}</p>'
    )
    campaign = write_campaign(tmp_path / "c", template=template, sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    assert render(campaign, out).exit_code == 0

    entry = manifest(out)["r1"]
    assert entry["status"] == "fallback"
    assert entry["fallback_blocks"][0]["reason"] == "UndefinedError: 'city' is empty (null or blank)"
    html = parts(eml_of(out, entry))["html"]
    assert "<p>Free delivery.</p><p>your door</p>" in html and "None" not in html


def test_a_null_in_a_list_never_prints_none(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": ["Mug", None]})
    template = '{% live "shop" %}<p>{% for p in shop.products %}{{ p }};{% endfor %}</p>{% fallback %}<p>New in.</p>{% endlive %}'
    campaign = write_campaign(tmp_path / "c", template=template, sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    assert render(campaign, out).exit_code == 0

    entry = manifest(out)["r1"]
    assert entry["fallback_blocks"][0]["reason"] == "UndefinedError: a value to print is empty (null)"
    assert "<p>New in.</p>" in parts(eml_of(out, entry))["html"]


def test_a_data_error_in_a_header_names_the_header_not_none(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"subject": "{{ first_name.nope.deeper }}"})
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 3
    assert manifest(out)["r1"]["error"] == "subject: 'str object' has no attribute 'nope'"


def test_a_null_from_a_call_takes_the_default(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"city": None})
    template = '{% live "shop" %}<p>To {{ shop.get("city")|default("your door") }}</p>{% endlive %}'
    campaign = write_campaign(tmp_path / "c", template=template, sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    assert render(campaign, out).exit_code == 0

    entry = manifest(out)["r1"]
    assert entry["status"] == "rendered"
    assert "<p>To your door</p>" in parts(eml_of(out, entry))["html"]
