"""The message files a run writes: file names, the .eml, whole-file writes.

Message files are written whole (temporary file, then rename) before their
manifest line (manifest.py), so a run killed at any moment leaves only whole
files, and the manifest says exactly which recipients are done.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import errno
import hashlib
import os
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import Header
from pathlib import Path

from emailpers.errors import OutputError
from emailpers.render import Email

FORMATS = ("eml", "html", "all")
MANIFEST = "manifest.jsonl"
REPORT = "report.json"
MESSAGES = "messages"

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
CRLF = "\r\n"


def file_stem(recipient_id: str) -> str:
    """A file name for any id, distinct from every other id's even on a
    case-insensitive file system (macOS, Windows), and never a path.

    A plainly safe lowercase id is its own name. A safe id with an uppercase
    letter gets `~` and 10 hex digits of its hash appended (`A1` becomes
    `A1~...`, `a1` stays `a1`: one file each, however the disk compares case).
    Any other id is encoded as `~` + base32 in lowercase, or `~h` + its SHA-256
    when that would be long; neither can collide with a safe id."""
    if _SAFE_ID.match(recipient_id) and not recipient_id.endswith("."):
        if recipient_id == recipient_id.lower():
            return recipient_id
        return f"{recipient_id}~{hashlib.sha256(recipient_id.encode()).hexdigest()[:10]}"
    encoded = base64.b32encode(recipient_id.encode()).decode().rstrip("=").lower()
    if len(encoded) > 100:
        encoded = "h" + hashlib.sha256(recipient_id.encode()).hexdigest()
    return "~" + encoded


# Every name file_stem can give, with every suffix write_message writes: the
# files of messages/ a run may sweep. Anything else there is left alone.
_OWN_FILE = re.compile(
    r"(?:[a-z0-9][a-z0-9_.-]{0,99}|[A-Za-z0-9][A-Za-z0-9_.-]{0,99}~[0-9a-f]{10}|~[a-z2-7]{1,100}|~h[0-9a-f]{64})"
    r"\.(?:eml|html|txt)"
)


def is_message_file(name: str) -> bool:
    """Could emailpers have written a file of this name into messages/?"""
    return _OWN_FILE.fullmatch(name) is not None


@dataclass(frozen=True)
class Envelope:
    """Per-run header values, prepared once."""

    from_: str
    domain: str

    @classmethod
    def parse(cls, from_: str) -> Envelope:
        """`from_` as load_campaign checked it: it has an address."""
        name, address = email.utils.parseaddr(from_)
        return cls(email.utils.formataddr((name, address), charset="utf-8"), address.rpartition("@")[2])


_PRINTABLE = re.compile(r"[ -~\t]*")  # printable ASCII, space and tab: what may stand raw in a header
MAX_LINE = 998  # RFC 5322 2.1.1, without the CRLF


def _header_line(name: str, value: str) -> str:
    """One header, folded when long. Printable ASCII stands as it is; a value
    with anything else (non-ASCII, a control character from the data: never
    written raw) or a word too long to fold at a space within 998 characters
    is RFC 2047-encoded as UTF-8, which folds anywhere."""
    if _PRINTABLE.fullmatch(value):
        if len(name) + len(value) < 76:
            return f"{name}: {value}"
        folded = Header(value, "us-ascii", header_name=name).encode(linesep=CRLF)
        if len(name) + 2 + max(len(line) for line in folded.split(CRLF)) <= MAX_LINE:
            return f"{name}: {folded}"
    return f"{name}: {Header(value, 'utf-8', header_name=name).encode(linesep=CRLF)}"


def _text_part(body: str) -> str:
    """text/plain as quoted-printable: it stays readable in the raw file."""
    # Encoded from LF-only text, then every LF made CRLF: given CRLF, b2a_qp
    # still passes a lone CR through and, for a body without a line break,
    # folds long lines with a bare LF.
    lf_body = body.replace("\r\n", "\n").replace("\r", "\n").encode()
    encoded = binascii.b2a_qp(lf_body, istext=True).decode("ascii").replace("\n", CRLF)
    return _part("text/plain", "quoted-printable", encoded)


def _html_part(body: str, content_type: str = "text/html") -> str:
    """text/html as base64: several times cheaper than quoted-printable,
    which was a large share of a warm render process (README, Performance);
    MJML's output has lines of
    thousands of characters, so 8bit (998 at most) is not an option."""
    line = binascii.b2a_base64(body.encode(), newline=False).decode("ascii")
    # Lines of 76 (RFC 2045), cut from one encoding: base64.encodebytes encodes
    # 57 bytes at a time in a Python loop, 1.4x the cost (bench, 14 KB of HTML).
    encoded = "".join([line[i : i + 76] + CRLF for i in range(0, len(line), 76)])
    return _part(content_type, "base64", encoded)


def _part(content_type: str, encoding: str, encoded: str) -> str:
    return (
        f'Content-Type: {content_type}; charset="utf-8"{CRLF}'
        f"Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}{encoded}"
    )


def build_eml(message: Email, to: str, envelope: Envelope) -> bytes:
    """multipart/alternative, text/plain then text/html, UTF-8, CRLF line endings.
    An AMP part goes between them (text/x-amp-html): clients show the last
    part they understand, so the HTML must stay last for those without AMP.

    Written directly rather than through email.message: the stdlib's generator
    cost more than Jinja and MJML together, this a fraction of it (README,
    Performance). Tests read every message back with
    the stdlib parser."""
    boundary = f"=_{uuid.uuid4().hex}"
    headers = [
        ("From", envelope.from_),
        ("To", to),
        ("Subject", message.subject),
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Message-ID", f"<{uuid.uuid4().hex}@{envelope.domain}>"),
        *message.headers.items(),
        ("MIME-Version", "1.0"),
    ]
    head = CRLF.join(_header_line(name, value) for name, value in headers)
    return (
        f"{head}{CRLF}"
        f'Content-Type: multipart/alternative; boundary="{boundary}"{CRLF}{CRLF}'
        f"--{boundary}{CRLF}{_text_part(message.text)}{CRLF}"
        + (f"--{boundary}{CRLF}{_html_part(message.amp, 'text/x-amp-html')}{CRLF}" if message.amp else "")
        + f"--{boundary}{CRLF}{_html_part(message.html)}{CRLF}"
        f"--{boundary}--{CRLF}"
    ).encode("ascii")


# Linux: write an unnamed file (O_TMPFILE), then link it to its name. Cleared for the
# process when the file system or the system refuses (no O_TMPFILE, no /proc).
_UNNAMED = [sys.platform.startswith("linux") and hasattr(os, "O_TMPFILE")]


def write_atomic(path: Path, data: bytes) -> None:
    """Write whole or not at all. On Linux an unnamed file is written, then
    linked to its name: one directory operation instead of a create and a
    rename (40-48 us of system time for a 16 KB file instead of 70-75, two
    processes writing into one folder), and a process killed mid-write leaves
    nothing behind. Elsewhere, or when the name exists: a temporary file, then
    a rename. os.open rather than open(): no buffering layer, fewer system calls."""
    if _UNNAMED[0] and _write_unnamed(path, data):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep half a file
        raise


def _write_unnamed(path: Path, data: bytes) -> bool:
    """False: not written, the caller writes it the other way (the name exists,
    or this system cannot). A full disk raises, and leaves nothing."""
    try:
        fd = os.open(path.parent, os.O_WRONLY | os.O_TMPFILE, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EISDIR):
            raise
        _UNNAMED[0] = False
        return False
    try:
        write_all(fd, data)
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, as open(2) shows: os.link calls
        # linkat, rather than link(), only when given a folder descriptor.
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):  # no /proc, or links refused
            raise
        _UNNAMED[0] = False
        return False
    finally:
        os.close(fd)
    return True


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to a descriptor (os.write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def whole_lines(path: Path, *, cut_torn: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of each whole line of a journal file (the manifest,
    a shard's journal, sent.jsonl); none when it is not there. A last line
    without its newline was cut off by a kill: it ends the reading and, with
    `cut_torn`, is cut off the file too, so the next append starts a line of its own."""
    try:
        f = open(path, "rb+" if cut_torn else "rb")
    except FileNotFoundError:
        return
    with f:
        position = 0
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                if cut_torn:
                    f.truncate(position)
                break
            position += len(line)
            yield number, line


