"""AMP for Email: amp_template rendered per recipient, checked by the real AMP
validator (validator_wasm.js in embedded V8), placed between the text and HTML
parts; signed open-time links; the demo's open-time endpoint and its CORS headers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from emailpers import amp
from emailpers.demo import DEMO_AMP_KEY, DEMO_CAMPAIGN, DEMO_SENDER, SampleAPI

from conftest import ScriptedAPI, eml_of, invoke, manifest, render, report, source, write_campaign
from render_processes import Started, kill_all, people, render_processes, wait_mid_run

HERE = Path(__file__).parent
SAMPLE = (HERE / "amp" / "cart.amp.html.j2").read_text(encoding="utf-8")
KEY = "amp-test-key-0123456789"
PEOPLE = [
    {"id": "r1", "email": "r1@example.com", "first_name": "Ann"},
    {"id": "r2", "email": "r2@example.com", "first_name": "Bob <b>&"},
]


def _validator_file() -> Path | None:
    try:
        path = amp.check_available()
    except amp.ValidatorUnavailable:
        return None
    return path


VALIDATOR = _validator_file()
needs_validator = pytest.mark.skipif(
    VALIDATOR is None,
    reason="the AMP validator cannot be had here: needs `pip install -e '.[amp]'` (mini-racer) and "
    "`emailpers amp fetch-validator` (npm), which .ci/run does",
)


@pytest.fixture(autouse=True)
def _amp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMP_LINK_KEY", KEY)
    if VALIDATOR is not None:
        monkeypatch.setenv(amp.VALIDATOR_ENV, str(VALIDATOR))


def amp_campaign(folder: Path, api: ScriptedAPI, amp_template: str = SAMPLE, **campaign: Any) -> Path:
    api.serve("/shop/r1", {"products": ["mug", "tea"]})
    api.serve("/shop/r2", {"products": ["pot"]})
    return write_campaign(
        folder,
        sources={"shop": source(f"{api.url}/shop/{{{{ id }}}}")},
        recipients=PEOPLE,
        files={"cart.amp.html.j2": amp_template},
        campaign={"amp_template": "cart.amp.html.j2", "amp_key_env": "AMP_LINK_KEY", **campaign},
    )


def content_types(message: EmailMessage) -> list[str]:
    assert message.get_content_type() == "multipart/alternative"
    return [part.get_content_type() for part in message.iter_parts()]


def amp_part(message: EmailMessage) -> str:
    (part,) = [p for p in message.iter_parts() if p.get_content_type() == "text/x-amp-html"]
    assert isinstance(part, EmailMessage)
    content = part.get_content()
    assert isinstance(content, str)
    return content


# -- signing --------------------------------------------------------------------------


def test_an_amp_url_carries_a_token_that_verify_request_accepts() -> None:
    key = KEY.encode()
    link = amp.AmpLink("r 1&x", "spring", amp.link_token(key, "r 1&x", "spring", 2_000))
    url = link.url("https://api.shop.example/amp/cart?v=2")
    query = urlsplit(url).query

    assert url.startswith("https://api.shop.example/amp/cart?v=2&r=")
    assert amp.verify_request(key, query, now=1_999) == "r 1&x"
    assert amp.verify_request(key, query, campaign="spring", now=0) == "r 1&x"
    assert amp.verify_request(key, query, campaign="autumn", now=0) is None
    assert amp.verify_request(key, query, now=2_000) is None  # expired
    assert amp.verify_request(key, query.replace("r=r+1%26x", "r=r2"), now=0) is None  # another recipient's data
    assert amp.verify_request(key, "r=r1&c=spring", now=0) is None
    for bad in ("/amp/cart", "http://api.shop.example/amp", "https://u:p@api.shop.example/"):
        with pytest.raises(ValueError, match="absolute https"):
            link.url(bad)


def test_cors_headers_v2_and_v1() -> None:
    sender = "news@shop.example"
    assert amp.cors_headers({"amp-email-sender": "News@Shop.example"}, "", sender) == {"AMP-Email-Allow-Sender": sender}
    assert amp.cors_headers({"AMP-Email-Sender": "evil@example.com"}, "", sender) is None
    v1 = amp.cors_headers({"Origin": "https://mail.google.com"}, f"__amp_source_origin={sender}", sender)
    assert v1 == {
        "Access-Control-Allow-Origin": "https://mail.google.com",
        "AMP-Access-Control-Allow-Source-Origin": sender,
        "Access-Control-Expose-Headers": "AMP-Access-Control-Allow-Source-Origin",
    }
    assert amp.cors_headers({}, "", sender) is None


# -- render: the real validator -----------------------------------------------------------


@needs_validator
def test_the_sample_amp_template_passes_and_sits_between_text_and_html(tmp_path: Path, api: ScriptedAPI) -> None:
    campaign = amp_campaign(tmp_path / "c", api)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "AMP parts: sent 2  dropped 0  unvalidated 0   (manifest total" in result.stdout
    assert report(tmp_path / "out")["amp"]["this_run"] == {"sent": 2, "dropped": 0, "unvalidated": 0}
    entries = manifest(tmp_path / "out")
    for person in PEOPLE:
        entry = entries[person["id"]]
        assert (entry["status"], entry["amp"]) == ("rendered", "sent")
        message = eml_of(tmp_path / "out", entry)
        assert content_types(message) == ["text/plain", "text/x-amp-html", "text/html"]
        document = amp_part(message)
        assert document.startswith("<!doctype html>\n<html ⚡4email")
        assert "When we wrote, your cart held" in document
        # the link in the AMP part was signed for this recipient and campaign
        src = re.search(r'src="(https://api\.shop\.example/amp/cart\?[^"]+)"', document)
        assert src is not None
        query = urlsplit(src.group(1).replace("&amp;", "&")).query
        assert amp.verify_request(KEY.encode(), query, campaign="test-campaign") == person["id"]
    assert "Bob &lt;b&gt;&amp;" in amp_part(eml_of(tmp_path / "out", entries["r2"]))  # autoescaped
    # the key signs links; it is written nowhere
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


BROKEN = {
    "custom script": ("<p>Right now:</p>", "<script>alert(1)</script>", "DISALLOWED_SCRIPT_TAG"),
    "onclick": ("<p>Right now:</p>", '<p onclick="alert(1)">Right now:</p>', "DISALLOWED_ATTR"),
    "javascript url": ("<p>Right now:</p>", '<a href="javascript:alert(1)">now</a>', "INVALID_URL_PROTOCOL"),
    "relative amp-list src": ("{{ amp_url('https://api.shop.example/amp/cart') }}", "/amp/cart",
                              "DISALLOWED_RELATIVE_URL"),
    "missing boilerplate": ("<style amp4email-boilerplate>body{visibility:hidden}</style>", "",
                            "TAG_REQUIRED_BY_MISSING"),
}  # fmt: skip


@needs_validator
@pytest.mark.parametrize("name", list(BROKEN))
def test_a_part_the_validator_refuses_is_dropped_with_its_code(tmp_path: Path, api: ScriptedAPI, name: str) -> None:
    old, new, code = BROKEN[name]
    assert old in SAMPLE
    campaign = amp_campaign(tmp_path / "c", api, SAMPLE.replace(old, new))

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert report(tmp_path / "out")["amp"]["total"] == {"sent": 0, "dropped": 2, "unvalidated": 0}
    for entry in manifest(tmp_path / "out").values():
        assert (entry["status"], entry["amp"]) == ("rendered", "dropped")
        first = entry["amp_errors"][0]
        assert first["code"] == code
        assert isinstance(first["line"], int) and isinstance(first["col"], int) and first["message"]
        # the email goes out without the AMP part, never with a broken one
        assert content_types(eml_of(tmp_path / "out", entry)) == ["text/plain", "text/html"]


@needs_validator
def test_render_processes_validate_too(tmp_path: Path, api: ScriptedAPI) -> None:
    campaign = amp_campaign(tmp_path / "c", api, SAMPLE.replace("<p>Right now:</p>", "{% if id == 'r2' %}<p onclick=x>.</p>{% endif %}"))

    result = render(campaign, tmp_path / "out", workers=2)

    assert result.exit_code == 0, result.output
    entries = manifest(tmp_path / "out")
    assert (entries["r1"]["amp"], entries["r2"]["amp"]) == ("sent", "dropped")
    assert entries["r2"]["amp_errors"][0]["code"] == "DISALLOWED_ATTR"


# -- dropped before the validator, and without one ------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amp_template_text": SAMPLE.replace("{{ first_name }}", "{{ shop.missing.field }}")}, "no attribute 'missing'"),
        ({"amp_key_env": None}, "amp_url needs [campaign] amp_key_env"),
        ({"amp_template_text": SAMPLE.replace("https://api.shop.example/amp/cart", "/amp/cart")}, "absolute https"),
    ],
    ids=["missing field", "no link key", "relative amp_url"],
)
def test_an_amp_template_error_drops_the_part_not_the_email(
    tmp_path: Path, api: ScriptedAPI, change: dict[str, Any], message: str
) -> None:
    text = change.pop("amp_template_text", SAMPLE)
    campaign = amp_campaign(tmp_path / "c", api, text, **change)

    result = render(campaign, tmp_path / "out", "--amp-unvalidated")

    assert result.exit_code == 0, result.output
    for entry in manifest(tmp_path / "out").values():
        assert (entry["status"], entry["amp"]) == ("rendered", "dropped")
        (error,) = entry["amp_errors"]
        assert error["code"] == "TEMPLATE_ERROR" and message in error["message"], error
        assert content_types(eml_of(tmp_path / "out", entry)) == ["text/plain", "text/html"]


def test_a_part_over_the_size_limit_is_dropped(tmp_path: Path, api: ScriptedAPI) -> None:
    filler = "<p>" + "x" * (amp.MAX_AMP_BYTES) + "</p>"
    campaign = amp_campaign(tmp_path / "c", api, SAMPLE.replace("<p>Right now:</p>", filler))

    result = render(campaign, tmp_path / "out", "--amp-unvalidated")

    assert result.exit_code == 0, result.output
    entry = manifest(tmp_path / "out")["r1"]
    assert entry["amp"] == "dropped"
    assert entry["amp_errors"][0]["code"] == "SIZE_LIMIT"
    assert "over the 200,000 AMP for Email allows" in entry["amp_errors"][0]["message"]


def test_without_a_validator_render_refuses_unless_amp_unvalidated(
    tmp_path: Path, api: ScriptedAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(amp.VALIDATOR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    campaign = amp_campaign(tmp_path / "c", api)

    refused = render(campaign, tmp_path / "out")

    assert refused.exit_code == 1
    assert "amp_template: no AMP validator" in refused.stderr
    assert "emailpers amp fetch-validator" in refused.stderr and "--amp-unvalidated" in refused.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was fetched or written

    result = render(campaign, tmp_path / "out", "--amp-unvalidated")

    assert result.exit_code == 0, result.output
    assert "AMP parts: sent 0  dropped 0  unvalidated 2" in result.stdout
    entry = manifest(tmp_path / "out")["r1"]
    assert entry["amp"] == "unvalidated"
    assert content_types(eml_of(tmp_path / "out", entry)) == ["text/plain", "text/x-amp-html", "text/html"]


@needs_validator
def test_a_process_with_a_validator_loaded_exits() -> None:
    """V8 left to the interpreter's finalization hung a process that called sys.exit."""
    code = "from emailpers import amp; amp.Validator(amp.find_validator()).errors('<p>'); raise SystemExit(3)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr


