"""The short on-disk response cache (diskcache, SQLite underneath).

Entries are keyed by method, final URL, the source's request headers and an
identity of its credentials (an HMAC keyed by the secret, never the secret),
and hold the parsed JSON with the time it was stored and how long it is fresh.
An entry outlives its freshness by the source's `stale_if_error`, so a failed
live fetch can still use it, marked `stale`.

The folder is data from outside (committed to a repository, unpacked from an
archive, shared in CI), so reading it never runs code: entries are JSON text
in the database rows, never pickles or files, and a row diskcache would
unpickle (or read from a file it names) is a miss. An entry that does not
parse is a miss too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diskcache

from emailpers import jsondata
from emailpers.errors import CacheError
from emailpers.flat import Recent, Sketch

if TYPE_CHECKING:
    from emailpers.campaign import Auth

DEFAULT_CACHE_DIR = ".emailpers-cache"
# Seconds to wait for another process's lock on the cache database; diskcache
# waits 60 s, and a cron run minutes before a send cannot.
LOCK_TIMEOUT = 2.0
# diskcache reads its settings from the folder's own Settings table, runs the
# `sqlite_*` ones as PRAGMA statements and passes the `disk_*` ones to the Disk:
# every setting is passed here, which overrides what a hostile folder wrote,
# and a folder with any other setting is refused.
_SETTINGS: dict[str, Any] = {
    "statistics": 0,
    "tag_index": 0,
    "size_limit": 2**32,
    # No size check on every write; expiry removes old entries.
    "cull_limit": 0,
    "eviction_policy": "least-recently-stored",
    # No mmap and a small page cache: a run reads each entry about once, and
    # diskcache's defaults (64 MiB mmap, 32 MiB cache) grew the process's RSS
    # with the size of the cache file.
    "sqlite_mmap_size": 0,
    "sqlite_cache_size": 256,
    "sqlite_auto_vacuum": 1,
    "sqlite_journal_mode": "wal",
    "sqlite_synchronous": 1,
    "disk_min_file_size": 2**31,  # never a file: _DataOnlyDisk keeps every value in its row
    "disk_pickle_protocol": 5,
}


def request_identity(headers: Mapping[str, str], auth: Auth | None) -> str:
    """Who asks, as far as an answer may depend on it: the source's own
    request headers and, for credentials, an HMAC keyed by the secret over
    the rest of the auth configuration. The secret itself never reaches the
    key, and an OAuth source is identified by its client, not by its
    short-lived token, so its answers stay cached across token renewals."""
    parts = sorted(f"{name.lower()}: {value}" for name, value in headers.items())
    if auth is not None:
        secret = auth.client_secret if auth.kind == "oauth2" else auth.secret
        # token_params pick what the token grants (Marketing Cloud's account_id: a business unit).
        params = [f"{k}={v}" for k, v in (*auth.token_params, *auth.secret_token_params)]
        config = "\0".join(
            [auth.kind, auth.header_name.lower(), auth.username, auth.token_url, auth.client_id, auth.scope, *params]
        )
        mac = hmac.new(secret.encode(), b"emailpers-cache-identity\0" + config.encode(), hashlib.sha256)
        parts.append(f"auth: {mac.hexdigest()[:32]}")
    return "\n".join(parts)


def cache_key(method: str, url: str, identity: str = "", body: bytes = b"") -> str:
    """The one cache and dedupe key: what is asked, and who asks (`identity`
    from `request_identity`)."""
    head = f"{method} {url}\n{len(identity)}:{identity}\n".encode()
    return hashlib.sha256(head + body).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    data: Any
    stored_at: float
    fresh_for: float
    source: str
    url: str

    def is_fresh(self, now: float) -> bool:
        return now - self.stored_at <= self.fresh_for

    def encode(self) -> bytes:
        record = {"data": self.data, "stored_at": self.stored_at, "fresh_for": self.fresh_for,
                  "source": self.source, "url": self.url}
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: object) -> Entry | None:
        """The entry in `raw`, or None for anything that is not one of ours."""
        if not isinstance(raw, bytes):
            return None
        try:  # within the limits of a live answer, plus the record around it
            record = jsondata.load(raw, jsondata.MAX_VALUES + 6, jsondata.MAX_DEPTH + 1)
        except jsondata.Refused:
            return None
        if not isinstance(record, dict) or set(record) != {"data", "stored_at", "fresh_for", "source", "url"}:
            return None
        stored_at, fresh_for = record["stored_at"], record["fresh_for"]
        numbers = all(type(n) in (int, float) and math.isfinite(n) for n in (stored_at, fresh_for))
        if not numbers or not isinstance(record["source"], str) or not isinstance(record["url"], str):
            return None
        return cls(record["data"], float(stored_at), float(fresh_for), record["source"], record["url"])


class _Refused(Exception):
    """A row this cache did not write: read as a miss."""


class _DataOnlyDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache has no type hints
    """diskcache's serialisation, cut down to bytes in the database row. The
    stock Disk unpickles any row whose mode or key flag says pickle, and reads
    or deletes any file a row names; a cache folder is not trusted that far."""

    def put(self, key: object) -> tuple[object, bool]:
        if type(key) is not str:
            raise TypeError("cache keys are str")
        return key, True

    def get(self, key: object, raw: bool) -> object:
        # A key flagged as pickled: an impossible key, so lookups of it miss.
        return key if raw and isinstance(key, str) else b""

    def store(self, value: object, read: bool, key: object = None) -> tuple[int, int, None, sqlite3.Binary]:
        if type(value) is not bytes:
            raise TypeError("cache values are bytes")
        return 0, diskcache.core.MODE_RAW, None, sqlite3.Binary(value)

    def fetch(self, mode: int, filename: object, value: object, read: bool) -> bytes:
        if mode != diskcache.core.MODE_RAW or not isinstance(value, bytes):
            raise _Refused
        return value

    def remove(self, file_path: str) -> None:
        # Rows this cache writes name no file; one that does came from elsewhere
        # and may name any path (`../../.ssh/id_rsa`): never delete it.
        return None


def _unusable(directory: Path, problem: str) -> CacheError:
    return CacheError(
        f"{directory}: the response cache cannot be used ({problem}). It holds only cached API "
        "responses: delete the folder to start a new one, point --cache-dir (or EMAILPERS_CACHE_DIR) "
        "elsewhere, or run with --no-cache"
    )


def _check_folder(directory: Path) -> None:
    """Refuse, before diskcache touches it, a folder that is no cache of ours:
    not a directory, not writable, not a database (or a symbolic link to one
    elsewhere), locked by another process,
    or with settings diskcache does not have (it runs `sqlite_*` ones as PRAGMAs)
    or counters that are no integers."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unusable(directory, f"cannot create it: {exc.strerror or exc}") from None
    database = directory / diskcache.core.DBNAME
    for path in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        if path.is_symlink():  # SQLite would write its pages wherever it points
            raise _unusable(directory, f"{path.name} is a symbolic link")
    if not os.access(directory, os.W_OK | os.X_OK) or (database.exists() and not os.access(database, os.R_OK | os.W_OK)):
        raise _unusable(directory, "not writable")
    if not database.exists():
        return
    if not database.is_file():
        raise _unusable(directory, f"{database.name} is not a file")
    try:
        connection = sqlite3.connect(database, timeout=LOCK_TIMEOUT, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")  # waits at most LOCK_TIMEOUT for a writer
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            settings = connection.execute("SELECT key, value FROM Settings").fetchall() if "Settings" in tables else []
            connection.execute("ROLLBACK")
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise _unusable(directory, f"another process has held its database locked for {LOCK_TIMEOUT:g}s") from None
        raise _unusable(directory, f"{database.name}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise _unusable(directory, f"{database.name} is damaged: {exc}") from None
    unknown = sorted(
        str(key) for key, value in settings
        if key not in _SETTINGS and (key not in diskcache.core.METADATA or type(value) is not int)
    )  # fmt: skip
    if unknown:
        raise _unusable(directory, f"its settings were not written by emailpers: {', '.join(unknown)}")


class ResponseCache:
    """Writes are buffered and committed in batches, one SQLite transaction
    each: a commit per write made cache writes a large share of a cold
    render's main process (figures: README, Performance). Reads see buffered
    writes; `close()` (or `flush()`) commits what is left.

    Opening checks the folder and raises CacheError when it cannot be used.
    Once open, a database error (a damaged page, a lock held past
    LOCK_TIMEOUT) never stops the run: a read is a miss, a failed write is
    dropped and counted in `write_errors`."""

    FLUSH_WRITES = 256
    FLUSH_SECONDS = 0.5
    # Entries read from the database stay decoded in memory, the most recently used
    # first: a key many recipients share (weather by city) is read and decoded once,
    # not once a recipient (measured: 5% of a cold run's main process at 200 ms).
    RECENT_ENTRIES = 256
    RECENT_BYTES = 4 * 2**20

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.clock = clock
        self.write_errors = 0
        _check_folder(directory)
        try:
            self._cache = diskcache.Cache(str(directory), timeout=LOCK_TIMEOUT, disk=_DataOnlyDisk, **_SETTINGS)
            # A cache that was empty when the run began holds only what this
            # instance wrote: a cold run skips 20,000 SQLite lookups that all miss.
            self._started_empty = len(self._cache) == 0
        except (sqlite3.Error, OSError, TypeError, ValueError) as exc:  # TypeError: a count that is no number
            raise _unusable(directory, f"{type(exc).__name__}: {exc}") from None
        self._pending: dict[str, tuple[Entry, bytes, float]] = {}
        # When it started empty, the keys this instance flushed: only those are worth a
        # lookup. A false "flushed" costs one lookup, never a wrong answer. A sketch, 1 MiB
        # at any count: the set of hashes it replaces grew ~60 bytes a write (59 MB of the
        # main process at a million recipients).
        self._flushed = Sketch()
        self._last_flush = time.monotonic()
        self._recent: Recent[Entry] = Recent(self.RECENT_ENTRIES, self.RECENT_BYTES)  # sized by the stored bytes

    def get(self, key: str) -> Entry | None:
        pending = self._pending.get(key)
        if pending is not None:
            return pending[0]
        if (recent := self._recent.get(key)) is not None:
            if recent.is_fresh(self.clock()):
                return recent
            self._recent.pop(key)  # past fresh, the database decides: stale, or gone
        if self._started_empty and key not in self._flushed:
            return None
        raw = self._stored(key)
        entry = Entry.decode(raw)
        if entry is not None and isinstance(raw, bytes):
            self._recent.put(key, entry, len(raw))
        return entry

    def _stored(self, key: str) -> object:
        """What the database holds for `key` (None when nothing, or nothing it may read)."""
        try:
            return self._cache.get(key)
        except (_Refused, sqlite3.Error, OSError):
            return None

    def set(self, key: str, *, data: Any, fresh_for: float, keep_for: float, source: str, url: str) -> None:
        """Store a response, fresh for `fresh_for` s and kept `keep_for` s (stale-if-error)."""
        entry = Entry(data, self.clock(), fresh_for, source, url)
        try:
            raw = entry.encode()
        except (ValueError, RecursionError):  # nested past what json.dumps can write
            self.write_errors += 1
            return
        self._recent.pop(key)
        self._pending[key] = (entry, raw, max(fresh_for, keep_for))
        if len(self._pending) >= self.FLUSH_WRITES or time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            try:
                with self._cache.transact():
                    for key, (_, raw, expire) in self._pending.items():
                        self._cache.set(key, raw, expire=expire)
                if self._started_empty:
                    for key in self._pending:
                        self._flushed.add(key)
            except (sqlite3.Error, OSError):
                self.write_errors += len(self._pending)
            self._pending.clear()
        self._last_flush = time.monotonic()

    def entries(self) -> list[Entry]:
        self.flush()
        try:
            self._cache.expire()
            keys = list(self._cache.iterkeys())
        except (sqlite3.Error, OSError) as exc:
            raise _unusable(self.directory, f"{type(exc).__name__}: {exc}") from None
        # Read past the decoded entries kept for the run: a listing must not fill them.
        return [entry for key in keys if isinstance(key, str) and (entry := Entry.decode(self._stored(key))) is not None]

    def stats(self) -> dict[str, Any]:
        """Entries, bytes on disk, and per source: entries, fresh ones, oldest."""
        now = self.clock()
        per_source: dict[str, dict[str, Any]] = {}
        entries = self.entries()
        for entry in entries:
            s = per_source.setdefault(entry.source, {"entries": 0, "fresh": 0, "oldest_age_s": 0.0})
            s["entries"] += 1
            s["fresh"] += entry.is_fresh(now)
            s["oldest_age_s"] = max(s["oldest_age_s"], round(now - entry.stored_at, 1))
        return {
            "directory": str(self.directory),
            "entries": len(entries),
            "bytes": int(self._cache.volume()),
            "oldest_age_s": max((s["oldest_age_s"] for s in per_source.values()), default=None),
            "sources": per_source,
        }

    def clear(self, source: str | None = None) -> int:
        self.flush()
        self._recent.clear()
        try:
            if source is None:
                return int(self._cache.clear())
            removed = 0
            for key in list(self._cache.iterkeys()):
                entry = Entry.decode(self._stored(key)) if isinstance(key, str) else None
                if entry is not None and entry.source == source:
                    removed += int(self._cache.delete(key))
            return removed
        except (sqlite3.Error, OSError) as exc:
            raise _unusable(self.directory, f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.flush()
        self._cache.close()
