"""When requests go: a source's retry policy (how many attempts, how far
apart, until when) and its rate limit, which read time only through the
collaborators in `Timing` (the public entry points accept them, so a test runs
them on a fake clock); and `Pacer`, the pace of `emailpers send`: transaction
starts at `--rate` per second over every connection."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from emailpers.campaign import Source
from emailpers.errors import FetchTimeout, SourceError, TransientError

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Timing:
    """The clocks, the sleep and the random source a run reads. The defaults
    are the real ones."""

    clock: Clock = time.monotonic  # intervals: deadlines, rate slots, token expiry
    wall_clock: Clock = time.time  # dates: cache ages, Retry-After
    sleep: Sleep = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)  # backoff jitter


REAL_TIMING = Timing()


@dataclass(frozen=True, slots=True)
class Tried(Generic[T]):
    """How a retried call ended: its value, or the error it gave up on."""

    attempts: int
    value: T | None = None
    error: SourceError | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """One source's retries, built once per run. A failure that may pass
    (TransientError: 429, 5xx, a broken connection; FetchTimeout) is tried
    again after Retry-After, or else a full-jitter backoff, as long as
    attempts remain and the wait ends within the deadline; anything else is
    final at once."""

    retries: int  # attempts after the first
    deadline: float  # seconds from the first attempt: no wait may end past it
    backoff_initial: float
    backoff_max: float
    rng: random.Random
    clock: Clock
    sleep: Sleep

    @classmethod
    def of(cls, source: Source, timing: Timing) -> RetryPolicy:
        return cls(
            source.retries, source.deadline, source.backoff_initial, source.backoff_max,
            timing.rng, timing.clock, timing.sleep,
        )  # fmt: skip

    def backoff(self, attempt: int) -> float:
        """Full jitter: anywhere in [0, cap], the cap doubling per attempt up to
        backoff_max, so clients that failed together do not return together."""
        cap = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
        return self.rng.uniform(0, cap)

    def wait(self, attempt: int, error: SourceError, elapsed: float) -> float | None:
        """Seconds to wait after failed attempt number `attempt`, `elapsed`
        seconds after the first began; None: give up."""
        if not isinstance(error, (TransientError, FetchTimeout)) or attempt > self.retries:
            return None
        after = error.retry_after if isinstance(error, TransientError) else None
        seconds = self.backoff(attempt) if after is None else after
        # A wait that ends exactly at the deadline is still within it.
        return None if elapsed + seconds > self.deadline else seconds

    async def run(self, attempt: Callable[[int], Awaitable[T]]) -> Tried[T]:
        """Call `attempt(1)`, `attempt(2)`, ... until one returns or the policy
        gives up on a SourceError. Other exceptions pass through."""
        started = self.clock()
        number = 1
        while True:
            try:
                return Tried(number, value=await attempt(number))
            except SourceError as exc:
                seconds = self.wait(number, exc, self.clock() - started)
                if seconds is None:
                    return Tried(number, error=exc)
            await self.sleep(seconds)
            number += 1


class RateLimiter:
    """Requests per second, shared by all concurrent fetches of a source:
    each request takes the next free slot, 1/rate apart."""

    def __init__(self, rate: float, clock: Clock, sleep: Sleep) -> None:
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self.next_slot = 0.0

    async def wait(self) -> None:
        now = self.clock()
        slot = max(now, self.next_slot)
        self.next_slot = slot + self.interval
        if slot > now:
            await self.sleep(slot - now)


class Pacer:
    """Transaction starts at `rate` per second over every connection.

    Two rules, one waiter at a time: starts follow a schedule `1/rate` apart
    (a start the event loop woke late for is made up by the next ones, so the
    average is `rate`; only the last MAX_DEBT seconds of delay are made up,
    so a stall never becomes a flood),
    and no `window` seconds ever hold more than `capacity` real starts
    (`capacity / window == rate`; 50 a second for rate 50), whatever the loop did."""

    MAX_DEBT = 0.25  # seconds behind the schedule that are made up: at most rate/4 starts back to back

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 0.0 if rate is None else 1.0 / rate
        self.capacity = 1 if rate is None else max(1, int(rate))
        self.window = self.capacity * self.interval
        self.clock = clock
        self.next_slot = -float("inf")
        self.starts: deque[float] = deque(maxlen=self.capacity)
        self._turn = asyncio.Lock()

    def slot(self, now: float) -> float:
        """When the next start may happen, asked at `now` (then `started`)."""
        # The first start opens the schedule: no debt before it.
        self.next_slot = now if not self.starts else max(self.next_slot, now - self.MAX_DEBT)
        slot = self.next_slot
        if len(self.starts) == self.capacity:
            slot = max(slot, self.starts[0] + self.window)
        self.next_slot = slot + self.interval
        return max(slot, now)

    def started(self, at: float) -> None:
        self.starts.append(at)

    async def wait_turn(self, stopping: asyncio.Event) -> bool:
        """Wait for the next start; False if `stopping` was set meanwhile."""
        if not self.interval:
            return not stopping.is_set()
        async with self._turn:
            delay = self.slot(self.clock()) - self.clock()
            if delay > 0:
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                    return False
                except TimeoutError:
                    pass
            if stopping.is_set():
                return False
            self.started(self.clock())
            return True
