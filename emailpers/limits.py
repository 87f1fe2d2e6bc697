"""How many requests a source has in flight: a limit each source finds for
itself while the run goes, in the spirit of TCP Vegas and Netflix's
concurrency-limits. The right number depends on the API's latency, its rate
limit and how it degrades under load, none of which a user can know.

`Controller` is the arithmetic (no asyncio, time only through `clock`, so a
test feeds it latencies and outcomes and reads the trajectory); `Gate` holds
requests to the controller's current limit.

The rules, applied on every finished request:
- drops (429, 5xx, a timeout, a broken connection) halve the limit once
  they are more than `DROP_SHARE` of a round trip's answers (a moving average
  over about `limit` answers, at least `DROP_WINDOW`), at
  most once per smoothed latency: the drops of one round trip are one
  signal, and the odd 503 of an API that is not overloaded is none;
- a smoothed latency above `TOLERANCE` x the floor + `SLACK` (the least latency seen,
  drifting slowly up so a server that got slower for good becomes the new
  normal within ~`FLOOR_MEMORY` seconds) shrinks the limit by that threshold / latency, at least
  `MIN_GRADIENT`, at most once per smoothed latency;
- otherwise, while the limit is in use (at least half of it in flight) and
  drops are few, it grows: by one per answer until the first decrease (doubling per round
  trip, so a run reaches hundreds within a second or two), then by
  sqrt(limit) per round trip;
- always between 1 and the ceiling (the source's `concurrency`, the run's
  `--concurrency`).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from types import TracebackType

from emailpers.errors import FetchTimeout, TransientError

INITIAL_LIMIT = 32  # the old fixed default: no API sees more at the start than it used to
TOLERANCE = 2.0  # latency up to this many times its floor is the API's own jitter, not a queue
SLOW_START_EXIT = 1.5  # latency past this many times its floor ends the doubling (as HyStart does for TCP)
# Seconds added to both thresholds: a busy client's own event loop delays every answer
# by tens of ms, which against a 20 ms API looks like a queue at the server and drove
# the limit to 1 (measured: 94 rcpt/s where a fixed 256 made 353).
SLACK = 0.05
MIN_GRADIENT = 0.5  # one latency decrease at most halves the limit
DROP_FACTOR = 0.5
DROP_SHARE = 0.1  # drops in the moving average beyond which the API is overloaded
# The least number of answers that average spans; above it, as many as the limit: about
# a round trip's answers. A fixed 20 took three of an API's usual 1% 503s within 20 ms
# of answers (at 1,000 a second) for overload, and halved the limit several times a run.
DROP_WINDOW = 20
SMOOTHING = 0.1  # weight of a new latency in the smoothed latency
FLOOR_MEMORY = 10.0  # seconds: the floor moves toward the latency seen with this time constant
REPORT_GROWTH = 1.25  # growth told to on_change (-v) in steps of at least this factor
DROPS = (FetchTimeout, TransientError)  # what an overloaded API answers


class Controller:
    """One source's in-flight limit. `adaptive=False` holds it at the ceiling."""

    def __init__(
        self,
        ceiling: int,
        clock: Callable[[], float],
        *,
        adaptive: bool = True,
        initial: int = INITIAL_LIMIT,
        on_change: Callable[[int, str], None] | None = None,
    ) -> None:
        """`on_change(limit, why)` hears of every decrease, and of growth once
        the limit is `REPORT_GROWTH` times the last one told or at the ceiling
        (in slow start the limit changes with every answer): `-v`."""
        self.ceiling = ceiling
        self.on_change = on_change
        self.clock = clock
        self.adaptive = adaptive
        self.limit = float(min(initial, ceiling) if adaptive else ceiling)
        self._told = self.allowed  # the limit on_change last heard of
        self.slow_start = True
        self.drops = 0.0  # moving share of answers that were drops
        self.floor: float | None = None  # seconds
        self.smoothed: float | None = None  # seconds
        self.last_decrease = -math.inf
        self.changes = 0
        # Seconds spent at each whole limit: the report's min/median/max over
        # time, in memory bounded by the ceiling however long the run.
        self.time_at: dict[int, float] = {}
        self._since = self._last = clock()

    @property
    def allowed(self) -> int:
        return max(1, int(self.limit))

    def sample(self, latency: float, in_flight: int, dropped: bool) -> None:
        """A request finished after `latency` seconds with `in_flight`
        requests under way (itself included); `dropped`: the API refused or
        failed it in a way that says slow down."""
        if not self.adaptive:
            return
        now = self.clock()
        self.drops += (dropped - self.drops) / max(DROP_WINDOW, self.allowed)
        if dropped:
            if self.drops > DROP_SHARE and now - self.last_decrease >= (self.smoothed or 0.0):
                self._set(self.limit * DROP_FACTOR, now, f"{self.drops:.0%} of recent answers were 429, 5xx or timeouts")
            return
        self.smoothed = latency if self.smoothed is None else self.smoothed + SMOOTHING * (latency - self.smoothed)
        # The drift is by time, not by answer: at a thousand answers a second
        # a per-answer drift would take a degraded API for normal at once.
        drift = min(1.0, (now - self._last) / FLOOR_MEMORY)
        self._last = now
        self.floor = latency if self.floor is None else min(latency, self.floor + drift * (latency - self.floor))
        gradient = (TOLERANCE * self.floor + SLACK) / self.smoothed if self.smoothed > 0 else 1.0
        if gradient < 1.0:
            if now - self.last_decrease >= self.smoothed:
                why = f"latency {self.smoothed * 1000:.0f} ms, over {(TOLERANCE * self.floor + SLACK) * 1000:.0f} ms"
                self._set(self.limit * max(MIN_GRADIENT, gradient), now, why)
        elif 2 * in_flight >= self.allowed and self.drops <= DROP_SHARE:
            if self.smoothed > SLOW_START_EXIT * self.floor + SLACK:
                self.slow_start = False  # a queue is forming: doubling now would overshoot by a round trip's worth
            step = 1.0 if self.slow_start else math.sqrt(self.limit) / self.limit
            self._set(self.limit + step, now, f"latency {self.smoothed * 1000:.0f} ms, fastest {self.floor * 1000:.0f} ms")

    def _set(self, limit: float, now: float, why: str) -> None:
        limit = min(float(self.ceiling), max(1.0, limit))
        if limit < self.limit:
            self.slow_start = False
            self.last_decrease = now
        before = self.allowed
        self.limit = limit
        if self.allowed != before:
            self.changes += 1
            self.time_at[before] = self.time_at.get(before, 0.0) + now - self._since
            self._since = now
            grown = self.allowed >= REPORT_GROWTH * self._told or (self.allowed == self.ceiling > self._told)
            if self.on_change is not None and (self.allowed < before or grown):
                self.on_change(self.allowed, why)
                self._told = self.allowed

    def figures(self) -> dict[str, int]:
        """The limit over the run so far: least, time-weighted median,
        greatest, now; how often it changed; the ceiling."""
        spent = dict(self.time_at)
        spent[self.allowed] = spent.get(self.allowed, 0.0) + max(0.0, self.clock() - self._since)
        levels = sorted(spent)
        half, total, median = sum(spent.values()) / 2, 0.0, levels[-1]
        for level in levels:
            total += spent[level]
            if total >= half:
                median = level
                break
        return {"min": levels[0], "median": median, "max": levels[-1], "final": self.allowed,
                "changes": self.changes, "ceiling": self.ceiling}  # fmt: skip


