"""The backend a run's shards share, in Redis (`--backend redis://host:6379/0`),
through redis-py's asyncio client.

    emailpers:cache:<cache_key>             an entry, as the disk cache stores it (cache.Entry), with its TTL
    emailpers:inflight:<cache_key>          a shard fetching that URL now (the others wait for its entry)
    emailpers:token:<identity>              the OAuth token of an [auth] table, and :lock while one shard renews it
    emailpers:<campaign hash>:<source>:rate      when the next request may go (GCRA, in Lua)
    emailpers:<campaign hash>:<source>:slots     requests in flight over all shards (leases, so a killed shard's expire)
    emailpers:<campaign hash>:<source>:guard     the error guard's window, and :tripped once a shard stopped on it

Any Redis error once the run is going raises BackendError: the shard stops
cleanly (what it finished is in its journal) instead of going on with limits
of its own. Keys hold no secret but the short-lived OAuth token (with its
lifetime as TTL); the client secret never leaves the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from emailpers.backend import CacheStore, Dedupe, GuardWindow, SharedToken, TokenStore
from emailpers.cache import Entry
from emailpers.campaign import Source
from emailpers.errors import BackendError, UnhealthySource
from emailpers.tally import HEALTH_MINIMUM, HEALTH_WINDOW, unhealthy

T = TypeVar("T")

MAX_CONNECTIONS = 64  # per shard; redis-py's asyncio pool raises past its cap, the blocking one waits
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0  # a Redis that does not answer within this is lost
POLL = 0.01  # seconds between looks at a key another shard holds (a slot, a lock, an entry)
TOKEN_LOCK_SECONDS = 30.0  # a token renewal's lock (the request's timeout is 10 s); a killed holder's expires
TRIP_SECONDS = 30.0  # a tripped guard stops every shard that fetches that source within this long
GUARD_IDLE_SECONDS = 600.0  # a guard window nobody added to for this long is forgotten
# The API counts requests as they arrive, and a busy machine delays a request
# between its grant and its arrival by tens of milliseconds (4 shards on 2
# loaded cores). A window 10% longer than the rate asks keeps such delays from
# fitting rate + 1 arrivals into one second, for 10% of the throughput.
RATE_MARGIN = 0.10

# GCRA (a token bucket of one): a request may go once Redis's clock reaches the
# theoretical arrival time in KEYS[1], which then moves one interval on. Asked
# right before a request goes (a waiter that wakes asks again), so no oversleep
# lies between the grant and the send, and requests go evenly spaced, not in bursts.
_SEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tat then return string.format('%.6f', tat - now) end
local interval = tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.6f', now + interval), 'PX', math.ceil(interval * 1000) + 1000)
return '0'
"""
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
  return 1
