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
    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.clock = clock
        self._cache = diskcache.Cache(str(directory), size_limit=2**32, eviction_policy="least-recently-stored")

    def get(self, key: str) -> Entry | None:
        value = self._cache.get(key)
        return value if isinstance(value, Entry) else None

    def set(self, key: str, *, data: Any, fresh_for: float, keep_for: float, source: str, url: str) -> None:
        """Store a response, fresh for `fresh_for` s and kept `keep_for` s (stale-if-error)."""
        entry = Entry(data, self.clock(), fresh_for, source, url)
        self._cache.set(key, entry, expire=max(fresh_for, keep_for))

    def entries(self) -> list[Entry]:
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
        if source is None:
            return int(self._cache.clear())
        removed = 0
        for key in list(self._cache.iterkeys()):
            entry = self.get(key)
            if entry is not None and entry.source == source:
                removed += int(self._cache.delete(key))
        return removed

    def close(self) -> None:
        self._cache.close()
