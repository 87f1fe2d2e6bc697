"""The 25 official MJML templates (mjmlio/email-templates), each used as a
campaign template: Jinja, then MJML, then a valid .eml per recipient.

They are third-party data kept outside the project: $EMAILPERS_MJML_CORPUS, else
../shared/mjml-official beside the checkout (where CI puts shared/), else this
workplace's /work/shared/mjml-official. Each test copies one into its tmp_path,
because templates must live in the campaign folder. Without the corpus the tests
skip on a developer's machine and fail under CI (CI set): a CI run must not pass
with the corpus silently missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import eml_of, manifest, parts, render, write_campaign

CANDIDATES = (
    [Path(os.environ["EMAILPERS_MJML_CORPUS"])]
    if os.environ.get("EMAILPERS_MJML_CORPUS")
    else [Path(__file__).resolve().parents[2] / "shared" / "mjml-official", Path("/work/shared/mjml-official")]
)
CORPUS = next((folder for folder in CANDIDATES if folder.is_dir()), None)
TEMPLATES = sorted(CORPUS.glob("*.mjml")) if CORPUS else []

# The merge tags some of the templates carry ({{FirstName}}, {{Company}}, ...).
PEOPLE = [
    {"id": "m1", "email": "m1@example.com", "FirstName": "Zoé", "Company": "Acme & Co", "CompanyName": "Acme",
     "ReferalCode": "REF-123"},
    {"id": "m2", "email": "m2@example.com", "FirstName": "Bo", "Company": "Initech", "CompanyName": "Initech",
     "ReferalCode": "REF-456"},
]

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
WHERE = f"looked in {', '.join(map(str, CANDIDATES))}; set EMAILPERS_MJML_CORPUS to the folder"

pytestmark = pytest.mark.skipif(not TEMPLATES and not IN_CI, reason=f"the official MJML corpus is not here ({WHERE})")


def test_the_whole_corpus_is_here() -> None:
    assert len(TEMPLATES) == 25, f"{len(TEMPLATES)} official MJML templates found, 25 expected ({WHERE})"


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_official_template_renders_to_a_valid_eml(template: Path, tmp_path: Path) -> None:
    source_text = template.read_text(encoding="utf-8")
    campaign = write_campaign(tmp_path / "campaign", template=source_text, template_name="email.mjml", recipients=PEOPLE,
                              campaign={"subject": "Hello {{ FirstName }}"})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert {rid: e["status"] for rid, e in entries.items()} == {"m1": "rendered", "m2": "rendered"}, entries
    for rid, person in zip(("m1", "m2"), PEOPLE, strict=True):
        message = eml_of(out, entries[rid])
        assert message.defects == []
        assert message["To"] == person["email"]
        assert message["Subject"] == f"Hello {person['FirstName']}"
        body = parts(message)
        html = body["html"]
        assert html.lstrip().lower().startswith("<!doctype html>")
        assert len(html) > 2000 and "</html>" in html
        assert "<mj-" not in html, "MJML left uncompiled"
        assert body["plain"].strip()
        if "{{FirstName}}" in source_text:
            assert person["FirstName"] in html
        if "{{Company}}" in source_text:
            assert "Acme &amp; Co" in html if rid == "m1" else "Initech" in html
        if "{{ReferalCode}}" in source_text:
            assert person["ReferalCode"] in html
