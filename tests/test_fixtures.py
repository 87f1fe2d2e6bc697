"""Fixtures: `render --record DIR` against a real loopback API, then
`render --replay DIR` with the server stopped and the secret unset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from advanced_servers import Api, running
from conftest import ScriptedAPI, invoke, manifest, parse_eml, parts, render, report, source, write_campaign

TOKEN = "s3cret-token-value"
ROWS = [
    {"id": "u1", "email": "u1@example.com", "first_name": "Ann"},
    {"id": "u2", "email": "u2@example.com", "first_name": "Ben"},
    {"id": "u3", "email": "u3@example.com", "first_name": "Cy"},
]


def _campaign(folder: Path, url: str) -> Path:
    return write_campaign(
        folder,
        sources={"shop": source(f"{url}/users/{{{{ id }}}}/cart", auth={"type": "bearer", "token_env": "FIX_TOKEN"})},
        recipients=ROWS,
    )


def _messages(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "messages").iterdir()) if p.suffix in (".html", ".txt")}


def test_recorded_answers_replay_byte_identically_offline_without_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIX_TOKEN", TOKEN)
    fixtures = tmp_path / "fixtures"
    with running(Api()) as server:
        api = ScriptedAPI(server)
        api.serve("/users/u1/cart", {"products": ["Lamp", "Rug"]}, headers={"Set-Cookie": "session=abc"})
        api.serve("/users/u2/cart", {"error": "down"}, status=503)
        # u3: unscripted, a 404
        campaign = _campaign(tmp_path / "c", api.url)
        recorded = render(campaign, tmp_path / "recorded", "--record", fixtures, "--format", "all")
        assert recorded.exit_code == 0, recorded.output
        assert {r.headers.get("authorization") for r in api.requests} == {f"Bearer {TOKEN}"}
    files = sorted(p.relative_to(fixtures).as_posix() for p in fixtures.rglob("*.json"))
    # One file per request, under the host, named by the path: a person finds u2's data by its id.
    assert [(Path(f).parent.as_posix(), Path(f).name.split(".")[0]) for f in files] == [
        ("127.0.0.1", "users-u1-cart"), ("127.0.0.1", "users-u2-cart"), ("127.0.0.1", "users-u3-cart")
    ]
    u1 = json.loads(next(fixtures.rglob("users-u1-cart.*.json")).read_text())
    assert u1["status"] == 200 and u1["json"] == {"products": ["Lamp", "Rug"]}
    assert u1["headers"] == {"Content-Type": "application/json"}
    every_byte = b"".join(p.read_bytes() for p in fixtures.rglob("*") if p.is_file())
    assert TOKEN.encode() not in every_byte and b"session=abc" not in every_byte

    monkeypatch.delenv("FIX_TOKEN")
    replayed = render(campaign, tmp_path / "replayed", "--replay", fixtures, "--format", "all")

    assert replayed.exit_code == 0, replayed.output
    assert _messages(tmp_path / "replayed") == _messages(tmp_path / "recorded")
    assert len(_messages(tmp_path / "recorded")) == 6
    before, after = manifest(tmp_path / "recorded"), manifest(tmp_path / "replayed")
    assert {k: v["status"] for k, v in after.items()} == {"u1": "rendered", "u2": "fallback", "u3": "fallback"}
    assert {k: v["status"] for k, v in after.items()} == {k: v["status"] for k, v in before.items()}
    for rid in ("u1", "u2"):
        old = parse_eml(tmp_path / "recorded" / before[rid]["files"][0])
        new = parse_eml(tmp_path / "replayed" / after[rid]["files"][0])
        assert parts(old) == parts(new)
        assert old["Subject"] == new["Subject"]


def test_a_request_with_no_fixture_is_that_sources_error_counted(tmp_path: Path) -> None:
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    campaign = _campaign(tmp_path / "c", "http://127.0.0.1:9")

    result = render(campaign, tmp_path / "out", "--replay", fixtures)

    assert result.exit_code == 0, result.output
    statuses = {k: v["status"] for k, v in manifest(tmp_path / "out").items()}
    assert statuses == {"u1": "fallback", "u2": "fallback", "u3": "fallback"}
    errors = report(tmp_path / "out")["sources"]["shop"]["top_errors"]
    assert errors == {"no fixture for this request (record one with --record)": 3}
    assert "3 x no fixture for this request (record one with --record)" in result.stdout
    u1 = manifest(tmp_path / "out")["u1"]["sources"]["shop"]
    assert "users-u1-cart." in json.dumps(u1)


def test_a_fixture_edited_by_hand_replays_and_a_broken_one_is_named(tmp_path: Path) -> None:
    fixtures = tmp_path / "fixtures"
    campaign = _campaign(tmp_path / "c", "http://127.0.0.1:9")
    from emailpers.fixtures import fixture_path

    good = fixture_path(fixtures, "GET", "http://127.0.0.1:9/users/u1/cart")
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps({"status": 200, "json": {"products": ["Edited"]}}))
    broken = fixture_path(fixtures, "GET", "http://127.0.0.1:9/users/u2/cart")
    broken.write_text("{not json")
    fixture_path(fixtures, "GET", "http://127.0.0.1:9/users/u3/cart").write_text('{"timeout": true}')

    result = render(campaign, tmp_path / "out", "--replay", fixtures, "--format", "html")

    assert result.exit_code == 0, result.output
    entries = manifest(tmp_path / "out")
    assert entries["u1"]["status"] == "rendered"
    assert "Cart: Edited" in (tmp_path / "out" / entries["u1"]["files"][0]).read_text()
    assert entries["u2"]["status"] == "fallback"
    assert f"unusable fixture: {broken}" in json.dumps(entries["u2"]["sources"]["shop"])
    assert entries["u3"]["status"] == "fallback"
    assert (entries["u3"]["sources"]["shop"]["outcome"], entries["u3"]["sources"]["shop"]["error"]) == (
        "timeout", "no answer within 2s")


def test_the_port_is_not_part_of_a_fixtures_key() -> None:
    from emailpers.fixtures import fixture_path

    assert fixture_path(Path("f"), "GET", "http://127.0.0.1:8765/v1/a?x=1") == fixture_path(
        Path("f"), "GET", "http://127.0.0.1:40000/v1/a?x=1"
    )
    assert fixture_path(Path("f"), "GET", "http://h/v1/a?x=1") != fixture_path(Path("f"), "GET", "http://h/v1/a?x=2")


def test_record_replay_and_offline_are_exclusive(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c")
    result = render(campaign, tmp_path / "out", "--offline", "--replay", tmp_path / "f")
    assert result.exit_code == 2
    assert "--offline, --record and --replay each choose where answers come from: choose one" in result.stderr


def test_cache_warm_records(api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIX_TOKEN", TOKEN)
    api.serve("/users/*", {"products": ["Mug"]})
    campaign = _campaign(tmp_path / "c", api.url)

    result = invoke("cache", "warm", campaign, "--no-progress", "--record", tmp_path / "f")

    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "f").rglob("*.json"))) == 3
    assert os.environ["FIX_TOKEN"] == TOKEN
