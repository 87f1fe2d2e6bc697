"""What a send did: the tally kept while sending, send-report.json, and the
summary lines the CLI prints."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emailpers.journal import OUTCOMES, SEND_REPORT, Outgoing
from emailpers.relay import SendOptions
from emailpers.report import EXIT_FAILED_RECIPIENTS, EXIT_OK

__all__ = ["SEND_REPORT", "Tally", "build_report", "send_exit_code", "send_summary"]


@dataclass
class Tally:
    """What this run did: outcomes, reply codes, failures worth showing."""

    outcomes: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)
    starts: int = 0  # transactions begun
    first_start: float | None = None
    last_start: float | None = None


def build_report(
    options: SendOptions,
    tally: Tally,
    stop_signal: int | None,
    messages: list[Outgoing],
    states: Mapping[str, str],
    settled: Counter[str],
    planned: int,
    elapsed: float,
) -> dict[str, Any]:
    this = {outcome: tally.outcomes.get(outcome, 0) for outcome in (*OUTCOMES, "unreadable")}
    total = Counter(states.get(m.id, "not sent") for m in messages)
    span = None if tally.first_start is None or tally.last_start is None else tally.last_start - tally.first_start
    return {
        "command": "send",
        "relay": options.relay.url,
        "dry_run": options.dry_run,
        "this_run": {**this, "attempted": sum(this.values()), "planned": planned},
        "total": {k: total.get(k, 0) for k in (*OUTCOMES, "not sent")},
        "messages": len(messages),
        "settled_by_earlier_runs": dict(settled),
        "reply_codes": dict(sorted(tally.codes.items())),
        "connections": options.connections,
        "rate_limit_per_s": options.rate,
        # Transactions begun per second, first to last: what --rate limits.
        "rate_achieved_per_s": round((tally.starts - 1) / span, 2) if span else None,
        "elapsed_s": round(elapsed, 3),
        "unreadable_files": tally.unreadable[:20],
        "stopped": None if stop_signal is None else signal.Signals(stop_signal).name,
    }


def send_exit_code(report: dict[str, Any]) -> int:
    """0 when every message the manifest offers is sent (or a dry run), 3 while
    any is rejected, deferred, unknown or unreadable."""
    if report["dry_run"]:
        return EXIT_OK
    total = report["total"]
    undelivered = total["rejected"] + total["deferred"] + total["unknown"] + report["this_run"]["unreadable"]
    return EXIT_FAILED_RECIPIENTS if undelivered else EXIT_OK


def send_summary(report: dict[str, Any]) -> str:
    """The lines printed at the end of a send."""
    if report["dry_run"]:
        return (f"Dry run: {report['relay']} accepted the connection, TLS and login; "
                f"{report['this_run']['planned']} messages would be sent.")
    this, total = report["this_run"], report["total"]
    rate = report["rate_achieved_per_s"]
    if this["planned"]:
        first = (f"Sent {this['sent']} of {this['planned']} messages to {report['relay']} in {report['elapsed_s']:.2f}s"
                 + (f" ({rate:g}/s)" if rate else ""))
    else:
        first = "Nothing to send: the journal settles every message"
    lines = [
        first,
        "  this run: " + "  ".join(f"{k} {this[k]}" for k in (*OUTCOMES, "unreadable") if this[k] or k == "sent"),
        "  journal:  " + "  ".join(f"{k} {v}" for k, v in total.items()) + f"   (of {report['messages']} messages)",
    ]
    if report["reply_codes"]:
        lines.append("  replies:  " + "  ".join(f"{code} x{n}" for code, n in report["reply_codes"].items()))
    if total["unknown"]:
        lines.append(f"  WARNING: {total['unknown']} messages are unknown (the connection died before the relay's "
                     "reply); --resend-unknown sends them again")
    lines.extend(f"  unreadable: {line}" for line in report["unreadable_files"])
    if report["stopped"]:
        lines.append(f"  STOPPED by {report['stopped']}")
    return "\n".join(lines)
