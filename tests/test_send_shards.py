"""`emailpers send` on a run rendered in shards (`render --shard K/N`), against
a real SMTP server on loopback: the whole run in one send, or one send per
shard side by side, each message delivered exactly once; refusals while a
shard is unfinished or running, and where mixing the two would send twice."""

from __future__ import annotations

import fcntl
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from smtp_server import Relay, running_relay

from emailpers.shards import shard_of

from conftest import invoke, render, write_campaign

ROWS = [{"id": f"s{i:02d}", "email": f"s{i:02d}@example.com", "first_name": f"N{i}"} for i in range(24)]
N = 3


def sharded(folder: Path, shards: range = range(N)) -> Path:
    """ROWS rendered as `shards` of N shards into folder/out (in-process, --workers 0)."""
    campaign = write_campaign(folder / "c", recipients=ROWS)
    out = folder / "out"
    for k in shards:
        result = render(campaign, out, "--shard", f"{k}/{N}")
        assert result.exit_code == 0, result.output + result.stderr
    return out


def send(out: Path, relay: Relay, *args: str) -> Any:
    return invoke("send", out, "--smtp", relay.url, *args)


def arrived(relay: Relay) -> Counter[str]:
    return Counter(r.rcpt_tos[0] for r in relay.received)


EVERYONE = Counter(r["email"] for r in ROWS)


def test_a_whole_run_send_reads_every_shards_journal(tmp_path: Path) -> None:
    out = sharded(tmp_path)
    with running_relay(tmp_path, tls=False, auth=False) as relay:
        result = send(out, relay, "--connections", "2")
        assert result.exit_code == 0, result.output + result.stderr
        assert arrived(relay) == EVERYONE  # each message exactly once
        for r in relay.received:
            rid = r.rcpt_tos[0].split("@")[0]
            assert r.data == (out / "messages" / f"{rid}.eml").read_bytes()
        assert f"Sent {len(ROWS)} of {len(ROWS)} messages" in result.output
        assert f"Journal: {out}/sent.jsonl, report: {out}/send-report.json" in result.output
        report = json.loads((out / "send-report.json").read_text())
        assert report["messages"] == len(ROWS) and report["total"]["sent"] == len(ROWS)
        again = send(out, relay)
        assert again.exit_code == 0 and again.output.startswith("Nothing to send")
        assert len(relay.received) == len(ROWS)
        # The whole run was sent: a send of one shard would send its part again.
        one = send(out, relay, "--shard", f"0/{N}")
        assert one.exit_code == 1
        assert "the whole run was sent here (sent.jsonl)" in one.stderr
        assert len(relay.received) == len(ROWS)


def test_one_send_per_shard_delivers_each_message_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = sharded(tmp_path)
    with running_relay(tmp_path, tls=False, auth=False) as relay:
        for k in range(N - 1):
            result = send(out, relay, "--shard", f"{k}/{N}")
            assert result.exit_code == 0, result.output + result.stderr
            mine = Counter(r["email"] for r in ROWS if shard_of(r["id"], N) <= k)
            assert arrived(relay) == mine
            assert f"Journal: {out}/shards/{k}-of-{N}.sent.jsonl" in result.output
            report = json.loads((out / "shards" / f"{k}-of-{N}.send-report.json").read_text())
            assert report["shard"] == f"{k}/{N}" and report["total"]["sent"] == sum(
                1 for r in ROWS if shard_of(r["id"], N) == k
            )
        # The last one as a job runner starts it: auto/N, the index from the environment.
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(N - 1))
        last = send(out, relay, "--shard", f"auto/{N}")
        assert last.exit_code == 0, last.output + last.stderr
        assert f"Shard {N - 1}/{N} (from JOB_COMPLETION_INDEX={N - 1})" in last.stderr
        assert arrived(relay) == EVERYONE
        # A shard sent again sends nothing; the whole run now would send everything again.
        assert send(out, relay, "--shard", f"0/{N}").output.startswith("Nothing to send")
        whole = send(out, relay)
        assert whole.exit_code == 1
        assert "shards of this run were sent one by one" in whole.stderr and f"--shard K/{N}" in whole.stderr
        assert arrived(relay) == EVERYONE
        assert not (out / "sent.jsonl").exists()


def test_refuses_while_a_shard_is_unfinished_or_running(tmp_path: Path) -> None:
    out = sharded(tmp_path, range(N - 1))  # the last shard never started
    last = f"{N - 1}-of-{N}"
    with running_relay(tmp_path, tls=False, auth=False) as relay:
        result = send(out, relay)
        assert result.exit_code == 1
        assert f"shard {last}: it has no {last}.report.json" in result.stderr and "--partial" in result.stderr
        with open(out / "shards" / f"0-of-{N}.lock", "w") as held:  # shard 0 rendering (again) right now
            fcntl.flock(held, fcntl.LOCK_EX)
            result = send(out, relay)
            assert result.exit_code == 1 and f"shard 0-of-{N}: it is still running" in result.stderr
            shard0 = send(out, relay, "--shard", f"0/{N}")
            assert shard0.exit_code == 1 and f"shard 0/{N} is still rendering" in shard0.stderr
        assert relay.received == []
        # --partial sends what the finished shards have; the rest once the last shard is rendered.
        result = send(out, relay, "--partial")
        assert result.exit_code == 0, result.output + result.stderr
        assert arrived(relay) == Counter(r["email"] for r in ROWS if shard_of(r["id"], N) != N - 1)
        sharded(tmp_path, range(N - 1, N))
        result = send(out, relay)
        assert result.exit_code == 0, result.output + result.stderr
        assert arrived(relay) == EVERYONE


def test_shard_options_that_do_not_fit_the_folder_are_refused(tmp_path: Path) -> None:
    unsharded = tmp_path / "plain" / "out"
    assert render(write_campaign(tmp_path / "plain" / "c", recipients=ROWS[:2]), unsharded).exit_code == 0
    out = sharded(tmp_path)
    with running_relay(tmp_path, tls=False, auth=False) as relay:
        result = send(unsharded, relay, "--shard", "0/2")
        assert result.exit_code == 1 and "this render was not run in shards; send it without --shard" in result.stderr
        result = send(out, relay, "--shard", "0/2")
        assert result.exit_code == 1 and f"rendered as {N} shards, not 2; use --shard K/{N}" in result.stderr
        assert relay.received == []
