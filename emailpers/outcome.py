"""A recipient's outcome: what happened to it, decided once.

The stages hand plain values forward: a fetch result per source
(`SourceResult`), what the render job made of the recipient (`Rendered`, or
`NotRendered` and why), and `decide` turns them, with the row, into the one
`Outcome` the manifest records and the tally counts. No other code names a
status.

Kept free of the fetch layer and of Jinja: a render process imports it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

if TYPE_CHECKING:
    from emailpers.amp import AmpLink
    from emailpers.recipients import Row

Status = Literal["rendered", "fallback", "skipped", "invalid", "failed", "warmed"]

# The order reports list them in.
RENDER_STATUSES: tuple[Status, ...] = ("rendered", "fallback", "skipped", "invalid", "failed")
WARM_STATUSES: tuple[Status, ...] = ("warmed", "invalid", "failed")  # cache warm: data fetched, or not
SENDABLE = frozenset({"rendered", "fallback"})  # the statuses whose message `send` delivers

# A source's fetch outcomes that gave data (the others: error, timeout, skipped).
OK_OUTCOMES = frozenset({"live", "cache", "stale"})
LOCAL_OUTCOMES = frozenset({"cache", "skipped"})  # answered without a request of its own


@dataclass(frozen=True, slots=True)
class SourceResult:
    """What one source gave one recipient, without the data itself."""

    outcome: str  # live | cache | stale | error | timeout | skipped
    attempts: int = 0
    ms: float = 0.0
    status_code: int | None = None
    error: str | None = None
    shared: bool = False  # answered by another recipient's identical request

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES

    @property
    def reason(self) -> str:
        return self.error or self.outcome

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "outcome": self.outcome,
            "attempts": self.attempts,
            "ms": round(self.ms, 1),
            "status_code": self.status_code,
        }
        if self.error:
            out["error"] = self.error
        return out


class StatusCounts(dict[str, int]):
    """Recipients per status, every known status listed (in report order),
    then any other a manifest line holds."""

    @classmethod
    def of(cls, counts: Mapping[str, int], *, warm: bool = False, also: Collection[str] = ()) -> StatusCounts:
        known = WARM_STATUSES if warm else RENDER_STATUSES
        others = [s for s in (*also, *counts) if s not in known]
        return cls({s: counts.get(s, 0) for s in (*known, *dict.fromkeys(others))})

    @property
    def failed(self) -> int:
        return self.get("failed", 0)

    @property
    def warmed(self) -> int:
        return self.get("warmed", 0)

    @property
    def invalid(self) -> int:
        return self.get("invalid", 0)


# -- between the pipeline and a render process: picklable, named -------------------------


@dataclass(frozen=True, slots=True)
class RenderRequest:
    """One recipient for the render job: its row's values and its sources' data."""

    id: str
    email: str
    fields: dict[str, Any]
    data: dict[str, Any]  # per source that gave data
    failures: dict[str, str]  # per source that did not: why
    # signed in the main process: the signing key never reaches a render process
    unsubscribe_token: str | None = None
    amp_link: AmpLink | None = None  # likewise: the AMP part's open-time link token


@dataclass(frozen=True, slots=True)
class Rendered:
    """The render job wrote the recipient's files."""

    files: list[str]
    fallback_blocks: list[dict[str, Any]] = field(default_factory=list)
    fallback_template: bool = False  # the campaign's fallback template replaced the whole email
    amp: Mapping[str, Any] | None = None  # the AMP part's outcome for the manifest line (amp, amp_errors)


@dataclass(frozen=True, slots=True)
class NotRendered:
    """The render job could not make the recipient's email; nothing was written."""

    error: str


RenderResult = Rendered | NotRendered


# -- the outcome ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recipient: one manifest line."""

    status: Status
    row: int
    id: str | None
    email: str | None
    sources: Mapping[str, SourceResult] = field(default_factory=dict)
    fallback_blocks: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    error: str | None = None
    amp: Mapping[str, Any] | None = None  # "amp": sent | dropped | unvalidated, and "amp_errors"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def fallback_sources(self) -> set[str]:
        """The sources a fallback email stands in for: those its fallback blocks
        name, or (the fallback template) every source that gave no data."""
        if self.status != "fallback":
            return set()
        named = {n for block in self.fallback_blocks for n in block["sources"]}
        return (named or {n for n, r in self.sources.items() if not r.ok}) & self.sources.keys()

    def manifest_line(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "row": self.row,
            "status": self.status,
            "sources": {name: r.manifest() for name, r in self.sources.items()},
            "fallback_blocks": self.fallback_blocks,
            "files": self.files,
            "error": self.error,
            **(self.amp or {}),
        }


def by_row(status: str) -> bool:
    """A manifest line of this status stands for its row, not its id (an
    invalid row may have no id, or another row's)."""
    return status == "invalid"


@overload
def decide(
    row: Row, sources: Mapping[str, SourceResult] = ..., *, required: Collection[str] = ..., warm: Literal[True]
) -> Outcome: ...
@overload
def decide(
    row: Row, sources: Mapping[str, SourceResult] = ..., *, required: Collection[str] = ..., render: RenderResult
) -> Outcome: ...
@overload
def decide(
    row: Row, sources: Mapping[str, SourceResult] = ..., *, required: Collection[str] = ...
) -> Outcome | None: ...
def decide(
    row: Row,
    sources: Mapping[str, SourceResult] | None = None,
    *,
    required: Collection[str] = (),
    render: RenderResult | None = None,
    warm: bool = False,
) -> Outcome | None:
    """The one place a recipient's status is chosen.

    `sources`: the fetch results (none for a row that is not usable);
    `required`: the sources without which no email goes out; `render`: what
    the render job made of it; `warm`: the fetch was the whole job (cache warm).
    Returns None when the recipient is to be rendered and `render` is not
    given yet: render it, then ask again with the result.
    """
    sources = dict(sources or {})

    def outcome(status: Status, error: str | None = None, **made: Any) -> Outcome:
        return Outcome(status, row.number, row.id, row.email, sources, error=error, **made)

    if row.problem is not None:
        return outcome("invalid", row.problem)
    failed = {name: r.reason for name, r in sources.items() if not r.ok}
    if warm:
        return outcome("failed", "; ".join(failed.values())) if failed else outcome("warmed")
    missing = [name for name in required if name in failed]
    if missing:
        return outcome("skipped", "; ".join(f"required source {n} unavailable: {failed[n]}" for n in missing))
    if render is None:
        return None
    if isinstance(render, NotRendered):
        return outcome("failed", render.error)
    fell_back = render.fallback_template or bool(render.fallback_blocks)
    return outcome(
        "fallback" if fell_back else "rendered", files=render.files, fallback_blocks=render.fallback_blocks, amp=render.amp
    )
