"""Trying it by hand: `demo --serve` keeps the sample API up and prints
commands that work; the sample campaign runs directly from its fixtures; the
shipped fixtures are what the sample API answers."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from emailpers.campaign import load_campaign
from emailpers.demo import project_root, write_fixtures

from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_fixtures_are_the_sample_apis_answers(tmp_path: Path) -> None:
    campaign = load_campaign(ROOT / "templates" / "campaign.toml", need_secrets=False)
    data = json.loads((ROOT / "sample_data" / "api.json").read_text())

    written = write_fixtures(campaign, data, tmp_path / "fixtures")

    shipped = ROOT / "sample_data" / "fixtures"
    assert sorted(p.relative_to(tmp_path / "fixtures") for p in written) == sorted(
        p.relative_to(shipped) for p in shipped.rglob("*.json"))
    for path in written:
        assert path.read_bytes() == (shipped / path.relative_to(tmp_path / "fixtures")).read_bytes()


def test_the_sample_campaign_checks_clean_from_any_folder_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHOP_API_TOKEN", raising=False)
    result = invoke("check", project_root() / "templates" / "campaign.toml", "--strict")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(": 0 errors, 0 warnings\n")
    assert "Checked 11 recipients with data from fixtures in " in result.stdout


def test_demo_serve_prints_commands_that_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_API_")}
    demo = subprocess.Popen([sys.executable, "-m", "emailpers", "demo", "--serve", "--out", "try"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("  emailpers preview"):
            line = demo.stdout.readline()
            assert line, demo.stderr.read() if demo.stderr else ""
            lines.append(line)
        assert lines[0].startswith("Sample API on http://127.0.0.1:")
        commands = [shlex.split(line) for line in lines if line.startswith("  ")]
        assert commands[0][0] == "export"
        run_env = {**env, **dict(a.split("=", 1) for a in commands[0][1:])}
        for command in commands[1:]:
            if "--open" in command:
                command.remove("--open")
            done = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, env=run_env,
                                  capture_output=True, text=True, timeout=120)
            # cache warm exits 3: the sample API's slow user and its 500 are not cached, by design
            expected = 3 if command[1:3] == ["cache", "warm"] else 0
            assert done.returncode == expected, (command, done.stdout, done.stderr)
        assert (tmp_path / "try" / "preview" / "index.html").is_file()
        assert any((tmp_path / "try" / "fixtures").rglob("*.json"))
    finally:
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    assert demo.returncode == 0, err
    assert out.endswith("Sample API stopped.\n")


def test_the_wheel_carries_the_sample_campaign(tmp_path: Path) -> None:
    """`pip install .` gives `emailpers demo` its campaign: every file of
    templates/ and sample_data/ is in the wheel, under emailpers/sample_campaign/."""
    import shutil
    import zipfile

    # A clean copy: setuptools would reuse a stale build/ folder of the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "*.egg-info", "__pycache__", ".*_cache", "demo-out"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("emailpers-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"emailpers/sample_campaign/{p.relative_to(ROOT).as_posix()}"
        for folder in ("templates", "sample_data") for p in (ROOT / folder).rglob("*") if p.is_file()
    }
    assert expected <= names, sorted(expected - names)
    assert "emailpers/sample_campaign/templates/campaign.toml" in names