end
return 0
"""
_GUARD = """
local tripped = redis.call('GET', KEYS[2])
if tripped then return {tripped, 0, 0} end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
local failed = 0
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for _, v in ipairs(items) do if v ~= '' then failed = failed + 1 end end
return {'', failed, #items}
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def public_url(url: str) -> str:
    """The backend URL as it may be shown: without its password."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "the --backend URL"


def _import_redis() -> Any:
    try:
        import redis
        import redis.asyncio  # noqa: F401 - an optional extra
    except ImportError:
        raise BackendError(
            "--backend needs the redis client: pip install 'emailpers[redis]'"
        ) from None
    return redis


def check_reachable(url: str) -> None:
    """Before anything runs: the backend answers, or BackendError naming it (without password)."""
    redis = _import_redis()
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise BackendError(
            f"cannot reach the backend {public_url(url)}: {_reason(exc, url)}; start Redis there or fix --backend "
            "(EMAILPERS_BACKEND, [run] backend)"
        ) from None


def _reason(exc: BaseException, url: str) -> str:
    """An exception as text without the URL's password (redis-py may quote the URL)."""
    text = f"{type(exc).__name__}: {exc}"
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text[:200].rstrip(".")


class RedisBackend:
    """The shared backend; built inside the run's event loop by `connect`."""

    def __init__(self, client: Any, url: str, campaign: str, redis_module: Any, max_error_rate: float | None) -> None:
        self.client = client
        self.url = url
        self._redis = redis_module
        self._prefix = f"emailpers:{namespace(campaign)}"
        self._send = client.register_script(_SEND)
        self._take_slot = client.register_script(_TAKE_SLOT)
        self._guard = client.register_script(_GUARD)
        self._release_lock = client.register_script(_RELEASE_LOCK)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.cache: CacheStore = _Cache(self)
        self.tokens: TokenStore = _Tokens(self)
        self.dedupe: Dedupe = _Dedupe(self)
        self.guard: GuardWindow = _Guard(self, max_error_rate)

    @classmethod
    async def connect(cls, url: str, campaign: str, max_error_rate: float | None) -> RedisBackend:
        """`max_error_rate`: the guard's, as the run's HealthGuard has it (None: never stop)."""
        redis = _import_redis()
        try:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=COMMAND_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
            )  # fmt: skip
            client = redis.asyncio.Redis(connection_pool=pool)
            await client.ping()
        except (redis.RedisError, ValueError, OSError) as exc:
            raise BackendError(f"cannot reach the backend {public_url(url)}: {_reason(exc, url)}") from None
        return cls(client, url, campaign, redis, max_error_rate)

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (self._redis.RedisError, OSError):
            pass

    async def call(self, command: Callable[[], Awaitable[T]]) -> T:
        """One Redis round trip; a lost Redis stops the shard (BackendError)."""
        try:
            return await command()
        except (self._redis.RedisError, OSError) as exc:
            raise BackendError(
                f"lost the backend {public_url(self.url)} mid-run ({_reason(exc, self.url)}); this shard stopped rather "
                "than go on with limits of its own. Its finished recipients are in its journal: run the same "
                "command again once Redis is back"
            ) from None

    def key(self, source: Source | str, what: str) -> str:
        name = source if isinstance(source, str) else source.name
        return f"{self._prefix}:{name}:{what}"

    def rate_limiter(self, source: Source) -> _RateLimit:
        assert source.rate_limit is not None
        return _RateLimit(self, self.key(source, "rate"), (1.0 + RATE_MARGIN) / source.rate_limit)

    def slots(self, source: Source, limit: int) -> _Slots:
        # A lease outlives any one attempt (its timeout, a 401 renewal and the retry).
        return _Slots(self, self.key(source, "slots"), limit, lease=2 * source.timeout + 10)


class _RateLimit:
    """A source's rate_limit over every shard: requests at least `interval` apart."""

    def __init__(self, backend: RedisBackend, key: str, interval: float) -> None:
        self.backend, self.key, self.interval = backend, key, interval
        # One waiter per shard asks Redis at a time; the others queue here, not in Redis.
        self._turn = asyncio.Lock()

    async def wait(self) -> None:
        args = [f"{self.interval:.6f}"]
        async with self._turn:
            while (delay := float(await self.backend.call(lambda: self.backend._send(keys=[self.key], args=args)))) > 0:
                await asyncio.sleep(delay)


class _Slots(AbstractAsyncContextManager[None]):
    """A source's concurrency over every shard: a sorted set of leases."""

    def __init__(self, backend: RedisBackend, key: str, limit: int, lease: float) -> None:
        self.backend, self.key, self.limit, self.lease = backend, key, limit, lease
        self._held: dict[asyncio.Task[Any] | None, str] = {}
        # While the slots are taken, one waiter per shard asks Redis (every POLL, and at
        # once when this shard frees one); the others queue here, as _RateLimit's do.
        self._turn = asyncio.Lock()
        self._freed = asyncio.Event()

    async def __aenter__(self) -> None:
        holder = f"{self.backend.holder}:{uuid.uuid4().hex[:12]}"
        script = self.backend._take_slot

        async def take() -> bool:
            return bool(await self.backend.call(lambda: script(keys=[self.key], args=[self.limit, holder, self.lease])))

        if not await take():
            async with self._turn:
                while not await take():
                    self._freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._freed.wait(), POLL)
        self._held[asyncio.current_task()] = holder

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        holder = self._held.pop(asyncio.current_task(), None)
        if holder is not None:
            await self.backend.call(lambda: self.backend.client.zrem(self.key, holder))
            self._freed.set()


