"""A hostile disk (issue 8, #12 and #16): a full file system, a file size limit.
A disk error stops the run with one `Error:` line, records nothing for the
recipients whose files were not written, leaves messages/ holding exactly what
the manifest lists, and the rerun finishes the job with everyone once.

The errors are real: a small tmpfs mounted for the test (ENOSPC; skipped where
the sandbox does not allow a mount), and RLIMIT_FSIZE set on a real emailpers
process (EFBIG from the kernel, everywhere)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import manifest, manifest_lines, parse_eml, render, write_campaign, write_recipients


def people(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": f"p{i:03d}", "email": f"p{i}@example.com", "first_name": f"P{i}", **extra} for i in range(n)]


def assert_consistent(out: Path) -> None:
    """No recipient recorded failed; every listed file whole; nothing else in messages/."""
    lines = manifest_lines(out)
    assert "failed" not in {e["status"] for e in lines}
    listed = sorted(Path(f).name for e in lines for f in e["files"])
    assert listed == sorted(p.name for p in (out / "messages").iterdir())
    for name in listed:
        assert parse_eml(out / "messages" / name)["To"]


def run_limited(campaign: Path, out: Path, max_file_bytes: int, *args: str) -> subprocess.CompletedProcess[str]:
    """A real emailpers process whose files may not grow past max_file_bytes
    (RLIMIT_FSIZE: the kernel answers EFBIG, and Python ignores SIGXFSZ)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    # --no-cache: the sqlite cache would hit the limit first (a cache error is another test's business)
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out), "--no-progress", "--no-cache",
               *args]
    return subprocess.run(command, preexec_fn=limit, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_message_file_the_disk_refuses_stops_the_run(tmp_path: Path, workers: str) -> None:
    rows = people(10)
    rows[4]["first_name"] = "x" * 200_000  # p004's email is larger than the process may write
    # A plain subject: a 200 KB subject would fail the recipient (header cap), not the disk.
    campaign = write_campaign(tmp_path / "c", recipients=rows, campaign={"subject": "Hello"})
    out = tmp_path / "out"

    result = run_limited(campaign, out, 64 * 1024, "--workers", workers, "--concurrency", "1")

    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"Error: {out / 'messages'}: cannot write message files: File too large (EFBIG); the run stopped, and "
        "recipients whose files were not written are not in the manifest: free space or fix the folder, then run "
        "the same command again to resume\n"
    )
    assert "p004" not in manifest(out)
    assert_consistent(out)
    assert json.loads((out / "report.json").read_text())["stopped"].startswith(f"{out / 'messages'}: cannot write")

    rows[4]["first_name"] = "Four"
    write_recipients(tmp_path / "c" / "recipients.jsonl", rows)
    result2 = render(campaign, out)

    assert result2.exit_code == 0, result2.output
    assert sorted(manifest(out)) == [r["id"] for r in rows]
    assert_consistent(out)


def test_a_manifest_the_disk_refuses_gives_one_error_and_a_report(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=people(200))
    out = tmp_path / "out"

    result = run_limited(campaign, out, 8 * 1024, "--workers", "0")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        f"Error: {out / 'manifest.jsonl'}: cannot write the manifest: File too large; the run stopped. Free space "
        "or fix the folder, then run the same command again to resume\n"
    )
    assert result.stdout.startswith("Campaign test-campaign: ")
    assert "STOPPED EARLY: " in result.stdout
    data = json.loads((out / "report.json").read_text())
    assert data["stopped"].startswith(f"{out / 'manifest.jsonl'}: cannot write the manifest")
    assert data["this_run"]["rendered"] == len(manifest_lines(out))  # lines that reached the disk, no more
    written = (out / "manifest.jsonl").read_bytes()
    # The kernel let part of a line through; the sweep after the stop cut it off (that recipient is redone).
    assert 7 * 1024 < len(written) <= 8 * 1024 and written.endswith(b"\n")
    assert_consistent(out)

    result2 = render(campaign, out)

    assert result2.exit_code == 0, result2.output
    assert sorted(manifest(out)) == [p["id"] for p in people(200)]
    assert_consistent(out)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1,200 KiB tmpfs: real ENOSPC. Needs root and a sandbox that allows mount."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and a sandbox that allows it): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_full_disk_stops_the_run_and_the_rerun_finishes_it(small_disk: Path, tmp_path: Path, workers: int) -> None:
    rows = people(400)  # each file takes a 4 KiB page: the disk is full after ~290, the manifest has 256 lines
    campaign = write_campaign(tmp_path / "c", recipients=rows)
    out = small_disk / "out"

    result = render(campaign, out, "--concurrency", "2", workers=workers)

    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: ") and "No space left on device" in result.stderr
    assert 0 < len(manifest_lines(out)) < 400
    assert_consistent(out)

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    result = render(campaign, out, workers=workers)

    assert result.exit_code == 0, result.output
    assert sorted(manifest(out)) == [r["id"] for r in rows]
    assert_consistent(out)

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    write_recipients(tmp_path / "c" / "recipients.jsonl", people(401))
    result = render(campaign, out, workers=workers)

    assert result.exit_code == 1
    assert result.stderr == f"Error: {out}: cannot use output folder: Read-only file system\n"
