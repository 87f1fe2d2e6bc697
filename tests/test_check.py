"""`emailpers check`: a sample rendered from fixtures with no network and no
secret, linted; exit codes, --strict, --json, --only, --format github line by line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from emailpers.fixtures import fixture_path

from conftest import invoke, source, write_campaign

URL = "http://127.0.0.1:9/users"
TEMPLATE = """<html><body>
<p>Hi {{ first_name }}, thanks for shopping with us this season.</p>
{% live "shop" %}<p>Your cart holds {{ shop.products|join(", ") }}.</p>{% fallback %}<p>See what is new this week.</p>{% endlive %}
<p><a href="https://shop.example/cart">Back to my cart</a></p>
</body></html>
"""
TEXT = "Hi {{ first_name }}, thanks for shopping with us this season. Back to my cart: https://shop.example/cart\n"
GOOD = {
    "preheader": "Your picks are saved.",
    "headers": {"List-Unsubscribe": "<https://shop.example/u/{{ id }}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
}


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i:02d}", "email": f"r{i}@example.com", "first_name": f"Name{i}"} for i in range(n)]


def make(folder: Path, *, template: str = TEMPLATE, campaign: dict[str, Any] | None = None, n: int = 3,
         extra: str = "") -> tuple[Path, Path]:
    """A campaign whose source needs a secret nobody set, and fixtures for every recipient."""
    path = write_campaign(
        folder, template=template, text_template=TEXT, recipients=rows(n), campaign={**GOOD, **(campaign or {})},
        sources={"shop": source(URL + "/{{ id }}", auth={"type": "bearer", "token_env": "CHECK_UNSET_TOKEN"})},
        extra=extra,
    )
    fixtures = folder / "fixtures"
    for row in rows(n):
        target = fixture_path(fixtures, "GET", f"{URL}/{row['id']}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"status": 200, "json": {"products": ["a lamp", "a rug"]}}))
    return path, fixtures


def test_a_clean_campaign_passes_with_no_network_and_no_secret(tmp_path: Path) -> None:
    campaign, fixtures = make(tmp_path / "c")

    result = invoke("check", campaign, "--replay", fixtures)

    assert result.exit_code == 0, result.output
    assert result.stdout == f"Checked 3 recipients with data from fixtures in {fixtures}: 0 errors, 0 warnings\n"


def test_github_annotations_line_by_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = TEMPLATE.replace("Hi {{ first_name }},", "Hi *|FNAME|*,").replace(
        "<p>See what is new this week.</p>", "")
    campaign, fixtures = make(tmp_path / "c", template=broken,
                              campaign={"headers": {"List-Unsubscribe": "<https://shop.example/u/{{ id }}>"}})
    monkeypatch.chdir(tmp_path)

    result = invoke("check", campaign, "--replay", fixtures, "--format", "github")

    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [
        # GitHub's escaping of a message: % is %25 (the annotation shows "{% live %}")
        "::error file=c/email.html.j2,line=3,title=emailpers empty-fallback::this {%25 live %25} block has an empty "
        "{%25 fallback %25}: when its source fails the recipient sees a hole; write the static text to show instead",
        "::error file=c/email.html.j2,title=emailpers merge-tag::'*|FNAME|*' left in the HTML (recipients r00, r01, r02)",
        "::error file=c/campaign.toml,line=8,title=emailpers list-unsubscribe-post::no 'List-Unsubscribe-Post: "
        "List-Unsubscribe=One-Click' header (RFC 8058 one-click unsubscribe, required by Gmail and Yahoo for bulk "
        "senders) (recipients r00, r01, r02)",
        "Checked 3 recipients with data from fixtures in c/fixtures: 7 errors, 0 warnings",
    ]
    assert (tmp_path / "c" / "campaign.toml").read_text().splitlines()[7].startswith("headers = ")


def test_warnings_pass_unless_strict_and_json(tmp_path: Path) -> None:
    campaign, fixtures = make(tmp_path / "c", campaign={"subject": "Hello {{ first_name }}" + "!" * 80})

    plain = invoke("check", campaign, "--replay", fixtures)
    strict = invoke("check", campaign, "--replay", fixtures, "--strict", "--json")

    assert plain.exit_code == 0, plain.output
    assert plain.stdout.splitlines() == [
        f"{campaign}:4: warning [subject] the subject is 91 characters, over 78: clients cut it "
        "(recipients r00, r01, r02)",
        f"Checked 3 recipients with data from fixtures in {fixtures}: 0 errors, 3 warnings",
    ]
    assert strict.exit_code == 1
    value = json.loads(strict.stdout)
    assert (value["errors"], value["warnings"], value["recipients"]) == (0, 3, ["r00", "r01", "r02"])
    assert value["findings"][0] == {
        "rule": "subject", "severity": "warning", "message": "the subject is 91 characters, over 78: clients cut it",
        "file": str(campaign.relative_to(Path.cwd())) if campaign.is_relative_to(Path.cwd()) else str(campaign),
        "line": 4, "recipient": "r00",
    }


def test_a_missing_fixture_is_a_fallback_and_the_check_says_so(tmp_path: Path) -> None:
    campaign, fixtures = make(tmp_path / "c", template=TEMPLATE.replace("See what is new this week.", "Hi ,"))
    for f in fixtures.rglob("*.json"):
        f.unlink()

    result = invoke("check", campaign, "--replay", fixtures)

    assert result.exit_code == 1
    assert "error [empty-value] 'Hi ,' in the HTML: a blank value before the comma (recipients r00, r01, r02)" in result.stdout
    assert f"{campaign}: warning [fixtures] source shop: 3 requests had no fixture in {fixtures}; those recipients " \
           "show the fallback (record them with render --record)\n" in result.stdout


def test_a_fixtures_folder_that_is_not_there_stops_before_anything(tmp_path: Path) -> None:
    campaign, _ = make(tmp_path / "c")
    commands: list[list[str | Path]] = [["check", campaign], ["render", campaign, "--out", tmp_path / "out"]]
    for command in commands:
        result = invoke(*command, "--replay", tmp_path / "nowhere")
        assert result.exit_code == 1
        assert result.stderr == f"Error: {tmp_path / 'nowhere'}: no fixtures folder here; record one with --record " \
                                f"{tmp_path / 'nowhere'}\n"
    assert not (tmp_path / "out").exists()


def test_the_sample_is_deterministic_and_only_picks_ids(tmp_path: Path) -> None:
    campaign, fixtures = make(tmp_path / "c", n=12)
    expected = sorted(sorted((r["id"] for r in rows(12)), key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:4])

    runs = [json.loads(invoke("check", campaign, "--replay", fixtures, "--sample", "4", "--json").stdout)
            for _ in range(2)]
    only = invoke("check", campaign, "--replay", fixtures, "--only", "r07,r03", "--json")
    unknown = invoke("check", campaign, "--replay", fixtures, "--only", "r99")

    assert runs[0]["recipients"] == runs[1]["recipients"] == expected
    assert json.loads(only.stdout)["recipients"] == ["r03", "r07"]
    assert unknown.exit_code == 1
    assert unknown.stderr == f"Error: {tmp_path / 'c' / 'recipients.jsonl'}: no usable recipient with id 'r99' (given by --only)\n"


def test_preview_table_names_fixtures_and_recipients(tmp_path: Path) -> None:
    campaign, fixtures = make(tmp_path / "c", n=5, extra='\n[preview]\nfixtures = "fixtures"\nrecipients = "preview.jsonl"\n')
    (tmp_path / "c" / "preview.jsonl").write_text(json.dumps(rows(5)[4]) + "\n")

    result = invoke("check", campaign)

    assert result.exit_code == 0, result.output
    assert result.stdout == f"Checked 1 recipients with data from fixtures in {fixtures}: 0 errors, 0 warnings\n"


def test_live_check_needs_the_secret(tmp_path: Path) -> None:
    campaign, _ = make(tmp_path / "c")
    result = invoke("check", campaign)
    assert result.exit_code == 1
    assert "environment variable CHECK_UNSET_TOKEN is not set" in result.stderr
