"""The run's report: counts by status, per-source figures, throughput.
Built from values; formatting for humans is `summary()`, for machines JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from emailpers.sources import SourceStats

STATUSES = ("rendered", "fallback", "skipped", "invalid", "failed")
WARM_STATUSES = ("warmed", "invalid", "failed")  # cache warm: data fetched, or not
DEGRADED_SHARE = 0.10  # a source that failed for more of its recipients than this makes the run "degraded"


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[rank - 1], 1)


def source_report(stats: SourceStats) -> dict[str, Any]:
    lat = stats.latencies_ms
    return {
        "requests": stats.requests,
        "cache_hits": stats.cache_hits,
        "dedupe_hits": stats.dedupe_hits,
        "batches": stats.batches,
        "retries": stats.retries,
        "errors": stats.errors,
        "status_429": stats.status_429,
        "stale": stats.stale,
        "token_renewals": stats.token_renewals,
        "fallbacks": stats.fallbacks,
        "latency_ms": {
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "max": round(max(lat), 1) if lat else None,
        },
        "top_errors": dict(sorted(stats.error_kinds.items(), key=lambda kv: -kv[1])[:5]),
    }


def build_report(
    *,
    campaign: str,
    counts: dict[str, int],
    previous: dict[str, int],
    sources: dict[str, SourceStats],
    elapsed: float,
    source_failures: dict[str, tuple[int, int]] | None = None,
    stopped: str | None = None,
    warnings: Sequence[str] = (),
    warm: bool = False,
    amp: tuple[dict[str, int], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """`counts` are this run's, `previous` the manifest's before it;
    `source_failures` gives per source (recipients it gave no data, recipients
    it was asked for) over the whole manifest; `amp`, AMP parts by outcome
    (this run's, the manifest's before it)."""
    done = sum(counts.values())
    known = WARM_STATUSES if warm else STATUSES
    statuses = [*known, *(s for s in {**previous, **counts} if s not in known)]
    total = {s: counts.get(s, 0) + previous.get(s, 0) for s in statuses}
    degraded = {
        name: {"failed_recipients": failed, "recipients": asked}
        for name, (failed, asked) in (source_failures or {}).items()
        if asked and failed / asked > DEGRADED_SHARE
    }
    return {
        "campaign": campaign,
        "command": "cache warm" if warm else "render",
        "this_run": {s: counts.get(s, 0) for s in statuses},
        "total": total,
        "resumed_from_previous_runs": sum(previous.values()),
        "sources": {name: source_report(stats) for name, stats in sources.items()},
        "degraded": bool(degraded),
        "degraded_sources": degraded,
        "elapsed_s": round(elapsed, 3),
        "recipients_per_s": round(done / elapsed, 1) if elapsed > 0 else None,
        "stopped": stopped,
        "warnings": list(warnings),
        **({} if amp is None else {"amp": _amp_counts(*amp)}),
    }


def _amp_counts(this_run: dict[str, int], previous: dict[str, int]) -> dict[str, dict[str, int]]:
    outcomes = ("sent", "dropped", "unvalidated")
    return {
        "this_run": {k: this_run.get(k, 0) for k in outcomes},
        "total": {k: this_run.get(k, 0) + previous.get(k, 0) for k in outcomes},
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}ms"


def summary(report: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""
    this, total = report["this_run"], report["total"]
    rate = f"in {report['elapsed_s']:.2f}s ({report['recipients_per_s'] or 0:g}/s)"
    if report["command"] == "cache warm":
        lines = [f"Campaign {report['campaign']}: cache warm, data for {sum(this.values())} recipients {rate}",
                 f"  cached {this['warmed']}  not fetched {this['failed']}  invalid {this['invalid']}"
                 "   (not fetched: an error or timeout for some source)"]
    else:
        lines = [f"Campaign {report['campaign']}: {sum(this.values())} recipients this run {rate}"]
        if report["resumed_from_previous_runs"]:
            lines.append(f"  resumed: {report['resumed_from_previous_runs']} already done by an earlier run")
        lines.append("  " + "  ".join(f"{s} {n}" for s, n in total.items()) + "   (manifest total)")
    if "amp" in report:
        lines.append("  AMP parts: " + "  ".join(f"{k} {n}" for k, n in report["amp"]["total"].items())
                     + "   (manifest total; dropped: see \"amp_errors\" in the manifest)")
    for name, s in report["sources"].items():
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
            + ("" if report["command"] == "cache warm" else f", {s['fallbacks']} fallbacks")
            + (", " + ", ".join(extras) if extras else "")
            + f"; latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])} max {_ms(lat['max'])}"
        )
        for error, count in s["top_errors"].items():
            lines.append(f"      {count} x {error}")
    lines.extend(f"  WARNING: {warning}" for warning in report.get("warnings", []))
    for name, d in report["degraded_sources"].items():
        lines.append(
            f"  WARNING: source {name} gave no data for {d['failed_recipients']} of {d['recipients']} recipients "
            f"({d['failed_recipients'] / d['recipients']:.0%}, more than {DEGRADED_SHARE:.0%}); "
            + ("not cached" if report["command"] == "cache warm" else "those recipients got fallbacks or were skipped")
        )
    if report["stopped"]:
        lines.append(f"  STOPPED EARLY: {report['stopped']}")
    return "\n".join(lines)
