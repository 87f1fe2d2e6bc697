"""Signals: SIGTERM and SIGINT stop a run cleanly (exit 143 / 130, the
manifest flushed, the resume hint printed), no render process outlives the
main process, not even after `kill -9`, and the rerun does each recipient
exactly once. Real processes against a real slow loopback API."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import HTML_TEMPLATE, ScriptedAPI, render, report
from render_processes import (
    SECRET,
    assert_each_once,
    complete_lines,
    files_match_manifest,
    kill_all,
    start_render,
    survivors,
    wait_mid_run,
)

N = 100


@pytest.mark.parametrize(
    ("signum", "workers", "exit_code"),
    [(signal.SIGTERM, 2, 143), (signal.SIGINT, 2, 130), (signal.SIGTERM, 0, 143), (signal.SIGINT, 0, 130)],
    ids=["SIGTERM-workers2", "SIGINT-workers2", "SIGTERM-workers0", "SIGINT-workers0"],
)
def test_a_signal_to_the_main_process_stops_the_run_cleanly(
    api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int, workers: int, exit_code: int
) -> None:
    started = start_render(api, tmp_path, N, workers)
    children = []
    try:
        children = wait_mid_run(started, workers)
        os.kill(started.process.pid, signum)  # only the main process, as `kill PID` or a supervisor does
        _, stderr = started.process.communicate(timeout=30)
        alive = survivors(children)
    finally:
        started.process.kill()
        kill_all(children)
    text = stderr.decode()
    assert started.process.returncode == exit_code, text
    assert "Traceback" not in text
    assert f"Interrupted by {signal.Signals(signum).name}" in text
    assert "run the same command to resume" in text
    assert alive == [], f"still running after the main process ended: {alive}"
    done_before = {str(entry["id"]) for entry in complete_lines(started.out)}
    assert 2 <= len(done_before) < N, "the signal must land mid-run"
    files_match_manifest(started.out)  # every finished recipient recorded, nothing unowned left behind
    assert report(started.out)["stopped"].startswith(f"Interrupted by {signal.Signals(signum).name}")

    started.behaviour.delay = 0.0
    monkeypatch.setenv("SHOP_TOKEN", SECRET)
    result = render(started.campaign, started.out)

    assert result.exit_code == 0, result.output
    assert_each_once(started.out, started.ids)
    assert report(started.out)["resumed_from_previous_runs"] == len(done_before)


def test_kill_9_of_the_main_process_leaves_no_render_process(
    api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = start_render(api, tmp_path, N, workers=2)
    children = []
    try:
        children = wait_mid_run(started, 2)
        os.kill(started.process.pid, signal.SIGKILL)
        started.process.wait(timeout=10)
        alive = survivors(children)
    finally:
        started.process.kill()
        kill_all(children)
    assert started.process.returncode == -signal.SIGKILL
    assert alive == [], f"outlived a kill -9 of the main process: {alive}"

    started.behaviour.delay = 0.0
    monkeypatch.setenv("SHOP_TOKEN", SECRET)
    result = render(started.campaign, started.out)

    assert result.exit_code == 0, result.output
    assert_each_once(started.out, started.ids)


def test_a_render_that_never_ends_does_not_hold_up_the_stop(api: ScriptedAPI, tmp_path: Path) -> None:
    """u000's render loops for hours; its data comes at once, everyone else's
    after 0.2 s, so once another recipient's message is written, u000 is
    surely in a render process. SIGTERM: u000 is given up after the grace."""
    api.serve("/users/u000/cart", {"products": ["NOW"]})
    endless = "{% if id == 'u000' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    started = start_render(api, tmp_path, N, workers=2, template=HTML_TEMPLATE + endless)
    children = []
    try:
        children = wait_mid_run(started, 2)
        os.kill(started.process.pid, signal.SIGTERM)
        _, stderr = started.process.communicate(timeout=30)
        alive = survivors(children)
    finally:
        started.process.kill()
        kill_all(children)
    assert started.process.returncode == 143, stderr.decode()
    assert alive == []
    files_match_manifest(started.out)
    assert not (started.out / "messages" / "u000.eml").exists()
