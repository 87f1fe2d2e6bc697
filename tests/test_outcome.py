"""A recipient's outcome: the one function that decides a status, the tally
that counts outcomes, the report's exit code."""

from __future__ import annotations

import pytest

from emailpers.errors import TooManyFailures, UnhealthySource
from emailpers.flat import Histogram
from emailpers.outcome import NotRendered, Outcome, Rendered, SourceResult, StatusCounts, decide
from emailpers.recipients import Row
from emailpers.report import STATUSES, SourceFigures, build_report, summary
from emailpers.tally import HealthGuard, Tally

LIVE = SourceResult("live", attempts=1, ms=12.34, status_code=200)
DOWN = SourceResult("error", attempts=3, ms=800.0, status_code=503, error="HTTP 503")
SLOW = SourceResult("timeout", attempts=1, ms=2000.0)
BLOCK = {"template": "email.mjml", "line": 7, "sources": ["cart"], "reason": "HTTP 503"}


def row(problem: str | None = None) -> Row:
    return Row(number=4, fields={"id": "u1"}, id="u1", email="u1@example.com", problem=problem)


# -- decide: every branch ---------------------------------------------------------------


def test_a_row_with_a_problem_is_invalid_whatever_else() -> None:
    for outcome in (decide(row("bad email")), decide(row("bad email"), warm=True),
                    decide(row("bad email"), {"cart": DOWN}, required=["cart"], render=Rendered(["m/u1.eml"]))):
        assert outcome is not None
        assert (outcome.status, outcome.error, outcome.files) == ("invalid", "bad email", [])


def test_cache_warm_is_warmed_or_failed_with_every_source_error() -> None:
    assert decide(row(), {"cart": LIVE, "user": LIVE}, warm=True).status == "warmed"
    failed = decide(row(), {"cart": DOWN, "user": SLOW}, warm=True)
    assert (failed.status, failed.error) == ("failed", "HTTP 503; timeout")


def test_a_required_source_without_data_skips_the_recipient() -> None:
    skipped = decide(row(), {"cart": DOWN, "user": LIVE}, required=["cart", "user"])
    assert skipped is not None
    assert (skipped.status, skipped.error) == ("skipped", "required source cart unavailable: HTTP 503")
    assert skipped.sources == {"cart": DOWN, "user": LIVE}
    # ... even when a render result is at hand: nothing is sent without required data
    assert decide(row(), {"cart": DOWN}, required=["cart"], render=Rendered(["x"])).status == "skipped"


def test_an_optional_source_without_data_leaves_the_recipient_to_render() -> None:
    assert decide(row(), {"cart": DOWN, "user": LIVE}, required=["user"]) is None
    assert decide(row(), {}) is None


def test_the_render_result_decides_the_rest() -> None:
    failed = decide(row(), {"cart": LIVE}, render=NotRendered("email.mjml:3: 'x' is undefined"))
    assert (failed.status, failed.error, failed.files) == ("failed", "email.mjml:3: 'x' is undefined", [])
    rendered = decide(row(), {"cart": LIVE}, render=Rendered(["messages/u1.eml"]))
    assert (rendered.status, rendered.files, rendered.error) == ("rendered", ["messages/u1.eml"], None)
    blocks = decide(row(), {"cart": DOWN}, render=Rendered(["messages/u1.eml"], [BLOCK]))
    assert (blocks.status, blocks.fallback_blocks) == ("fallback", [BLOCK])
    whole = decide(row(), {"cart": DOWN}, render=Rendered(["messages/u1.eml"], [], fallback_template=True))
    assert whole.status == "fallback"


def test_the_manifest_line_keeps_its_shape() -> None:
    outcome = decide(row(), {"cart": DOWN}, render=Rendered(["messages/u1.eml"], [BLOCK]))
    assert outcome.manifest_line() == {
        "id": "u1", "email": "u1@example.com", "row": 4, "status": "fallback",
        "sources": {"cart": {"outcome": "error", "attempts": 3, "ms": 800.0, "status_code": 503, "error": "HTTP 503"}},
        "fallback_blocks": [BLOCK], "files": ["messages/u1.eml"], "error": None,
    }


def test_a_fallback_stands_in_for_the_sources_its_blocks_name_else_every_failed_one() -> None:
    named = decide(row(), {"cart": DOWN, "user": SLOW}, render=Rendered(["f"], [BLOCK]))
    assert named.fallback_sources() == {"cart"}
    template = decide(row(), {"cart": DOWN, "user": SLOW, "shop": LIVE}, render=Rendered(["f"], [], True))
    assert template.fallback_sources() == {"cart", "user"}
    assert decide(row(), {"cart": LIVE}, render=Rendered(["f"])).fallback_sources() == set()


# -- the tally -----------------------------------------------------------------------------


