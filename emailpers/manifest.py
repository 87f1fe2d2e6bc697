"""The manifest, a run's journal, and the output folder it keeps honest.

One JSON line per finished recipient, appended after its files are whole
(output.py), so a run killed at any moment resumes with every recipient once.
Around it, in --out:

- `run.json` holds the fingerprint of the campaign that started the folder (the
  campaign file, every template, --format). A rerun of anything else refuses to
  start rather than mix two versions of an email in one folder. A separate file
  keeps every manifest line the same shape, and is written before the first
  manifest line exists.
- `.emailpers.lock` is held (flock) while a run uses the folder: a second run on
  the same --out refuses instead of writing every row twice. The kernel releases
  it when its holder dies, however it dies.
- `messages/` holds exactly the files the manifest lists. Files a run wrote
  whose lines it never wrote (killed, stopped, a disk error) are swept: at once
  after a stop emailpers controls, at the next start after `kill -9`. Only names
  emailpers could have written are touched (`output.is_message_file`).
- `--fresh` renames `messages/` to `.emailpers-old-*` and deletes its files in
  a thread while the run goes (a million files took 118 s to delete before
  the first recipient); other files in it go back into `messages/`. The run
  waits for that thread when it closes; a folder left by a killed run is
  cleared the same way by the next run on the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emailpers.errors import OutputError
from emailpers.flat import FirstSeen
from emailpers.outcome import OK_OUTCOMES, by_row
from emailpers.output import MANIFEST, MESSAGES, REPORT, is_message_file, whole_lines, write_all, write_atomic
from emailpers.shards import RUN, Shard, run_shards

LOCK = ".emailpers.lock"
_RUN_VERSION = 1


def fingerprint(root: Path, files: Iterable[Path], formats: str) -> dict[str, Any]:
    """What makes a run's emails what they are: each file's SHA-256, by its
    name relative to the campaign folder, and the output format."""
    hashes = {}
    for path in files:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"emailpers_run": _RUN_VERSION, "format": formats, "files": dict(sorted(hashes.items()))}


def describe_change(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in words; None when nothing does."""
    changes = []
    if before.get("shards") != now.get("shards"):
        changes.append(f"it was run as {before.get('shards') or 'no'} shards, now {now.get('shards') or 'no'} shards")
    if before.get("format") != now["format"]:
        changes.append(f"--format was {before.get('format')}, now {now['format']}")
    old, new = before.get("files") or {}, now["files"]
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            changes.append(f"{name} is no longer used")
        elif name not in old:
            changes.append(f"{name} was not used before")
        elif old[name] != new[name]:
            changes.append(f"{name} changed")
    return "; ".join(changes) or None


@dataclass
class Done:
    """What earlier runs on the same output folder already finished."""

    ids: FirstSeen = field(default_factory=FirstSeen)  # flat in memory however long the manifest (flat.py)
    invalid_rows: set[int] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)
    # per source: recipients it was asked for, and those it gave no data
    source_recipients: dict[str, int] = field(default_factory=dict)
    source_failures: dict[str, int] = field(default_factory=dict)
    amp: dict[str, int] = field(default_factory=dict)  # AMP parts sent, dropped, unvalidated

    def add(self, entry: dict[str, Any]) -> None:
        status = entry["status"]
        self.counts[status] = self.counts.get(status, 0) + 1
        if isinstance(entry.get("amp"), str):
            self.amp[entry["amp"]] = self.amp.get(entry["amp"], 0) + 1
        if by_row(status):
            self.invalid_rows.add(entry.get("row", -1))
        else:
            self.ids.first(entry["id"])
        for name, result in (entry.get("sources") or {}).items():
            self.source_recipients[name] = self.source_recipients.get(name, 0) + 1
            if result.get("outcome") not in OK_OUTCOMES:
                self.source_failures[name] = self.source_failures.get(name, 0) + 1



