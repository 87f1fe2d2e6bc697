"""What a run writes: .eml files read back with the stdlib parser, --format,
file names for unsafe ids, report.json, and secrets that must stay out of it all."""

from __future__ import annotations

import base64
import email.utils
import re
from pathlib import Path

import pytest

from conftest import (
    ScriptedAPI,
    eml_of,
    invoke,
    manifest,
    manifest_lines,
    parse_eml,
    parts,
    render,
    report,
    source,
    write_campaign,
)


def test_eml_structure_headers_and_non_ascii(tmp_path: Path) -> None:
    people = [
        {"id": "r1", "email": "zoe@example.com", "first_name": "Zoé"},
        {"id": "r2", "email": "li@example.com", "first_name": "李"},
    ]
    campaign = write_campaign(
        tmp_path / "c",
        recipients=people,
        template="<html><body>\n<p>Bonjour {{ first_name }}, voilà.</p>\n</body></html>\n",
        campaign={
            "subject": "Café for {{ first_name }}",
            "from": "Boutique Élise <news@shop.example>",
            "headers": {"List-Unsubscribe": "<https://shop.example/u/{{ id }}>", "X-Campaign": "spring"},
        },
    )
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert entries["r1"]["files"] == ["messages/r1.eml"]
    raw = (out / "messages" / "r1.eml").read_bytes()
    assert raw.isascii()
    assert re.search(rb"(?<!\r)\n", raw) is None, "every line ends in CRLF"
    assert b"\r" not in raw.replace(b"\r\n", b"")

    message = parse_eml(out / "messages" / "r1.eml")
    assert message.defects == []
    assert message["Subject"] == "Café for Zoé"
    assert message["From"] == "Boutique Élise <news@shop.example>"
    assert message["From"].addresses[0].addr_spec == "news@shop.example"
    assert message["To"] == "zoe@example.com"
    assert message["To"].addresses[0].addr_spec == "zoe@example.com"
    assert message["MIME-Version"] == "1.0"
    assert message["List-Unsubscribe"] == "<https://shop.example/u/r1>"
    assert message["X-Campaign"] == "spring"
    assert re.fullmatch(r"<[0-9a-f]{32}@shop\.example>", message["Message-ID"])
    sent = email.utils.parsedate_to_datetime(message["Date"])
    assert sent.tzinfo is not None
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert [p.get_content_charset() for p in message.iter_parts()] == ["utf-8", "utf-8"]
    body = parts(message)
    assert "<p>Bonjour Zoé, voilà.</p>" in body["html"]
    assert body["plain"].replace("\r\n", "\n") == "Bonjour Zoé, voilà.\n"

    other = eml_of(out, entries["r2"])
    assert other["Subject"] == "Café for 李"
    assert other["Message-ID"] != message["Message-ID"]


def test_long_lines_and_bare_line_breaks_stay_crlf(tmp_path: Path) -> None:
    people = [{"id": "r1", "email": "r1@example.com", "first_name": "A" * 120, "note": "one\rtwo\nthree"}]
    template = "<p>" + "long words " * 40 + "{{ first_name }} {{ note }}</p>"  # no line break at all
    campaign = write_campaign(tmp_path / "c", recipients=people, template=template,
                              campaign={"subject": "A subject that is rather long: " + "{{ first_name }}"})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    raw = (out / "messages" / "r1.eml").read_bytes()
    assert re.search(rb"(?<!\r)\n", raw) is None, "a bare LF in the message"
    assert b"\r" not in raw.replace(b"\r\n", b"")
    message = parse_eml(out / "messages" / "r1.eml")
    assert message["Subject"] == "A subject that is rather long: " + "A" * 120
    html = parts(message)["html"]
    assert html.startswith("<p>long words long words")
    assert ("A" * 120 + " one") in html