def test_the_tally_counts_statuses_and_per_source_figures() -> None:
    tally = Tally(HealthGuard(None))
    outcomes: list[Outcome | None] = [
        decide(row(), {"cart": LIVE, "user": LIVE}, render=Rendered(["a"])),
        decide(row(), {"cart": DOWN, "user": LIVE}, render=Rendered(["b"], [BLOCK])),
        decide(row(), {"cart": DOWN, "user": SLOW}, required=["user"]),
        decide(row("no email")),
    ]
    for outcome in outcomes:
        assert outcome is not None
        tally.add(outcome)
    assert dict(tally.counts) == {"rendered": 1, "fallback": 1, "skipped": 1, "invalid": 1}
    assert tally.recipients == 4
    assert dict(tally.source_recipients) == {"cart": 3, "user": 3}
    assert dict(tally.source_failures) == {"cart": 2, "user": 1}
    assert dict(tally.fallbacks) == {"cart": 1}  # a skipped recipient got no fallback


def test_the_tally_stops_the_run_at_the_max_failures_th_failed_recipient() -> None:
    tally = Tally(HealthGuard(None), max_failures=2)
    failed = decide(row(), {}, render=NotRendered("boom"))
    tally.add(failed)
    tally.add(decide(row(), {}, render=Rendered(["a"])))
    with pytest.raises(TooManyFailures, match=r"2 recipients failed in this run .* 'u1': boom"):
        tally.add(failed)
    assert tally.counts["failed"] == 2


def test_fetch_results_feed_the_error_rate_window() -> None:
    tally = Tally(HealthGuard(0.5, window=4, minimum=4))
    for result in (LIVE, SourceResult("cache"), SourceResult("live", shared=True), DOWN, DOWN):
        tally.fetched({"cart": result})
    assert list(tally.guard.recent["cart"]) == [None, "HTTP 503", "HTTP 503"]  # no request of its own: not judged
    with pytest.raises(UnhealthySource, match=r"source 'cart': 3 of its last 4 fetches failed .*HTTP 503"):
        tally.fetched({"cart": SLOW, "user": LIVE})


# -- the report ------------------------------------------------------------------------------


def test_the_exit_code_comes_from_the_whole_manifest_and_the_stop() -> None:
    ok = build_report(campaign="c", counts={"rendered": 2}, previous={}, sources={}, elapsed=1.0)
    assert (ok.exit_code, ok.failed_earlier) == (0, 0)
    earlier = build_report(campaign="c", counts={"rendered": 2}, previous={"failed": 1}, sources={}, elapsed=1.0)
    assert (earlier.exit_code, earlier.failed_earlier) == (3, 1)
    now = build_report(campaign="c", counts={"failed": 1}, previous={"failed": 1}, sources={}, elapsed=1.0)
    assert (now.exit_code, now.failed_earlier) == (3, 0)
    stopped = build_report(campaign="c", counts={"failed": 1}, previous={}, sources={}, elapsed=1.0,
                           stopped="source 'cart' failed", stop_code=4)
    assert stopped.exit_code == 4
    warm = build_report(campaign="c", counts={"warmed": 1, "failed": 1}, previous={}, sources={}, elapsed=1.0, warm=True)
    assert warm.exit_code == 3


def test_the_report_lists_every_known_status_then_any_other() -> None:
    value = build_report(campaign="c", counts={"rendered": 1, "odd": 1}, previous={"old": 2}, sources={}, elapsed=2.0)
    data = value.to_json()
    assert list(data["this_run"]) == [*STATUSES, "old", "odd"]
    zero: dict[str, int] = dict.fromkeys(STATUSES, 0)
    assert data["total"] == {**zero, "rendered": 1, "old": 2, "odd": 1}
    assert (data["command"], data["resumed_from_previous_runs"], data["recipients_per_s"]) == ("render", 2, 1.0)
    warm = build_report(campaign="c", counts={"warmed": 3}, previous={}, sources={}, elapsed=1.0, warm=True)
    assert list(warm.to_json()["this_run"]) == ["warmed", "invalid", "failed"]
    assert StatusCounts.of({}, warm=True).warmed == 0


def test_the_report_takes_plain_source_figures() -> None:
    figures = SourceFigures(requests=3, errors=1, fallbacks=1, latencies_ms=Histogram.of((10.0, 20.0, 30.0)),
                            error_kinds={"HTTP 503": 1})
    value = build_report(campaign="c", counts={"fallback": 1}, previous={}, sources={"cart": figures}, elapsed=1.0,
                         source_failures={"cart": (1, 3)})
    cart = value.to_json()["sources"]["cart"]
    assert cart["latency_ms"] == {"p50": 20.0, "p95": 30.0, "p99": 30.0, "max": 30.0}
    assert (cart["fallbacks"], cart["top_errors"]) == (1, {"HTTP 503": 1})
    assert value.degraded and value.to_json()["degraded_sources"] == {"cart": {"failed_recipients": 1, "recipients": 3}}
    assert "source cart: 3 requests, 0 cache hits, 0 retries, 1 errors, 1 fallbacks;" in summary(value)
