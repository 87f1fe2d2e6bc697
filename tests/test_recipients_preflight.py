"""The recipient list is read whole before the first request (issue 7).

What makes the list untrustworthy as a whole (a stray quote merging rows, bytes
that are not text, an empty file, a header without the id or email column)
stops the run with exit 1, `file:line` and what to do, before anything is
fetched or written. The lists people really export (semicolon CSV, TSV,
cp1252, gzip, stdin) work.
"""

from __future__ import annotations

import gzip
import os
import pty
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from emailpers.campaign import load_campaign
from emailpers.cli import cli
from emailpers.errors import RecipientListError
from emailpers.recipients import MAX_COLUMNS, Preflight, columns, preflight, recipients_argument

from conftest import (
    ScriptedAPI,
    invoke,
    manifest,
    manifest_lines,
    parse_eml,
    render,
    report,
    source,
    write_campaign,
)

HEADER = "id,email,first_name,city"


def rows_text(n: int, replace: dict[int, str] | None = None, header: str = HEADER) -> str:
    """A CSV list of n recipients; `replace` swaps whole lines by line number
    (line 1 is the header, recipient i is on line i + 2)."""
    lines = [header] + [f"{i},user{i}@example.com,Name{i},Porto" for i in range(n)]
    for number, line in (replace or {}).items():
        lines[number - 1] = line
    return "\n".join(lines) + "\n"


def campaign_with(tmp_path: Path, api: ScriptedAPI | None, text: str, name: str = "recipients.csv", extra: str = "") -> Path:
    sources = {"shop": source(api.url + "/users/{{ id }}")} if api else None
    if api:
        api.serve("/users/*", {"products": ["tea"]})
    campaign = write_campaign(tmp_path / "c", sources=sources, recipients=text, recipients_file=name)
    if extra:  # keys for [recipients], which write_campaign writes right after path
        path_line = f'path = "{name}"\n'
        campaign.write_text(campaign.read_text().replace(path_line, path_line + extra))
    return campaign


def assert_stopped_before_anything(result: Result, api: ScriptedAPI | None, campaign: Path, out: Path, error: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr == f"Error: {error}\n"
    assert result.stdout == ""
    if api is not None:
        assert api.requests == []  # nothing fetched
    assert not out.exists()  # nothing written, not even the manifest or the folder
    assert not (campaign.parent / ".emailpers-cache").exists()


REMEDY = 'remove the stray quote, or write a quote inside a value as "" and quote the whole value'


# -- stray quotes ------------------------------------------------------------------------


def test_a_stray_quote_stops_the_run_before_any_request(tmp_path: Path, api: ScriptedAPI) -> None:
    # Issue 7's list: 1,000 rows, line 11 opens a quote that is never closed. On the
    # old code it swallowed the other 990 rows into recipient 9's city and exited 0.
    text = rows_text(1000, {11: '9,user9@example.com,Name9,"Lisbon'})
    campaign = campaign_with(tmp_path, api, text)
    stray = tmp_path / "stray.csv"
    stray.write_text(text)
    out = tmp_path / "out"
    for args in (["--recipients", str(stray)], []):
        result = render(campaign, out, *args)
        where = stray if args else campaign.parent / "recipients.csv"  # --recipients: errors name that file
        assert_stopped_before_anything(
            result, api, campaign, out,
            f"{where}:11: a quote opened in this row is never closed (the file ends inside it); {REMEDY}",
        )
    result = invoke("cache", "warm", campaign, "--no-progress")
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {campaign.parent / 'recipients.csv'}:11: ")
    assert api.requests == []


def test_a_balanced_pair_of_stray_quotes_merges_no_rows(tmp_path: Path, api: ScriptedAPI) -> None:
    # strict CSV accepts this: the quote on line 11 closes at the end of line 21, and
    # the ten rows between become one city. A line of that value that looks like a
    # row of its own (values and an email address) gives it away.
    text = rows_text(1000, {11: '9,user9@example.com,Name9,"Lisbon', 21: '19,user19@example.com,Name19,Porto"'})
    campaign = campaign_with(tmp_path, api, text)
    out = tmp_path / "out"
    assert_stopped_before_anything(
        render(campaign, out), api, campaign, out,
        f"{campaign.parent / 'recipients.csv'}:11: the quoted value of column 4 runs on to line 12, which looks "
        "like a row of its own (it holds an email address): a stray quote merges rows 11-21; remove it, or write "
        'a quote inside a value as ""',
    )


def test_text_after_a_closing_quote_names_both_lines(tmp_path: Path) -> None:
    text = rows_text(30, {11: '9,user9@example.com,Name9,"Lisbon', 15: '13,user13@example.com,"Name13" Smith,Porto'})
    campaign = campaign_with(tmp_path, None, text)
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {campaign.parent / 'recipients.csv'}:11: text follows a closing quote on line 15, inside a value "
        f"that starts on line 11: a stray quote; {REMEDY}\n"
    )