def test_text_part_from_text_template_or_derived_from_html(tmp_path: Path) -> None:
    template = (
        "<html><head><style>p{color:red}</style></head><body>\n"
        '<p>Hi {{ first_name }},</p><p>See <a href="https://shop.example/new">what is new</a>.</p>\n'
        "</body></html>\n"
    )
    derived = write_campaign(tmp_path / "derived", template=template, campaign={"preheader": "Fresh picks inside"})
    explicit = write_campaign(tmp_path / "explicit", template=template, text_template="Hello {{ first_name }} <plain>\n")

    assert render(derived, tmp_path / "out1").exit_code == 0
    assert render(explicit, tmp_path / "out2").exit_code == 0

    body = parts(eml_of(tmp_path / "out1", manifest(tmp_path / "out1")["r1"]))
    assert body["plain"].replace("\r\n", "\n") == (
        "Fresh picks inside\n\nHi Ann,\n\nSee what is new (https://shop.example/new).\n"
    )
    assert re.search(r"<body><div style=\"display:none;[^\"]*\">Fresh picks inside</div>", body["html"])
    text = parts(eml_of(tmp_path / "out2", manifest(tmp_path / "out2")["r1"]))["plain"]
    assert text.replace("\r\n", "\n") == "Hello Ann <plain>\n"  # text templates are not HTML-escaped


