"""Every lint rule, each with a message (or template) that breaks it and the
clean one that passes. Messages are built by emailpers' own .eml writer."""

from __future__ import annotations

from dataclasses import replace

import pytest

from emailpers.lint import RULES, lint_amp, lint_message, lint_template
from emailpers.output import Envelope, build_eml
from emailpers.render import Email

TEXT = "Hi Ann, your cart holds a lamp and a rug. Back to my cart: https://shop.example/cart"
PREHEADER = ('<div style="display:none;font-size:1px;max-height:0;mso-hide:all;">'
             "Your picks are saved.</div>")
HTML = (f"<html><head><style>p {{ color: red }}</style></head><body>{PREHEADER}"
        '<p>Hi Ann, your cart holds a lamp and a rug.</p>'
        '<p><img src="https://shop.example/lamp.png" alt="A lamp"></p>'
        '<p><a href="https://shop.example/cart">Back to my cart</a></p></body></html>')
HEADERS = {"List-Unsubscribe": "<https://shop.example/u/1>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
CLEAN = Email("Ann, your cart is waiting", HTML, TEXT, HEADERS, [], False)


def rules_of(message: Email = CLEAN, sender: str = "Shop <news@shop.example>") -> list[tuple[str, str]]:
    eml = build_eml(message, "ann@example.com", Envelope.parse(sender))
    return [(f.rule, f.severity) for f in lint_message(eml, recipient="r1")]


def test_a_clean_message_has_no_finding() -> None:
    assert rules_of() == []


def _html(body: str) -> Email:
    return replace(CLEAN, html=f"<html><body>{PREHEADER}{body}<p>{TEXT}</p></body></html>")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (_html("<p>" + "x" * (103 * 1024) + "</p>"), [("gmail-clip", "error"), ("text-part", "warning")]),
        (_html("<p>" + "x " * (46 * 1024) + "</p>"), [("gmail-clip", "warning"), ("text-part", "warning")]),
        (_html("<mj-colum><p>x</p></mj-colum>"), [("mjml-unknown-tag", "error")]),
        (replace(CLEAN, text=TEXT + " {{ first_name }}"), [("merge-tag", "error")]),
        (_html("<p>Hello *|FNAME|*</p>"), [("merge-tag", "error")]),
        (_html("<p>Hello %%FirstName%%</p>"), [("merge-tag", "error")]),
        (_html("<p>Hello [[name]]</p>"), [("merge-tag", "error")]),
        (replace(CLEAN, subject="{% if x %}Sale"), [("merge-tag", "error")]),
        (_html('<a href="https://x.example/?u={{id}}">go</a>'), [("merge-tag", "error")]),
        (_html("<p>Hi ,</p>"), [("empty-value", "error")]),
        (_html("<p>Your city: None</p>"), [("empty-value", "error")]),
        (replace(CLEAN, subject="undefined, your cart"), [("empty-value", "error")]),
        (_html("<p>Points: nan</p>"), [("empty-value", "error")]),
        (_html('<img src="https://shop.example/a.png">'), [("img-alt", "warning")]),
        (_html('<img src="http://shop.example/a.png" alt="a">'), [("insecure-url", "warning")]),
        (_html('<a href="http://shop.example/">shop</a>'), [("insecure-url", "warning")]),
        (_html('<a href="javascript:alert(1)">shop</a>'), [("javascript-link", "error")]),
        (_html('<a href="https://shop.example/my cart">shop</a>'), [("bad-link", "error")]),
        (_html('<a href="https://shop.example/cart"x">shop</a>'), [("bad-link", "error")]),
        (replace(CLEAN, headers={"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}), [("list-unsubscribe", "error")]),
        (replace(CLEAN, headers={"List-Unsubscribe": "<https://u.example/1>"}), [("list-unsubscribe-post", "error")]),
        (replace(CLEAN, subject=""), [("subject", "error")]),
        (replace(CLEAN, subject="A" * 79), [("subject", "warning")]),
        (replace(CLEAN, html=HTML.replace(PREHEADER, "")), [("preheader", "warning")]),
        (replace(CLEAN, html=HTML.replace("Your picks are saved.", "p" * 141)), [("preheader", "warning")]),
        (replace(CLEAN, text=""), [("text-part", "error")]),
        (replace(CLEAN, text="Hi Ann"), [("text-part", "warning")]),
    ],
)
def test_each_message_rule_fails_on_its_case(message: Email, expected: list[tuple[str, str]]) -> None:
    assert rules_of(message) == expected


def test_from_without_a_domain() -> None:
    assert rules_of(sender="Shop <news@localhost>") == [("from-domain", "error")]
    assert rules_of(sender="Shop <news@shop.example>") == []


def test_a_comma_after_markup_is_no_blank_value() -> None:
    assert rules_of(_html("<p>Ships from <b>Paris</b>, France; Nancy said hi.</p>")) == []


GOOD_MJML = """<mjml version="4">
  <mj-head><mj-attributes><mj-all font-family="Arial" /><mj-text color="#222" /></mj-attributes></mj-head>
  <mj-body background-color="#f4f4f4">
    <mj-section>
      <mj-column>
        <mj-text font-size="14px">Hi {{ first_name }}, <b>welcome</b>.</mj-text>
        {% live "cart" %}<mj-text>{{ cart.items|length }} items</mj-text>{% fallback %}<mj-text>New in.</mj-text>{% endlive %}
        <mj-image src="https://x.example/a.png" alt="a" />
        <mj-raw><p>raw</p></mj-raw>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""


def findings(source: str) -> list[tuple[str, int | None, str]]:
    return [(f.rule, f.line, f.message) for f in lint_template("email.mjml.j2", source)]


def test_clean_mjml_template_has_no_finding() -> None:
    assert findings(GOOD_MJML) == []


def test_unknown_mjml_tag_with_its_line() -> None:
    assert findings(GOOD_MJML.replace("<mj-column>", "<mj-colum>").replace("</mj-column>", "</mj-colum>")) == [
        ("mjml-unknown-tag", 5, "<mj-colum> is not an MJML tag (a typo?); it would ship raw into the HTML")
    ]
    assert [f[0] for f in findings(GOOD_MJML.replace("<mj-raw>", "<mj-bogus>").replace("</mj-raw>", "</mj-bogus>"))] == [
        "mjml-unknown-tag"
    ]


def test_unknown_mjml_attribute() -> None:
    assert findings(GOOD_MJML.replace('font-size="14px"', 'font-sise="14px"')) == [
        ("mjml-unknown-attribute", 6, "<mj-text> has no attribute 'font-sise'")
    ]


def test_mjml_tag_in_a_parent_that_does_not_allow_it() -> None:
    source = GOOD_MJML.replace("<mj-section>\n      <mj-column>", "<mj-section>\n      <mj-text>x</mj-text><mj-column>")
    assert findings(source) == [
        ("mjml-bad-parent", 5, "<mj-text> cannot be inside <mj-section>; it belongs in <mj-column> or <mj-hero>")
    ]


def test_live_block_with_an_empty_or_no_fallback() -> None:
    empty = GOOD_MJML.replace("<mj-text>New in.</mj-text>", " {# nothing #} ")
    assert [(f[0], f[1]) for f in findings(empty)] == [("empty-fallback", 7)]
    none = GOOD_MJML.replace("{% fallback %}<mj-text>New in.</mj-text>", "")
    assert [(f[0], f[1]) for f in findings(none)] == [("empty-fallback", 7)]


def test_amp_outcomes() -> None:
    """A manifest line's AMP outcome; tests/test_amp_check.py runs the validator through check."""
    where = {"recipient": "r1", "file": "cart.amp.html.j2"}
    assert lint_amp(None, **where) == lint_amp({"amp": "sent"}, **where) == []
    (unvalidated,) = lint_amp({"amp": "unvalidated"}, **where)
    assert (unvalidated.rule, unvalidated.severity) == ("amp", "warning")
    dropped = lint_amp({"amp": "dropped", "amp_errors": [
        {"line": 3, "col": 4, "code": "DISALLOWED_ATTR", "message": "no onclick"},
        {"line": None, "col": None, "code": "SIZE_LIMIT", "message": "over 200,000 bytes"}]}, **where)
    assert [(f.rule, f.severity, f.message, f.file, f.line, f.recipient) for f in dropped] == [
        ("amp", "error", "AMP part dropped (the email went without it): line 3, column 4 of the AMP part: "
                         "DISALLOWED_ATTR: no onclick", "cart.amp.html.j2", None, "r1"),
        ("amp", "error", "AMP part dropped (the email went without it): SIZE_LIMIT: over 200,000 bytes",
         "cart.amp.html.j2", None, "r1"),
    ]


def test_every_rule_is_tested_here() -> None:
    """(render and fixtures come from the run, not a message: tests/test_check.py has them.)"""
    source = open(__file__, encoding="utf-8").read()
    untested = [rule for rule in RULES if rule not in ("render", "fixtures") and f'"{rule}"' not in source.split("def test_every")[0]]
    assert untested == []
