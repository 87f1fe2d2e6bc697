"""The command line as a user meets it: help for every command, python -m,
the demo, the cache commands and the exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from emailpers import __version__
from emailpers.cli import cli

from conftest import ScriptedAPI, invoke, manifest, manifest_lines, parse_eml, render, report, source, write_campaign


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = [(prefix, group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += commands(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


ALL_COMMANDS = commands(cli)


def test_the_expected_commands_exist() -> None:
    assert sorted(" ".join(path) for path, _ in ALL_COMMANDS) == [
        "", "amp", "amp fetch-validator", "amp where", "cache", "cache clear", "cache stats", "cache warm", "check",
        "demo", "preview", "render", "send", "status",
    ]


@pytest.mark.parametrize(("path", "command"), ALL_COMMANDS, ids=[" ".join(p) or "emailpers" for p, _ in ALL_COMMANDS])
def test_every_command_has_help_listing_its_options(path: tuple[str, ...], command: click.Command) -> None:
    result = invoke(*path, "--help")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: emailpers {' '.join(path)}".rstrip() + " [OPTIONS]")
    assert command.help, f"{path} has no help text"
    assert command.help.splitlines()[0] in result.stdout
    for param in command.params:
        for name in param.opts + param.secondary_opts:
            if name.startswith("-"):
                assert name in result.stdout, f"{name} missing from `{' '.join(path)} --help`"


def test_render_help_mentions_its_options() -> None:
    result = invoke("render", "-h")

    assert result.exit_code == 0
    for option in ("--out", "--format", "--recipients", "--concurrency", "--workers", "--cache-dir",
                   "--no-cache", "--offline", "--fresh", "--max-error-rate", "--no-progress"):
        assert option in result.stdout
    assert "[default: eml]" in result.stdout


def test_python_m_emailpers() -> None:
    result = subprocess.run([sys.executable, "-m", "emailpers", "--help"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: emailpers [OPTIONS] COMMAND [ARGS]...")
    for name in ("render", "cache", "demo"):
        assert f"  {name} " in result.stdout


def test_version() -> None:
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"emailpers, version {__version__}\n")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert invoke("frobnicate").exit_code == 2
    missing_out = invoke("render", write_campaign(tmp_path / "c"))
    assert missing_out.exit_code == 2
    assert "Missing option '--out'" in missing_out.stderr
    bad_workers = render(write_campaign(tmp_path / "c"), tmp_path / "out", workers=-1)
    assert bad_workers.exit_code == 2


def test_render_prints_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"

    result = render(write_campaign(tmp_path / "c"), out)

    assert result.exit_code == 0
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Campaign test-campaign: 1 recipients this run in ")
    assert lines[1] == "  rendered 1  fallback 0  skipped 0  invalid 0  failed 0   (manifest total)"
    assert lines[-1] == f"Output: {out}/ (manifest.jsonl, report.json, messages/)"


def test_output_folder_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    out = tmp_path / "taken" / "out"

    result = render(write_campaign(tmp_path / "c"), out)

    assert result.exit_code == 1, result.output
    assert result.stderr == f"Error: {out}: cannot use output folder: Not a directory\n"


def test_max_error_rate_stops_early_with_exit_4(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"error": "gone"}, status=404)
    rows = [{"id": f"u{i:02d}", "email": f"u{i}@example.com", "first_name": "X"} for i in range(60)]
    campaign = write_campaign(tmp_path / "c", recipients=rows, sources={"shop": source(api.url + "/users/{{ id }}")})
    out = tmp_path / "out"

    result = render(campaign, out, "--max-error-rate", "0.5", "--concurrency", "1")

    assert result.exit_code == 4, result.output
    assert result.stderr.startswith("Error: source 'shop': ")
    assert "most common error: HTTP 404" in result.stderr
    assert len(manifest_lines(out)) == 19  # the 20th, whose fetch tripped the guard, is redone on resume
    assert report(out)["stopped"].startswith("source 'shop': ")


# -- cache commands ----------------------------------------------------------------------


def test_cache_warm_then_offline_render_then_clear(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Mug"]})
    api.serve("/users/r2/cart", status=500)
    rows = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": "X"} for i in (1, 2, 3)]
    campaign = write_campaign(tmp_path / "c", recipients=rows, sources={"shop": source(api.url + "/users/{{ id }}/cart")})

    warm = invoke("cache", "warm", campaign, "--no-progress")
    assert warm.exit_code == 3, warm.output  # r2 could not be fetched
    assert api.count() == 3

    stats = invoke("cache", "stats", campaign, "--json")
    assert stats.exit_code == 0, stats.output
    figures = json.loads(stats.stdout)
    assert figures["entries"] == 2
    assert figures["sources"]["shop"]["entries"] == 2
    assert figures["directory"] == str(campaign.parent / ".emailpers-cache")

    offline = render(campaign, tmp_path / "out", "--offline")
    assert offline.exit_code == 0, offline.output
    entries = manifest(tmp_path / "out")
    assert {rid: e["sources"]["shop"]["outcome"] for rid, e in entries.items()} == {
        "r1": "cache", "r2": "skipped", "r3": "cache",
    }
    assert api.count() == 3

    cleared = invoke("cache", "clear", campaign, "--source", "shop")
    assert (cleared.exit_code, cleared.stdout) == (0, "Removed 2 cached responses of source shop.\n")
    unknown = invoke("cache", "clear", campaign, "--source", "nope")
    assert unknown.exit_code == 2
    assert "'nope' is not a source of this campaign (sources: shop)" in unknown.stderr


def test_cache_stats_without_a_cache(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c")

    result = invoke("cache", "stats", campaign)

    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {campaign.parent / '.emailpers-cache'}: no cache here yet; `emailpers cache warm` or a render creates it\n"
    )


# -- the demo ----------------------------------------------------------------------------


def test_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SHOP_API_TOKEN", "SHOP_API_KEY"):  # the demo sets them; restore afterwards
        monkeypatch.setenv(name, "placeholder")
    out = tmp_path / "demo"

    result = invoke("demo", "--out", out)

    assert result.exit_code == 0, result.output
    assert "== Run 1: cold cache" in result.stdout
    assert "== Run 2: same campaign on the warm cache" in result.stdout
    cold, warm = manifest(out), manifest(out / "warm-run")
    assert set(cold) == set(warm) == {str(n) for n in range(12345, 12356)}
    outcomes = {s["outcome"] for e in cold.values() for s in e["sources"].values()}
    assert {"live", "timeout", "error"} <= outcomes
    assert "cache" in {s["outcome"] for e in warm.values() for s in e["sources"].values()}
    statuses = [e["status"] for e in manifest_lines(out)]
    assert statuses.count("invalid") == 3
    assert {"rendered", "fallback"} <= set(statuses)
    assert cold["12353"]["status"] == "fallback"  # always 500: generic template
    assert cold["12353"]["fallback_blocks"][0]["template"] == "generic.mjml.j2"
    assert cold["12354"]["sources"]["cart"] == {**cold["12354"]["sources"]["cart"], "outcome": "live", "attempts": 2}
    assert cold["12350"]["status"] == "fallback"  # no last_browsed: one block falls back
    html = parse_eml(out / cold["12349"]["files"][0]).get_body(("html",))
    assert html is not None
    content = html.get_content()
    assert "&lt;script&gt;" in content and "<script>" not in content
    for entry in cold.values():
        parse_eml(out / entry["files"][0])
