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
- A sharded run (shards.py) is sent whole (every shard's journal, each
  shard's lock held) or one shard at a time (`--shard K/N`: that shard's
  journal, its own `shards/K-of-N.sent.jsonl`); `open_folder` says which.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emailpers.errors import SendError
from emailpers.manifest import LOCK, hold_lock
from emailpers.outcome import SENDABLE
from emailpers.output import MANIFEST, MESSAGES, REPORT, message_files, whole_lines, write_all
from emailpers.shards import SHARDS, Shard, run_shards

JOURNAL = "sent.jsonl"
SEND_REPORT = "send-report.json"
DONE = frozenset({"sent", "rejected"})  # a rerun never sends these again
OUTCOMES = ("sent", "rejected", "deferred", "unknown")


@dataclass(frozen=True)
class Outgoing:
    """One message to send: its id, the envelope recipient, the file."""

    id: str
    to: str
    path: Path
    attempt: int = 1


def _flock(path: Path, mode: int, busy: str) -> int:
    """A descriptor holding `mode` (LOCK_EX or LOCK_SH) on `path` until closed;
    SendError(busy) when another process holds it."""
    fd = hold_lock(path, mode)
    if fd is None:
        raise SendError(busy)
    return fd


def render_unfinished(report: Path) -> str | None:
    """Why the render (or the shard) whose report is `report` is not complete
    (it stopped, or never wrote its report), or None when it finished."""
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {report.name}: the render was killed or is not finished"
    except (OSError, ValueError):
        return f"its {report.name} cannot be read"
    stopped = data.get("stopped") if isinstance(data, dict) else "unknown"
    return f"the render stopped early ({stopped})" if stopped else None


def _has_lines(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


@dataclass
class Folder:
    """What one send reads and writes in OUT, and the locks it holds (close()).

    - An unsharded render: manifest.jsonl; sent.jsonl, send-report.json.
    - The whole of a sharded run: every shard's journal (shards/K-of-N.jsonl),
      in shard order; sent.jsonl and send-report.json, as above.
    - One shard (`send --shard K/N`): shards/K-of-N.jsonl only; its own
      shards/K-of-N.sent.jsonl and .send-report.json, so N senders run side by side.

    A whole-run send and per-shard sends never mix on one folder: each would
    resend what the other's journal settles."""

    manifests: list[Path]
    journal: Path
    report: Path
    locks: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.locks:
            os.close(fd)
        self.locks.clear()


def open_folder(out: Path, shard: Shard | None, partial: bool) -> Folder:
    """Lock `out` for a send (of the whole run, or of one shard) and say what
    it reads and writes. Raises SendError while a render (or a send that would
    overlap) is running, or while the render is unfinished unless `partial`."""
    count = run_shards(out)
    if count is None:
        if shard is not None:
            raise SendError(f"{out}: this render was not run in shards; send it without --shard")
        if not (out / MANIFEST).is_file():
            raise SendError(f"{out}: no {MANIFEST} here; give send the --out folder of a render")
        folder = Folder([out / MANIFEST], out / JOURNAL, out / SEND_REPORT)
        folder.locks.append(_flock(out / LOCK, fcntl.LOCK_EX, (
            f"{out}: a render (or another send) is still running on this folder; wait for it to finish, then send")))
        problems = {MANIFEST: render_unfinished(out / REPORT)}
    elif shard is None:
        folder = Folder([Shard(k, count).journal(out) for k in range(count)], out / JOURNAL, out / SEND_REPORT)
        folder.locks.append(_flock(out / LOCK, fcntl.LOCK_EX, (
            f"{out}: another send is running on this folder (of the whole run, or of a shard); wait for it")))
        problems = {}
        try:
            for k in range(count):
                part = Shard(k, count)
                try:
                    folder.locks.append(_flock(part.lock(out), fcntl.LOCK_EX, "running"))
                    problems[part.name] = render_unfinished(part.report(out))
                except SendError:
                    problems[part.name] = "it is still running"
            mixed = sorted(p.name for p in (out / SHARDS).glob("*.sent.jsonl") if _has_lines(p))
            if mixed:
                raise SendError(
                    f"{out}: shards of this run were sent one by one ({', '.join(mixed)}); sending the whole run "
                    f"would send their messages again. Finish with send --shard K/{count} for each shard"
                )
        except BaseException:
            folder.close()
            raise
    else:
        if shard.count != count:
            raise SendError(f"{out}: this run was rendered as {count} shards, not {shard.count}; use --shard K/{count}")
        base = out / SHARDS / shard.name
        folder = Folder([shard.journal(out)], base.with_name(f"{shard.name}.sent.jsonl"),
                        base.with_name(f"{shard.name}.{SEND_REPORT}"))
        try:
            # Shared: the shards' sends run side by side; a whole-run send (exclusive) waits for them all.
            folder.locks.append(_flock(out / LOCK, fcntl.LOCK_SH, (
                f"{out}: a send of the whole run is running on this folder; a send of shard {shard} would double it")))
            folder.locks.append(_flock(shard.lock(out), fcntl.LOCK_EX, (
                f"{out}: shard {shard} is still rendering (or another send of it is running); wait for it, then send")))
            if _has_lines(out / JOURNAL):
                raise SendError(
                    f"{out}: the whole run was sent here ({JOURNAL}); a send of shard {shard} would send its messages "
                    "again. Finish with send OUT, without --shard"
                )
        except BaseException:
            folder.close()
            raise
        problems = {shard.name: render_unfinished(shard.report(out))}
    unfinished = {name: why for name, why in problems.items() if why is not None}
    if unfinished and not partial:
        folder.close()
        whose = "; ".join(why if name == MANIFEST else f"shard {name}: {why}" for name, why in unfinished.items())
        raise SendError(
            f"{out}: {whose}, so some recipients may have no message yet. Finish the render (run the same render "
            "command again), or pass --partial to send what is there"
        )
    return folder


def read_manifest(path: Path, out: Path) -> list[Outgoing]:
    """The sendable messages of one manifest (or shard journal) of `out`, in
    its order. A line cut off by a kill is ignored (the render redoes that
    recipient); any other bad line is an error. A shard's journal that is not
    there yet (never started, with --partial) holds nothing."""
    messages: dict[str, Outgoing] = {}
    for number, line in whole_lines(path, cut_torn=False):
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

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.states: dict[str, str] = {}
        self.readonly = readonly  # a dry run: reads what earlier sends did, writes nothing
        self._read()
        self._fd = -1 if readonly else os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _read(self) -> None:
        for number, line in whole_lines(self.path, cut_torn=not self.readonly):
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
        return str(event)

    def write(self, entry: dict[str, Any]) -> None:
        assert not self.readonly, "a dry run sends nothing"
        data = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            write_all(self._fd, data)
        except OSError as exc:
            raise SendError(f"{self.path}: cannot write the journal: {exc.strerror}; sending stopped") from None
        self.states[entry["id"]] = self._state(entry)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
