"""Shards without a shared backend: `--shard K/N` and `auto/N`, one --out for
all shards, each resuming only its part, and `emailpers status` over them.
(The Redis backend, with shards as separate processes: test_redis_shards.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from emailpers.cli import cli
from emailpers.errors import CampaignError
from emailpers.output import file_stem
from emailpers.shards import Shard, parse_shard, shard_of, stem_id

from conftest import ScriptedAPI, source, write_campaign

ROWS = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": f"N{i}"} for i in range(40)]


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="emailpers", catch_exceptions=False, env=env)


def render_shard(campaign: Path, out: Path, shard: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return run("render", campaign, "--out", out, "--workers", "0", "--no-progress", "--shard", shard, *args, env=env)


def journal(out: Path, name: str) -> list[dict[str, Any]]:
    path = out / "shards" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_the_hash_is_the_same_everywhere() -> None:
    # Pinned: SHA-256 of the UTF-8 id, first 8 bytes big-endian, modulo N. Python's
    # salted hash() would give other values in every process.
    assert [shard_of(f"r{i}", 4) for i in range(12)] == [2, 1, 1, 0, 0, 2, 1, 3, 0, 3, 2, 0]
    assert shard_of("ünïcode", 7) == 1


def test_auto_reads_the_runners_index() -> None:
    assert parse_shard("auto/4", {"JOB_COMPLETION_INDEX": "2"}) == Shard(2, 4, "JOB_COMPLETION_INDEX")
    assert parse_shard("auto/4", {"AWS_BATCH_JOB_ARRAY_INDEX": "3"}).index == 3
    assert parse_shard("auto/4", {"SLURM_ARRAY_TASK_ID": "0"}).index == 0
    assert parse_shard("auto/4", {"CI_NODE_INDEX": "1"}) == Shard(0, 4, "CI_NODE_INDEX")  # GitLab counts from 1
    assert parse_shard("1/3", {"JOB_COMPLETION_INDEX": "2"}) == Shard(1, 3)
    with pytest.raises(CampaignError, match="none of JOB_COMPLETION_INDEX, .*CI_NODE_INDEX is set"):
        parse_shard("auto/4", {})
    with pytest.raises(CampaignError, match=r"index 4 \(CI_NODE_INDEX=5\) is not between 0 and 3"):
        parse_shard("auto/4", {"CI_NODE_INDEX": "5"})
    with pytest.raises(CampaignError, match="write K/N"):
        parse_shard("2of4", {})


@pytest.mark.parametrize("recipient_id", ["r1", "Ann.B", "ünï code/../x", "a" * 90])
def test_a_message_file_names_its_shard(recipient_id: str) -> None:
    assert stem_id(file_stem(recipient_id)) == recipient_id


def test_four_shards_share_one_out_and_status_totals_them(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/cart/*", {"products": ["Mug"]})
    rows = [*ROWS, {"id": "", "email": "nobody@example.com", "first_name": "X"}]  # an invalid row: one shard has it
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/cart/{{ id }}")}, recipients=rows)
    out = tmp_path / "out"
    for k in (0, 1, 2):
        assert render_shard(campaign, out, f"{k}/4").exit_code == 0

    status = run("status", out)
    assert status.exit_code == 1  # shard 3 never started
    assert "shard 3-of-4: no recipients   (never started)" in status.output

    auto = render_shard(campaign, out, "auto/4", env={"JOB_COMPLETION_INDEX": "3"})
    assert auto.exit_code == 0, auto.output
    assert "Shard 3/4 (from JOB_COMPLETION_INDEX=3)" in auto.stderr
    assert {e["id"] for e in journal(out, "3-of-4")} == {r["id"] for r in ROWS if shard_of(r["id"], 4) == 3}

    lines = [e for k in range(4) for e in journal(out, f"{k}-of-4")]
    ids = [e["id"] for e in lines if e["status"] != "invalid"]
    assert sorted(ids) == sorted(r["id"] for r in ROWS)  # each recipient exactly once
    assert [e["status"] for e in lines].count("invalid") == 1
    assert len(list((out / "messages").iterdir())) == len(ROWS)
    assert api.count() == len(ROWS)

    status = run("status", out)
    assert status.exit_code == 0, status.output
    assert status.output.splitlines()[-1] == f"overall: {len(ROWS) + 1} recipients: invalid 1  rendered {len(ROWS)}   (exit 0)"

    # A shard run again resumes only its own part: nothing to do.
    again = render_shard(campaign, out, "2/4")
    assert again.exit_code == 0
    assert "0 recipients this run" in again.output
    assert api.count() == len(ROWS)


def test_a_shard_refuses_another_n_or_campaign(api: ScriptedAPI, tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=ROWS)
    out = tmp_path / "out"
    assert render_shard(campaign, out, "0/4").exit_code == 0
    other_n = render_shard(campaign, out, "1/3")
    assert other_n.exit_code == 1
    assert "it was run as 4 shards, now 3 shards" in other_n.stderr
    assert not (out / "shards" / "1-of-3.jsonl").exists()

    (tmp_path / "c" / "email.html.j2").write_text("<html><body>changed</body></html>\n", encoding="utf-8")
    changed = render_shard(campaign, out, "1/4")
    assert changed.exit_code == 1
    assert "email.html.j2 changed" in changed.stderr

    unsharded = run("render", campaign, "--out", out, "--workers", "0", "--no-progress")
    assert unsharded.exit_code == 1
    assert "it was run as 4 shards, now no shards" in unsharded.stderr


def test_a_shard_sweeps_only_its_own_unlisted_files(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=ROWS)
    out = tmp_path / "out"
    assert render_shard(campaign, out, "0/4").exit_code == 0
    mine = next(r["id"] for r in ROWS if shard_of(r["id"], 4) == 0)
    theirs = next(r["id"] for r in ROWS if shard_of(r["id"], 4) == 1)
    # As a kill leaves them: files whose lines were never written. Shard 1's may
    # be a file shard 1 is writing right now.
    (out / "messages" / f"{mine}.eml").unlink()
    (out / "messages" / f"{mine}.eml").write_bytes(b"half")
    (out / "messages" / f"{theirs}.eml").write_bytes(b"in the making")
    lines = (out / "shards" / "0-of-4.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["id"] != mine]
    (out / "shards" / "0-of-4.jsonl").write_text("".join(line + "\n" for line in kept))

    result = render_shard(campaign, out, "0/4")
    assert result.exit_code == 0
    assert "1 recipients this run" in result.output
    assert (out / "messages" / f"{theirs}.eml").read_bytes() == b"in the making"
    assert (out / "messages" / f"{mine}.eml").read_bytes() != b"half"


def test_cache_warm_warms_only_its_shard(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/cart/*", {"products": ["Mug"]})
    campaign = write_campaign(tmp_path / "c", sources={"shop": source(api.url + "/cart/{{ id }}")}, recipients=ROWS)
    result = run("cache", "warm", campaign, "--no-progress", "--shard", "1/4")
    assert result.exit_code == 0, result.output
    asked = sorted(r.path.removeprefix("/cart/") for r in api.requests)
    assert asked == sorted(r["id"] for r in ROWS if shard_of(r["id"], 4) == 1)


def test_the_backend_comes_from_the_option_the_environment_or_the_campaign(tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="the redis client is the emailpers[redis] extra")
    campaign = write_campaign(tmp_path / "c", recipients=ROWS, extra='\n[run]\nbackend = "redis://127.0.0.1:1/0"\n')
    out = tmp_path / "out"
    from_campaign = render_shard(campaign, out, "0/2")
    assert from_campaign.exit_code == 1
    assert from_campaign.stderr.startswith("Error: cannot reach the backend redis://127.0.0.1:1/0: ")
    from_env = render_shard(campaign, out, "0/2", env={"EMAILPERS_BACKEND": "redis://:pw@127.0.0.1:2/0"})
    assert "cannot reach the backend redis://:***@127.0.0.1:2/0: " in from_env.stderr
    assert "pw@" not in from_env.stderr
    option = render_shard(campaign, out, "0/2", "--backend", "redis://127.0.0.1:3/0",
                          env={"EMAILPERS_BACKEND": "redis://127.0.0.1:2/0"})
    assert "cannot reach the backend redis://127.0.0.1:3/0: " in option.stderr
    assert not out.exists()  # nothing written before the backend answered

    bad = write_campaign(tmp_path / "d", recipients=ROWS, extra='\n[run]\nbackend = "http://redis:6379"\n')
    result = render_shard(bad, out, "0/2")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {bad}:11: [run] backend must be a redis://, rediss:// or unix:// URL\n"
