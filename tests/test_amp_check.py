"""AMP for Email in `check` and `preview`: a dropped AMP part is a check error
naming the recipient, the amp_template and the validator's line, column and
code; an unvalidated one a warning; the gallery shows the AMP part beside the
HTML with its outcome, and filters on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_amp import BROKEN, SAMPLE, VALIDATOR, needs_validator
from test_preview import needs_chromium

from emailpers import amp
from emailpers.fixtures import fixture_path

from conftest import invoke, source, write_campaign

URL = "http://127.0.0.1:9/shop"
TEXT = "Hi {{ first_name }}, your picks are saved: https://shop.example/cart\n"
ROWS = [{"id": "r1", "email": "r1@example.com", "first_name": "Ann"},
        {"id": "r2", "email": "r2@example.com", "first_name": "Bob"}]
# <p>Right now:</p> is line 20 of tests/amp/cart.amp.html.j2 and line 18 of the AMP part: the {% live %}
# block's fallback lines render to nothing. The validator numbers the AMP part's lines, and check says so.
ONCLICK_LINE = 18


@pytest.fixture(autouse=True)
def _validator(monkeypatch: pytest.MonkeyPatch) -> None:
    # The link key is not set: check and preview sign amp_url with a throwaway key.
    monkeypatch.delenv("AMP_LINK_KEY", raising=False)
    if VALIDATOR is not None:
        monkeypatch.setenv(amp.VALIDATOR_ENV, str(VALIDATOR))


def make(folder: Path, amp_template: str = SAMPLE) -> tuple[Path, Path]:
    """A clean campaign with an amp_template, and fixtures for its source."""
    campaign = write_campaign(
        folder, text_template=TEXT, recipients=ROWS, sources={"shop": source(URL + "/{{ id }}")},
        files={"cart.amp.html.j2": amp_template},
        campaign={"amp_template": "cart.amp.html.j2", "amp_key_env": "AMP_LINK_KEY",
                  "preheader": "Your picks are saved.",
                  "headers": {"List-Unsubscribe": "<https://shop.example/u/{{ id }}>",
                              "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}},
    )
    fixtures = folder / "fixtures"
    for row in ROWS:
        target = fixture_path(fixtures, "GET", f"{URL}/{row['id']}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"status": 200, "json": {"products": ["mug", "tea"]}}))
    return campaign, fixtures


def onclick() -> str:
    old, new, _code = BROKEN["onclick"]
    return SAMPLE.replace(old, new)


def amp_findings(result: Any) -> list[dict[str, Any]]:
    return [f for f in json.loads(result.stdout)["findings"] if f["rule"] == "amp"]


@needs_validator
def test_check_reports_an_amp_part_the_validator_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    campaign, fixtures = make(tmp_path / "c", onclick())
    monkeypatch.chdir(tmp_path)

    result = invoke("check", campaign, "--replay", fixtures, "--format", "github")

    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[-1] == "Checked 2 recipients with data from fixtures in c/fixtures: 2 errors, 0 warnings"
    (line,) = [x for x in lines if "emailpers amp" in x]
    assert line == ("::error file=c/cart.amp.html.j2,title=emailpers amp::AMP part dropped (the email went "
                           f"without it): line {ONCLICK_LINE}, column 2 of the AMP part: DISALLOWED_ATTR: The "
                           "attribute 'onclick' may not appear in tag 'p'. (recipients r1, r2)")

    as_json = invoke("check", campaign, "--replay", fixtures, "--json")
    assert as_json.exit_code == 1
    found = amp_findings(as_json)
    assert [(f["severity"], f["recipient"], f["file"]) for f in found] == [
        ("error", "r1", "c/cart.amp.html.j2"), ("error", "r2", "c/cart.amp.html.j2")]


def test_check_reports_an_amp_template_error(tmp_path: Path) -> None:
    campaign, fixtures = make(tmp_path / "c", SAMPLE.replace("{{ first_name }}", "{{ shop.missing.field }}"))

    result = invoke("check", campaign, "--replay", fixtures, "--only", "r1", "--json")

    assert result.exit_code == 1, result.output
    (finding,) = amp_findings(result)
    assert finding["severity"] == "error" and finding["recipient"] == "r1"
    assert "TEMPLATE_ERROR: cart.amp.html.j2: " in finding["message"] and "no attribute 'missing'" in finding["message"]


@needs_validator
def test_a_valid_amp_part_passes_check(tmp_path: Path) -> None:
    campaign, fixtures = make(tmp_path / "c")

    result = invoke("check", campaign, "--replay", fixtures)

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(": 0 errors, 0 warnings\n")


def test_without_a_validator_check_warns_that_the_amp_part_is_unvalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(amp.VALIDATOR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    campaign, fixtures = make(tmp_path / "c")

    result = invoke("check", campaign, "--replay", fixtures, "--json")
    strict = invoke("check", campaign, "--replay", fixtures, "--strict")

    assert result.exit_code == 0, result.output
    assert [(f["severity"], f["recipient"]) for f in amp_findings(result)] == [("warning", "r1"), ("warning", "r2")]
    assert "sent unvalidated" in amp_findings(result)[0]["message"]
    assert strict.exit_code == 1, strict.output


def amp_gallery(tmp_path: Path) -> tuple[Path, Any]:
    """A gallery where r1's AMP part passes and r2's is dropped."""
    template = SAMPLE.replace("<p>Right now:</p>", "{% if id == 'r2' %}<p onclick=x>.</p>{% endif %}<p>Right now:</p>")
    campaign, fixtures = make(tmp_path / "c", template)
    out = tmp_path / "gallery"
    return out, invoke("preview", campaign, "--replay", fixtures, "--out", out)


@needs_validator
def test_the_gallery_shows_the_amp_part_and_its_outcome(tmp_path: Path) -> None:
    out, result = amp_gallery(tmp_path)

    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text(encoding="utf-8")
    cards = page.split('<section class="card" data-recipient="')[1:]
    (r1,) = [c for c in cards if c.startswith('r1" data-state="live"')]
    (r2,) = [c for c in cards if c.startswith('r2" data-state="live"')]
    assert 'data-amp="sent"' in r1 and 'class="amp-outcome sent">sent<' in r1
    # the AMP source beside the HTML, escaped, its link signed
    assert "&lt;html ⚡4email data-css-strict&gt;" in r1 and "https://api.shop.example/amp/cart?r=r1&amp;amp;c=" in r1
    assert 'data-amp="dropped"' in r2 and 'class="amp-outcome dropped">dropped<' in r2
    assert "DISALLOWED_ATTR: The attribute &#x27;onclick&#x27; may not appear in tag &#x27;p&#x27;." in r2
    assert "[amp] AMP part dropped" in r2  # a lint finding too: the Finding filter selects it
    assert '<option value="dropped">AMP dropped</option>' in page


@needs_validator
@needs_chromium
def test_in_chromium_the_amp_part_sits_beside_the_html_and_the_filter_selects_amp_dropped(tmp_path: Path) -> None:
    from emailpers.browser import chromium

    out, result = amp_gallery(tmp_path)
    assert result.exit_code == 0, result.output
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto((out / "index.html").as_uri())
        card = '.card[data-recipient="r1"][data-state="live"]'
        html_frames = page.locator(f"{card} iframe")
        amp_part = page.locator(f"{card} figure.amp")
        assert amp_part.is_visible() and html_frames.count() == 2
        last, box = html_frames.nth(1).bounding_box(), amp_part.bounding_box()
        assert last is not None and box is not None
        assert box["x"] >= last["x"] + last["width"] and box["y"] < last["y"] + last["height"]  # beside, not below

        def shown() -> list[tuple[str, str]]:
            return [tuple(c) for c in page.eval_on_selector_all(
                ".card:not(.hidden)", "cs => cs.map(c => [c.dataset.recipient, c.dataset.state])")]

        assert len(shown()) == 4
        page.select_option("#amp", "dropped")
        assert shown() == [("r2", "live"), ("r2", "shop failed")]
        page.select_option("#amp", "sent")
        assert shown() == [("r1", "live"), ("r1", "shop failed")]
