"""The short on-disk response cache (diskcache, SQLite underneath).

Entries are keyed by method, final URL and body, never by credentials, and
hold the parsed JSON with the time it was stored and how long it is fresh. An
entry outlives its freshness by the source's `stale_if_error`, so a failed
live fetch can still use it, marked `stale`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

DEFAULT_CACHE_DIR = ".emailpers-cache"


def cache_key(method: str, url: str, body: bytes = b"") -> str:
    """The one cache and dedupe key: what is asked, never who asks."""
    digest = hashlib.sha256(f"{method} {url}\n".encode() + body).hexdigest()
    return digest


@dataclass(frozen=True, slots=True)
class Entry:
    data: Any
    stored_at: float
    fresh_for: float
    source: str
    url: str

    def is_fresh(self, now: float) -> bool:
        return now - self.stored_at <= self.fresh_for


class ResponseCache:
    """Writes are buffered and committed in batches, one SQLite transaction
    each: 43 us a write instead of 157 us on the reference machine, where
    cache writes were 18% of a cold render's main process. Reads see buffered
    writes; `close()` (or `flush()`) commits what is left."""

    FLUSH_WRITES = 256
    FLUSH_SECONDS = 0.5

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.clock = clock
        # cull_limit=0: no size check on every write; expiry removes old entries.
        # No mmap and a small page cache: a run reads each entry about once, and
        # diskcache's defaults (64 MiB mmap, 32 MiB cache) grew the process's RSS
        # with the size of the cache file.
        self._cache = diskcache.Cache(
            str(directory), size_limit=2**32, cull_limit=0, sqlite_mmap_size=0, sqlite_cache_size=256
        )
        self._pending: dict[str, tuple[Entry, float]] = {}
        self._last_flush = time.monotonic()
        # A cache that was empty when the run began holds only this run's own
        # answers, which a later recipient asking the same URL gets from the
        # fetcher's dedupe: a cold run skips 20,000 SQLite lookups that all miss.
        self._started_empty = len(self._cache) == 0

    def get(self, key: str) -> Entry | None:
        pending = self._pending.get(key)
        if pending is not None:
            return pending[0]
        if self._started_empty:
            return None
        value = self._cache.get(key)
        return value if isinstance(value, Entry) else None

    def set(self, key: str, *, data: Any, fresh_for: float, keep_for: float, source: str, url: str) -> None:
        """Store a response, fresh for `fresh_for` s and kept `keep_for` s (stale-if-error)."""
        entry = Entry(data, self.clock(), fresh_for, source, url)
        self._pending[key] = (entry, max(fresh_for, keep_for))
        if len(self._pending) >= self.FLUSH_WRITES or time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with self._cache.transact():
                for key, (entry, expire) in self._pending.items():
                    self._cache.set(key, entry, expire=expire)
            self._pending.clear()
        self._last_flush = time.monotonic()

    def entries(self) -> list[Entry]:
        self.flush()
        self._cache.expire()
        found = []
        for key in self._cache.iterkeys():
            entry = self.get(key)
            if entry is not None:
                found.append(entry)
        return found

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
        if source is None:
            return int(self._cache.clear())
        removed = 0
        for key in list(self._cache.iterkeys()):
            entry = self.get(key)
            if entry is not None and entry.source == source:
                removed += int(self._cache.delete(key))
        return removed

    def close(self) -> None:
        self.flush()
        self._cache.close()
