"""A message file reaches its name only whole: written unnamed and then linked
to its name (Linux), or written to a temporary name and then renamed (the
manifest's "every listed file is whole" rests on it). When that last step
fails, the recipient leaves no file, no temporary file and no manifest line,
and the run stops with one error."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from emailpers import output

from conftest import manifest_lines, parse_eml, render, write_campaign


class NamingFails:
    """`os` as emailpers.output sees it, except that giving `target` its name
    (a rename or a link) fails as a full disk would; every other call is the real one."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.renamed: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _named(self, src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == self.target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        self.renamed.append((str(src), Path(dst).name))

    def replace(self, src: str | Path, dst: str | Path) -> None:
        self._named(src, dst)
        os.replace(src, dst)

    def link(self, src: str | Path, dst: str | Path, **kwargs: Any) -> None:
        self._named(src, dst)
        os.link(src, dst, **kwargs)


PEOPLE = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": f"N{i}"} for i in range(1, 4)]


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed-then-linked", "temporary-then-renamed"])
def test_a_message_file_reaches_its_name_only_whole(
    unnamed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if unnamed and not output._UNNAMED[0]:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(output, "_UNNAMED", [unnamed])
    campaign = write_campaign(tmp_path / "c", recipients=PEOPLE)
    out = tmp_path / "out"
    fake_os = NamingFails("r2.eml")
    monkeypatch.setattr(output, "os", fake_os)

    result = render(campaign, out, "--concurrency", "1")  # workers=0: the files are written in this process

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: {out / 'messages'}: cannot write message files: No space left on device")
    assert [e["id"] for e in manifest_lines(out)] == ["r1"]
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["r1.eml"]  # no r2.eml, whole or partial; no tmp
    assert parse_eml(out / "messages" / "r1.eml")["To"] == "r1@example.com"
    renamed = [(src, dst) for src, dst in fake_os.renamed if dst.endswith(".eml")]
    assert [dst for _, dst in renamed] == ["r1.eml"]
    src = renamed[0][0]
    if unnamed:
        assert src.startswith("/proc/self/fd/")  # an unnamed file: nothing to leave behind
    else:
        assert Path(src).name.startswith(".r1.eml.") and src.endswith(".tmp")

    monkeypatch.undo()
    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert sorted(e["id"] for e in manifest_lines(out)) == ["r1", "r2", "r3"]
    assert sorted(p.name for p in (out / "messages").iterdir()) == ["r1.eml", "r2.eml", "r3.eml"]


def test_a_file_written_again_is_replaced_whole(tmp_path: Path) -> None:
    """The unnamed file cannot be linked over an existing name: that one write
    goes by a temporary name and a rename instead."""
    path = tmp_path / "r1.eml"
    output.write_atomic(path, b"first")
    output.write_atomic(path, b"second")
    assert path.read_bytes() == b"second" and [p.name for p in tmp_path.iterdir()] == ["r1.eml"]
