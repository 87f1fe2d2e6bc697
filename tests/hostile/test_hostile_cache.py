"""Issue 8 (and 7), the cache folder as hostile input: a planted folder must
never run code or delete files, a damaged, locked or unwritable one stops the
run with one `Error:` line before any request, and answers never cross
credentials through a shared folder. Real diskcache folders, real SQLite
locks held by another process."""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import diskcache
import pytest

from emailpers.cache import request_identity
from emailpers.campaign import Auth

from conftest import ScriptedAPI, eml_of, invoke, manifest, parts, render, source, write_campaign

CART = "/users/{{ id }}/cart"


class Payload:
    """Unpickling this creates the marker folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def campaign_with_cache(tmp_path: Path, api: ScriptedAPI) -> Path:
    api.serve("/users/r1/cart", {"products": ["Desk Lamp"]})
    return write_campaign(tmp_path / "campaign", sources={"shop": source(api.url + CART, cache_ttl=600)})


def rows(folder: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(folder / "cache.db") as db:
        return db.execute("SELECT key, raw, mode, filename FROM Cache").fetchall()


def plant(folder: Path, marker: Path) -> None:
    """Turn every entry a render wrote into a pickle that runs code, add one
    at the key the original code used, and a pickled key for iteration."""
    evil = pickle.dumps(Payload(marker))
    with sqlite3.connect(folder / "cache.db") as db:
        db.execute("UPDATE Cache SET mode = ?, value = ?", (diskcache.core.MODE_PICKLE, evil))
        db.execute(
            "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, mode, value)"
            " VALUES (?, 0, 0, NULL, 0, ?, ?)",
            (pickle.dumps(Payload(marker)), diskcache.core.MODE_PICKLE, evil),
        )


def test_a_planted_cache_never_runs_code_in_render_or_cache_stats(api: ScriptedAPI, tmp_path: Path) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    assert render(campaign, tmp_path / "warm").exit_code == 0
    # The key the original code used: sha256("GET <url>\n"), predictable from the campaign alone.
    predictable = hashlib.sha256(f"GET {api.url}/users/r1/cart\n".encode()).hexdigest()
    marker = tmp_path / "code-ran"
    with diskcache.Cache(str(folder)) as stock:
        stock.set(predictable, Payload(marker))
    plant(folder, marker)
    assert len(rows(folder)) >= 2 and not marker.exists()

    rendered = render(campaign, tmp_path / "out")
    stats = invoke("cache", "stats", campaign)
    cleared = invoke("cache", "clear", campaign)

    assert not marker.exists()
    assert rendered.exit_code == 0, rendered.output
    assert manifest(tmp_path / "out")["r1"]["sources"]["shop"]["outcome"] == "live"  # the planted rows were misses
    assert "<p>Cart: Desk Lamp</p>" in parts(eml_of(tmp_path / "out", manifest(tmp_path / "out")["r1"]))["html"]
    assert stats.exit_code == 0, stats.output
    assert cleared.exit_code == 0, cleared.output


def entry(data: bytes, stored_at: bytes = b"1e12") -> bytes:
    return b'{"data": %s, "stored_at": %s, "fresh_for": 600, "source": "shop", "url": "u"}' % (data, stored_at)


@pytest.mark.parametrize(
    "value",
    [
        entry(b'{"products": ["Forged"]}')[:-1],  # truncated
        entry(b'{"products": ["Forged"]}', stored_at=b'"now"'),
        entry(b'{"products": ["Forged"], "deep": ' + b"[" * 900 + b"]" * 900 + b"}"),  # stopped the run in pickle
        entry(b'{"products": ["Forged"], "many": [' + b",".join([b"{}"] * 60_000) + b"]}"),
    ],
    ids=["truncated", "no-time", "nested-900", "60k-values"],
)
def test_an_entry_that_does_not_parse_or_passes_the_limits_is_a_miss(
    api: ScriptedAPI, tmp_path: Path, value: bytes
) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    assert render(campaign, tmp_path / "warm").exit_code == 0
    with sqlite3.connect(folder / "cache.db") as db:
        db.execute("UPDATE Cache SET value = ?", (value,))

    result = render(campaign, tmp_path / "out", workers=1)

    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "out")["r1"]["sources"]["shop"]["outcome"] == "live"
    assert api.count("/users/r1/cart") == 2


def test_an_entry_of_ours_is_read_back(api: ScriptedAPI, tmp_path: Path) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    assert render(campaign, tmp_path / "warm").exit_code == 0
    with sqlite3.connect(folder / "cache.db") as db:
        db.execute("UPDATE Cache SET value = ?", (entry(b'{"products": ["From the cache"]}'),))

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "out")["r1"]["sources"]["shop"]["outcome"] == "cache"
    assert "<p>Cart: From the cache</p>" in parts(eml_of(tmp_path / "out", manifest(tmp_path / "out")["r1"]))["html"]


def test_a_row_naming_a_file_outside_the_folder_never_deletes_it(api: ScriptedAPI, tmp_path: Path) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    assert render(campaign, tmp_path / "warm").exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    with sqlite3.connect(folder / "cache.db") as db:  # expired long ago: the next expiry sweep removes it
        db.execute("UPDATE Cache SET expire_time = 1, filename = ?", (os.path.relpath(victim, folder),))

    stats = invoke("cache", "stats", campaign)
    cleared = invoke("cache", "clear", campaign)

    assert (stats.exit_code, cleared.exit_code) == (0, 0), stats.output + cleared.output
    assert victim.read_text() == "precious"


# -- a folder that cannot be used ---------------------------------------------------------------


def unusable(folder: Path, problem: str) -> str:
    return (
        f"Error: {folder}: the response cache cannot be used ({problem}). It holds only cached API responses: "
        "delete the folder to start a new one, point --cache-dir (or EMAILPERS_CACHE_DIR) elsewhere, "
        "or run with --no-cache\n"
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cache_database_stops_every_command_with_one_clear_error(
    api: ScriptedAPI, tmp_path: Path, damage: str
) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    assert render(campaign, tmp_path / "warm").exit_code == 0
    database = folder / "cache.db"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if damage == "garbage":
        database.write_bytes(b"this is not a database, it only sits where one should" * 100)
    else:
        database.write_bytes(database.read_bytes()[:1500])
    requests = api.count()

    results = [render(campaign, tmp_path / "out"), invoke("cache", "stats", campaign), invoke("cache", "clear", campaign)]

    for result in results:
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"Error: {folder}: the response cache cannot be used (cache.db ")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert api.count() == requests
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["cache.db", "cache.db-wal"])
def test_a_cache_database_that_links_elsewhere_is_refused(api: ScriptedAPI, tmp_path: Path, name: str) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    folder.mkdir()
    victim = tmp_path / "someone-elses.db"
    with sqlite3.connect(victim) as db:
        db.execute("CREATE TABLE mine (x)")
    if name != "cache.db":
        with sqlite3.connect(folder / "cache.db") as db:
            db.execute("CREATE TABLE Settings (key TEXT NOT NULL UNIQUE, value)")
    (folder / name).symlink_to(victim)
    before = victim.read_bytes()

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1
    assert result.stderr == unusable(folder, f"{name} is a symbolic link")
    assert victim.read_bytes() == before and api.count() == 0


def test_a_cache_locked_by_another_process_is_a_clear_error_not_a_long_wait(
    api: ScriptedAPI, tmp_path: Path
) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    assert render(campaign, tmp_path / "warm").exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         f"db = sqlite3.connect({str(folder / 'cache.db')!r}, isolation_level=None)\n"
         "db.execute('BEGIN EXCLUSIVE')\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        requests = api.count()

        results = [render(campaign, tmp_path / "out"), invoke("cache", "clear", campaign)]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)

    for result in results:
        assert result.exit_code == 1, result.output
        assert result.stderr == unusable(folder, "another process has held its database locked for 2s")
    assert api.count() == requests


def test_an_unwritable_cache_folder_stops_the_run_before_any_request(api: ScriptedAPI, tmp_path: Path) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    folder = blocker / "cache"  # root may write anywhere, but not under a regular file

    result = render(campaign, tmp_path / "out", "--cache-dir", folder)

    assert result.exit_code == 1
    assert result.stderr == unusable(folder, "cannot create it: Not a directory")
    assert api.count() == 0
    assert not (tmp_path / "out").exists()


def test_emailpers_cache_dir_sets_the_folder_and_cache_dir_overrides_it(
    api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    from_env = tmp_path / "from-env"

    monkeypatch.setenv("EMAILPERS_CACHE_DIR", str(blocker / "cache"))
    refused = render(campaign, tmp_path / "out1")
    overridden = render(campaign, tmp_path / "out2", "--cache-dir", tmp_path / "from-option")
    monkeypatch.setenv("EMAILPERS_CACHE_DIR", str(from_env))
    used = render(campaign, tmp_path / "out3")
    help_text = invoke("render", "--help").output

    assert refused.exit_code == 1 and refused.stderr == unusable(blocker / "cache", "cannot create it: Not a directory")
    assert overridden.exit_code == 0, overridden.output
    assert (tmp_path / "from-option" / "cache.db").is_file()
    assert used.exit_code == 0, used.output
    assert (from_env / "cache.db").is_file() and not (campaign.parent / ".emailpers-cache").exists()
    assert "EMAILPERS_CACHE_DIR" in help_text


# -- a shared folder does not share answers across credentials ------------------------------------


def test_a_shared_cache_dir_never_gives_one_campaigns_answers_to_another(
    api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_TOKEN", "secret-token-value")
    api.serve("/users/r1/cart", lambda request: {"products": [request.headers.get("authorization", "anonymous")]})
    url = api.url + CART
    signed_in = write_campaign(tmp_path / "a", sources={"shop": source(url, auth={"type": "bearer", "token_env": "SHOP_TOKEN"})})
    anonymous = write_campaign(tmp_path / "b", sources={"shop": source(url)})
    shared = tmp_path / "shared-cache"

    first = render(signed_in, tmp_path / "out-a", "--cache-dir", shared)
    second = render(anonymous, tmp_path / "out-b", "--cache-dir", shared)

    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    html = parts(eml_of(tmp_path / "out-b", manifest(tmp_path / "out-b")["r1"]))["html"]
    assert "<p>Cart: anonymous</p>" in html
    assert manifest(tmp_path / "out-b")["r1"]["sources"]["shop"]["outcome"] == "live"


@pytest.mark.parametrize(
    "setting", [("sqlite_query_only", "1"), ("disk_evil", 1), ("count", "many"), ("size", "large")]
)
def test_a_cache_with_settings_diskcache_would_act_on_is_refused(
    api: ScriptedAPI, tmp_path: Path, setting: tuple[str, Any]
) -> None:
    campaign = campaign_with_cache(tmp_path, api)
    folder = campaign.parent / ".emailpers-cache"
    assert render(campaign, tmp_path / "warm").exit_code == 0
    with sqlite3.connect(folder / "cache.db") as db:
        db.execute("INSERT OR REPLACE INTO Settings VALUES (?, ?)", setting)

    results = [render(campaign, tmp_path / "out"), invoke("cache", "stats", campaign)]

    for result in results:
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Error: {folder}: the response cache cannot be used (")
        assert result.stderr.count("\n") == 1


def test_the_credential_identity_is_an_hmac_never_the_secret() -> None:
    def oauth(client_id: str, secret: str) -> Auth:
        return Auth("oauth2", token_url="https://auth.example/token", client_id=client_id, client_secret=secret)

    bearer = request_identity({}, Auth("bearer", secret="s3cr3t-value"))

    assert "s3cr3t-value" not in bearer
    assert bearer != request_identity({}, Auth("bearer", secret="other-value")) != request_identity({}, None)
    assert request_identity({}, oauth("client-a", "x")) == request_identity({}, oauth("client-a", "x"))
    assert request_identity({}, oauth("client-a", "x")) != request_identity({}, oauth("client-b", "x"))
    assert request_identity({"X-Tenant": "a"}, None) == request_identity({"x-tenant": "a"}, None)
    assert request_identity({"X-Tenant": "a"}, None) != request_identity({"X-Tenant": "b"}, None)
