"""Stream recipients from a .csv (header row) or .jsonl file.

Rows are read one at a time so memory stays flat for any file size. Each row
comes out as a `Row`: its number in the file, the parsed fields, and the
reason it cannot be used (or None).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emailpers.campaign import RecipientsConfig
from emailpers.errors import CampaignError

# Deliberately plain: one @, no spaces or angle brackets, a dot in the domain.
_EMAIL = re.compile(r"^[^@\s<>\"(),;:]+@[^@\s<>\"(),;:\[\]]+\.[^@\s<>\"(),;:\[\]]+$")


@dataclass(frozen=True, slots=True)
class Row:
    number: int  # line of the file the row ends on (a quoted CSV value may span lines)
    fields: dict[str, Any]
    id: str | None
    email: str | None
    problem: str | None  # None: usable


def read_recipients(config: RecipientsConfig) -> Iterator[Row]:
    """Yield every row, usable or not. Duplicate ids are the caller's concern:
    resuming a run changes which ids count as already seen."""
    path = config.path
    raw = _csv_rows(path) if path.suffix == ".csv" else _jsonl_rows(path)
    for number, fields in raw:
        yield _check(number, fields, config)


def count_rows(path: Path) -> int:
    """Rows in the file, for a progress bar (a fast byte count of newlines)."""
    with path.open("rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return max(lines - 1, 0) if path.suffix == ".csv" else lines


def _check(number: int, fields: dict[str, Any], config: RecipientsConfig) -> Row:
    if isinstance(fields, str):  # a line that could not be parsed: fields holds why
        return Row(number, {}, None, None, fields)
    rid = fields.get(config.id_field)
    rid = None if rid is None else str(rid).strip()
    email = fields.get(config.email_field)
    email = email.strip() if isinstance(email, str) else None
    if not rid:
        problem = f"no {config.id_field!r} field"
    elif not email:
        problem = f"no {config.email_field!r} field"
    elif not _EMAIL.match(email):
        problem = f"malformed email address {email!r}"
    elif not email.isascii():  # the .eml is ASCII: an encoded-word is no address
        problem = f"non-ASCII email address {email!r} is not supported; use its ASCII (IDNA) form"
    else:
        problem = None
    return Row(number, fields, rid or None, email or None, problem)


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return
            for fields in reader:
                number = reader.line_num
                if None in fields:
                    yield number, f"more values than the {len(reader.fieldnames)} columns of the header"
                    continue
                yield number, {k: v for k, v in fields.items() if v is not None}
    except UnicodeDecodeError as exc:
        raise CampaignError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    except csv.Error as exc:
        raise CampaignError(f"{path}: malformed CSV: {exc}") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    fields = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, f"not valid JSON ({exc.msg} at column {exc.colno})"
                    continue
                if not isinstance(fields, dict):
                    yield number, f"must be a JSON object, got {type(fields).__name__}"
                    continue
                yield number, fields
    except UnicodeDecodeError as exc:
        raise CampaignError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def columns(config: RecipientsConfig) -> tuple[str, ...]:
    """The fields a recipient may have, for the template name check: the CSV
    header, or every key any JSONL line has (lines that do not parse are
    skipped; the run records them as invalid). Minimal on purpose: the
    pre-flight pass over the list replaces it."""
    path = config.path
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            if path.suffix == ".csv":
                return tuple(next(csv.reader(f), []))
            found: dict[str, None] = {}
            for line in f:
                try:
                    fields = json.loads(line)
                except ValueError:
                    continue
                if isinstance(fields, dict):
                    found.update(dict.fromkeys(fields))
            return tuple(found)
    except (UnicodeDecodeError, csv.Error):
        return ()  # reading the rows reports it, with the line
