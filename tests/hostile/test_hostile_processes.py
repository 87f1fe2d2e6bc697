"""Issue 8 (6, 11, 14): render processes hold no secret in their environment,
die with the main process so a reader of the output sees its end, and leave
a terminal's Ctrl-C (SIGINT to the whole process group) to the main process.
Real `python -m emailpers render` processes against a slow loopback API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ScriptedAPI
from render_processes import SECRET, SIGNING_KEY, files_match_manifest, kill_all, start_render, survivors, wait_mid_run


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
def test_render_processes_and_the_resource_tracker_hold_no_secret(api: ScriptedAPI, tmp_path: Path) -> None:
    started = start_render(api, tmp_path, 100, workers=2, unsubscribe=True)
    children = []
    try:
        children = wait_mid_run(started, 2)
        environs = {}
        for child in children:
            environs[" ".join(child.cmdline())[-70:]] = Path(f"/proc/{child.pid}/environ").read_bytes()
        own = Path(f"/proc/{started.process.pid}/environ").read_bytes()
    finally:
        started.process.kill()
        kill_all(children)
        started.process.communicate()
    assert SECRET.encode() in own and SIGNING_KEY.encode() in own, "the test must hand the secrets to the main process"
    assert any("resource_tracker" in name for name in environs), environs.keys()
    assert any("spawn_main" in name for name in environs), environs.keys()
    leaking = [name for name, environ in environs.items() for secret in (SECRET, SIGNING_KEY) if secret.encode() in environ]
    assert leaking == []


def test_a_reader_of_the_output_sees_its_end_after_kill_9(api: ScriptedAPI, tmp_path: Path) -> None:
    """`emailpers render ... | cat` must end when the main process is killed:
    no orphan may keep stdout or stderr open."""
    started = start_render(api, tmp_path, 100, workers=2, stdout=subprocess.PIPE)
    children = []
    try:
        children = wait_mid_run(started, 2)
        os.kill(started.process.pid, signal.SIGKILL)
        try:
            started.process.communicate(timeout=10)  # reads stdout and stderr to their end
        except subprocess.TimeoutExpired:
            pytest.fail(f"stdout/stderr still open 10 s after kill -9 of the main process: {survivors(children, 0)}")
    finally:
        started.process.kill()
        kill_all(children)


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "group-sigterm"])
def test_a_signal_to_the_whole_process_group_stops_the_run_cleanly(
    api: ScriptedAPI, tmp_path: Path, signum: int
) -> None:
    """Ctrl-C in a terminal signals every process of the group, render
    processes included; so do `timeout` and systemd with SIGTERM."""
    started = start_render(api, tmp_path, 100, workers=2, new_session=True)
    children = []
    try:
        children = wait_mid_run(started, 2)
        os.killpg(started.process.pid, signum)
        _, stderr = started.process.communicate(timeout=30)
        alive = survivors(children)
    finally:
        started.process.kill()
        kill_all(children)
    text = stderr.decode()
    assert started.process.returncode == 128 + signum, text
    assert "Traceback" not in text
    assert "run the same command to resume" in text
    assert alive == []
    files_match_manifest(started.out)