class _Cache:
    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    async def get(self, key: str) -> Entry | None:
        raw = await self.backend.call(lambda: self.backend.client.get(f"emailpers:cache:{key}"))
        return Entry.decode(raw)  # anything that is not one of our entries is a miss

    async def set(self, key: str, *, data: Any, fresh_for: float, keep_for: float, source: str, url: str) -> None:
        try:
            raw = Entry(data, time.time(), fresh_for, source, url).encode()
        except (ValueError, RecursionError):  # nested past what json.dumps can write: not cached, as on disk
            return
        ttl = max(1, math.ceil(max(fresh_for, keep_for) * 1000))
        await self.backend.call(lambda: self.backend.client.set(f"emailpers:cache:{key}", raw, px=ttl))


class _Tokens:
    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    @asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        name = f"emailpers:token:{key}:lock"
        mine = uuid.uuid4().hex
        client = self.backend.client
        px = int(TOKEN_LOCK_SECONDS * 1000)
        while not await self.backend.call(lambda: client.set(name, mine, nx=True, px=px)):
            await asyncio.sleep(POLL * 5)
        try:
            yield
        finally:
            await self.backend.call(lambda: self.backend._release_lock(keys=[name], args=[mine]))

    async def load(self, key: str) -> SharedToken | None:
        raw = await self.backend.call(lambda: self.backend.client.get(f"emailpers:token:{key}"))
        try:
            record = json.loads(raw) if raw is not None else None
            return SharedToken(str(record["token"]), float(record["expires_at"]), float(record["lifetime"]),
                               {str(k): str(v) for k, v in record["bases"].items()}) if record else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    async def save(self, key: str, token: SharedToken) -> None:
        raw = json.dumps({"token": token.token, "expires_at": token.expires_at, "lifetime": token.lifetime,
                          "bases": dict(token.bases)})
        ttl = max(1, math.ceil((token.expires_at - time.time()) * 1000))
        await self.backend.call(lambda: self.backend.client.set(f"emailpers:token:{key}", raw, px=ttl))


class _Dedupe:
    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    async def claim(self, key: str, hold_for: float) -> bool:
        client, px = self.backend.client, max(1, math.ceil(hold_for * 1000))
        return bool(await self.backend.call(lambda: client.set(f"emailpers:inflight:{key}", self.backend.holder,
                                                              nx=True, px=px)))

    async def release(self, key: str) -> None:
        await self.backend.call(lambda: self.backend.client.delete(f"emailpers:inflight:{key}"))

    async def wait(self, key: str, cache: CacheStore, hold_for: float) -> Entry | None:
        """The entry another shard's fetch stores, once its claim ends; None if it
        stored none (an error, no-store) or took longer than `hold_for`."""
        loop = asyncio.get_running_loop()
        until = loop.time() + hold_for
        client = self.backend.client
        while loop.time() < until:
            if not await self.backend.call(lambda: client.exists(f"emailpers:inflight:{key}")):
                return await cache.get(key)
            await asyncio.sleep(POLL)
        return None


class _Guard:
    def __init__(self, backend: RedisBackend, max_error_rate: float | None) -> None:
        self.backend = backend
        self.max_error_rate = max_error_rate

    async def check(self, name: str, error: str | None) -> None:
        rate = self.max_error_rate
        if rate is None:
            return
        window, tripped = self.backend.key(name, "guard"), self.backend.key(name, "guard:tripped")
        script, client = self.backend._guard, self.backend.client
        args = [error or "", HEALTH_WINDOW, int(GUARD_IDLE_SECONDS * 1000)]
        message, failed, total = await self.backend.call(lambda: script(keys=[window, tripped], args=args))
        if message:
            raise unhealthy_from(message)
        if total >= HEALTH_MINIMUM and failed / total > rate:
            items = await self.backend.call(lambda: client.lrange(window, 0, -1))
            common = Counter(i.decode("utf-8", "replace") for i in items if i).most_common(1)
            exc = unhealthy(name, failed, total, rate, common[0][0] if common else "unknown")
            await self.backend.call(lambda: client.set(tripped, str(exc), ex=int(TRIP_SECONDS), nx=True))
            await self.backend.call(lambda: client.delete(window))  # a rerun after the fix starts a new window
            raise exc


def unhealthy_from(message: bytes | str) -> UnhealthySource:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return UnhealthySource(text + " (found by another shard)")


def namespace(campaign_name: str) -> str:
    """The campaign's key prefix, safe whatever its name holds."""
    return hashlib.sha256(campaign_name.encode()).hexdigest()[:16]
