"""Adaptive concurrency (emailpers/limits.py): the controller's trajectory on
a fake clock, fed latencies and outcomes; the gate holding requests to it;
and one run against a real loopback API that starts answering 429 past a
number of requests in flight."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_sources_advanced import users_source

from emailpers.limits import INITIAL_LIMIT, Controller, Gate

from advanced_servers import Api, Request, Response, running
from conftest import make_campaign, people, render, report


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def round_trip(c: Controller, clock: Clock, latency: float, *, busy: bool = True) -> None:
    """One round trip's worth of answers: as many as the limit, each with
    the limit in flight (`busy`) or one in flight, then the clock moves on."""
    for _ in range(c.allowed):
        c.sample(latency, c.allowed if busy else 1, dropped=False)
    clock.now += latency


def doubled_twice(clock: Clock) -> Controller:
    """A controller (ceiling 256) that started at 16 and doubled twice in slow start."""
    c = Controller(256, clock, initial=16)
    round_trip(c, clock, 0.1)
    round_trip(c, clock, 0.1)
    assert c.allowed == 64
    return c


def test_slow_start_doubles_the_limit_each_round_trip_up_to_the_ceiling() -> None:
    clock = Clock()
    c = Controller(100, clock, initial=16)
    trajectory = [c.allowed]
    for _ in range(4):
        round_trip(c, clock, 0.2)
        trajectory.append(c.allowed)
    assert trajectory == [16, 32, 64, 100, 100]


def test_the_limit_does_not_grow_while_it_is_not_in_use() -> None:
    clock = Clock()
    c = Controller(100, clock)
    for _ in range(10):
        round_trip(c, clock, 0.2, busy=False)
    assert c.allowed == INITIAL_LIMIT


def test_drops_halve_the_limit_once_per_round_trip() -> None:
    clock = Clock()
    c = doubled_twice(clock)
    for _ in range(20):  # a burst of 429s within one round trip: one signal
        c.sample(0.001, 64, dropped=True)
    assert c.allowed == 32
    clock.now += 0.11
    c.sample(0.001, 32, dropped=True)
    assert c.allowed == 16
    for _ in range(10):  # a server refusing everything, a round trip apart each
        clock.now += 0.11
        c.sample(0.001, 1, dropped=True)
    assert c.allowed == 1


def test_an_apis_usual_one_percent_of_503s_never_halves_a_large_limit() -> None:
    """Three 503s close together are 3 of a round trip's 256 answers, not overload."""
    clock = Clock()
    c = Controller(256, clock)
    while c.allowed < 256:
        round_trip(c, clock, 0.2)
    for n in range(5000):  # 1%: in bursts of three
        c.sample(0.2, 256, dropped=n % 300 in (0, 1, 2))
        clock.now += 0.2 / 256
    assert c.allowed == 256 and c.changes == 224


def test_an_odd_failure_is_not_overload() -> None:
    clock = Clock()
    c = Controller(256, clock, initial=16)
    for i in range(1000):  # 2% of answers a 503, all the time
        c.sample(0.1, c.allowed, dropped=i % 50 == 0)
        clock.now += 0.01
    assert c.allowed == 256
    assert c.slow_start


def test_after_a_decrease_the_limit_grows_by_its_square_root_per_round_trip() -> None:
    clock = Clock()
    c = Controller(256, clock, initial=16)
    for _ in range(3):
        round_trip(c, clock, 0.1)
    assert c.allowed == 128
    for _ in range(20):  # a round trip with 20 of 128 answers refused: overload
        c.sample(0.1, 128, dropped=True)
    assert c.allowed == 64
    clock.now += 0.11
    round_trip(c, clock, 0.1, busy=False)  # the drops fade; a limit not in use does not grow
    trajectory = []
    for _ in range(3):
        round_trip(c, clock, 0.1)
        trajectory.append(c.allowed)
    assert trajectory == [71, 79, 88]  # about +sqrt(limit) a round trip


