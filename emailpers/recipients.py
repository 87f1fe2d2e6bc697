"""Stream recipients from a CSV/TSV (header row) or JSONL file, gzipped or not.

Two passes read the file, through the same code. `preflight()` reads it whole
before the first request and raises `RecipientListError` for whatever makes
the list untrustworthy as a whole: bytes that are not text in its encoding,
no header or a header without the id or email column, a stray quote that
merges rows. `read_recipients()` then streams it for the run. Memory stays
flat: one line at a time, never more than `MAX_LINE_BYTES` of it.

Problems of one row (no id, a malformed address, a line that is not JSON) are
not errors: the row comes out as a `Row` with a `problem`, and the run records
it `invalid` and goes on.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from emailpers.campaign import RecipientsConfig, recipient_format
from emailpers.errors import RecipientListError
from emailpers.flat import FirstSeen

# Deliberately plain: one @, no spaces or angle brackets, a dot in the domain.
_EMAIL = re.compile(r"^[^@\s<>\"(),;:\x00-\x1f\x7f]+@[^@\s<>\"(),;:\[\]\x00-\x1f\x7f]+\.[^@\s<>\"(),;:\[\]\x00-\x1f\x7f]+$")

MAX_LINE_BYTES = 1024 * 1024  # a longer line is no recipient: read no further into memory
# A quoted CSV value may hold line breaks (a postal address over 2-3 lines). One
# that runs over more lines than this, or grows past this many characters while
# spanning lines, is a stray quote swallowing the rows after it.
MAX_VALUE_LINES = 6
MAX_MULTILINE_CHARS = 2000
MAX_JSON_DEPTH = 32  # deeper rows are invalid: templates and pickling recurse over them
MAX_COLUMNS = 1000  # JSONL keys remembered as the list's columns
MAX_EXAMPLES = 5  # rows named in a warning
STDIN_LABEL = "<stdin>"


@dataclass(frozen=True, slots=True)
class Row:
    number: int  # line of the file the row ends on (a quoted CSV value may span lines)
    fields: dict[str, Any]
    id: str | None
    email: str | None
    problem: str | None  # None: usable


@dataclass(frozen=True)
class Preflight:
    """What the pass over the whole list found. `columns` is the CSV header, or
    the keys seen in a JSONL file (the first MAX_COLUMNS of them, in order)."""

    columns: tuple[str, ...]
    rows: int  # data rows, usable or not: the progress bar's total
    warnings: tuple[str, ...] = ()


def preflight(config: RecipientsConfig) -> Preflight:
    """Read the whole list once, before any request; raise RecipientListError
    (file:line and what to do) for a list that cannot be trusted."""
    reader = _Reader(config)
    rows = 0
    keys: dict[str, None] = {}  # JSONL keys in the order seen (a dict is an ordered set)
    has_id = has_email = False
    addresses = FirstSeen()  # address, lowercased -> the id first seen with it; flat in memory at any N
    shared = 0
    examples: list[str] = []
    for number, fields in reader:
        rows += 1
        if isinstance(fields, str):
            continue
        if config.format == "jsonl":
            has_id = has_id or config.id_field in fields
            has_email = has_email or config.email_field in fields
            if len(keys) < MAX_COLUMNS and fields.keys() - keys.keys():
                keys.update((k, None) for k in fields if len(keys) < MAX_COLUMNS)
        row = _check(number, fields, config)
        if row.problem is not None or row.email is None:
            continue
        first = addresses.first(row.email.lower(), row.id or "")
        if first is not None and first != row.id:
            shared += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{config.name}:{number} {row.email} (id {row.id!r})")
    addresses.close()
    if rows == 0:
        what = "a header but no recipient rows" if config.format == "csv" else "no recipient lines"
        raise RecipientListError(f"{config.name}: has {what}; nothing to send. Check the export that wrote it")
    if config.format == "jsonl":
        columns = tuple(keys)
        if not (has_id and has_email):
            raise RecipientListError(f"{config.name}: {_missing_columns(columns, config, key_word='key')}")
    else:
        columns = reader.header
    warnings = []
    if shared:
        more = f", and {shared - len(examples)} more" if shared > len(examples) else ""
        rows_reuse = "1 row reuses" if shared == 1 else f"{shared} rows reuse"
        warnings.append(
            f"{rows_reuse} the address of an earlier row under another id (compared case-insensitively), "
            f"so that address gets one email per id: {', '.join(examples)}{more}"
        )
    return Preflight(columns=columns, rows=rows, warnings=tuple(warnings))


def columns(config: RecipientsConfig) -> tuple[str, ...]:
    """The list's columns (CSV header, or JSONL keys seen). Reads the whole file:
    where a Preflight is at hand, use its `columns`."""
    return preflight(config).columns


def read_recipients(config: RecipientsConfig) -> Iterator[Row]:
    """Yield every row, usable or not. Duplicate ids are the caller's concern:
    resuming a run changes which ids count as already seen."""
    for number, fields in _Reader(config):
        yield _check(number, fields, config)


def count_rows(path: Path) -> int:
    """Rows in the file, for a progress bar (a fast byte count of newlines)."""
    kind = recipient_format(path.name)
    opener = gzip.open if kind is not None and kind[2] else open
    with opener(path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return lines if kind is not None and kind[0] == "jsonl" else max(lines - 1, 0)


@contextmanager
def recipients_argument(value: Path | None, stdin: IO[bytes] | None) -> Iterator[tuple[Path | None, str | None]]:
    """--recipients as `load_campaign` takes it: (path, label for errors).
    `-` is stdin, copied to a private temporary file so that both passes can
    read it (named .jsonl when it starts with `{`, else .csv; .gz when
    gzipped), and removed afterwards."""
    if value is None or str(value) != "-":
        yield value, None
        return
    if stdin is None:  # a process started with standard input closed
        raise RecipientListError(f"{STDIN_LABEL}: this process has no standard input to read the list from")
    if stdin.isatty():  # nothing is piped in: copying would wait for the keyboard
        raise RecipientListError(f"{STDIN_LABEL}: is a terminal; pipe the list in (cat list.csv | emailpers ... --recipients -)")
    with tempfile.TemporaryDirectory(prefix="emailpers-stdin-") as folder:  # mode 0700: it holds personal data
        path = Path(folder) / "stdin"
        with path.open("wb") as f:
            shutil.copyfileobj(stdin, f, 1 << 20)
        with path.open("rb") as f:
            head = f.read(4096)
        compressed = head.startswith(b"\x1f\x8b")
        if compressed:
            try:
                with gzip.open(path, "rb") as g:
                    head = g.read(4096)
            except (OSError, EOFError, zlib.error):
                head = b""  # the real pass reports the broken gzip with the file's name
        suffix = ".jsonl" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else ".csv"
        named = path.rename(path.with_name("stdin" + suffix + (".gz" if compressed else "")))
        yield named, STDIN_LABEL


# -- one row -----------------------------------------------------------------------


def _check(number: int, fields: dict[str, Any] | str, config: RecipientsConfig) -> Row:
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


# -- the file ------------------------------------------------------------------------

_Parsed = tuple[int, dict[str, Any] | str]  # (line, fields or why the row is unusable)


class _Reader:
    """Iterates (line, fields or problem) over the data rows of a recipient file,
    raising RecipientListError for what stops the run. `header` is the CSV header
    once iteration has begun."""

    def __init__(self, config: RecipientsConfig) -> None:
        self.config = config
        self.name = config.name
        self.header: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[_Parsed]:
        return self._csv() if self.config.format == "csv" else self._jsonl()

    def error(self, line: int | None, message: str) -> RecipientListError:
        return RecipientListError(f"{self.name}:{line}: {message}" if line else f"{self.name}: {message}")

    def _lines(self) -> Iterator[tuple[int, str | None]]:
        """(number, text) of each line, decoded one at a time so that an encoding
        error names its line; text None for a line longer than MAX_LINE_BYTES."""
        config = self.config
        try:
            with (gzip.open if config.gzip else open)(config.path, "rb") as f:
                number = 0
                while raw := f.readline(MAX_LINE_BYTES + 1):
                    number += 1
                    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                        while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                            pass
                        yield number, None
                        continue
                    try:
                        text = raw.decode(config.encoding)
                    except UnicodeDecodeError as exc:
                        raise self.error(number, self._not_text(raw, exc)) from None
                    yield number, text.removeprefix("\ufeff") if number == 1 else text
                if number == 0:
                    raise self.error(None, "is empty (0 bytes); export the list again")
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise self.error(None, f"is not a whole gzip file ({exc or 'cut short'}); compress it again, or drop .gz from its name") from None
        except OSError as exc:
            raise self.error(None, f"cannot read the recipient file: {exc.strerror or exc}") from None

    def _not_text(self, raw: bytes, exc: UnicodeDecodeError) -> str:
        column = len(raw[: exc.start].decode(self.config.encoding, errors="replace")) + 1
        byte = raw[exc.start : exc.start + 1].hex()
        hint = (
            'save the file as UTF-8, or set encoding = "cp1252" (Excel on Windows) or "latin-1" in [recipients]'
            if self.config.encoding.startswith("utf")
            else "check [recipients] encoding, or save the file as UTF-8 and remove the key"
        )
        return f"not {self.config.encoding} text (byte 0x{byte} at column {column}); {hint}"

    # -- CSV --------------------------------------------------------------------------

    def _csv(self) -> Iterator[_Parsed]:
        delimiter = self.config.delimiter
        physical = 0

        def texts() -> Iterator[str]:
            nonlocal physical
            for physical, text in self._lines():
                if text is None:
                    raise self.error(physical, f"line longer than {MAX_LINE_BYTES // 1024} KiB; is this a recipient list?")
                yield text

        reader = csv.reader(texts(), delimiter=delimiter, strict=True)
        end = 0  # the line the previous record ended on
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise self._csv_error(str(exc), end + 1, physical) from None
            start, end = end + 1, physical
            if not values:  # a blank line
                continue
            if end > start:
                self._judge_multiline(values, start, end)
            if not self.header:
                self.header = self._check_header(values, start)
                continue
            if len(values) > len(self.header):
                yield end, f"more values than the {len(self.header)} columns of the header"
                continue
            yield end, dict(zip(self.header, values, strict=False))
        if not self.header:
            raise self.error(None, "has no header row (only blank lines); the first line must name the columns")

    def _csv_error(self, message: str, start: int, line: int) -> RecipientListError:
        remedy = 'remove the stray quote, or write a quote inside a value as "" and quote the whole value'
        if "unexpected end of data" in message:
            return self.error(start, f"a quote opened in this row is never closed (the file ends inside it); {remedy}")
        if "expected after" in message:
            where = "in this row" if line == start else f"on line {line}, inside a value that starts on line {start}"
            return self.error(start, f"text follows a closing quote {where}: a stray quote; {remedy}")
        if "field larger than field limit" in message:
            limit = csv.field_size_limit()
            if line == start:
                return self.error(start, f"a value longer than {limit} characters; is this a recipient list?")
            return self.error(
                start, f"a value grows past {limit} characters (up to line {line}): "
                f"a quote opened in this row is probably never closed; {remedy}",
            )
        if "new-line character seen in unquoted field" in message:
            return self.error(line, "a bare carriage return (\\r) inside a line; save the file with ordinary line endings")
        return self.error(line, f"malformed CSV ({message}); {remedy}")

    def _judge_multiline(self, values: list[str], start: int, end: int) -> None:
        """A record over several lines is legitimate when a quoted value holds a
        short address; a stray quote instead swallows whole rows into one value.
        Judge by length and by content: a line of the value that looks like a row
        of its own (values split by the delimiter, one an email address)."""
        line = start
        for column, value in enumerate(values):
            parts = value.split("\n")
            for offset, part in enumerate(parts[1:], start=1):
                cells = part.rstrip("\r").split(self.config.delimiter)
                if len(cells) > 1 and any(_EMAIL.match(c.strip().strip('"')) for c in cells):
                    raise self.error(
                        start, f"the quoted value of column {column + 1} runs on to line {line + offset}, which "
                        f"looks like a row of its own (it holds an email address): a stray quote merges rows "
                        f"{start}-{end}; remove it, or write a quote inside a value as \"\"",
                    )
            if len(parts) > MAX_VALUE_LINES or (len(parts) > 1 and len(value) > MAX_MULTILINE_CHARS):
                raise self.error(
                    start, f"the quoted value of column {column + 1} runs over lines {line}-{line + len(parts) - 1} "
                    f"({len(value)} characters): a stray quote merges rows; remove it, or write a quote inside "
                    f'a value as "". A value may span at most {MAX_VALUE_LINES} lines and, when it does, '
                    f"{MAX_MULTILINE_CHARS} characters",
                )
            line += len(parts) - 1

    def _check_header(self, values: list[str], line: int) -> tuple[str, ...]:
        header = tuple(values)
        config = self.config
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise self.error(line, f"the header names column {repeated[0]!r} twice; rename one so no value is lost")
        if config.id_field not in header or config.email_field not in header:
            raise self.error(line, _missing_columns(header, config, key_word="column"))
        return header

    # -- JSONL -------------------------------------------------------------------------

    def _jsonl(self) -> Iterator[_Parsed]:
        for number, text in self._lines():
            if text is None:
                yield number, f"line longer than {MAX_LINE_BYTES // 1024} KiB"
                continue
            if not text.strip():
                continue
            yield number, _json_row(text)


def _json_row(text: str) -> dict[str, Any] | str:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except ValueError:  # Python refuses to convert an integer of more than 4,300 digits
        return "not usable JSON: a number with too many digits"
    except RecursionError:
        return f"not usable JSON: nested deeper than {MAX_JSON_DEPTH} levels"
    if not isinstance(fields, dict):
        return f"must be a JSON object, got {type(fields).__name__}"
    # Counting brackets is cheap and bounds the depth from above: most rows need no walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(fields, MAX_JSON_DEPTH):
        return f"not usable JSON: nested deeper than {MAX_JSON_DEPTH} levels"
    return fields


def _deeper_than(value: dict[str, Any], limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


# -- guessing why the id or email column is missing -----------------------------------

_DELIMITERS = {";": "semicolon", "\t": "tab", ",": "comma", "|": "pipe"}


def _missing_columns(found: tuple[str, ...], config: RecipientsConfig, *, key_word: str) -> str:
    wanted = {"id_field": config.id_field, "email_field": config.email_field}
    missing = {key: name for key, name in wanted.items() if name not in found}
    shown = ", ".join(repr(c) for c in found[:20]) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")
    what = " or ".join(repr(name) for name in missing.values())
    message = f"no {what} {key_word} (found: {shown or 'none'})"
    if config.format == "jsonl":
        message = f"no line has the {what} {key_word} (keys seen: {shown or 'none'})"
    hints = []
    joined = config.delimiter.join(found)
    for delimiter, label in _DELIMITERS.items():
        if config.format == "csv" and delimiter != config.delimiter and delimiter in joined:
            cells = {c.strip().lower() for c in joined.split(delimiter)}
            if all(name.lower() in cells for name in wanted.values()):
                toml = json.dumps(delimiter)
                hints.append(f'it looks {label}-separated: set delimiter = {toml} in [recipients]')
                break
    if not hints:
        for key, name in missing.items():
            close = [c for c in found if c.strip().lower() == name.lower()]
            if close:
                hints.append(
                    f"{key_word} {close[0]!r} differs from {name!r} only in case or spaces: rename it, "
                    f"or set {key} = {json.dumps(close[0])} in [recipients]"
                )
    if not hints and config.format == "csv" and any(_EMAIL.match(c.strip()) for c in found):
        hints.append("the first line holds an email address: the file needs a header row naming the columns")
    if not hints:
        hints.append(f"set id_field and email_field in [recipients] to the {key_word}s that hold them")
    return f"{message}; {'; '.join(hints)}"
