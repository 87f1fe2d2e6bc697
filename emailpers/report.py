"""The run's report: counts by status, per-source figures, throughput.
A typed value built from plain values (this module knows nothing of the
fetch layer); for humans `summary()`, for machines `to_json()`, for a
scheduler `exit_code`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from emailpers.flat import Histogram
from emailpers.outcome import RENDER_STATUSES, StatusCounts

STATUSES = RENDER_STATUSES  # a render's manifest lines: what --redo can name
DEGRADED_SHARE = 0.10  # a source that failed for more of its recipients than this makes the run "degraded"
EXIT_OK = 0
EXIT_FAILED_RECIPIENTS = 3


def percentile(values: Histogram, q: float) -> float | None:
    """Nearest-rank percentile to 0.1 ms (within Histogram.ERROR past its
    first EXACT values); None for no values."""
    value = values.percentile(q)
    return None if value is None else round(value, 1)


@dataclass
class SourceFigures:
    """One source over this run: the fetcher counts into it as the run goes
    (latencies of fetches that went to the network), the report takes a
    `snapshot` with the recipients its failures sent to a fallback."""

    requests: int = 0
    cache_hits: int = 0
    dedupe_hits: int = 0
    batches: int = 0
    retries: int = 0
    errors: int = 0
    status_429: int = 0
    stale: int = 0
    token_renewals: int = 0
    fallbacks: int = 0
    latencies_ms: Histogram = field(default_factory=Histogram)  # fixed size at any count
    error_kinds: dict[str, int] = field(default_factory=dict)
    concurrency: dict[str, int] = field(default_factory=dict)  # the in-flight limit: min median max final changes ceiling

    def snapshot(self, fallbacks: int) -> SourceFigures:
        """A copy the run's further counting leaves alone."""
        return replace(self, fallbacks=fallbacks, latencies_ms=self.latencies_ms.copy(),
                       error_kinds=dict(self.error_kinds), concurrency=dict(self.concurrency))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "dedupe_hits": self.dedupe_hits,
            "batches": self.batches,
            "retries": self.retries,
            "errors": self.errors,
            "status_429": self.status_429,
            "stale": self.stale,
            "token_renewals": self.token_renewals,
            "fallbacks": self.fallbacks,
            "latency_ms": {
                "p50": percentile(lat, 50),
                "p95": percentile(lat, 95),
                "p99": percentile(lat, 99),
                "max": round(lat.max, 1) if lat.max is not None else None,
            },
            "top_errors": dict(sorted(self.error_kinds.items(), key=lambda kv: -kv[1])[:5]),
            "concurrency": dict(self.concurrency),
        }


@dataclass(frozen=True)
class Degraded:
    failed_recipients: int
    recipients: int


@dataclass(frozen=True)
class Report:
    """What a run did: this run's counts, the whole manifest's, and why it stopped."""

    campaign: str
    warm: bool  # cache warm: fetched, rendered nothing
    this_run: StatusCounts
    total: StatusCounts  # the whole manifest (earlier runs and this one)
    resumed_from_previous_runs: int
    sources: Mapping[str, SourceFigures]
    degraded_sources: Mapping[str, Degraded]
    elapsed_s: float
    recipients_per_s: float | None
    stopped: str | None = None  # the error that stopped the run early
    stop_code: int | None = None  # ... and its exit code
    warnings: tuple[str, ...] = ()
    amp: Mapping[str, Mapping[str, int]] | None = None  # AMP parts by outcome: this_run, total

    @property
    def command(self) -> str:
        return "cache warm" if self.warm else "render"

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_sources)

    @property
    def failed_earlier(self) -> int:
        """Failed recipients in the manifest that this run did not try again."""
        return self.total.failed if not self.this_run.failed else 0

    @property
    def exit_code(self) -> int:
        """The stop's code when the run stopped early; otherwise 3 while any
        recipient in the manifest failed (a rerun that skips failed recipients
        never reports success), else 0."""
        if self.stop_code is not None:
            return self.stop_code
        return EXIT_FAILED_RECIPIENTS if self.total.failed else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        """report.json."""
        return {
            "campaign": self.campaign,
            "command": self.command,
            "this_run": dict(self.this_run),
            "total": dict(self.total),
            "resumed_from_previous_runs": self.resumed_from_previous_runs,
            "sources": {name: figures.to_json() for name, figures in self.sources.items()},
            "degraded": self.degraded,
            "degraded_sources": {
                name: {"failed_recipients": d.failed_recipients, "recipients": d.recipients}
                for name, d in self.degraded_sources.items()
            },
            "elapsed_s": self.elapsed_s,
            "recipients_per_s": self.recipients_per_s,
            "stopped": self.stopped,
            "warnings": list(self.warnings),
            **({} if self.amp is None else {"amp": {k: dict(v) for k, v in self.amp.items()}}),
        }