_SUFFIXES = {"eml": (".eml",), "html": (".html", ".txt"), "all": (".eml", ".html", ".txt")}


def message_files(recipient_id: str, formats: str) -> list[str]:
    """The files `write_message` writes for a recipient, relative to the output folder."""
    stem = file_stem(recipient_id)
    return [f"{MESSAGES}/{stem}{suffix}" for suffix in _SUFFIXES[formats]]


def write_message(out: Path, recipient_id: str, to: str, message: Email, formats: str, envelope: Envelope) -> list[str]:
    """Write one recipient's files whole; return their paths relative to `out`.

    Raises OutputError when the disk refuses (full, read-only, quota, I/O
    error): that is not this recipient's fault and would fail every later one,
    so the run stops, and the recipient is not recorded (a rerun does it)."""
    names = message_files(recipient_id, formats)
    try:
        for name in names:
            if name.endswith(".eml"):
                data = build_eml(message, to, envelope)
            else:
                data = (message.html if name.endswith(".html") else message.text).encode()
            write_atomic(out / name, data)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "?")
        raise OutputError(
            f"{out / MESSAGES}: cannot write message files: {exc.strerror} ({code}); the run stopped, and recipients "
            "whose files were not written are not in the manifest: free space or fix the folder, then run the "
            "same command again to resume"
        ) from None
    return names
