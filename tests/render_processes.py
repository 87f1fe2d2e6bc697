"""Helpers for tests that run `python -m emailpers render` as a real process
against a slow loopback API and look at its render processes with psutil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from conftest import Behaviour, ScriptedAPI, manifest, parse_eml, parts, source, write_campaign

SECRET = "s3cret-token-value-7f2c"  # the campaign's bearer token: it must never reach a render process
SIGNING_KEY = "unsubscribe-signing-key-not-for-render-processes"


def people(n: int) -> list[dict[str, str]]:
    return [{"id": f"u{i:03d}", "email": f"u{i}@example.com", "first_name": f"Name{i}"} for i in range(n)]


@dataclass
class Started:
    process: subprocess.Popen[bytes]
    behaviour: Behaviour
    ids: list[str]
    campaign: Path
    out: Path


def start_render(
    api: ScriptedAPI,
    tmp_path: Path,
    n: int,
    workers: int,
    *,
    new_session: bool = False,
    stdout: int = subprocess.DEVNULL,
    template: str | None = None,
    unsubscribe: bool = False,
) -> Started:
    """A real render process (the API answers after 0.2 s, eight requests at
    a time, so the run lasts seconds). `new_session`: its own process group, so
    a test can signal the whole group the way a terminal's Ctrl-C does."""
    behaviour = api.serve("/users/*", lambda request: {"products": [request.path.split("/")[2].upper()]}, delay=0.2)
    # unsubscribe: a signing key, a second secret that must stay in the main process
    extra = {"unsubscribe": {"url": "https://shop.example/u/{{ token }}", "key_env": "UNSUBSCRIBE_KEY"}} if unsubscribe else {}
    campaign = write_campaign(tmp_path / "c", recipients=people(n), template=template, campaign=extra,
                              sources={"shop": source(api.url + "/users/{{ id }}/cart",
                                                      auth={"type": "bearer", "token_env": "SHOP_TOKEN"})})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out),
               "--workers", str(workers), "--concurrency", "8", "--no-progress"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE,
                               env={**os.environ, "SHOP_TOKEN": SECRET, "UNSUBSCRIBE_KEY": SIGNING_KEY}, start_new_session=new_session)
    return Started(process, behaviour, [p["id"] for p in people(n)], campaign, out)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def render_processes(pid: int) -> list[psutil.Process]:
    """The pool's processes (not the resource tracker)."""
    found = []
    for child in descendants(pid):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_until(condition: Callable[[], bool], started: Started, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if started.process.poll() is not None:
            stderr = started.process.stderr.read().decode() if started.process.stderr else ""
            raise AssertionError(f"render ended (exit {started.process.returncode}) before {what}: {stderr}")
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def wait_mid_run(started: Started, workers: int) -> list[psutil.Process]:
    """Wait until a render process runs (unless `workers` is 0) and some
    messages are written; return every descendant of the main process (render
    processes, resource tracker). The pool starts its processes on demand, so
    the second of two may never be needed."""
    need = min(workers, 1)
    wait_until(lambda: len(render_processes(started.process.pid)) >= need, started, "a render process")
    wait_until(lambda: len(list((started.out / "messages").glob("*.eml"))) >= 2, started, "two messages written")
    return descendants(started.process.pid)


def survivors(children: list[psutil.Process], timeout: float = 10) -> list[str]:
    """The command lines of those of `children` still alive after up to
    `timeout` seconds (polled)."""
    _, alive = psutil.wait_procs(children, timeout=timeout)
    found = []
    for process in alive:
        try:
            found.append(" ".join(process.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return found


def kill_all(children: list[psutil.Process]) -> None:
    """Test cleanup: no process of a failed test may outlive it."""
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


def complete_lines(out: Path) -> list[dict[str, object]]:
    path = out / "manifest.jsonl"
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def files_match_manifest(out: Path) -> None:
    """After a stop emailpers controls, messages/ holds exactly the files the manifest lists."""
    listed = sorted(name for entry in complete_lines(out) for name in entry["files"])  # type: ignore[attr-defined]
    on_disk = sorted(f"messages/{p.name}" for p in (out / "messages").iterdir())
    assert on_disk == listed


def assert_each_once(out: Path, ids: list[str]) -> None:
    """Each id exactly once in the manifest, every message file whole and its own."""
    entries = manifest(out)
    assert sorted(entries) == sorted(ids)
    assert sorted(p.name for p in (out / "messages").iterdir()) == sorted(f"{rid}.eml" for rid in ids)
    for rid, entry in entries.items():
        assert entry["status"] == "rendered", entry
        message = parse_eml(out / entry["files"][0])
        assert message["To"] == entry["email"]
        assert f"<p>Cart: {rid.upper()}</p>" in parts(message)["html"]
