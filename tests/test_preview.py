"""`emailpers preview`: the gallery opened in a real headless Chromium (the
system's, driven by Playwright): every email iframe rendered, failed states
show their fallback blocks, the filter works, screenshots are not blank."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from emailpers.browser import find_chromium
from emailpers.fixtures import fixture_path

from conftest import invoke, source, write_campaign

try:
    import playwright  # noqa: F401

    PLAYWRIGHT = True
except ImportError:
    PLAYWRIGHT = False

needs_chromium = pytest.mark.skipif(
    not PLAYWRIGHT or find_chromium() is None,
    reason="no headless Chromium here: install the Debian package chromium and Playwright (pip install -e '.[test]')",
)

URL = "http://127.0.0.1:9"
TEMPLATE = """<html><body>
<p>Hi {{ first_name }},</p>
{% live "shop" %}<p class="live-shop">Cart: {{ shop.products|join(", ") }}</p>{% fallback %}<p class="fallback-shop">See what is new.</p>{% endlive %}
{% live "points" %}<p class="live-points">{{ points.balance }} points</p>{% fallback %}<p class="fallback-points">Earn points on every order.</p>{% endlive %}
</body></html>
"""
GENERIC = "<html><body><p class=\"generic\">Hello from the shop, {{ first_name }}.</p></body></html>\n"
ROWS = [{"id": "ann", "email": "ann@example.com", "first_name": "Ann"},
        {"id": "ben", "email": "ben@example.com", "first_name": "Ben"}]


def gallery(tmp_path: Path, *args: str) -> tuple[Path, Any]:
    campaign = write_campaign(
        tmp_path / "c", template=TEMPLATE, fallback_template=GENERIC, recipients=ROWS,
        sources={"shop": source(URL + "/cart/{{ id }}", auth={"type": "bearer", "token_env": "PREVIEW_UNSET"}),
                 "points": source(URL + "/points/{{ id }}")},
        campaign={"headers": {"List-Unsubscribe": "<https://shop.example/u>"}},
    )
    fixtures = tmp_path / "fixtures"
    for row in ROWS:
        for path, body in ((f"/cart/{row['id']}", {"products": ["a lamp"]}), (f"/points/{row['id']}", {"balance": 40})):
            target = fixture_path(fixtures, "GET", URL + path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps({"status": 200, "json": body}))
    out = tmp_path / "gallery"
    result = invoke("preview", campaign, "--replay", fixtures, "--out", out, *args)
    return out, result


def test_preview_writes_every_state_without_a_browser(tmp_path: Path) -> None:
    out, result = gallery(tmp_path, "--json")

    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert value["recipients"] == ["ann", "ben"]
    assert value["states"] == ["all sources failed", "fallback_template", "live", "points failed", "shop failed"]
    assert value["emails"] == 10 and value["not_rendered"] == []
    page = (out / "index.html").read_text()
    assert "http://" not in page.replace("http://127.0.0.1:9", "") and "<script src" not in page and "<link" not in page
    assert (out / "emails" / "ann" / "shop-failed.html").read_text().count("fallback-shop") == 1


@needs_chromium
def test_gallery_in_headless_chromium(tmp_path: Path) -> None:
    from emailpers.browser import chromium

    out, result = gallery(tmp_path, "--screenshots")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Preview of 2 recipients in 5 data states: 10 emails, ")
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((out / "index.html").as_uri())
        page.wait_for_function("document.querySelectorAll('iframe[data-loaded]').length === 20")
        seen: dict[tuple[str, str, str], str] = {}
        for frame in page.frames[1:]:
            element = frame.frame_element()
            card = element.evaluate("e => [e.closest('.card').dataset.recipient, e.closest('.card').dataset.state]")
            width = element.get_attribute("data-width")
            classes = frame.evaluate("Array.from(document.querySelectorAll('p[class]')).map(p => p.className).join(' ')")
            seen[(card[0], card[1], str(width))] = classes
            # the email's own viewport is the width a client gives it; the frame grew to the email's height
            assert frame.evaluate("innerWidth") == int(str(width))
            assert frame.evaluate("innerHeight") >= frame.evaluate("document.documentElement.scrollHeight") > 60
        assert len(seen) == 20
        for rid in ("ann", "ben"):
            for width in ("600", "375"):
                assert seen[(rid, "live", width)] == "live-shop live-points"
                assert seen[(rid, "shop failed", width)] == "fallback-shop live-points"
                assert seen[(rid, "points failed", width)] == "live-shop fallback-points"
                assert seen[(rid, "all sources failed", width)] == "fallback-shop fallback-points"
                assert seen[(rid, "fallback_template", width)] == "generic"
        shop_failed = page.locator('.card[data-recipient="ann"][data-state="shop failed"] .fallbacks').inner_text()
        assert "email.html.j2:3 {% live shop %} fell back: shop: preview: shop made to fail" in shop_failed

        def shown() -> list[tuple[str, str]]:
            return [tuple(c) for c in page.eval_on_selector_all(
                ".card:not(.hidden)", "cs => cs.map(c => [c.dataset.recipient, c.dataset.state])")]

        assert len(shown()) == 10
        page.fill("#recipient", "ben")
        assert {r for r, _ in shown()} == {"ben"} and len(shown()) == 5
        page.select_option("#state", "shop failed")
        assert shown() == [("ben", "shop failed")]
        assert page.inner_text("#count") == "1"
        page.fill("#recipient", "")
        page.select_option("#state", "")
        page.select_option("#finding", "list-unsubscribe-post")
        assert len(shown()) == 10  # no List-Unsubscribe-Post anywhere
        page.select_option("#finding", "none")
        assert shown() == []

        shots = sorted((out / "screenshots").glob("*.png"))
        assert len(shots) == 20
        colours = page.evaluate(
            """async (url) => { const img = new Image(); img.src = url; await img.decode();
                 const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
                 const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                 const d = g.getImageData(0, 0, c.width, c.height).data; const s = new Set();
                 for (let i = 0; i < d.length; i += 4) s.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
                 return [s.size, img.width]; }""",
            "data:image/png;base64," + base64.b64encode((out / "screenshots" / "ann--live--375.png").read_bytes()).decode(),
        )
        assert colours[0] > 2 and colours[1] == 375


def test_screenshots_without_a_browser_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAILPERS_CHROMIUM", str(tmp_path / "no-such-chromium"))
    if not PLAYWRIGHT:
        pytest.skip("Playwright is not installed: the message is about Playwright instead")
    _, result = gallery(tmp_path, "--screenshots")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: no Chromium found (looked for $EMAILPERS_CHROMIUM, then chromium, chromium-browser, google-chrome, "
        "google-chrome-stable on PATH); on Debian or Ubuntu: apt-get install chromium\n"
    )
