"""What `emailpers send` reads and keeps in the output folder.

- `manifest.jsonl` (written by the render) says which messages exist: only
  lines with status `rendered` or `fallback` are sent, and only the one .eml
  file the render gives that id (`output.message_files`), opened without
  following a symbolic link: never a file the manifest does not own.
- `sent.jsonl` is the send's own journal. A `sending` line is on disk before
  each SMTP transaction starts, and one of `sent` (with the relay's queue id),
  `rejected` (5xx), `deferred` (4xx; `final` once the retries are spent) or
  `unknown` (the connection died after the message was handed over, before
  the reply) after it. The last line of an id is its state; an id whose last
  line is `sending` was caught by a crash: `unknown`, since the relay may or
  may not have taken it.
- `.emailpers.lock` (manifest.py) is held while sending: a render still
  running on the folder, or a second send, is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emailpers.errors import SendError
from emailpers.manifest import LOCK
from emailpers.output import MANIFEST, MESSAGES, REPORT, message_files

JOURNAL = "sent.jsonl"
SENDABLE = frozenset({"rendered", "fallback"})
DONE = frozenset({"sent", "rejected"})  # a rerun never sends these again
OUTCOMES = ("sent", "rejected", "deferred", "unknown")


@dataclass(frozen=True)
class Outgoing:
    """One message to send: its id, the envelope recipient, the file."""

    id: str
    to: str
    path: Path
    attempt: int = 1


def lock_folder(out: Path) -> int:
    """Take the folder's lock (the one a render holds while it runs); return
    its descriptor, which holds the lock until closed."""
    if not (out / MANIFEST).is_file():
        raise SendError(f"{out}: no {MANIFEST} here; give send the --out folder of a render")
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SendError(
            f"{out}: a render (or another send) is still running on this folder; wait for it to finish, then send"
        ) from None
    return fd


def render_unfinished(out: Path) -> str | None:
    """Why the render of `out` is not complete (it stopped, or never wrote its
    report), or None when it finished."""
    try:
        report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {REPORT}: the render was killed or is not finished"
    except (OSError, ValueError):
        return f"its {REPORT} cannot be read"
    stopped = report.get("stopped") if isinstance(report, dict) else "unknown"
    return f"the render stopped early ({stopped})" if stopped else None


def read_manifest(out: Path) -> list[Outgoing]:
    """The sendable messages, in manifest order. A line cut off by a kill is
    ignored (the render redoes that recipient); any other bad line is an error."""
    path = out / MANIFEST
    messages: dict[str, Outgoing] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
                status, rid = entry["status"], entry.get("id")
            except (ValueError, KeyError, TypeError):
                raise SendError(f"{path}:{number}: not a manifest line; the folder was edited or damaged") from None
            if status not in SENDABLE:
                messages.pop(rid, None)
                continue
            files, to = entry.get("files"), entry.get("email")
            if not isinstance(rid, str) or not isinstance(to, str) or not isinstance(files, list):
                raise SendError(f"{path}:{number}: a {status} line without id, email or files")
            own = message_files(rid, "eml")[0]
            if own not in files:
                raise SendError(
                    f"{path}:{number}: lists no {own} for id {rid!r} (rendered with --format html?); send needs .eml "
                    "files: render with --format eml or all"
                )
            messages[rid] = Outgoing(rid, to, out / own)
    return list(messages.values())


def read_message(message: Outgoing) -> bytes:
    """The bytes of a message file, refusing a symbolic link (a file planted
    in messages/ must not send some other file)."""
    assert message.path.parent.name == MESSAGES
    fd = os.open(message.path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


class Journal:
    """sent.jsonl: appended a line at a time, unbuffered, so a `sending` line
    is on disk (the kernel's) before the transaction it announces starts."""

    def __init__(self, out: Path, *, readonly: bool = False) -> None:
        self.path = out / JOURNAL
        self.states: dict[str, str] = {}
        self.readonly = readonly  # a dry run: reads what earlier sends did, writes nothing
        self._read()
        self._fd = -1 if readonly else os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb" if self.readonly else "rb+") as f:
            position = 0
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    if not self.readonly:
                        f.truncate(position)  # torn by a kill: the line it would have been is not known
                    break
                position += len(line)
                try:
                    entry = json.loads(line)
                    self.states[entry["id"]] = self._state(entry)
                except (ValueError, KeyError, TypeError):
                    raise SendError(f"{self.path}:{number}: not a journal line; the file was edited or damaged") from None

    @staticmethod
    def _state(entry: dict[str, Any]) -> str:
        event = entry["event"]
        if event == "sending":
            return "unknown"  # until a reply line says otherwise
        if event == "deferred" and not entry.get("final"):
            return "retrying"
        return str(event)

    def write(self, entry: dict[str, Any]) -> None:
        assert not self.readonly, "a dry run sends nothing"
        data = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise SendError(f"{self.path}: cannot write the journal: {exc.strerror}; sending stopped") from None
        self.states[entry["id"]] = self._state(entry)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
