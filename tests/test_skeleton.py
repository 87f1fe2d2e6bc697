"""Compile once per layout (skeleton.py): the memoised render is byte for byte
the per-recipient compile, over the whole official MJML corpus and the sample
campaign, and the memo is really used (hits) where the templates allow it."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_mjml_corpus import CORPUS, TEMPLATES

from emailpers import skeleton
from emailpers.campaign import load_campaign
from emailpers.errors import RenderFailed
from emailpers.render import Email, Renderer, html_to_text

from conftest import write_campaign

ROOT = Path(__file__).resolve().parents[1]

# Values chosen to hit every path: plain text (markers), escaping, white space
# at an end, a line break and a control character (written into the skeleton
# as they are), a marker character (the body renders again without markers).
PEOPLE: list[dict[str, Any]] = [
    {"id": "p1", "email": "p1@example.com", "FirstName": "Zoé", "Company": "Acme & Co", "CompanyName": "Acme",
     "ReferalCode": "REF-123", "link": "https://a.example/?u=1&v=2", "color": "#ff0000"},
    {"id": "p2", "email": "p2@example.com", "FirstName": "<b>Bo</b>", "Company": 'say "hi"', "CompanyName": " lead",
     "ReferalCode": "line\nbreak", "link": "https://b.example/p2", "color": "#00ff00"},
    {"id": "p3", "email": "p3@example.com", "FirstName": "Ann\x07", "Company": "it's", "CompanyName": "x  y",
     "ReferalCode": "R", "link": "https://c.example/", "color": "blue"},
    {"id": "p4", "email": "p4@example.com", "FirstName": "Ed \u27e60\u27e7", "Company": "Initech",
     "CompanyName": "Initech", "ReferalCode": "REF-9", "link": "https://d.example/", "color": "red"},
    {"id": "p5", "email": "p5@example.com", "FirstName": "Kim", "Company": "Globex", "CompanyName": "Globex",
     "ReferalCode": "REF-5", "link": "https://e.example/?q=%20", "color": "#123"},
]


def personalise(mjml: str) -> str:
    """An official template with values in text, links and alt text (the
    official ones carry few merge tags of their own)."""
    head, _, body = mjml.partition("<mj-body")
    body = re.sub(r"(<mj-text\b[^>]*[^/]>)", r"\1{{ FirstName }} of {{ Company }}: ", body)
    # A carousel writes each image's link and alt text twice: that skeleton
    # compiles per recipient (the attributes test below has one), so they stay.
    for attribute, value in (("href", "link"), ("alt", "CompanyName")):
        body = _outside_carousels(body, attribute, f'{attribute}="{{{{ {value} }}}}"')
    return f"{head}<mj-body{body}"


def attempt(renderer: Renderer, fields: dict[str, Any], data: dict[str, Any], failures: dict[str, str]) -> Any:
    """The email, or why the recipient failed."""
    try:
        return renderer.render(fields, data, failures)
    except RenderFailed as exc:
        return str(exc)


def _outside_carousels(body: str, attribute: str, replacement: str) -> str:
    def replace(match: re.Match[str]) -> str:
        in_carousel = body.rfind("<mj-carousel-image", 0, match.start()) > body.rfind(">", 0, match.start())
        return match[0] if in_carousel else replacement

    return re.sub(f'{attribute}="[^"{{]*"', replace, body)


def both_ways(campaign_file: Path, cases: list[tuple[dict[str, Any], dict[str, Any], dict[str, str]]]) -> int:
    """Render every case with the memo and without; compare every byte. How
    many renders used a compiled skeleton (with its text part when `text`)."""
    campaign = load_campaign(campaign_file, need_secrets=False)
    memoised, plain = Renderer(campaign), Renderer(campaign, memo=False)
    assert memoised.memo_off is None, memoised.memo_off
    for _ in range(2):  # the second round finds each layout in the memo
        for fields, data, failures in cases:
            a, b = (attempt(r, fields, data, failures) for r in (memoised, plain))
            assert not isinstance(a, Email) or not isinstance(b, Email) or a.html == b.html, fields["id"]
            assert a == b, f"{fields['id']}: memoised email (or its failure) differs"
    assert all(memo.on for memo in memoised.memos.values())
    return sum(memo.uses for memo in memoised.memos.values())


@pytest.mark.skipif(CORPUS is None, reason="the official MJML corpus is not here")
@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_official_template_memoised_is_byte_identical(template: Path, tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path, template=personalise(template.read_text(encoding="utf-8")),
                              template_name="email.mjml", recipients=PEOPLE,
                              campaign={"subject": "Hello", "preheader": "Hi {{ FirstName }}"})
    cases: list[tuple[dict[str, Any], dict[str, Any], dict[str, str]]] = [(dict(p), {}, {}) for p in PEOPLE]

    memoised = both_ways(campaign, cases)

    assert memoised >= 2 * (len(PEOPLE) - 1)  # all but the one holding a marker character


def sample_cases() -> list[tuple[dict[str, Any], dict[str, Any], dict[str, str]]]:
    users = json.loads((ROOT / "sample_data" / "api.json").read_text(encoding="utf-8"))["users"]
    with open(ROOT / "sample_data" / "recipients.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    cases = []
    for n, row in enumerate(rows):
        user = users.get(row["id"])
        data: dict[str, Any] = {}
        failures: dict[str, str] = {}
        if user is None or n % 5 == 1:
            failures["cart"] = "timed out"  # the fallback template
        else:
            data["cart"] = {k: v for k, v in user.items() if k not in ("loyalty_points", "tier")}
        if user is None or n % 3 == 2:
            failures["loyalty"] = "HTTP 500"  # the live block's fallback
        else:
            data["loyalty"] = {"user_id": row["id"], "points": user["loyalty_points"], "tier": user["tier"]}
        cases.append((dict(row), data, failures))
    return cases


def test_sample_campaign_memoised_is_byte_identical() -> None:
    cases = sample_cases()
    assert {bool(f) for _, _, f in cases} == {True, False}

    assert both_ways(ROOT / "templates" / "campaign.toml", cases) > 0


DATA_ATTRIBUTES = """<mjml><mj-head><mj-preview>{{ first_name }}, hello</mj-preview></mj-head><mj-body>
<mj-section{% if color %} background-color="{{ color }}"{% endif %}><mj-column>
{% for item in items %}<mj-image src="https://img.example/{{ item }}.png" alt="{{ item }}"
 {%- if wide %} width="{{ 100 + loop.index }}px"{% endif %} />