def test_rising_latency_shrinks_the_limit_by_the_gradient() -> None:
    clock = Clock()
    c = doubled_twice(clock)
    # The API slows to 3x its floor: the smoothed latency climbs past 2x + slack,
    # then the limit falls by (2 x floor + slack) / smoothed (at most by half) per round trip.
    trajectory = []
    for _ in range(4):
        for _ in range(c.allowed):
            c.sample(0.3, c.allowed, dropped=False)
        clock.now += 0.3
        trajectory.append(c.allowed)
    assert trajectory == [70, 62, 58, 55]  # a few answers of growth before the smoothed latency passes 1.5x, then 2x
    assert c.slow_start is False


def test_a_queue_forming_ends_the_doubling_without_a_decrease() -> None:
    clock = Clock()
    c = doubled_twice(clock)
    trajectory = []
    for _ in range(3):
        round_trip(c, clock, 0.22)  # past 1.5x the floor + slack (0.2), within 2x + slack (0.25)
        trajectory.append(c.allowed)
    assert not c.slow_start
    assert trajectory == [86, 95, 104]  # doubling would be 128: a dozen answers of it, then ~+sqrt(limit) per round trip


def test_jitter_within_the_tolerance_is_not_a_queue() -> None:
    clock = Clock()
    c = Controller(256, clock, initial=16)
    latencies = [0.15, 0.25, 0.2, 0.18, 0.22]  # 200 +/- 50 ms
    for i in range(400):
        c.sample(latencies[i % 5], c.allowed, dropped=False)
        clock.now += 0.01
    assert c.allowed == 256
    assert c.slow_start  # never a decrease


def test_a_busy_clients_own_delay_against_a_fast_api_is_not_a_queue() -> None:
    clock = Clock()
    c = Controller(256, clock, initial=16)
    c.sample(0.015, c.allowed, dropped=False)  # the API's 15 ms, once
    for _ in range(6):
        round_trip(c, clock, 0.045)  # then +30 ms of event-loop delay on every answer
    assert c.allowed == 256


def test_a_fixed_limit_stays_at_the_ceiling() -> None:
    clock = Clock()
    c = Controller(32, clock, adaptive=False)
    c.sample(5.0, 32, dropped=True)
    c.sample(0.1, 32, dropped=False)
    assert c.allowed == 32
    assert c.figures() == {"min": 32, "median": 32, "max": 32, "final": 32, "changes": 0, "ceiling": 32}


def test_figures_are_weighted_by_the_time_at_each_limit() -> None:
    clock = Clock()
    c = Controller(64, clock, initial=16)
    clock.now += 1.0  # 1 s at 16
    round_trip(c, clock, 0.1)  # 0.1 s more at 16, then 32
    clock.now += 5.0
    round_trip(c, clock, 0.1)  # 5.1 s at 32, then 64
    clock.now += 2.0
    assert c.figures() == {"min": 16, "median": 32, "max": 64, "final": 64, "changes": 48, "ceiling": 64}


def test_a_ceiling_below_the_initial_limit_is_the_start() -> None:
    c = Controller(4, Clock(), initial=16)
    assert c.allowed == 4


# -- the gate ---------------------------------------------------------------------------


def test_the_gate_holds_requests_to_the_current_limit() -> None:
    async def scenario() -> list[int]:
        clock = Clock()
        controller = Controller(2, clock, adaptive=False)
        gate = Gate(controller)
        seen: list[int] = []
        release = asyncio.Event()

        async def request() -> None:
            async with gate.slot():
                seen.append(gate.in_flight)
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(5)]
        await asyncio.sleep(0)
        assert gate.in_flight == 2
        controller.limit = 1.0  # shrunk: finishing requests do not let a new one in until below it
        tasks[0].cancel()  # a waiter cancelled: its turn goes to the next
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return seen

    seen = asyncio.run(scenario())
    assert seen == [1, 2, 1, 1, 1] or seen == [1, 2, 1, 1]


