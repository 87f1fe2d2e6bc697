"""The run's tally: every recipient's outcome, counted once, as it is recorded.

Counters flow forward: the pipeline hands each `Outcome` to `Tally.add`, which
keeps the status counts and the per-source figures the report shows
(fallbacks, recipients a source gave no data); each recipient's fetch results
feed the error-rate window (`Tally.fetched`) as soon as they are in. Both raise
the error that stops the run when a limit is reached.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from typing import Protocol

from emailpers.errors import TooManyFailures, UnhealthySource
from emailpers.outcome import LOCAL_OUTCOMES, Outcome, SourceResult

HEALTH_WINDOW = 200  # a source's latest fetches judged by --max-error-rate
HEALTH_MINIMUM = 20  # fetches before the guard may judge at all


class FetchResult(Protocol):
    """What the guard reads of a fetch (a SourceResult, or the fetcher's own result)."""

    @property
    def outcome(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def shared(self) -> bool: ...
    @property
    def ok(self) -> bool: ...


def judged(result: FetchResult) -> bool:
    """Whether an error guard judges a fetch: one that went to the API for this
    recipient (not a cache hit, not a skip, not another recipient's answer)."""
    return result.outcome not in LOCAL_OUTCOMES and not result.shared


def error_of(result: FetchResult) -> str | None:
    """What a guard's window keeps of a fetch: None for an answer, else its error."""
    return None if result.ok else (result.error or result.outcome)


def unhealthy(name: str, failed: int, window: int, max_error_rate: float, common: str) -> UnhealthySource:
    """The error that stops a run on an unhealthy source (here, or in the window all shards share)."""
    return UnhealthySource(
        f"source {name!r}: {failed} of its last {window} fetches failed (more than "
        f"{max_error_rate:.0%}); most common error: {common}. Stopped early; "
        "fix the API and run the same command again to resume"
    )


class HealthGuard:
    """Stops the run when more than `max_error_rate` of a source's latest
    HEALTH_WINDOW network fetches failed: an API that dies at recipient 10,000
    of 200,000 stops the run as surely as one that was never up."""

    def __init__(self, max_error_rate: float | None, window: int = HEALTH_WINDOW, minimum: int = HEALTH_MINIMUM) -> None:
        self.max_error_rate = max_error_rate if max_error_rate is not None and max_error_rate < 1 else None
        self.window = window
        self.minimum = minimum
        self.recent: dict[str, deque[str | None]] = {}  # per source: None for a success, else the error
        self.failed: dict[str, int] = {}

    def check(self, name: str, result: FetchResult) -> None:
        if self.max_error_rate is None or not judged(result):
            return
        recent = self.recent.setdefault(name, deque())
        error = error_of(result)
        recent.append(error)
        failed = self.failed[name] = self.failed.get(name, 0) + (error is not None)
        if len(recent) > self.window and recent.popleft() is not None:
            failed = self.failed[name] = failed - 1
        if len(recent) >= self.minimum and failed / len(recent) > self.max_error_rate:
            common = Counter(e for e in recent if e is not None).most_common(1)[0][0]
            raise unhealthy(name, failed, len(recent), self.max_error_rate, common)


class Tally:
    """This run's outcomes, counted."""

    def __init__(self, guard: HealthGuard, max_failures: int | None = None) -> None:
        self.guard = guard
        self.max_failures = max_failures
        self.counts: Counter[str] = Counter()
        # per source, over this run's recipients: asked for, gave no data, and
        # stood in for by a fallback
        self.source_recipients: Counter[str] = Counter()
        self.source_failures: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.amp: Counter[str] = Counter()  # AMP parts: sent, dropped, unvalidated

    def fetched(self, results: Mapping[str, SourceResult]) -> None:
        """Feed one recipient's fetches to the error-rate window, as soon as they
        are in: a fetch that shows a source unhealthy stops the run before its
        recipient is rendered or recorded (UnhealthySource)."""
        for name, result in results.items():
            self.guard.check(name, result)

    def add(self, outcome: Outcome) -> None:
        """Count one recorded outcome. Raises TooManyFailures when it is the
        --max-failures'th failed one: the run stops."""
        self.counts[outcome.status] += 1
        for name, result in outcome.sources.items():
            self.source_recipients[name] += 1
            self.source_failures[name] += not result.ok
        self.fallbacks.update(outcome.fallback_sources())
        if outcome.amp:
            self.amp[outcome.amp["amp"]] += 1
        limit = self.max_failures
        if outcome.failed and limit is not None and self.counts[outcome.status] >= limit:
            raise TooManyFailures(
                f"{limit} recipients failed in this run (--max-failures {limit}); the last, {outcome.id!r}: "
                f"{outcome.error}. Stopped; fix the data, then run the same command with --redo failed (a fixed "
                "template needs --fresh)"
            )

    @property
    def recipients(self) -> int:
        return sum(self.counts.values())