<mj-text>{{ loop.index }}. {{ item }}</mj-text>{% endfor %}
{% live "shop" %}<mj-button href="https://shop.example/{{ shop.path }}">{{ shop.label }}</mj-button>
{% fallback %}<mj-text>Shop closed</mj-text>{% endlive %}
<mj-text>{{ note|safe }}</mj-text>
{% if wide %}<mj-carousel><mj-carousel-image src="https://img.example/c.png" href="https://shop.example/{{ first_name }}" />
</mj-carousel>{% endif %}
</mj-column></mj-section></mj-body></mjml>"""


def test_attributes_loops_and_safe_markup_from_data_are_byte_identical(tmp_path: Path) -> None:
    """Values in CSS and widths, in a carousel's links (written twice), MJML
    from `|safe`, loops and a live block: each layout memoised or compiled
    per recipient, and the same bytes either way."""
    people = [{"id": f"r{n}", "email": f"r{n}@example.com", "first_name": name} for n, name in enumerate("Al Bea Cy".split())]
    campaign = write_campaign(tmp_path, template=DATA_ATTRIBUTES, template_name="email.mjml", recipients=people,
                              campaign={"subject": "Hi {{ first_name }}"})
    cases = []
    for n, person in enumerate(people):
        for items in (["a", "b"], ["c"], []):
            fields = person | {"items": items, "note": ["<b>bold</b>", "<mj-raw>x</mj-raw>", "plain"][n],
                               "color": "#fff" if n == 2 else None, "wide": n == 1}
            shop = {"shop": {"path": f"p/{n}", "label": "Go"}} if n != 1 else {}
            cases.append((fields, shop, {"shop": "down"} if n == 1 else {}))

    assert both_ways(campaign, cases) > 0


def test_capturing_constructs_turn_the_memo_off(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path, template="{% set x %}{{ first_name }}{% endset %}<mjml><mj-body>"
                              "<mj-text>{{ x|upper }}</mj-text></mj-body></mjml>", template_name="email.mjml",
                              recipients=[{"id": "1", "email": "a@example.com", "first_name": "al"}])

    renderer = Renderer(load_campaign(campaign, need_secrets=False))

    assert renderer.memo_off is not None and "AssignBlock" in renderer.memo_off
    assert "AL" in renderer.render({"id": "1", "email": "a@example.com", "first_name": "al"}, {}, {}).html


def test_a_capture_in_the_text_template_leaves_the_html_memo_on(tmp_path: Path) -> None:
    """The text template renders without markers: what it captures is no
    reason to compile the HTML per recipient."""
    people = [{"id": f"{n}", "email": f"{n}@example.com", "first_name": name} for n, name in enumerate(["al", "Bo"])]
    campaign = write_campaign(tmp_path, template="<mjml><mj-body><mj-text>Hi {{ first_name }}</mj-text></mj-body></mjml>",
                              template_name="email.mjml", recipients=people,
                              text_template="{% set x %}{{ first_name }}{% endset %}Hi {{ x|upper }}")

    assert both_ways(campaign, [(fields, {}, {}) for fields in people]) > 0


def test_a_difference_at_start_up_turns_the_memo_off() -> None:
    """A compiler that treats one value differently from its marker (as MJML
    does with a width): the start-up comparison catches it, the plain compile wins."""
    def compile_(text: str) -> str:
        return text.replace("7", "seven")

    memo = skeleton.Memo(compile_, lambda html, _: html, html_to_text)
    skeleton_text = f"<p>{skeleton.OPEN}0{skeleton.CLOSE}</p>"

    assert memo.render(skeleton_text, ["7"], None, True) == ("<p>seven</p>", "seven\n")
    assert memo.on is False


def test_the_memo_stays_within_its_bytes() -> None:
    memo = skeleton.Memo(lambda text: text, lambda html, _: html, html_to_text, max_bytes=10_000)
    for n in range(200):
        memo.render(f"<p>{n}{'x' * 100}{skeleton.OPEN}0{skeleton.CLOSE}</p>", ["v"], None, True)

    assert memo.size <= 10_000
    assert 0 < len(memo.entries) < 200