def test_a_woken_waiter_that_is_cancelled_passes_its_turn_on() -> None:
    async def scenario() -> int:
        gate = Gate(Controller(1, Clock(), adaptive=False))
        first_in = asyncio.Event()
        done = 0

        async def request(hold: asyncio.Event | None) -> None:
            nonlocal done
            async with gate.slot():
                if hold is not None:
                    first_in.set()
                    await hold.wait()
                done += 1

        hold = asyncio.Event()
        first = asyncio.create_task(request(hold))
        await first_in.wait()
        second = asyncio.create_task(request(None))
        third = asyncio.create_task(request(None))
        await asyncio.sleep(0)
        hold.set()
        await asyncio.sleep(0)  # the first leaves and wakes the second ...
        second.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(first, second, third, return_exceptions=True)
        return done

    assert asyncio.run(scenario()) == 2


# -- a real API that starts refusing --------------------------------------------------


class Overloading:
    """After `calm` requests, answers 429 to any request that arrives with
    more than `most` in flight. Records the in-flight count at each arrival."""

    def __init__(self, api: Api, *, calm: int, most: int, delay: float) -> None:
        self.lock = threading.Lock()
        self.arrivals: list[int] = []
        self.refused = 0
        self.refusals: list[int] = []  # arrival numbers answered 429

        @api.route(r"/v1/users/(\w+)")
        def _(request: Request, match: re.Match[str]) -> Response:
            with self.lock:
                in_flight = api.in_flight  # this request included
                self.arrivals.append(in_flight)
                if len(self.arrivals) > calm and in_flight > most:
                    self.refused += 1
                    self.refusals.append(len(self.arrivals))
                    return Response(429, {"error": "slow down"}, delay=delay / 3)  # refusing takes work too
            return Response(200, {"user": match.group(1)}, delay=delay)


@pytest.fixture
def api() -> Iterator[Api]:
    with running(Api()) as server:
        yield server


def test_an_api_answering_429_past_a_load_sees_the_load_fall(api: Api, tmp_path: Path) -> None:
    server = Overloading(api, calm=250, most=8, delay=0.03)
    source = users_source(api, "retries = 8\nbackoff_initial = 0.02\nbackoff_max = 0.2\ndeadline = 30")
    campaign = make_campaign(tmp_path, source, people(600), live=["users"])

    # With --no-adaptive (the fixed limit of before) the tail stays at ~27 in flight.
    result = render(campaign, tmp_path / "out", "--concurrency", "64")

    assert result.exit_code == 0, result.output
    loaded = server.arrivals[250:]
    assert server.refused > 0
    # Past the first refusals the load falls to about what the API takes.
    tail = loaded[len(loaded) // 3 :]
    assert sorted(tail)[int(len(tail) * 0.95)] <= 12, sorted(tail)[-50:]
    # It grew while the API kept up. (The limit, not the API's count of arrivals:
    # a client short of CPU sends fewer than its limit allows. Seen in CI.)
    figures = report(tmp_path / "out")["sources"]["users"]["concurrency"]
    assert figures["max"] > INITIAL_LIMIT and figures["final"] <= 12 and figures["ceiling"] == 64
    assert "in flight: limit min" in result.output


def test_verbose_tells_each_limit_change_of_a_source_with_its_reason(api: Api, tmp_path: Path) -> None:
    Overloading(api, calm=60, most=4, delay=0.02)
    source = users_source(api, "retries = 8\nbackoff_initial = 0.02\nbackoff_max = 0.1\ndeadline = 30")
    campaign = make_campaign(tmp_path, source, people(200), live=["users"])

    result = render(campaign, tmp_path / "out", "--concurrency", "64", "-v")

    assert result.exit_code == 0, result.output
    told = re.findall(r"^users: in flight limit (\d+) \((.*)\)$", result.output, re.M)
    assert any("429, 5xx or timeouts" in why for _, why in told), result.output[-3000:]
    assert int(told[-1][0]) < 32  # it came down from where it started


def test_on_change_hears_every_decrease_and_growth_in_steps() -> None:
    clock = Clock()
    heard: list[tuple[int, str]] = []
    c = Controller(100, clock, initial=16, on_change=lambda limit, why: heard.append((limit, why)))
    for _ in range(3):
        round_trip(c, clock, 0.2)
    grown = [limit for limit, _ in heard]
    assert grown[0] == 20 and grown[-1] == 100 and len(grown) < 10  # 16 -> 100 in ~1.25x steps, not 84 lines
    assert all(b >= 1.25 * a or b == 100 for a, b in zip(grown, grown[1:], strict=False))
    heard.clear()
    for _ in range(15):
        c.sample(0.001, 100, dropped=True)
    [(limit, why)] = heard  # once per round trip
    assert limit == 50 and re.fullmatch(r"1\d% of recent answers were 429, 5xx or timeouts", why), heard
    heard.clear()
    clock.now += 1.0  # a round trip after the drops
    for _ in range(8):  # answers slow down: past twice the fastest + 50 ms, a queue
        clock.now += 0.01
        c.sample(2.0, 50, dropped=False)
    [(limit, why)] = heard  # once per round trip
    assert limit < 50 and re.fullmatch(r"latency \d+ ms, over \d+ ms", why), heard


def test_a_cancelled_waiter_already_passed_over_is_still_just_cancelled() -> None:
    # The waiter's future is cancelled and the holder leaves in the same tick:
    # the wake skips (and drops) the cancelled future before the waiter runs.
    async def scenario() -> BaseException | None:
        gate = Gate(Controller(1, Clock(), adaptive=False))
        await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        waiter.cancel()  # the future is cancelled now, the task's handler runs later
        gate.release(None, dropped=False)
        try:
            await waiter
        except BaseException as exc:  # noqa: BLE001 - what escapes is the point
            return exc
        return None

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)