@pytest.mark.parametrize(
    "value",
    [
        "12 Rua Augusta\nLisbon",
        "Flat 4, Floor 2\n12 Main Street, Springfield\nIL 62701, USA",  # commas in every line
        "c/o Ann\r\n1 Rue de Rivoli\r\n75001 Paris",  # Windows line breaks
        "line\n" * 5 + "sixth line",  # MAX_VALUE_LINES lines
    ],
    ids=["two-lines", "three-lines-with-commas", "crlf", "six-lines"],
)
def test_a_quoted_address_over_a_few_lines_is_a_value(tmp_path: Path, value: str) -> None:
    quoted = '"' + value.replace('"', '""') + '"'
    text = rows_text(5, {3: f"1,user1@example.com,Name1,{quoted}"})
    campaign = campaign_with(tmp_path, None, text)
    config = load_campaign(campaign).recipients
    assert preflight(config) == Preflight(columns=("id", "email", "first_name", "city"), rows=5)
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(manifest(tmp_path / "out")) == 5


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("a\n" * 6 + "b", "runs over lines 3-9 (13 characters): a stray quote merges rows"),
        ("x" * 1500 + "\n" + "y" * 600, "runs over lines 3-4 (2101 characters): a stray quote merges rows"),
        ("Lisbon\n7,user7@example.com,Name7,Porto", "runs on to line 4, which looks like a row of its own"),
    ],
    ids=["seven-lines", "long", "a-row-inside"],
)
def test_a_value_that_spans_too_much_is_a_stray_quote(tmp_path: Path, value: str, error: str) -> None:
    text = rows_text(5, {3: f'1,user1@example.com,Name1,"{value}"'})
    campaign = campaign_with(tmp_path, None, text)
    with pytest.raises(RecipientListError) as caught:
        preflight(load_campaign(campaign).recipients)
    assert str(caught.value).startswith(f"{campaign.parent / 'recipients.csv'}:3: the quoted value of column 4 {error}")


# -- not the list we expect -----------------------------------------------------------------


def test_a_semicolon_list_stops_with_a_guess_and_works_with_delimiter(tmp_path: Path, api: ScriptedAPI) -> None:
    text = "id;email;first_name\nr1;r1@example.com;Ann\nr2;r2@example.com;Bo\n"
    campaign = campaign_with(tmp_path, api, text)
    out = tmp_path / "out"
    assert_stopped_before_anything(
        render(campaign, out), api, campaign, out,
        f"{campaign.parent / 'recipients.csv'}:1: no 'id' or 'email' column (found: 'id;email;first_name'); "
        'it looks semicolon-separated: set delimiter = ";" in [recipients]',
    )
    campaign = campaign_with(tmp_path, api, text, extra='delimiter = ";"\n')
    result = render(campaign, out)
    assert result.exit_code == 0, result.output
    assert {entry["status"] for entry in manifest(out).values()} == {"rendered"}
    assert "Hi Bo," in parse_eml(out / "messages" / "r2.eml").get_body(("html",)).get_content()  # type: ignore[union-attr]


def test_an_empty_file_stops_the_run(tmp_path: Path, api: ScriptedAPI) -> None:
    campaign = campaign_with(tmp_path, api, "")
    out = tmp_path / "out"
    assert_stopped_before_anything(
        render(campaign, out), api, campaign, out,
        f"{campaign.parent / 'recipients.csv'}: is empty (0 bytes); export the list again",
    )


def test_a_header_without_rows_stops_the_run(tmp_path: Path) -> None:
    campaign = campaign_with(tmp_path, None, HEADER + "\n\n")
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {campaign.parent / 'recipients.csv'}: has a header but no recipient rows; nothing to send. "
        "Check the export that wrote it\n"
    )