class Manifest:
    """The journal: one JSON line per finished recipient, appended in batches
    (a line is only ever written after its files are whole).

    Opening it takes the folder's lock, checks the fingerprint, drops the lines
    of statuses to `redo`, and sweeps message files no line lists."""

    FLUSH_LINES = 256
    FLUSH_SECONDS = 0.5

    def __init__(
        self,
        out: Path,
        *,
        fresh: bool,
        run: dict[str, Any],
        redo: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
        shard: Shard | None = None,
    ) -> None:
        self.out = out
        self.shard = shard  # one of N shards sharing `out`: its own journal, lock and report (shards.py)
        self.path = out / MANIFEST if shard is None else shard.journal(out)
        self._redo_tmp = self.path.with_name(f".{self.path.name}.redo.tmp")
        if shard is not None:
            run = {**run, "shards": shard.count}
        self._clock = clock
        self._fd = -1
        self._lock_fd = -1
        self._broken = False
        self._clearing: threading.Thread | None = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.path.parent.mkdir(exist_ok=True)
            self._lock()
            self._redo_tmp.unlink(missing_ok=True)  # from a redo killed mid-rewrite
            if shard is not None:
                # Its report goes until this run writes a new one: `status` reads a shard without one as unfinished.
                shard.report(out).unlink(missing_ok=True)
                if fresh:
                    self.path.unlink(missing_ok=True)
            elif fresh:
                for name in (MANIFEST, REPORT, RUN):
                    (out / name).unlink(missing_ok=True)
                _set_aside(out / MESSAGES)
            (out / MESSAGES).mkdir(exist_ok=True)
            self._clearing = _clear_behind(out)
            self.done, listed = self._read()
            self._check_run(run, started=bool(self.done.counts))
            if redo and any(self.done.counts.get(status) for status in redo):
                self._drop(redo)
                self.done, listed = self._read()
            self._sweep(listed)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            self._release()
            raise OutputError(f"{out}: cannot use output folder: {exc.strerror}") from None
        except OutputError:
            self._release()
            raise
        self._buffer: list[str] = []
        self._last_flush = self._clock()

    # -- opening --------------------------------------------------------------------

    def _lock(self) -> None:
        fd = hold_lock(self.out / LOCK if self.shard is None else self.shard.lock(self.out), fcntl.LOCK_EX)
        if fd is None:
            raise OutputError(
                f"{self.out}: another emailpers run{f' of shard {self.shard}' if self.shard else ''} is using this "
                "output folder; wait for it to end, or give this run another --out"
            )
        self._lock_fd = fd

    def _release(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)  # closing the lock's file releases the lock
        self._fd = self._lock_fd = -1

    def _check_run(self, run: dict[str, Any], *, started: bool) -> None:
        """A folder with finished recipients resumes only the campaign that started it."""
        path = self.out / RUN
        if not started and (self.shard is not None or run_shards(self.out) is not None):
            # Shards share run.json: the first to start writes it (exclusively: two
            # starting at once cannot both), every other one compares.
            started = not _create_exclusive(path, (json.dumps(run, indent=2) + "\n").encode())
        if started:
            try:
                before = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise OutputError(
                    f"{self.out}: has a manifest but no {RUN} (made by an older emailpers, or removed), so it "
                    "cannot tell which campaign made it; run with --fresh to start over, or use a new --out"
                ) from None
            except ValueError:
                raise OutputError(f"{path}: not a run file; run with --fresh to start over, or use a new --out") from None
            change = describe_change(before, run) if isinstance(before, dict) else f"{RUN} is not an object"
            if change is not None:
                todo = "Run with --fresh to start over, or use a new --out"
                if self.shard is not None or "shards" in before:
                    todo = ("Every shard of a run needs the same campaign, --format and N; to start another "
                            "sharded run, use a new --out")
                raise OutputError(
                    f"{self.out}: was started by a different campaign or templates ({change}); resuming would mix "
                    f"two versions of the email. {todo}"
                )
            return
        write_atomic(path, (json.dumps(run, indent=2) + "\n").encode())

    def _lines(self) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        """(line number, raw line, entry) of every whole line; a line cut off by a
        kill is cut off the file too (that recipient is redone)."""
        for number, line in whole_lines(self.path, cut_torn=True):
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not isinstance(entry["status"], str):
                    raise TypeError
                if not by_row(entry["status"]) and not isinstance(entry["id"], str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise OutputError(
                    f"{self.path}:{number}: not a manifest line; use a new --out folder or --fresh to start over"
                ) from None
            yield number, line, entry

    def _read(self) -> tuple[Done, set[str]]:
        done, listed = Done(), set[str]()
        for _, _, entry in self._lines():
            done.add(entry)
            listed.update(entry.get("files") or ())
        return done, listed

    def _drop(self, statuses: Collection[str]) -> None:
        """--redo: remove the lines of these statuses. The new manifest replaces
        the old whole (and durably) before any file is deleted, so a crash
        at any point leaves each recipient either with its old line and files,
        or with neither (then it is redone)."""
        tmp = self._redo_tmp
        try:
            with open(tmp, "wb") as f:
                for _, line, entry in self._lines():
                    if entry["status"] not in statuses:
                        f.write(line)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _sweep(self, listed: set[str]) -> None:
        """Delete message files that no manifest line lists, and temporary files."""
        folder = self.out / MESSAGES
        for entry in os.scandir(folder):
            name = entry.name
            leftover = name.startswith(".") and name.endswith(".tmp")
            if (leftover or (is_message_file(name) and f"{MESSAGES}/{name}" not in listed)) and entry.is_file():
                # A shard sweeps only its own recipients' files: another shard's may be
                # in the middle of being written. A temporary file names no recipient:
                # a shard leaves them to an unsharded run or --fresh (they are hidden).
                if self.shard is not None and (leftover or not self.shard.owns_file(name)):
                    continue
                os.unlink(entry.path)

    # -- during and after the run -------------------------------------------------------

    def add(self, entry: dict[str, Any]) -> None:
        self._buffer.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":")))
        if len(self._buffer) >= self.FLUSH_LINES or self._clock() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Append the buffered lines. A disk error stops the run (OutputError);
        whatever part of them reached the disk is read back as usual next time
        (a torn last line is redone)."""
        if self._buffer and not self._broken:
            data = ("\n".join(self._buffer) + "\n").encode()
            self._buffer.clear()
            try:
                write_all(self._fd, data)
            except OSError as exc:
                self._broken = True
                raise OutputError(
                    f"{self.path}: cannot write the manifest: {exc.strerror}; the run stopped. Free space or fix "
                    "the folder, then run the same command again to resume"
                ) from None
        self._last_flush = self._clock()

    @property
    def broken(self) -> bool:
        """A write failed: some lines this run added may not be on disk."""
        return self._broken

    def sweep(self) -> Done | None:
        """After a stop: delete the files of recipients whose lines were never
        written, so messages/ holds exactly what the manifest lists; return what
        the manifest on disk holds. Best effort (None): what a dead disk keeps,
        the next run's start sweeps."""
        try:
            on_disk, listed = self._read()
            self._sweep(listed)
            return on_disk
        except (OSError, OutputError):
            return None

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._release()
            if self._clearing is not None:
                self._clearing.join()


