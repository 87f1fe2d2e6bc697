"""A message file reaches its name only whole: written to a temporary name,
then renamed (the manifest's "every listed file is whole" rests on it). When
the rename fails, the recipient leaves no file, no temporary file and no
manifest line, and the run stops with one error."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from emailpers import output

from conftest import manifest_lines, parse_eml, render, write_campaign


class RenameFails:
    """`os` as emailpers.output sees it, except that renaming onto `target`
    fails as a full disk would; every other call is the real one."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.renamed: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == self.target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        self.renamed.append((Path(src).name, Path(dst).name))
        os.replace(src, dst)


PEOPLE = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": f"N{i}"} for i in range(1, 4)]


def test_a_message_file_reaches_its_name_only_by_a_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=PEOPLE)
    out = tmp_path / "out"
    fake_os = RenameFails("r2.eml")
    monkeypatch.setattr(output, "os", fake_os)

    result = render(campaign, out, "--concurrency", "1")  # workers=0: the files are written in this process

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: {out / 'messages'}: cannot write message files: No space left on device")
    assert [e["id"] for e in manifest_lines(out)] == ["r1"]
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["r1.eml"]  # no r2.eml, whole or partial; no tmp
    assert parse_eml(out / "messages" / "r1.eml")["To"] == "r1@example.com"
    renamed = [(src, dst) for src, dst in fake_os.renamed if dst.endswith(".eml")]
    assert [dst for _, dst in renamed] == ["r1.eml"]
    assert renamed[0][0].startswith(".r1.eml.") and renamed[0][0].endswith(".tmp")

    monkeypatch.undo()
    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert sorted(e["id"] for e in manifest_lines(out)) == ["r1", "r2", "r3"]
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["r1.eml", "r2.eml", "r3.eml"]
