"""The pace of `emailpers send`: transaction starts at `--rate` per second over
every connection."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


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
