"""Fetch each recipient's live data through the cache, request dedupe,
batching and each source's limits. One `Fetcher` per run. What it builds on
has its own module: URLs (`urls.py`), credentials (`auth.py`), when requests
go (`pacing.py`: retries, rate limits), the wire (`http.py`).

Every fetch ends in a `Fetched` value, never an exception: a source that is
late, down or returns garbage is an outcome for that recipient, and rendering
decides what to do with it. The exceptions that do escape are the ones that
should stop the run (the OAuth token endpoint refusing us, cancellation);
any other exception while fetching is that recipient's `error` outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from emailpers import jsondata
from emailpers.auth import TokenProvider, static_auth_headers
from emailpers.backend import CacheStore, DiskStore, Limiter, SharedBackend
from emailpers.batching import Batcher
from emailpers.cache import Entry, ResponseCache, cache_key, request_identity
from emailpers.campaign import Auth, Campaign, Source
from emailpers.errors import AuthFailed, BackendError, BadResponse, FetchTimeout, TransientError
from emailpers.flat import Recent
from emailpers.http import BadBody, ConnectionFailed, HttpClient, Response, parse_max_age, parse_retry_after
from emailpers.limits import Controller, Gate, Slot
from emailpers.outcome import OK_OUTCOMES
from emailpers.pacing import REAL_TIMING, RateLimiter, RetryPolicy, Timing
from emailpers.report import SourceFigures
from emailpers.urls import UrlTemplate, url_environment

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_ANSWERED_MAX = 4096  # live answers kept per run for request dedupe (least recently used go)
_ANSWERED_BYTES = 16 * 2**20  # ... and their bodies' bytes together: decoded, they take 4-24x that
_ERROR_KINDS_MAX = 32  # distinct error kinds counted per source; the rest count as "other"


@dataclass(slots=True)
class Fetched:
    """What one source gave one recipient."""

    outcome: str  # live | cache | stale | error | timeout | skipped
    data: Any = None
    attempts: int = 0
    ms: float = 0.0
    status_code: int | None = None
    error: str | None = None
    shared: bool = False  # answered by another recipient's identical request
    size: int = 0  # bytes of the response body
    storable: bool = True  # Cache-Control allows caching
    max_age: float | None = None  # Cache-Control max-age

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES



@dataclass
class _Answer:
    data: Any
    status_code: int
    cache_control: str | None
    size: int


def decode_json(body: bytes, status: int, max_values: int) -> Any:
    """A response body as JSON within the limits of `jsondata.load`."""
    try:
        return jsondata.load(body, max_values)
    except jsondata.Refused as exc:
        raise BadResponse(f"HTTP {status} but the body {exc}", status) from None


def error_kind(error: str) -> str:
    """A recipient's error text as a counter key: what went wrong, not the
    details after a colon (a URL, a recipient id, an exception text), which
    the API or the data control."""
    return error.partition(":")[0].strip()[:80]


class _SourceRuntime:
    """Per source, per run: compiled URL templates, headers, limits, stats."""

    def __init__(self, source: Source, env: SandboxedEnvironment, fetcher: Fetcher) -> None:
        self.source = source
        self.url = UrlTemplate(source.url, env)
        self.batch_url = env.from_string(source.batch.url) if source.batch else None
        self.headers = {**source.headers, **static_auth_headers(source.auth)}
        self.identity = request_identity(source.headers, source.auth)
        self.token = fetcher.token_provider(source.auth) if source.auth and source.auth.kind == "oauth2" else None
        if self.token is not None and source.base_url_from is not None:
            self.token.base_fields.add(source.base_url_from)
        timing = fetcher.timing
        # The source's own `concurrency` and the run's are ceilings; within
        # them the limit adapts to how the API answers (limits.py).
        ceiling = min(source.concurrency or fetcher.concurrency, fetcher.concurrency)
        log = fetcher.log_limit
        self.limit = Controller(
            ceiling, timing.clock, adaptive=fetcher.adaptive,
            on_change=None if log is None else lambda limit, why: log(f"{source.name}: in flight limit {limit} ({why})"),
        )  # fmt: skip
        self.slots = Gate(self.limit)
        # With a shared backend, a source's limits hold over every shard: its `rate_limit`,
        # and its `concurrency`, within which each shard's own limit still adapts.
        shared = fetcher.backend
        self.rate: Limiter | None = None
        if source.rate_limit:
            self.rate = shared.rate_limiter(source) if shared else RateLimiter(source.rate_limit, timing.clock, timing.sleep)
        self.shared_slots: AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if shared is not None and source.concurrency:
            self.shared_slots = shared.slots(source, source.concurrency)
        self.policy = RetryPolicy.of(source, timing)
        self.stats = SourceFigures()
        self.batcher: Batcher[str, Fetched] | None = None
        if source.batch is not None:
            self.batcher = Batcher(source.batch.size, source.batch.linger, partial(fetcher._send_batch, self))

    async def absolute(self, url: str) -> str:
        """The request URL: with base_url_from, the current token's base URL
        (checked when the token arrived) followed by the rendered path."""
        if self.source.base_url_from is None:
            return url
        assert self.token is not None  # the campaign loader requires oauth2 auth
        return await self.token.base_url(self.source.base_url_from) + url


class Fetcher:
    """Gets each source's data for each recipient. Collaborators are passed in
    so tests can give it a real loopback client, a real cache folder and a
    fake clock (`timing`)."""

    def __init__(
        self,
        campaign: Campaign,
        client: HttpClient,
        cache: ResponseCache | CacheStore | None,
        *,
        offline: bool = False,
        concurrency: int = 32,
        adaptive: bool = True,
        timing: Timing = REAL_TIMING,
        backend: SharedBackend | None = None,
        log_limit: Callable[[str], None] | None = None,
    ) -> None:
        """`log_limit`: a line for each change of a source's in-flight limit (-v)."""
        self.client = client
        self.log_limit = log_limit
        # The disk cache is read in this thread; a shared one (backend.CacheStore) over the network.
        self.store: CacheStore | None = DiskStore(cache) if isinstance(cache, ResponseCache) else cache
        self.backend = backend  # shared with other shards: cache, limits, token, dedupe (backend.py)
        self.offline = offline
        self.concurrency = concurrency
        self.adaptive = adaptive
        self.timing = timing
        self.clock = timing.clock
        self.wall_clock = timing.wall_clock
        self.id_field = campaign.recipients.id_field
        self._tokens: dict[Auth, TokenProvider] = {}
        env = url_environment()
        self.sources = {name: _SourceRuntime(s, env, self) for name, s in campaign.sources.items()}
        self._inflight: dict[str, asyncio.Future[Fetched]] = {}
        self._answered: Recent[Fetched] = Recent(_ANSWERED_MAX, _ANSWERED_BYTES)

    def token_provider(self, auth: Auth) -> TokenProvider:
        # Keyed by the whole configuration: an [auth.X] table and a source X
        # with inline auth share a name, not credentials.
        if auth not in self._tokens:
            store = self.backend.tokens if self.backend is not None else None
            self._tokens[auth] = TokenProvider(auth, self.client, self.clock, store=store, wall_clock=self.wall_clock)
        return self._tokens[auth]

    def stats(self) -> dict[str, SourceFigures]:
        for runtime in self.sources.values():
            if runtime.token:
                runtime.stats.token_renewals = runtime.token.renewals
            runtime.stats.concurrency = runtime.limit.figures()
        return {name: runtime.stats for name, runtime in self.sources.items()}

    async def fetch_all(self, fields: dict[str, Any], names: list[str] | None = None) -> dict[str, Fetched]:
        """Every source for one recipient, concurrently."""
        names = list(self.sources) if names is None else names
        if len(names) == 1:
            return {names[0]: await self.fetch(names[0], fields)}
        results = await asyncio.gather(*(self.fetch(name, fields) for name in names))
        return dict(zip(names, results, strict=True))

    async def fetch(self, name: str, fields: dict[str, Any]) -> Fetched:
        """One source for one recipient. Only AuthFailed and cancellation
        escape: anything else that goes wrong (a parser's RecursionError, a
        header no one foresaw) is this recipient's error, and its fallback."""
        try:
            return await self._fetch(self.sources[name], fields)
        except (AuthFailed, BackendError):
            raise
        except Exception as exc:
            return self._count(self.sources[name].stats, Fetched("error", error=f"unexpected error: {type(exc).__name__}"))

    async def _fetch(self, runtime: _SourceRuntime, fields: dict[str, Any]) -> Fetched:
        stats = runtime.stats
        try:
            url = runtime.url.render(fields)
        except jinja2.UndefinedError as exc:
            return self._count(stats, Fetched("error", error=f"cannot build the url: {exc}"))
        if runtime.source.base_url_from is not None and self.offline:
            # No token request offline, so no base URL and no cache key.
            return Fetched("skipped", error=f"offline: base URL comes from a token ({runtime.source.base_url_from})")
        # `url` is only a path for a base_url_from source: each attempt puts the
        # current token's base before it (_send). The key is on the whole URL.
        final_url = await runtime.absolute(url)
        key = cache_key("GET", final_url, runtime.identity)
        cached = await self._cached(key) if runtime.source.cache_ttl > 0 else None
        if cached is not None and cached.is_fresh(self.wall_clock()):
            stats.cache_hits += 1
            return Fetched("cache", cached.data)
        if self.offline:
            if cached is not None and runtime.source.stale_if_error:
                stats.stale += 1
                return Fetched("stale", cached.data)
            return Fetched("skipped", error="offline and not in the cache")

        if (waiting := self._inflight.get(key)) is not None:
            stats.dedupe_hits += 1
            return replace(await asyncio.shield(waiting), shared=True)
        if (answered := self._answered.get(key)) is not None:
            stats.dedupe_hits += 1
            return answered
        future: asyncio.Future[Fetched] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        claimed = False
        try:
            shared, claimed = await self._other_shard(runtime, key)
            if shared is not None:
                stats.dedupe_hits += 1
                future.set_result(shared)
                return shared
            if runtime.batcher is not None:
                result = await runtime.batcher.submit(str(fields[self.id_field]))
            else:
                result = await self._network(runtime, url)
            if not result.ok and cached is not None and runtime.source.stale_if_error:
                stats.stale += 1
                result = replace(result, outcome="stale", data=cached.data)
            elif result.outcome == "live" and not result.shared:
                await self._store(runtime, key, final_url, result)
                self._remember(key, result)
            future.set_result(result)
            return self._count(stats, result)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: dedupe waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[key]
            if claimed:
                assert self.backend is not None
                await self.backend.dedupe.release(key)

    async def _cached(self, key: str) -> Entry | None:
        return await self.store.get(key) if self.store is not None else None

    async def _other_shard(self, runtime: _SourceRuntime, key: str) -> tuple[Fetched | None, bool]:
        """With a shared backend: claim the request, or wait for the shard that did
        and take its answer from the shared cache. (None, whether we hold the
        claim): fetch it here."""
        if self.backend is None or self.store is None:
            return None, False
        source = runtime.source
        hold_for = source.deadline + source.timeout  # the longest one fetch may take, retries included
        if await self.backend.dedupe.claim(key, hold_for):
            return None, True
        entry = await self.backend.dedupe.wait(key, self.store, hold_for)
        if entry is None or not entry.is_fresh(self.wall_clock()):
            return None, False  # it stored nothing (an error, no-store): ask ourselves
        return Fetched("cache", entry.data, shared=True), False

    def _remember(self, key: str, result: Fetched) -> None:
        """Recent live answers, so a later recipient asking the same URL in this
        run shares it even when the cache is off or the API said no-store."""
        self._answered.put(key, replace(result, shared=True), result.size)

    def _count(self, stats: SourceFigures, result: Fetched) -> Fetched:
        if not result.ok and not result.shared:
            stats.errors += 1
            kind = error_kind(result.error or result.outcome)
            if kind not in stats.error_kinds and len(stats.error_kinds) >= _ERROR_KINDS_MAX - 1:  # one left for "other"
                kind = "other"
            stats.error_kinds[kind] = stats.error_kinds.get(kind, 0) + 1
        return result

    async def _store(self, runtime: _SourceRuntime, key: str, url: str, result: Fetched) -> None:
        source = runtime.source
        if self.store is None or source.cache_ttl <= 0 or not result.storable:
            return
        fresh_for = source.cache_ttl if result.max_age is None else min(source.cache_ttl, result.max_age)
        await self.store.set(
            key, data=result.data, fresh_for=fresh_for, keep_for=fresh_for + source.stale_if_error,
            source=source.name, url=url,
        )

    async def _send_batch(self, runtime: _SourceRuntime, ids: list[str]) -> list[Fetched]:
        """One request for a batch of recipients; each gets its own object."""
        batch = runtime.source.batch
        assert batch is not None and runtime.batch_url is not None
        runtime.stats.batches += 1
        result = await self._network(runtime, runtime.batch_url.render(ids=ids), recipients=len(ids))
        if not result.ok:
            return [result] * len(ids)
        items = result.data.get(batch.items) if isinstance(result.data, dict) else None
        if not isinstance(items, list):
            return [replace(result, outcome="error", data=None, error=f"batch response has no list: {batch.items!r}")] * len(ids)
        index = {str(item.get(batch.key)): item for item in items if isinstance(item, dict)}
        return [
            replace(result, data=index[rid], size=result.size // len(ids))
            if rid in index
            else replace(result, outcome="error", data=None, error=f"missing from the batch response: id {rid}")
            for rid in ids
        ]

    async def _network(self, runtime: _SourceRuntime, url: str, *, recipients: int = 1) -> Fetched:
        """One logical request with retries, within the source's limits."""
        started = self.clock()
        tried = await runtime.policy.run(partial(self._attempt, runtime, url, recipients))
        ms = (self.clock() - started) * 1000
        runtime.stats.latencies_ms.add(ms)
        if tried.error is not None:
            error = tried.error
            return Fetched(error.outcome, None, tried.attempts, ms, error.status_code, str(error))
        answer = tried.value
        assert answer is not None
        storable, max_age = parse_max_age(answer.cache_control)
        return Fetched(
            "live", answer.data, tried.attempts, ms, answer.status_code, storable=storable, max_age=max_age,
            size=answer.size,
        )  # fmt: skip

    async def _attempt(self, runtime: _SourceRuntime, url: str, recipients: int, number: int) -> _Answer:
        """Attempt `number` (from 1) of a request, counted."""
        if number > 1:
            runtime.stats.retries += 1
        async with runtime.slots.slot() as slot, runtime.shared_slots:
            headers = dict(runtime.headers)
            response = await self._send(runtime, slot, url, headers)
            if response.status == 401 and runtime.token is not None:
                # One renewal, then the same request once more before it counts as
                # failed; it waits for the rate limit like any other request.
                rejected = headers["Authorization"].removeprefix("Bearer ")
                response = await self._send(runtime, slot, url, headers, renew_from=rejected)
            status = response.status
            if status == 429 or status >= 500:  # raised in the slot: a drop, it tells the limit (limits.DROPS)
                if status == 429:
                    runtime.stats.status_429 += 1
                retry_after = None
                if status in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("retry-after"), self.wall_clock())
                raise TransientError(f"HTTP {status}", status, retry_after)
        if status in _REDIRECTS:
            raise BadResponse(f"HTTP {status} redirect not followed; set follow_redirects = true", status)
        if not 200 <= status < 300:
            raise BadResponse(f"HTTP {status}", status)
        data = decode_json(response.body, status, jsondata.MAX_VALUES * recipients)
        return _Answer(data, status, response.headers.get("cache-control"), len(response.body))

    async def _send(
        self, runtime: _SourceRuntime, slot: Slot, url: str, headers: dict[str, str], *, renew_from: str | None = None
    ) -> Response:
        """One request: a rate-limit slot, the current token, the timeout; the
        API's latency for `slot` from when it leaves."""
        source = runtime.source
        if runtime.token is not None and runtime.rate is not None:
            # A token before the rate slot too: a slot granted, then spent waiting for the
            # token endpoint, would send the requests granted meanwhile all at once.
            await runtime.token.header(renew_from=renew_from)
        if runtime.rate is not None:
            await runtime.rate.wait()
        runtime.stats.requests += 1
        if runtime.token is not None:
            headers["Authorization"] = await runtime.token.header(renew_from=renew_from)
            # The base of the token just used: a renewed token's base from then on,
            # even for a request that was queued (or refused) before the renewal.
            url = await runtime.absolute(url)
        slot.sending()
        try:
            async with asyncio.timeout(source.timeout):
                return await self._get(url, headers, source)
        except TimeoutError:
            raise FetchTimeout(f"no answer within {source.timeout:g}s") from None
        except BadBody as exc:
            raise BadResponse(str(exc)) from None
        except ConnectionFailed as exc:
            raise TransientError(f"connection failed: {exc.kind}") from None

    async def _get(self, url: str, headers: dict[str, str], source: Source) -> Response:
        """GET with a body limit, following redirects only when allowed and only
        on the same scheme, host and port."""
        first = url
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self.client.get(url, headers, max_bytes=source.max_bytes)
            if response.status not in _REDIRECTS or not source.follow_redirects:
                return response
            location = response.headers.get("location")
            if not location:
                return response
            try:
                target = urljoin(url, location)
                elsewhere = urlsplit(target)[:2] != urlsplit(first)[:2]
            except ValueError:  # `http://[::1/x`: an unclosed IPv6 bracket
                raise BadResponse(f"HTTP {response.status} redirect to a malformed Location", response.status) from None
            if elsewhere:
                raise BadResponse(f"HTTP {response.status} redirect to another host refused: {target}", response.status)
            url = target
        raise BadResponse(f"more than {_MAX_REDIRECTS} redirects", response.status)