_ASIDE = ".emailpers-old-"  # messages/ of an earlier run, being deleted behind this one


def _set_aside(messages: Path) -> None:
    """Move a non-empty messages/ out of the way at once (one rename)."""
    try:
        if any(os.scandir(messages)):
            os.rename(messages, messages.with_name(f"{_ASIDE}{uuid.uuid4().hex[:12]}"))
    except FileNotFoundError:
        pass


def _clear_behind(out: Path) -> threading.Thread | None:
    """Start deleting every set-aside folder of `out` in a thread; None when there is none."""
    folders = [Path(e.path) for e in os.scandir(out) if e.name.startswith(_ASIDE) and e.is_dir(follow_symlinks=False)]
    if not folders:
        return None
    thread = threading.Thread(target=_clear, args=(folders, out / MESSAGES), name="emailpers-fresh", daemon=True)
    thread.start()
    return thread


def _clear(folders: list[Path], messages: Path) -> None:
    """Delete emailpers' own files (and temporary ones); move anything else
    back into messages/ unless a file of that name is there by now."""
    for folder in folders:
        try:
            for entry in os.scandir(folder):
                name = entry.name
                own = (name.startswith(".") and name.endswith(".tmp")) or is_message_file(name)
                if own and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                elif not (messages / name).exists():
                    os.rename(entry.path, messages / name)
            os.rmdir(folder)
        except OSError:
            continue  # left for the next run, which tries again


def hold_lock(path: Path, mode: int) -> int | None:
    """A descriptor holding `mode` (LOCK_EX or LOCK_SH) on `path` until it is
    closed; None when another process holds the lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write `path` whole unless it exists; False when it did (another shard was first)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_atomic(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
