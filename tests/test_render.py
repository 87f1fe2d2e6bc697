"""Rendering: live blocks and their fallbacks, the fallback template, required
sources, escaping, header injection, template errors and invalid rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ScriptedAPI, eml_of, manifest, manifest_lines, parts, render, source, write_campaign

PEOPLE = [
    {"id": "r1", "email": "r1@example.com", "first_name": "Ann"},
    {"id": "r2", "email": "r2@example.com", "first_name": "Bob"},
    {"id": "r3", "email": "r3@example.com", "first_name": "Cy"},
]


def shop_and_loyalty(api: ScriptedAPI, **keys: object) -> dict[str, dict[str, object]]:
    return {
        "shop": source(api.url + "/shop/{{ id }}", **keys),
        "loyalty": source(api.url + "/loyalty/{{ id }}", **keys),
    }


def test_live_block_with_several_sources_needs_all_of_them(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": ["Mug", "Tea"]})
    api.serve("/loyalty/r1", {"points": 120})
    api.serve("/shop/r2", {"products": ["Mug"]})
    api.serve("/loyalty/r2", status=500)
    api.serve("/shop/r3", status=404)
    api.serve("/loyalty/r3", status=503)
    template = (
        "<html><body>\n"
        "<p>Hi {{ first_name }}</p>\n"
        '{% live "shop", "loyalty" %}<p>{{ shop.products|length }} items, {{ loyalty.points }} points</p>'
        "{% fallback %}<p>Members save more.</p>{% endlive %}\n"
        "</body></html>\n"
    )
    campaign = write_campaign(tmp_path / "c", template=template, recipients=PEOPLE, sources=shop_and_loyalty(api))
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert entries["r1"]["status"] == "rendered"
    assert entries["r1"]["fallback_blocks"] == []
    assert "<p>2 items, 120 points</p>" in parts(eml_of(out, entries["r1"]))["html"]

    assert entries["r2"]["status"] == "fallback"
    assert entries["r2"]["fallback_blocks"] == [
        {"template": "email.html.j2", "line": 3, "sources": ["shop", "loyalty"], "reason": "loyalty: HTTP 500"}
    ]
    html = parts(eml_of(out, entries["r2"]))["html"]
    assert "<p>Members save more.</p>" in html and "items," not in html

    assert entries["r3"]["fallback_blocks"][0]["reason"] == "shop: HTTP 404; loyalty: HTTP 503"
    assert entries["r3"]["sources"]["loyalty"]["outcome"] == "error"


def test_live_body_hitting_a_missing_field_falls_back(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": ["Mug"], "total": 12.5})
    api.serve("/shop/r2", {"products": ["Mug"]})  # no "total"
    api.serve("/shop/r3", {"products": ["Mug"], "total": "twelve"})  # wrong type
    template = (
        "<p>Hi {{ first_name }}</p>\n"
        "\n"
        '{% live "shop" %}<p>Total: {{ "%.2f"|format(shop.total) }}</p>{% fallback %}<p>Your cart awaits.</p>{% endlive %}\n'
    )
    campaign = write_campaign(tmp_path / "c", template=template, recipients=PEOPLE,
                              sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert entries["r1"]["status"] == "rendered"
    assert "<p>Total: 12.50</p>" in parts(eml_of(out, entries["r1"]))["html"]
    assert entries["r2"]["status"] == "fallback"
    assert entries["r2"]["sources"]["shop"]["outcome"] == "live"
    assert entries["r2"]["fallback_blocks"] == [{
        "template": "email.html.j2", "line": 3, "sources": ["shop"],
        "reason": "UndefinedError: 'dict object' has no attribute 'total'",
    }]
    assert "<p>Your cart awaits.</p>" in parts(eml_of(out, entries["r2"]))["html"]
    assert entries["r3"]["status"] == "fallback"
    assert entries["r3"]["fallback_blocks"][0]["reason"].startswith("TypeError: ")


OUTSIDE = '<p>Hi {{ first_name }}, delivering to {{ shop.city }}</p>\n'


def test_failed_source_outside_a_live_block_uses_the_fallback_template(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"city": "Oslo"})
    api.serve("/shop/r2", status=500)
    campaign = write_campaign(
        tmp_path / "c", template=OUTSIDE, recipients=PEOPLE[:2], sources={"shop": source(api.url + "/shop/{{ id }}")},
        fallback_template="<p>Hello {{ first_name }}, new arrivals are in.</p>\n",
    )
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert entries["r1"]["status"] == "rendered"
    assert "delivering to Oslo" in parts(eml_of(out, entries["r1"]))["html"]
    assert entries["r2"]["status"] == "fallback"
    assert entries["r2"]["fallback_blocks"] == [{
        "template": "generic.html.j2", "line": None, "sources": ["shop"],
        "reason": "source 'shop' is unavailable for this recipient (HTTP 500); use it inside {% live 'shop' %}",
    }]
    assert "<p>Hello Bob, new arrivals are in.</p>" in parts(eml_of(out, entries["r2"]))["html"]


def test_failed_source_outside_a_live_block_without_fallback_template_fails(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"city": "Oslo"})
    api.serve("/shop/r2", status=500)
    campaign = write_campaign(tmp_path / "c", template=OUTSIDE, recipients=PEOPLE[:2],
                              sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 3, result.output
    entries = manifest(out)
    assert entries["r1"]["status"] == "rendered"
    assert entries["r2"]["status"] == "failed"
    assert entries["r2"]["error"] == (
        "source 'shop' is unavailable for this recipient (HTTP 500); use it inside {% live 'shop' %}; "
        "the campaign has no fallback_template"
    )
    assert entries["r2"]["files"] == []
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["r1.eml"]
    assert "failed 1" in result.stdout


def test_required_source_failure_skips_the_recipient(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": ["Mug"]})
    api.serve("/shop/r2", status=500)
    campaign = write_campaign(tmp_path / "c", recipients=PEOPLE[:2],
                              sources={"shop": source(api.url + "/shop/{{ id }}", required=True, retries=1)})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert entries["r1"]["status"] == "rendered"
    assert entries["r2"]["status"] == "skipped"
    assert entries["r2"]["error"] == "required source shop unavailable: HTTP 500"
    assert entries["r2"]["sources"]["shop"]["attempts"] == 2
    assert entries["r2"]["files"] == []
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["r1.eml"]


def test_markup_from_the_api_is_escaped(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": ["<script>alert('x')</script>", "Tea & Cake"], "note": "<b onclick=x>hi</b>"})
    template = '<p>Hi {{ first_name }}</p>{% live "shop" %}<ul>{% for p in shop.products %}<li>{{ p }}</li>{% endfor %}</ul><p>{{ shop.note }}</p>{% endlive %}\n'
    people = [{"id": "r1", "email": "r1@example.com", "first_name": "<img src=x onerror=alert(1)>"}]
    campaign = write_campaign(tmp_path / "c", template=template, recipients=people,
                              sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    html = parts(eml_of(out, manifest(out)["r1"]))["html"]
    assert "<li>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</li>" in html
    assert "<li>Tea &amp; Cake</li>" in html
    assert "<p>&lt;b onclick=x&gt;hi&lt;/b&gt;</p>" in html
    assert "<p>Hi &lt;img src=x onerror=alert(1)&gt;</p>" in html
    assert "<script" not in html and "<img" not in html and "<b " not in html


def test_markup_from_the_api_is_escaped_through_mjml(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": ["<script>alert('x')</script>"], "note": "</mj-text><mj-raw><script>x</script></mj-raw>"})
    template = """<mjml><mj-body><mj-section><mj-column>
