"""The manifest as a journal: a killed run resumes with every recipient exactly
once, a torn last line is redone, --fresh starts over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import (
    Behaviour,
    ScriptedAPI,
    manifest,
    manifest_lines,
    parse_eml,
    parts,
    render,
    report,
    source,
    write_campaign,
)
from render_processes import people


def complete_lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def assert_whole(out: Path, ids: list[str]) -> None:
    """Each id exactly once in the manifest, every message file whole and parseable."""
    entries = manifest(out)
    assert sorted(entries) == sorted(ids)
    expected_files = sorted(f"{rid}.eml" for rid in ids)
    assert sorted(p.name for p in (out / "messages").iterdir()) == expected_files
    for rid, entry in entries.items():
        assert entry["status"] == "rendered", entry
        message = parse_eml(out / entry["files"][0])
        assert message["To"] == entry["email"]
        assert f"<p>Cart: {rid.upper()}</p>" in parts(message)["html"]


def start_render(
    api: ScriptedAPI, tmp_path: Path, n: int, workers: int
) -> tuple[Behaviour, list[str], Path, Path, subprocess.Popen[bytes]]:
    """A real `python -m emailpers render` process against a slow loopback API:
    (the API behaviour, the ids, the campaign, the output folder, the process)."""
    behaviour = api.serve("/users/*", lambda request: {"products": [request.path.split("/")[2].upper()]}, delay=0.1)
    campaign = write_campaign(tmp_path / "c", recipients=people(n),
                              sources={"shop": source(api.url + "/users/{{ id }}/cart")})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out),
               "--workers", str(workers), "--concurrency", "2", "--no-progress"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return behaviour, [p["id"] for p in people(n)], campaign, out, process


def test_killed_run_resumes_with_each_recipient_once(api: ScriptedAPI, tmp_path: Path) -> None:
    behaviour, ids, campaign, out, process = start_render(api, tmp_path, 40, workers=0)
    try:
        deadline = time.monotonic() + 20
        while len(complete_lines(out / "manifest.jsonl")) < 3:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "no manifest lines within 20 s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    done_before = {str(e["id"]) for e in complete_lines(out / "manifest.jsonl")}
    assert 3 <= len(done_before) < 40, "the kill must land mid-run"
    seen_before = len(api.requests)

    behaviour.delay = 0.0
    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert_whole(out, ids)
    assert not list((out / "messages").glob(".*.tmp"))
    data = report(out)
    assert data["resumed_from_previous_runs"] == len(done_before)
    assert data["this_run"]["rendered"] == 40 - len(done_before)
    assert data["total"]["rendered"] == 40
    asked_again = {r.path.split("/")[2] for r in api.requests[seen_before:]}
    assert not asked_again & done_before, "finished recipients were fetched again"


def test_torn_last_line_is_dropped_and_redone(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", lambda request: {"products": [request.path.split("/")[2].upper()]})
    ids = [p["id"] for p in people(5)]
    campaign = write_campaign(tmp_path / "c", recipients=people(5), sources={"shop": source(api.url + "/users/{{ id }}/cart")})
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    path = out / "manifest.jsonl"
    data = path.read_bytes()
    last = data[data.rstrip(b"\n").rfind(b"\n") + 1:]
    torn_id = json.loads(last)["id"]
    path.write_bytes(data[: len(data) - len(last) // 2])  # a kill in the middle of the last write
    (out / "messages" / f"{torn_id}.eml").unlink()
    (out / "messages" / f".{torn_id}.eml.999.tmp").write_bytes(b"half a message")

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert path.read_bytes().endswith(b"\n")
    assert len(manifest_lines(out)) == 5
    assert_whole(out, ids)
    assert report(out)["this_run"]["rendered"] == 1
    assert report(out)["resumed_from_previous_runs"] == 4
    assert "resumed: 4 already done by an earlier run" in result.stdout


def test_resume_does_not_repeat_finished_or_invalid_rows(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Mug"]})
    rows = people(3) + [{"id": "", "email": "x@example.com"}, {"id": "u000", "email": "dup@example.com"}]
    campaign = write_campaign(tmp_path / "c", recipients=rows, sources={"shop": source(api.url + "/users/{{ id }}/cart")})
    out = tmp_path / "out"
    assert render(campaign, out, "--no-cache").exit_code == 0
    before = (out / "manifest.jsonl").read_bytes()

    result = render(campaign, out, "--no-cache")

    assert result.exit_code == 0, result.output
    assert (out / "manifest.jsonl").read_bytes() == before
    assert api.count() == 3
    data = report(out)
    assert data["this_run"] == {"rendered": 0, "fallback": 0, "skipped": 0, "invalid": 0, "failed": 0}
    assert data["total"] == {"rendered": 3, "fallback": 0, "skipped": 0, "invalid": 2, "failed": 0}


def test_fresh_starts_over(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", lambda request: {"products": [request.path.split("/")[2].upper()]})
    ids = [p["id"] for p in people(3)]
    campaign = write_campaign(tmp_path / "c", recipients=people(3), sources={"shop": source(api.url + "/users/{{ id }}/cart")})
    out = tmp_path / "out"
    assert render(campaign, out, "--no-cache").exit_code == 0
    (out / "messages" / "stray.eml").write_text("from an older campaign")

    result = render(campaign, out, "--no-cache", "--fresh")

    assert result.exit_code == 0, result.output
    assert_whole(out, ids)
    assert api.count() == 6
    assert report(out)["this_run"]["rendered"] == 3
    assert report(out)["resumed_from_previous_runs"] == 0


def test_a_foreign_manifest_is_refused(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"id": "a", "status": "rendered"}\nnot json at all\n{"id": "b", "status": "rendered"}\n')

    result = render(campaign, out)

    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {out / 'manifest.jsonl'}:2: not a manifest line; use a new --out folder or --fresh to start over\n"
    )
    assert render(campaign, out, "--fresh").exit_code == 0
    assert list(manifest(out)) == ["r1"]


def test_a_killed_render_process_stops_the_run_cleanly_and_it_resumes(api: ScriptedAPI, tmp_path: Path) -> None:
    import psutil

    behaviour, ids, campaign, out, process = start_render(api, tmp_path, 60, workers=2)
    try:
        deadline = time.monotonic() + 30
        while not list((out / "messages").glob("*.eml")):
            assert process.poll() is None and time.monotonic() < deadline, "no message written within 30 s"
            time.sleep(0.01)
        workers = [c for c in psutil.Process(process.pid).children() if "multiprocessing" in " ".join(c.cmdline())
                   and "resource_tracker" not in " ".join(c.cmdline())]
        assert workers, "no render process found"
        workers[0].kill()
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr
    assert stderr.decode().startswith("Error: a render process died"), stderr
    assert "Traceback" not in stderr.decode()

    behaviour.delay = 0.0
    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert_whole(out, ids)