@pytest.mark.parametrize(
    ("header", "guess"),
    [
        ("ID,email,first_name", "column 'ID' differs from 'id' only in case or spaces: rename it, or set id_field = \"ID\" in [recipients]"),
        ("id, email,first_name", "column ' email' differs from 'email' only in case or spaces: rename it, or set email_field = \" email\" in [recipients]"),
        ("id\temail\tfirst_name", 'it looks tab-separated: set delimiter = "\\t" in [recipients]'),
        ("r0,r0@example.com,Ann", "the first line holds an email address: the file needs a header row naming the columns"),
        ("user,mail,first_name", "set id_field and email_field in [recipients] to the columns that hold them"),
    ],
    ids=["case", "space", "tab", "no-header", "other-names"],
)
def test_a_header_without_the_id_or_email_column_lists_the_columns_and_guesses_why(
    tmp_path: Path, api: ScriptedAPI, header: str, guess: str
) -> None:
    delimiter = "\t" if "\t" in header else ","
    campaign = campaign_with(tmp_path, api, header + "\n" + delimiter.join(["r1", "r1@example.com", "Ann"]) + "\n")
    out = tmp_path / "out"
    result = render(campaign, out)
    assert result.exit_code == 1
    found = ", ".join(repr(c) for c in header.split(","))
    missing = {"ID": "'id'", "id, email": "'email'", "user": "'id' or 'email'"}
    what = next((v for k, v in missing.items() if header.startswith(k)), "'id' or 'email'")
    assert result.stderr == f"Error: {campaign.parent / 'recipients.csv'}:1: no {what} column (found: {found}); {guess}\n"
    assert api.requests == [] and not out.exists()


def test_a_header_naming_a_column_twice_stops_the_run(tmp_path: Path) -> None:
    campaign = campaign_with(tmp_path, None, "id,email,name,name\nr1,r1@example.com,Ann,Bo\n")
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {campaign.parent / 'recipients.csv'}:1: the header names column 'name' twice; rename one so no value is lost\n"
    )


def test_bytes_that_are_not_utf8_stop_the_run_naming_the_line(tmp_path: Path, api: ScriptedAPI) -> None:
    campaign = campaign_with(tmp_path, api, "")
    (campaign.parent / "recipients.csv").write_bytes(
        "id,email,first_name\nr1,r1@example.com,Ann\nr2,r2@example.com,José\n".encode("cp1252")
    )
    out = tmp_path / "out"
    assert_stopped_before_anything(
        render(campaign, out), api, campaign, out,
        f"{campaign.parent / 'recipients.csv'}:3: not utf-8 text (byte 0xe9 at column 22); save the file as UTF-8, "
        'or set encoding = "cp1252" (Excel on Windows) or "latin-1" in [recipients]',
    )


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_the_encoding_key_reads_excel_exports(tmp_path: Path, encoding: str) -> None:
    campaign = campaign_with(tmp_path, None, "", extra=f'encoding = "{encoding}"\n')
    # A semicolon list from European Excel, BOM-less cp1252, CRLF line ends.
    (campaign.parent / "recipients.csv").write_bytes(
        "id,email,first_name\r\nr1,r1@example.com,José\r\nr2,r2@example.com,Zoë\r\n".encode(encoding)
    )
    out = tmp_path / "out"
    result = render(campaign, out)
    assert result.exit_code == 0, result.output
    assert parse_eml(out / "messages" / "r1.eml")["Subject"] == "Hello José"
    assert parse_eml(out / "messages" / "r2.eml")["Subject"] == "Hello Zoë"


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    campaign = campaign_with(tmp_path, None, "\ufeffid,email,first_name\nr1,r1@example.com,Ann\n")
    assert columns(load_campaign(campaign).recipients) == ("id", "email", "first_name")


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('delimiter = ";;"', "[recipients] delimiter must be one character such as \";\" or \"\\t\" (tab), got ';;'"),
        ("delimiter = '\"'", "[recipients] delimiter must be one character such as \";\" or \"\\t\" (tab), got '\"'"),
        ('encoding = "latin-42"', "[recipients] encoding 'latin-42' is not an encoding Python knows; try \"utf-8\", \"cp1252\" or \"latin-1\""),
        ('encoding = "utf-16"', "[recipients] encoding 'utf-16' is not supported (not ASCII-compatible); save the file as UTF-8"),
        ("delimiter = 59", "[recipients] delimiter must be a string, got 59"),
    ],
)
def test_delimiter_and_encoding_are_checked_at_load(tmp_path: Path, extra: str, error: str) -> None:
    campaign = campaign_with(tmp_path, None, rows_text(2), extra=extra + "\n")
    line = campaign.read_text().splitlines().index(extra) + 1
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {campaign}:{line}: {error}\n"