class Gate:
    """Requests to one source, held to its controller's limit. `slot()`
    times each request and tells the controller how it ended."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def slot(self) -> Slot:
        return Slot(self)

    async def acquire(self) -> None:
        while self.in_flight >= self.controller.allowed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the turn goes to the next
                elif waiter in self._waiters:  # a wake may have passed over it already
                    self._waiters.remove(waiter)
                raise
        self.in_flight += 1

    def release(self, latency: float | None, dropped: bool) -> None:
        """`latency` None: the request ended in a way that says nothing about the API."""
        if latency is not None:
            self.controller.sample(latency, self.in_flight, dropped)
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        free = self.controller.allowed - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class Slot:
    """`async with gate.slot() as slot:` one request. A timeout or a
    TransientError (429, 5xx, a broken connection) raised inside is an answer
    that says slow down."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.started = 0.0

    async def __aenter__(self) -> Slot:
        await self.gate.acquire()
        self.sending()
        return self

    def sending(self) -> None:
        """The request leaves now: what it waited for since it took the slot (its
        turn under a rate limit, a token, a slot shared over shards) is this run's
        own pacing, not the API's latency."""
        self.started = self.gate.controller.clock()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        latency: float | None = self.gate.controller.clock() - self.started
        if exc is not None and not isinstance(exc, Exception):  # cancelled: no answer to learn from
            latency = None
        self.gate.release(latency, isinstance(exc, DROPS))