AMP_OUTCOMES = ("sent", "dropped", "unvalidated")


def build_report(
    *,
    campaign: str,
    counts: Mapping[str, int],
    previous: Mapping[str, int],
    sources: Mapping[str, SourceFigures],
    elapsed: float,
    source_failures: Mapping[str, tuple[int, int]] | None = None,
    stopped: str | None = None,
    stop_code: int | None = None,
    warnings: Sequence[str] = (),
    warm: bool = False,
    amp: tuple[Mapping[str, int], Mapping[str, int]] | None = None,
) -> Report:
    """`counts` are this run's, `previous` the manifest's before it;
    `source_failures` gives per source (recipients it gave no data, recipients
    it was asked for) over the whole manifest; `amp`, AMP parts by outcome
    (this run's, the manifest's before it) when the campaign has an AMP part."""
    this_run = StatusCounts.of(counts, warm=warm, also=previous)
    total = StatusCounts({s: n + previous.get(s, 0) for s, n in this_run.items()})
    done = sum(counts.values())
    return Report(
        campaign=campaign,
        warm=warm,
        this_run=this_run,
        total=total,
        resumed_from_previous_runs=sum(previous.values()),
        sources=dict(sources),
        degraded_sources={
            name: Degraded(failed, asked)
            for name, (failed, asked) in (source_failures or {}).items()
            if asked and failed / asked > DEGRADED_SHARE
        },
        elapsed_s=round(elapsed, 3),
        recipients_per_s=round(done / elapsed, 1) if elapsed > 0 else None,
        stopped=stopped,
        stop_code=stop_code,
        warnings=tuple(warnings),
        amp=None if amp is None else _amp_counts(*amp),
    )


def _amp_counts(this_run: Mapping[str, int], previous: Mapping[str, int]) -> dict[str, dict[str, int]]:
    return {
        "this_run": {k: this_run.get(k, 0) for k in AMP_OUTCOMES},
        "total": {k: this_run.get(k, 0) + previous.get(k, 0) for k in AMP_OUTCOMES},
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}ms"


def summary(report: Report) -> str:
    """The lines printed at the end of a run."""
    this, total = report.this_run, report.total
    rate = f"in {report.elapsed_s:.2f}s ({report.recipients_per_s or 0:g}/s)"
    if report.warm:
        lines = [f"Campaign {report.campaign}: cache warm, data for {sum(this.values())} recipients {rate}",
                 f"  cached {this.warmed}  not fetched {this.failed}  invalid {this.invalid}"
                 "   (not fetched: an error or timeout for some source)"]
    else:
        lines = [f"Campaign {report.campaign}: {sum(this.values())} recipients this run {rate}"]
        if report.resumed_from_previous_runs:
            lines.append(f"  resumed: {report.resumed_from_previous_runs} already done by an earlier run")
        lines.append("  " + "  ".join(f"{s} {n}" for s, n in total.items()) + "   (manifest total)")
    if report.amp is not None:
        lines.append("  AMP parts: " + "  ".join(f"{k} {n}" for k, n in report.amp["total"].items())
                     + "   (manifest total; dropped: see \"amp_errors\" in the manifest)")
    for name, figures in report.sources.items():
        s = figures.to_json()
        lat = s["latency_ms"]
        extras = [
            f"{s[key]} {label}"
            for key, label in (("dedupe_hits", "deduped"), ("batches", "batches"), ("status_429", "429s"),
                               ("stale", "stale"), ("token_renewals", "token renewals"))
            if s[key]
        ]
        lines.append(
            f"  source {name}: {s['requests']} requests, {s['cache_hits']} cache hits, {s['retries']} retries, "
            f"{s['errors']} errors"
            + ("" if report.warm else f", {s['fallbacks']} fallbacks")
            + (", " + ", ".join(extras) if extras else "")
            + f"; latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])} max {_ms(lat['max'])}"
        )
        if (limit := s["concurrency"]) and limit["changes"]:
            lines.append(
                f"      in flight: limit min {limit['min']} median {limit['median']} max {limit['max']} "
                f"(ceiling {limit['ceiling']}, {limit['changes']} changes)"
            )
        for error, count in s["top_errors"].items():
            lines.append(f"      {count} x {error}")
    lines.extend(f"  WARNING: {warning}" for warning in report.warnings)
    for name, d in report.degraded_sources.items():
        lines.append(
            f"  WARNING: source {name} gave no data for {d.failed_recipients} of {d.recipients} recipients "
            f"({d.failed_recipients / d.recipients:.0%}, more than {DEGRADED_SHARE:.0%}); "
            + ("not cached" if report.warm else "those recipients got fallbacks or were skipped")
        )
    if report.stopped:
        lines.append(f"  STOPPED EARLY: {report.stopped}")
    return "\n".join(lines)