# -- the lists people export ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["people.tsv", "PEOPLE.TSV", "people.CSV", "people.csv.gz", "people.tsv.gz", "people.jsonl.gz"])
def test_suffixes_any_case_and_gzip(tmp_path: Path, name: str) -> None:
    campaign = campaign_with(tmp_path, None, rows_text(3))
    lower = name.lower()
    if ".jsonl" in lower:
        text = "".join(f'{{"id": "r{i}", "email": "r{i}@example.com", "first_name": "N{i}"}}\n' for i in range(3))
    else:
        text = rows_text(3, header="id,email,first_name,city")
        if ".tsv" in lower:
            text = text.replace(",", "\t")  # tab by default for .tsv
    data = text.encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if lower.endswith(".gz") else data)
    out = tmp_path / "out"
    result = render(campaign, out, "--recipients", tmp_path / name)
    assert result.exit_code == 0, result.output
    assert len(manifest(out)) == 3
    assert {entry["status"] for entry in manifest(out).values()} == {"rendered"}


def test_a_broken_gzip_file_names_the_file(tmp_path: Path) -> None:
    campaign = campaign_with(tmp_path, None, rows_text(3))
    broken = tmp_path / "people.csv.gz"
    broken.write_bytes(gzip.compress(rows_text(3000).encode())[:2000])
    result = render(campaign, tmp_path / "out", "--recipients", broken)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {broken}: is not a whole gzip file (")
    assert result.stderr.endswith("); compress it again, or drop .gz from its name\n")
    assert not (tmp_path / "out").exists()


def render_stdin(campaign: Path, out: Path, data: bytes, *args: str) -> Result:
    runner = CliRunner()
    argv = ["render", str(campaign), "--out", str(out), "--workers", "0", "--no-progress", "--recipients", "-", *args]
    return runner.invoke(cli, argv, input=data, prog_name="emailpers", catch_exceptions=False)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "csv.gz"])
def test_recipients_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    campaign = campaign_with(tmp_path, None, rows_text(1))
    if kind == "jsonl":
        data = b"".join(b'{"id": "s%d", "email": "s%d@example.com", "first_name": "S"}\n' % (i, i) for i in range(4))
    else:
        data = rows_text(4).encode()
    if kind.endswith(".gz"):
        data = gzip.compress(data)
    out = tmp_path / "out"
    result = render_stdin(campaign, out, data)
    assert result.exit_code == 0, result.output
    assert len(manifest(out)) == 4
    assert list(spool.iterdir()) == []  # the spooled copy is gone


def test_errors_in_a_list_from_stdin_say_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    campaign = campaign_with(tmp_path, None, rows_text(1))
    result = render_stdin(campaign, tmp_path / "out", rows_text(1000, {11: '9,user9@example.com,Name9,"Lisbon'}).encode())
    assert result.exit_code == 1
    assert result.stderr == f"Error: <stdin>:11: a quote opened in this row is never closed (the file ends inside it); {REMEDY}\n"
    assert not (tmp_path / "out").exists()
    assert list(spool.iterdir()) == []
    assert render_stdin(campaign, tmp_path / "out", b"").stderr == "Error: <stdin>: is empty (0 bytes); export the list again\n"


# -- warnings and row-level problems -------------------------------------------------------


def test_the_same_address_under_several_ids_is_a_warning(tmp_path: Path) -> None:
    text = (
        "id,email,first_name\n"
        "r1,ann@example.com,Ann\n"
        "r2,ANN@Example.com,Ann\n"  # the same mailbox: addresses compare case-insensitively
        "r1,ann@example.com,Ann\n"  # a duplicate id: invalid, not this warning
        "r3,bo@example.com,Bo\n"
        "r4,bo@example.com,Bo\n"
    )
    campaign = campaign_with(tmp_path, None, text)
    out = tmp_path / "out"
    result = render(campaign, out)
    assert result.exit_code == 0, result.output
    name = campaign.parent / "recipients.csv"
    warning = (
        "2 rows reuse the address of an earlier row under another id (compared case-insensitively), "
        f"so that address gets one email per id: {name}:3 ANN@Example.com (id 'r2'), "
        f"{name}:6 bo@example.com (id 'r4')"
    )
    assert report(out)["warnings"] == [warning]
    assert f"  WARNING: {warning}\n" in result.stdout
    statuses = sorted(entry["status"] for entry in manifest_lines(out))
    assert statuses == ["invalid", "rendered", "rendered", "rendered", "rendered"]


