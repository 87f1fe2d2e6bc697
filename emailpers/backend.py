"""What a backend shared by a run's shards provides to the fetch layer.

Without one (the default) a run is alone: its cache is the disk folder
(cache.py), its rate limits and concurrency caps are in-process (pacing.py,
limits.py), its OAuth token is its own (auth.py), its request dedupe
covers its own recipients (fetch.py) and its error guard judges its own
fetches (tally.py). A `SharedBackend` (redis_backend.py) replaces each of
those with one every shard sees. The fetch layer depends only on these
protocols, never on Redis.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from emailpers.cache import Entry, ResponseCache
from emailpers.campaign import Source


class CacheStore(Protocol):
    """The response cache: the same keys (cache.cache_key), entries and TTLs as the disk cache."""

    async def get(self, key: str) -> Entry | None: ...

    async def set(self, key: str, *, data: Any, fresh_for: float, keep_for: float, source: str, url: str) -> None: ...


class DiskStore:
    """The disk cache (the default) as a CacheStore."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def get(self, key: str) -> Entry | None:
        return self.cache.get(key)

    async def set(self, key: str, *, data: Any, fresh_for: float, keep_for: float, source: str, url: str) -> None:
        self.cache.set(key, data=data, fresh_for=fresh_for, keep_for=keep_for, source=source, url=url)


class Limiter(Protocol):
    """A source's rate limit: returns when this request may go."""

    async def wait(self) -> None: ...


@dataclass(frozen=True)
class SharedToken:
    """An OAuth token as every shard sees it; its expiry in wall-clock seconds
    (the shards' monotonic clocks share no origin)."""

    token: str
    expires_at: float
    lifetime: float
    bases: Mapping[str, str]


class TokenStore(Protocol):
    """One OAuth token for all shards: renewed by one shard under `lock`, the
    others wait for the lock, then read what it stored."""

    def lock(self, key: str) -> AbstractAsyncContextManager[None]: ...

    async def load(self, key: str) -> SharedToken | None: ...

    async def save(self, key: str, token: SharedToken) -> None: ...


class Dedupe(Protocol):
    """Identical requests across shards: one shard claims a key and fetches;
    the others wait for its answer in the shared cache."""

    async def claim(self, key: str, hold_for: float) -> bool: ...

    async def release(self, key: str) -> None: ...

    async def wait(self, key: str, cache: CacheStore, hold_for: float) -> Entry | None: ...


class GuardWindow(Protocol):
    """The error guard's window over every shard's fetches of a source: raises
    UnhealthySource in every shard once the shared share of failures is too high."""

    async def check(self, name: str, error: str | None) -> None: ...


class SharedBackend(Protocol):
    cache: CacheStore
    tokens: TokenStore
    dedupe: Dedupe
    guard: GuardWindow

    def rate_limiter(self, source: Source) -> Limiter: ...

    def slots(self, source: Source, limit: int) -> AbstractAsyncContextManager[None]: ...

    async def close(self) -> None: ...
