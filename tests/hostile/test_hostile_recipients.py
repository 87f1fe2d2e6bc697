"""Issue 8 item 13, and what else a hostile recipient file can try: a JSONL
line that breaks the JSON parser (a 5,000-digit integer, nesting 100,000 deep)
or holds more than memory should take is one `invalid` row, never a stop of
the run; a CSV file that would make the reader hold the rest of the file in
one value stops the run before any request, naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emailpers.recipients import MAX_JSON_DEPTH, MAX_LINE_BYTES

from conftest import ScriptedAPI, manifest, manifest_lines, render, report, source, write_campaign


def good(i: int) -> str:
    return json.dumps({"id": f"r{i}", "email": f"r{i}@example.com", "first_name": f"N{i}"})


HOSTILE_LINES = {
    "5000-digit-integer": ('{"id": "x", "email": "x@example.com", "n": ' + "9" * 5000 + "}",
                           "not usable JSON: a number with too many digits"),
    "100k-deep-list": ('{"id": "x", "email": "x@example.com", "n": ' + "[" * 100_000 + "]" * 100_000 + "}",
                       f"not usable JSON: nested deeper than {MAX_JSON_DEPTH} levels"),
    "100k-deep-object": ('{"id": "x", "email": "x@example.com", "n": ' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "}",
                         f"not usable JSON: nested deeper than {MAX_JSON_DEPTH} levels"),
    # Parses (Python's limit is ~1,000 levels), but templates and the pickle to the
    # render processes recurse over it.
    "deep-but-parsable": ('{"id": "x", "email": "x@example.com", "n": ' + "[" * 200 + "]" * 200 + "}",
                          f"not usable JSON: nested deeper than {MAX_JSON_DEPTH} levels"),
    "longer-than-1-MiB": ('{"id": "x", "email": "x@example.com", "n": "' + "a" * MAX_LINE_BYTES + '"}',
                          f"line longer than {MAX_LINE_BYTES // 1024} KiB"),
}


@pytest.mark.parametrize("line", list(HOSTILE_LINES), ids=list(HOSTILE_LINES))
def test_a_hostile_jsonl_line_is_an_invalid_row_and_the_run_goes_on(tmp_path: Path, api: ScriptedAPI, line: str) -> None:
    text, error = HOSTILE_LINES[line]
    api.serve("/users/*", {"products": ["tea"]})
    recipients = "\n".join([good(1), text, good(3)]) + "\n"
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/users/{{ id }}")}, recipients=recipients)
    out = tmp_path / "out"
    result = render(campaign, out)
    assert result.exit_code == 0, result.output
    assert [(e["row"], e["status"], e["error"]) for e in manifest_lines(out) if e["status"] == "invalid"] == [(2, "invalid", error)]
    assert {rid: e["status"] for rid, e in manifest(out).items()} == {"r1": "rendered", "r3": "rendered"}
    assert report(out)["total"]["invalid"] == 1
    # Resuming finds the invalid row done: nothing is redone, the run still goes through.
    again = render(campaign, out)
    assert again.exit_code == 0, again.output
    assert len(manifest_lines(out)) == 3


def test_a_csv_line_longer_than_1_mib_stops_before_any_request(tmp_path: Path, api: ScriptedAPI) -> None:
    recipients = "id,email,first_name\nr1,r1@example.com,Ann\nr2,r2@example.com," + "a" * MAX_LINE_BYTES + "\n"
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/users/{{ id }}")},
                              recipients=recipients, recipients_file="recipients.csv")
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {campaign.parent / 'recipients.csv'}:3: line longer than 1024 KiB; is this a recipient list?\n"
    assert api.requests == [] and not (tmp_path / "out").exists()


def test_a_quote_that_swallows_more_than_the_csv_field_limit_names_its_line(tmp_path: Path, api: ScriptedAPI) -> None:
    # 20,000 rows after a stray quote, then a closing quote followed by text: the
    # value outgrows csv's field limit (128 KiB) long before it ends.
    rows = [f"r{i},r{i}@example.com,N{i}" for i in range(20_000)]
    rows[4] = 'r4,r4@example.com,"N4'
    rows[-1] = 'r19999,r19999@example.com,N"x'
    recipients = "id,email,first_name\n" + "\n".join(rows) + "\n"
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/users/{{ id }}")},
                              recipients=recipients, recipients_file="recipients.csv")
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: {campaign.parent / 'recipients.csv'}:6: a value grows past 131072 characters (up to line "
    )
    assert "a quote opened in this row is probably never closed" in result.stderr
    assert api.requests == [] and not (tmp_path / "out").exists()
