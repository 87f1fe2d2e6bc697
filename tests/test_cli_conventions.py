"""What CI jobs and cron expect of the CLI: --json, -q, -v, options from
EMAILPERS_* variables, an example in every command's --help."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from emailpers.cli import cli

from conftest import ScriptedAPI, invoke, render, source, write_campaign


def _campaign(tmp_path: Path, api: ScriptedAPI) -> Path:
    api.serve("/users/*", {"products": ["Lamp"]})
    return write_campaign(tmp_path / "c", sources={
        "shop": source(api.url + "/users/{{ id }}/cart", auth={"type": "bearer", "token_env": "CONV_TOKEN"})})


def test_render_json_quiet_and_verbose(api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONV_TOKEN", "tok-secret-123")
    campaign = _campaign(tmp_path, api)

    as_json = render(campaign, tmp_path / "a", "--json")
    quiet = render(campaign, tmp_path / "b", "-q")
    verbose = render(campaign, tmp_path / "c2", "-v", "-q", "--no-cache")

    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["this_run"]["rendered"] == 1 and report["command"] == "render"
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert verbose.exit_code == 0 and verbose.stdout == ""
    assert re.fullmatch(rf"GET {re.escape(api.url)}/users/r1/cart 200 \d+ms\n", verbose.stderr), verbose.stderr
    assert "tok-secret-123" not in verbose.stderr


def test_verbose_names_a_request_that_got_no_answer(tmp_path: Path) -> None:
    (tmp_path / "fixtures").mkdir()
    campaign = write_campaign(tmp_path / "c", sources={"shop": source("http://127.0.0.1:9/users/{{ id }}")})
    result = render(campaign, tmp_path / "out", "--replay", tmp_path / "fixtures", "-v", "-q")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"GET http://127\.0\.0\.1:9/users/r1 NoFixture \d+ms\n", result.stderr), result.stderr


def test_options_from_emailpers_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    campaign = write_campaign(tmp_path / "c")
    monkeypatch.setenv("EMAILPERS_RENDER_FORMAT", "html")
    monkeypatch.setenv("EMAILPERS_RENDER_QUIET", "1")
    monkeypatch.setenv("EMAILPERS_CHECK_JSON", "1")

    result = render(campaign, tmp_path / "out")
    check = invoke("check", campaign)

    assert (result.exit_code, result.stdout) == (0, "")
    assert sorted(p.suffix for p in (tmp_path / "out" / "messages").iterdir()) == [".html", ".txt"]
    assert json.loads(check.stdout)["recipients"] == ["r1"]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


@pytest.mark.parametrize("command", [(), *_commands(cli)], ids=lambda c: " ".join(c) or "emailpers")
def test_every_command_has_an_example_in_its_help(command: tuple[str, ...]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert re.search(r"^  Examples?\b.*:\n +emailpers ", result.stdout, re.MULTILINE), result.stdout