def test_a_validator_path_that_is_not_a_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(amp.VALIDATOR_ENV, str(tmp_path / "nope.js"))
    result = invoke("amp", "where")
    assert result.exit_code == 1
    assert f"${amp.VALIDATOR_ENV} names {tmp_path / 'nope.js'}, which is not a file" in result.stderr


def test_amp_keys_need_amp_template(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", campaign={"amp_key_env": "AMP_LINK_KEY"})
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert "[campaign] amp_key_env needs amp_template" in result.stderr


def test_a_short_amp_link_key_stops_the_run_at_load(
    tmp_path: Path, api: ScriptedAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMP_LINK_KEY", "short")
    result = render(amp_campaign(tmp_path / "c", api), tmp_path / "out", "--amp-unvalidated")
    assert result.exit_code == 1
    assert "[campaign] amp_key_env the signing key must be at least 16 bytes" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_campaign_without_amp_has_no_amp_in_its_output(tmp_path: Path) -> None:
    result = render(write_campaign(tmp_path / "c"), tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "AMP" not in result.stdout and "amp" not in report(tmp_path / "out")
    assert "amp" not in manifest(tmp_path / "out")["r1"]


# -- the demo's open-time endpoint --------------------------------------------------------


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers.items()), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), json.loads(exc.read())


def test_the_sample_endpoint_answers_a_signed_link_with_amp_cors_headers() -> None:
    fixtures = json.loads((HERE.parent / "sample_data" / "api.json").read_text(encoding="utf-8"))
    fixtures["latency_ms"] = [0, 0]
    key = DEMO_AMP_KEY.encode()
    good = amp.AmpLink("12345", DEMO_CAMPAIGN, amp.link_token(key, "12345", DEMO_CAMPAIGN, 2**40))
    expired = amp.AmpLink("12345", DEMO_CAMPAIGN, amp.link_token(key, "12345", DEMO_CAMPAIGN, 1))
    with SampleAPI(fixtures) as api:
        base = f"{api.origin}/amp/cart"
        query = "?" + urlsplit(good.url("https://x.example/")).query

        status, headers, body = _get(base + query, {"AMP-Email-Sender": DEMO_SENDER})
        assert status == 200
        assert headers["AMP-Email-Allow-Sender"] == DEMO_SENDER
        assert body == {"items": [{"name": "Wireless Headphones"}, {"name": "Laptop Sleeve"}]}

        origin = "https://mail.google.com"
        status, headers, _ = _get(f"{base}{query}&__amp_source_origin={DEMO_SENDER}", {"Origin": origin})
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == origin
        assert headers["AMP-Access-Control-Allow-Source-Origin"] == DEMO_SENDER
        assert headers["Access-Control-Expose-Headers"] == "AMP-Access-Control-Allow-Source-Origin"

        assert _get(base + query, {"AMP-Email-Sender": "other@evil.example"})[0] == 403
        tampered = query.replace("r=12345", "r=12346")
        assert _get(base + tampered, {"AMP-Email-Sender": DEMO_SENDER})[0] == 403
        old = "?" + urlsplit(expired.url("https://x.example/")).query
        assert _get(base + old, {"AMP-Email-Sender": DEMO_SENDER})[0] == 403


def test_readme_shows_the_sample_amp_template_verbatim() -> None:
    readme = (HERE.parent / "README.md").read_text(encoding="utf-8")
    assert SAMPLE in readme


def test_fetch_validator_needs_npm(tmp_path: Path) -> None:
    with pytest.raises(amp.ValidatorUnavailable, match="needs npm"):
        amp.fetch_validator(tmp_path / "v.js", npm=str(tmp_path / "no-npm"))
    assert not os.path.exists(tmp_path / "v.js")


def test_render_processes_never_hold_the_link_key(tmp_path: Path, api: ScriptedAPI) -> None:
    """Links are signed in the main process: the key is out of the render processes' environment."""
    behaviour = api.serve("/users/*", {"products": ["mug"]}, delay=0.2)
    rows = people(12)
    campaign = write_campaign(
        tmp_path / "c",
        sources={"shop": source(api.url + "/users/{{ id }}/cart")},
        recipients=rows,
        files={"cart.amp.html.j2": SAMPLE},
        campaign={"amp_template": "cart.amp.html.j2", "amp_key_env": "AMP_LINK_KEY"},
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out), "--workers", "2",
               "--concurrency", "4", "--no-progress", "--amp-unvalidated"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "AMP_LINK_KEY": KEY})  # fmt: skip
    started = Started(process, behaviour, [r["id"] for r in rows], campaign, out)
    children = []
    try:
        children = wait_mid_run(started, 2)
        environments = [" ".join(f"{k}={v}" for k, v in p.environ().items()) for p in render_processes(process.pid)]
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        kill_all(children)
    assert process.returncode == 0, stderr.decode()
    assert environments and all(KEY not in environment for environment in environments)
    entries = manifest(out)
    for rid, entry in entries.items():
        document = amp_part(eml_of(out, entry))
        src = re.search(r'src="(https://api\.shop\.example/amp/cart\?[^"]+)"', document)
        assert src is not None
        assert amp.verify_request(KEY.encode(), urlsplit(src.group(1).replace("&amp;", "&")).query) == rid