def test_no_adaptive_holds_every_source_at_its_ceiling(api: Api, tmp_path: Path) -> None:
    @api.route(r"/v1/users/(\w+)")
    def _(request: Request, match: re.Match[str]) -> Response:
        # Long enough that a client short of CPU still has more than 32 out at once (at 50 ms,
        # a loaded machine sent only 29 before the first answers came back).
        return Response(200, {"user": match.group(1)}, delay=0.2)

    campaign = make_campaign(tmp_path, users_source(api), people(120), live=["users"])

    result = render(campaign, tmp_path / "out", "--concurrency", "48", "--no-adaptive")

    assert result.exit_code == 0, result.output
    assert api.max_in_flight > INITIAL_LIMIT  # from the start, not grown to
    figures = report(tmp_path / "out")["sources"]["users"]["concurrency"]
    assert figures == {"min": 48, "median": 48, "max": 48, "final": 48, "changes": 0, "ceiling": 48}
    assert "in flight:" not in result.output  # a limit that never changed is not news


def test_render_help_mentions_adaptive() -> None:
    from click.testing import CliRunner

    from emailpers.cli import cli

    result = CliRunner().invoke(cli, ["render", "-h"])

    assert "--adaptive / --no-adaptive" in result.stdout
    assert "--concurrency INTEGER RANGE" in result.stdout and "[default: 256" in result.stdout


def test_waiting_for_the_rate_limit_is_not_taken_for_api_latency(api: Api, tmp_path: Path) -> None:
    api.echo(r"/v1/users/(\w+)", delay=0.01)
    campaign = make_campaign(tmp_path, users_source(api, "rate_limit = 40"), people(80), live=["users"])

    result = render(campaign, tmp_path / "out", "-v")

    assert result.exit_code == 0, result.output
    # The API answered in ~10 ms throughout; the ~1 s a request queued for its turn
    # under 40 a second is this run's own pacing, no reason to cut the limit.
    figures = report(tmp_path / "out")["sources"]["users"]["concurrency"]
    assert figures["min"] >= INITIAL_LIMIT, result.output[-2000:]
