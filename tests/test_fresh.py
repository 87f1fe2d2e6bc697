"""`--fresh` on a big folder: the run starts at once, the old message files go
behind it (manifest.py), and what emailpers did not write stays."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from emailpers import manifest as manifest_module
from emailpers.manifest import Manifest

from conftest import manifest_lines, render, write_campaign
from render_processes import people


def old_folder(out: Path, n: int) -> None:
    messages = out / "messages"
    messages.mkdir(parents=True)
    for i in range(n):
        (messages / f"old{i:04d}.eml").write_text("x")
    (messages / "README").write_text("mine")


def test_fresh_opens_before_the_old_files_are_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    old_folder(out, 300)
    go = threading.Event()
    clear = getattr(manifest_module, "_clear", None)

    def held_clear(folders: list[Path], messages: Path) -> None:
        go.wait()
        assert clear is not None
        clear(folders, messages)

    monkeypatch.setattr(manifest_module, "_clear", held_clear, raising=False)

    journal = Manifest(out, fresh=True, run={"campaign": "c"})
    try:
        # Open, with a new empty messages/, while not one old file is deleted yet.
        assert sorted(p.name for p in (out / "messages").iterdir()) == []
        (aside,) = [p for p in out.iterdir() if p.name.startswith(".emailpers-old-")]
        assert len(list(aside.iterdir())) == 301
    finally:
        go.set()
        journal.close()

    assert [p.name for p in (out / "messages").iterdir()] == ["README"]
    assert not [p for p in out.iterdir() if p.name.startswith(".emailpers-old-")]


def test_a_folder_set_aside_by_a_killed_run_is_cleared_by_the_next(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=people(2))
    out = tmp_path / "out"
    old_folder(out, 5)
    (out / "messages").rename(out / ".emailpers-old-0123456789ab")

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["README", "u000.eml", "u001.eml"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".emailpers")] == [".emailpers.lock"]
    assert len(manifest_lines(out)) == 2