@pytest.mark.skipif(VALIDATOR is None, reason="needs mini-racer: pip install -e '.[amp]'")
def test_a_file_that_is_not_the_validator_stops_the_run_before_it_starts(
    tmp_path: Path, api: ScriptedAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "validator_wasm.js"
    fake.write_text("var amp = {};\n", encoding="utf-8")
    monkeypatch.setenv(amp.VALIDATOR_ENV, str(fake))
    campaign = amp_campaign(tmp_path / "c", api)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1
    assert f"{fake} is not a working AMP validator" in result.stderr
    assert api.count() == 0 and not (tmp_path / "out").exists()


def test_amp_counts_add_up_over_a_resumed_run(tmp_path: Path, api: ScriptedAPI) -> None:
    campaign = amp_campaign(tmp_path / "c", api)
    assert render(campaign, tmp_path / "out", "--amp-unvalidated").exit_code == 0
    api.serve("/shop/r3", {"products": []})
    with (tmp_path / "c" / "recipients.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "r3", "email": "r3@example.com", "first_name": "Cy"}) + "\n")

    result = render(campaign, tmp_path / "out", "--amp-unvalidated")

    assert result.exit_code == 0, result.output
    assert report(tmp_path / "out")["amp"] == {
        "this_run": {"sent": 0, "dropped": 0, "unvalidated": 1},
        "total": {"sent": 0, "dropped": 0, "unvalidated": 3},
    }
    assert "AMP parts: sent 0  dropped 0  unvalidated 3   (manifest total" in result.stdout