def test_format_html_and_all(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c")

    html_only = render(campaign, tmp_path / "html", "--format", "html")
    both = render(campaign, tmp_path / "all", "--format", "all")

    assert (html_only.exit_code, both.exit_code) == (0, 0)
    assert manifest(tmp_path / "html")["r1"]["files"] == ["messages/r1.html", "messages/r1.txt"]
    assert sorted(p.name for p in (tmp_path / "html" / "messages").iterdir()) == ["r1.html", "r1.txt"]
    html = (tmp_path / "html" / "messages" / "r1.html").read_text(encoding="utf-8")
    assert html == "<html><body>\n<p>Hi Ann,</p>\n<p>New arrivals are in.</p>\n</body></html>\n"
    assert (tmp_path / "html" / "messages" / "r1.txt").read_text(encoding="utf-8") == "Hi Ann,\n\nNew arrivals are in.\n"

    assert manifest(tmp_path / "all")["r1"]["files"] == ["messages/r1.eml", "messages/r1.html", "messages/r1.txt"]
    eml_html = parts(parse_eml(tmp_path / "all" / "messages" / "r1.eml"))["html"]
    assert eml_html.replace("\r\n", "\n") == html


def test_format_choice_is_checked(tmp_path: Path) -> None:
    result = render(write_campaign(tmp_path / "c"), tmp_path / "out", "--format", "pdf")

    assert result.exit_code == 2
    assert "'pdf' is not one of 'eml', 'html', 'all'" in result.stderr


def test_unsafe_ids_become_encoded_file_names_inside_messages(tmp_path: Path) -> None:
    ids = ["../../etc/x", "a/b", "a_b", "with space", ".hidden", "x.", "C:\\evil", "safe-id_1.2"]
    people = [{"id": rid, "email": f"u{i}@example.com", "first_name": "X"} for i, rid in enumerate(ids)]
    campaign = write_campaign(tmp_path / "c", recipients=people)
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    names = {}
    for rid in ids:
        (name,) = entries[rid]["files"]
        path = (out / name).resolve()
        assert path.parent == (out / "messages").resolve() and path.is_file()
        assert parse_eml(path)["To"] == entries[rid]["email"]
        names[rid] = path.name
    assert names["safe-id_1.2"] == "safe-id_1.2.eml"
    assert names["a_b"] == "a_b.eml"
    for rid in set(ids) - {"safe-id_1.2", "a_b"}:
        stem = names[rid].removesuffix(".eml")
        assert stem.startswith("~")
        padded = stem[1:].upper() + "=" * (-len(stem[1:]) % 8)
        assert base64.b32decode(padded).decode() == rid
    assert len(set(names.values())) == len(ids)
    assert sorted(p.name for p in out.iterdir()) == [".emailpers.lock", "manifest.jsonl", "messages", "report.json", "run.json"]
    assert not (tmp_path / "etc").exists() and not (tmp_path / "x.eml").exists()


def test_report_counts(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/*", {"products": ["Mug"]})
    api.serve("/shop/fb", status=500)
    api.serve("/profile/*", {"tier": "gold"})
    api.serve("/profile/sk", status=404)
    rows = [
        {"id": "ok1", "email": "ok1@example.com", "first_name": "A"},
        {"id": "ok2", "email": "ok2@example.com", "first_name": "B"},
        {"id": "fb", "email": "fb@example.com", "first_name": "C"},
        {"id": "sk", "email": "sk@example.com", "first_name": "D"},
        {"id": "", "email": "noid@example.com", "first_name": "E"},
        {"id": "ok1", "email": "dup@example.com", "first_name": "F"},
        {"id": "fl", "email": "fl@example.com", "first_name": "G\r\nBcc: x@y"},
    ]
    campaign = write_campaign(tmp_path / "c", recipients=rows, sources={
        "shop": source(api.url + "/shop/{{ id }}", retries=1),
        "profile": source(api.url + "/profile/{{ id }}", required=True, retries=1),
    })
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 3, result.output
    counts = {"rendered": 2, "fallback": 1, "skipped": 1, "invalid": 2, "failed": 1}
    data = report(out)
    assert data["campaign"] == "test-campaign"
    assert data["this_run"] == counts
    assert data["total"] == counts
    assert data["resumed_from_previous_runs"] == 0
    assert data["stopped"] is None
    shop, profile = data["sources"]["shop"], data["sources"]["profile"]
    # 5 recipients reach the fetch stage; fb's 500 is retried once, sk's 404 is final.
    assert (shop["requests"], shop["retries"], shop["errors"], shop["fallbacks"]) == (6, 1, 1, 1)
    assert shop["top_errors"] == {"HTTP 500": 1}
    assert (profile["requests"], profile["retries"], profile["errors"]) == (5, 0, 1)
    assert profile["top_errors"] == {"HTTP 404": 1}
    assert shop["latency_ms"]["p50"] is not None and shop["latency_ms"]["max"] >= shop["latency_ms"]["p50"]
    statuses = sorted(e["status"] for e in manifest_lines(out))
    assert statuses == sorted(["rendered"] * 2 + ["fallback", "skipped", "invalid", "invalid", "failed"])
    assert "rendered 2  fallback 1  skipped 1  invalid 2  failed 1   (manifest total)" in result.stdout
    assert "source shop: 6 requests, 0 cache hits, 1 retries, 1 errors, 1 fallbacks" in result.stdout
    assert "      1 x HTTP 500" in result.stdout


def test_process_pool_renders_the_same_emails(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", lambda request: {"products": [request.path.split("/")[2].upper()]})
    api.serve("/users/p3/cart", status=500)
    people = [{"id": f"p{i}", "email": f"p{i}@example.com", "first_name": f"Name{i}"} for i in range(6)]
    campaign = write_campaign(tmp_path / "c", recipients=people,
                              sources={"shop": source(api.url + "/users/{{ id }}/cart")})

    pooled = render(campaign, tmp_path / "pool", "--no-cache", workers=2)
    inline = render(campaign, tmp_path / "inline", "--no-cache", workers=0)

    assert (pooled.exit_code, inline.exit_code) == (0, 0), pooled.output + inline.output
    in_pool, in_process = manifest(tmp_path / "pool"), manifest(tmp_path / "inline")
    assert {k: v["status"] for k, v in in_pool.items()} == {
        "p0": "rendered", "p1": "rendered", "p2": "rendered", "p3": "fallback", "p4": "rendered", "p5": "rendered",
    }
    assert in_pool["p3"]["fallback_blocks"] == in_process["p3"]["fallback_blocks"]
    for rid in in_pool:
        a = parts(eml_of(tmp_path / "pool", in_pool[rid]))
        b = parts(eml_of(tmp_path / "inline", in_process[rid]))
        assert a == b
    assert "<p>Cart: P1</p>" in parts(eml_of(tmp_path / "pool", in_pool["p1"]))["html"]
    assert report(tmp_path / "pool")["this_run"] == report(tmp_path / "inline")["this_run"]


# -- secrets ---------------------------------------------------------------------------------

SECRETS = {
    "EMAILPERS_TEST_TOKEN": "tok-SECRET-7f3a9c",
    "EMAILPERS_TEST_KEY": "key-SECRET-b81d20",
    "EMAILPERS_TEST_USER": "user-SECRET-55e0aa",
    "EMAILPERS_TEST_PASSWORD": "pw-SECRET-c4d9e1",
}


def test_secrets_never_reach_disk_or_output(api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    api.serve("/shop/*", {"products": ["Mug"]})
    api.serve("/shop/r2", status=401)
    api.serve("/loyalty/*", {"points": 5})
    api.serve("/loyalty/r3", status=500)
    api.serve("/profile/*", {"tier": "gold"})
    people = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": "Ann"} for i in range(1, 4)]
    template = (
        '<p>Hi</p>{% live "shop", "loyalty", "profile" %}<p>{{ shop.products[0] }} {{ loyalty.points }} '
        "{{ profile.tier }}</p>{% endlive %}\n"
    )
    campaign = write_campaign(tmp_path / "c", recipients=people, template=template, sources={
        "shop": source(api.url + "/shop/{{ id }}", auth={"type": "bearer", "token_env": "EMAILPERS_TEST_TOKEN"}),
        "loyalty": source(api.url + "/loyalty/{{ id }}", retries=1,
                          auth={"type": "header", "name": "X-API-Key", "value_env": "EMAILPERS_TEST_KEY"}),
        "profile": source(api.url + "/profile/{{ id }}", auth={
            "type": "basic", "username_env": "EMAILPERS_TEST_USER", "password_env": "EMAILPERS_TEST_PASSWORD"}),
    })
    out, cache = tmp_path / "out", tmp_path / "cache"

    results = [render(campaign, out, "--cache-dir", cache, "--format", "all"),
               render(campaign, tmp_path / "out2", "--cache-dir", cache),
               invoke("cache", "stats", campaign, "--cache-dir", cache, "--json")]

    assert [r.exit_code for r in results] == [0, 0, 0], [r.output for r in results]
    basic = base64.b64encode(f"{SECRETS['EMAILPERS_TEST_USER']}:{SECRETS['EMAILPERS_TEST_PASSWORD']}".encode())
    by_path = {r.path: r.headers for r in api.requests}
    assert by_path["/shop/r1"]["authorization"] == f"Bearer {SECRETS['EMAILPERS_TEST_TOKEN']}"
    assert by_path["/loyalty/r1"]["x-api-key"] == SECRETS["EMAILPERS_TEST_KEY"]
    assert by_path["/profile/r1"]["authorization"] == f"Basic {basic.decode()}"
    assert manifest(out)["r1"]["status"] == "rendered"

    files = [p for folder in (out, tmp_path / "out2", cache) for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".eml" for p in files) and any(p.parent == cache for p in files)
    needles = [v.encode() for v in SECRETS.values()] + [basic]
    for path in files:
        data = path.read_bytes()
        if path.suffix == ".eml":  # the parts' decoded text too, not only the transfer encoding
            data += "".join(p.get_content() for p in parse_eml(path).iter_parts()).encode()
        for needle in needles:
            assert needle not in data, f"a secret is in {path}"
    for result in results:
        for value in SECRETS.values():
            assert value not in result.output