def test_the_warning_keeps_a_few_examples(tmp_path: Path) -> None:
    text = "id,email\n" + "".join(f"r{i},same@example.com\n" for i in range(200))
    campaign = campaign_with(tmp_path, None, text)
    (warning,) = preflight(load_campaign(campaign).recipients).warnings
    assert warning.startswith("199 rows reuse the address of an earlier row")
    assert warning.count("same@example.com") == 5 and warning.endswith(", and 194 more")


def test_row_level_problems_stay_invalid_lines(tmp_path: Path) -> None:
    text = rows_text(4, {3: "1,not-an-address,Name1,Porto", 4: "1,user1@example.com,Name1,Porto,extra"})
    campaign = campaign_with(tmp_path, None, text)
    out = tmp_path / "out"
    result = render(campaign, out)
    assert result.exit_code == 0, result.output
    invalid = {entry["row"]: entry["error"] for entry in manifest_lines(out) if entry["status"] == "invalid"}
    assert invalid == {3: "malformed email address 'not-an-address'", 4: "more values than the 4 columns of the header"}


# -- the Preflight value ----------------------------------------------------------------------


def test_preflight_counts_rows_and_gives_the_columns(tmp_path: Path) -> None:
    campaign = campaign_with(tmp_path, None, rows_text(7, {4: "oops"}) + "\n\n")
    assert preflight(load_campaign(campaign).recipients) == Preflight(
        columns=("id", "email", "first_name", "city"), rows=7
    )


def test_jsonl_columns_are_the_keys_seen_and_bounded(tmp_path: Path) -> None:
    lines = ['{"id": "a", "email": "a@example.com", "first_name": "A"}', '{"id": "b", "email": "b@example.com", "tier": 2}']
    lines.append("{" + ", ".join(f'"k{i}": {i}' for i in range(MAX_COLUMNS + 50)) + "}")
    campaign = campaign_with(tmp_path, None, "\n".join(lines) + "\n", name="recipients.jsonl")
    found = columns(load_campaign(campaign).recipients)
    assert found[:4] == ("id", "email", "first_name", "tier")
    assert len(found) == MAX_COLUMNS


def test_a_jsonl_list_where_no_line_has_the_id_key_stops_with_a_guess(tmp_path: Path) -> None:
    text = '{"ID": "a", "email": "a@example.com"}\n{"ID": "b", "email": "b@example.com"}\n'
    campaign = campaign_with(tmp_path, None, text, name="recipients.jsonl")
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {campaign.parent / 'recipients.jsonl'}: no line has the 'id' key (keys seen: 'ID', 'email'); "
        "key 'ID' differs from 'id' only in case or spaces: rename it, or set id_field = \"ID\" in [recipients]\n"
    )


def test_stdin_that_is_a_terminal_is_refused_instead_of_waiting(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()  # a real terminal: nothing piped in
    os.write(controller, b"\x04")  # Ctrl-D: should the check go, the copy reads end-of-file instead of waiting
    try:
        with os.fdopen(terminal, "rb", closefd=False) as stdin, pytest.raises(RecipientListError) as caught:
            with recipients_argument(Path("-"), stdin):
                pass
    finally:
        os.close(controller)
        os.close(terminal)
    assert str(caught.value) == "<stdin>: is a terminal; pipe the list in (cat list.csv | emailpers ... --recipients -)"


def test_a_single_line_value_past_the_csv_field_limit_is_not_called_a_quote(tmp_path: Path) -> None:
    campaign = campaign_with(tmp_path, None, rows_text(3, {4: "1,user1@example.com,Name1," + "x" * 200_000}))
    with pytest.raises(RecipientListError) as caught:
        preflight(load_campaign(campaign).recipients)
    name = campaign.parent / "recipients.csv"
    assert str(caught.value) == f"{name}:4: a value longer than 131072 characters; is this a recipient list?"