<mj-text>Hi {{ first_name }}</mj-text>
{% live "shop" %}<mj-text>{{ shop.products[0] }} / {{ shop.note }}</mj-text>{% endlive %}
</mj-column></mj-section></mj-body></mjml>
"""
    campaign = write_campaign(tmp_path / "c", template=template, template_name="email.mjml.j2",
                              sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entry = manifest(out)["r1"]
    assert entry["status"] == "rendered"
    html = parts(eml_of(out, entry))["html"]
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "&lt;/mj-text&gt;&lt;mj-raw&gt;" in html
    assert "<script" not in html


def test_subject_is_plain_text_not_html(tmp_path: Path) -> None:
    people = [{"id": "r1", "email": "r1@example.com", "first_name": "Tom & Jerry <3"}]
    out = tmp_path / "out"

    result = render(write_campaign(tmp_path / "c", recipients=people), out)

    assert result.exit_code == 0, result.output
    message = eml_of(out, manifest(out)["r1"])
    assert message["Subject"] == "Hello Tom & Jerry <3"
    assert "<p>Hi Tom &amp; Jerry &lt;3,</p>" in parts(message)["html"]


# -- header injection --------------------------------------------------------------------


def test_line_break_in_a_header_value_fails_that_recipient_only(tmp_path: Path) -> None:
    people = [
        {"id": "ok", "email": "ok@example.com", "first_name": "Ann", "ref": "a1"},
        {"id": "evil", "email": "evil@example.com", "first_name": "Eve\r\nBcc: x@y", "ref": "a2"},
        {"id": "lf", "email": "lf@example.com", "first_name": "Lou\nBcc: x@y", "ref": "a3"},
        {"id": "hdr", "email": "hdr@example.com", "first_name": "Hal", "ref": "a4\r\nBcc: x@y"},
    ]
    campaign = write_campaign(tmp_path / "c", recipients=people, campaign={"headers": {"X-Ref": "{{ ref }}"}})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 3, result.output
    entries = manifest(out)
    assert {rid: e["status"] for rid, e in entries.items()} == {
        "ok": "rendered", "evil": "failed", "lf": "failed", "hdr": "failed",
    }
    assert entries["evil"]["error"] == (
        "subject would contain a line break (header injection refused): 'Hello Eve\\r\\nBcc: x@y'"
    )
    assert entries["lf"]["error"].startswith("subject would contain a line break")
    assert entries["hdr"]["error"] == (
        "X-Ref would contain a line break (header injection refused): 'a4\\r\\nBcc: x@y'"
    )
    files = list((out / "messages").iterdir())
    assert [f.name for f in files] == ["ok.eml"]
    for path in files:
        # No line of the file starts a Bcc header (a substring test would trip
        # on "bcc" inside a random Message-ID, boundary or base64 line).
        assert not re.search(rb"(?im)^bcc\s*:", path.read_bytes())
        message = eml_of(out, entries["ok"])
        assert message["Bcc"] is None and message["X-Ref"] == "a1"


# -- template errors ------------------------------------------------------------------------


def test_template_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    template = "<html><body>\n<p>Hi {{ first_name }}</p>\n<p>{% endif %}</p>\n</body></html>\n"
    campaign = write_campaign(tmp_path / "c", template=template)
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: {campaign.parent / 'email.html.j2'}:3: template syntax error: Encountered unknown tag 'endif'.\n"
    )
    assert not out.exists()


def test_syntax_error_in_an_included_template_stops_before_the_run(tmp_path: Path) -> None:
    campaign = write_campaign(
        tmp_path / "c",
        template='<p>Hi</p>\n{% include "_footer.html.j2" %}\n',
        files={"_footer.html.j2": "<p>Unsubscribe</p>\n<p>{{ id }</p>\n"},
    )
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"Error: {campaign.parent / '_footer.html.j2'}:2: template syntax error: unexpected '}}'\n"
    )
    assert not (out / "manifest.jsonl").exists()


def test_missing_or_escaping_include_stops_before_the_run(tmp_path: Path) -> None:
    for name in ("_missing.html.j2", "../outside.html.j2"):
        (tmp_path / "outside.html.j2").write_text("secret\n")
        campaign = write_campaign(tmp_path / "c", template=f'<p>Hi</p>{{% include "{name}" %}}\n')

        result = render(campaign, tmp_path / "out")

        assert result.exit_code == 1, result.output
        assert result.stderr == (
            f"Error: {campaign.parent / 'email.html.j2'}: template includes {name}, "
            f"which is not in {campaign.parent}\n"
        )


def test_includes_render_with_the_recipient(tmp_path: Path) -> None:
    campaign = write_campaign(
        tmp_path / "c",
        template='<p>Hi {{ first_name }}</p>\n{% include "_footer.html.j2" %}\n',
        files={"_footer.html.j2": '<p>Unsubscribe: https://shop.example/u/{{ id }}</p>{% include "_legal.html.j2" %}\n',
               "_legal.html.j2": "<p>Shop Ltd</p>\n"},
    )
    out = tmp_path / "out"

    assert render(campaign, out).exit_code == 0
    html = parts(eml_of(out, manifest(out)["r1"]))["html"]
    assert "<p>Unsubscribe: https://shop.example/u/r1</p><p>Shop Ltd</p>" in html


def test_subject_syntax_error(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"subject": "Hi {{ first_name"})

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {campaign}:4: [campaign] subject: template syntax error: ")
    assert result.stderr.count("\n") == 1


def test_data_error_outside_a_live_block_fails_the_recipient(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": []})
    campaign = write_campaign(tmp_path / "c", template="<p>{{ shop.city.name }}</p>\n",
                              sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 3, result.output
    entry = manifest(out)["r1"]
    assert entry["status"] == "failed"
    assert entry["error"] == "email.html.j2: 'dict object' has no attribute 'city'"


# -- invalid rows ------------------------------------------------------------------------------


def test_invalid_jsonl_rows_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    rows = "\n".join([
        '{"id": "ok", "email": "ok@example.com", "first_name": "Ann"}',
        '{"email": "noid@example.com", "first_name": "Nid"}',
        '{"id": "bad", "email": "not-an-email"}',
        '{"id": "ok", "email": "dup@example.com"}',
        "this is not json",
        "[1, 2]",
        '{"id": "noemail"}',
        '{"id": "  ", "email": "blank@example.com"}',
        '{"id": "zoe", "email": "zoë@exämple.com"}',
        '{"id": "ok2", "email": "ok2@example.com", "first_name": "Bo"}',
    ]) + "\n"
    campaign = write_campaign(tmp_path / "c", recipients=rows)
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    invalid = sorted((e["row"], e["id"], e["error"]) for e in manifest_lines(out) if e["status"] == "invalid")
    assert invalid == [
        (2, None, "no 'id' field"),
        (3, "bad", "malformed email address 'not-an-email'"),
        (4, "ok", "duplicate id 'ok' (first seen earlier in the file)"),
        (5, None, "not valid JSON (Expecting value at column 1)"),
        (6, None, "must be a JSON object, got list"),
        (7, "noemail", "no 'email' field"),
        (8, None, "no 'id' field"),
        (9, "zoe", "non-ASCII email address 'zoë@exämple.com' is not supported; use its ASCII (IDNA) form"),
    ]
    assert {rid: e["status"] for rid, e in manifest(out).items()} == {"ok": "rendered", "ok2": "rendered"}
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["ok.eml", "ok2.eml"]
    assert "invalid 8" in result.stdout


def test_invalid_csv_rows(tmp_path: Path) -> None:
    rows = (
        "id,email,first_name\n"
        "c1,c1@example.com,Ann\n"
        ",c2@example.com,Nobody\n"
        "c3,c3@example.com,Cy,extra\n"
        'c4,c4@example.com,"Dee"\n'
        "c1,again@example.com,Dup\n"
    )
    campaign = write_campaign(tmp_path / "c", recipients=rows, recipients_file="people.csv")
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    invalid = sorted((e["row"], e["error"]) for e in manifest_lines(out) if e["status"] == "invalid")
    assert invalid == [
        (3, "no 'id' field"),
        (4, "more values than the 3 columns of the header"),
        (6, "duplicate id 'c1' (first seen earlier in the file)"),
    ]
    assert {rid: e["status"] for rid, e in manifest(out).items()} == {"c1": "rendered", "c4": "rendered"}


def test_failed_source_outside_a_live_block_of_the_text_template_uses_the_fallback_template(
    api: ScriptedAPI, tmp_path: Path
) -> None:
    api.serve("/shop/r1", {"city": "Oslo"})
    api.serve("/shop/r2", status=500)
    campaign = write_campaign(
        tmp_path / "c", recipients=PEOPLE[:2], sources={"shop": source(api.url + "/shop/{{ id }}")},
        template='<p>Hi</p>{% live "shop" %}<p>{{ shop.city }}</p>{% endlive %}\n',
        text_template="Hi, delivering to {{ shop.city }}\n",
        fallback_template="<p>Hello {{ first_name }}, new arrivals are in.</p>\n",
    )
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert parts(eml_of(out, entries["r1"]))["plain"].replace("\r\n", "\n") == "Hi, delivering to Oslo\n"
    assert entries["r2"]["status"] == "fallback"
    assert entries["r2"]["fallback_blocks"][0]["template"] == "generic.html.j2"
    body = parts(eml_of(out, entries["r2"]))
    assert "<p>Hello Bob, new arrivals are in.</p>" in body["html"]
    assert body["plain"].replace("\r\n", "\n") == "Hello Bob, new arrivals are in.\n"


def test_data_error_in_the_text_template_names_it(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"products": []})
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/shop/{{ id }}")},
                              text_template="Hi {{ shop.city.name }}\n")
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 3, result.output
    assert manifest(out)["r1"]["error"] == "text_template email.txt.j2: 'dict object' has no attribute 'city'"


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unexpected_render_error_fails_that_recipient_not_the_run(tmp_path: Path, workers: int) -> None:
    # Endless recursion raises RecursionError: not a data error a live block
    # expects, yet one recipient's failure must still not stop the run.
    template = (
        "{% macro deep(n) %}{{ deep(n + 1) }}{% endmacro %}"
        "<p>Hi {{ first_name }}</p>{% if first_name == 'Loop' %}{{ deep(0) }}{% endif %}"
    )
    people = [
        {"id": "ok", "email": "ok@example.com", "first_name": "Ann"},
        {"id": "loop", "email": "loop@example.com", "first_name": "Loop"},
    ]
    campaign = write_campaign(tmp_path / "c", recipients=people, template=template)
    out = tmp_path / "out"

    result = render(campaign, out, workers=workers)

    assert result.exit_code == 3, result.output
    entries = manifest(out)
    assert entries["ok"]["status"] == "rendered"
    assert entries["loop"]["status"] == "failed"
    assert entries["loop"]["error"].startswith("unexpected error while rendering: RecursionError")
