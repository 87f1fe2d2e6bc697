"""A rerun does what the operator means: it refuses a changed campaign, redoes
the statuses asked for, keeps the exit code honest over the whole manifest, and
leaves messages/ holding exactly what the manifest lists. Also the error guard's
rolling window, --max-failures, and the lock on --out."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_resume import complete_lines

from emailpers.fetch import Fetched
from emailpers.output import file_stem

from advanced_servers import Api, Request, Response, running
from conftest import (
    ScriptedAPI,
    manifest,
    manifest_lines,
    parse_eml,
    parts,
    render,
    report,
    source,
    write_campaign,
    write_recipients,
)
from render_processes import people


def listed_files(out: Path) -> list[str]:
    return sorted(Path(f).name for e in manifest_lines(out) for f in e["files"])


def message_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "messages").iterdir())


def cart_campaign(api: ScriptedAPI, folder: Path, rows: list[dict[str, Any]], **options: Any) -> Path:
    return write_campaign(folder, recipients=rows, sources={"shop": source(api.url + "/users/{{ id }}/cart")}, **options)


# -- the campaign that started --out -----------------------------------------------------------


def test_a_changed_template_or_campaign_file_refuses_to_resume(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Mug"]})
    template = '<html><body>{% include "footer.html.j2" %}</body></html>'
    campaign = cart_campaign(api, tmp_path / "c", people(3), template=template, files={"footer.html.j2": "<p>Bye</p>"})
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    before = (out / "manifest.jsonl").read_bytes()

    (tmp_path / "c" / "footer.html.j2").write_text("<p>Goodbye</p>")
    result = render(campaign, out)

    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"Error: {out}: was started by a different campaign or templates (footer.html.j2 changed); resuming would "
        "mix two versions of the email. Run with --fresh to start over, or use a new --out\n"
    )
    assert (out / "manifest.jsonl").read_bytes() == before

    (tmp_path / "c" / "footer.html.j2").write_text("<p>Bye</p>")
    campaign.write_text(campaign.read_text().replace('subject = "Hello', 'subject = "Hi'))
    result = render(campaign, out)
    assert result.exit_code == 1
    assert "(campaign.toml changed)" in result.stderr

    result = render(campaign, out, "--fresh")
    assert result.exit_code == 0, result.output
    assert report(out)["this_run"]["rendered"] == 3


def test_an_edited_recipient_list_resumes_by_id(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Mug"]})
    campaign = cart_campaign(api, tmp_path / "c", people(3))
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0

    write_recipients(tmp_path / "c" / "recipients.jsonl", list(reversed(people(5))))
    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert report(out)["this_run"]["rendered"] == 2
    assert sorted(manifest(out)) == [p["id"] for p in people(5)]


def test_another_format_refuses_to_resume(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c")
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0

    result = render(campaign, out, "--format", "html")

    assert result.exit_code == 1
    assert "(--format was eml, now html)" in result.stderr


# -- --redo and the exit code over the whole manifest ---------------------------------------------


DIVIDE = "<html><body><p>{{ 10 // divisor }}</p></body></html>"


def test_failed_recipients_keep_exit_3_until_redone(tmp_path: Path) -> None:
    rows = [{"id": f"d{i}", "email": f"d{i}@example.com", "first_name": "D", "divisor": 0 if i in (1, 3) else 1} for i in range(5)]
    campaign = write_campaign(tmp_path / "c", recipients=rows, template=DIVIDE)
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 3

    result = render(campaign, out)  # nothing to do: the two failures are still there

    assert result.exit_code == 3, result.output
    assert result.stderr == "2 recipients failed in an earlier run; --redo failed does them again\n"
    assert report(out)["total"]["failed"] == 2

    for row in rows:
        row["divisor"] = 2
    write_recipients(tmp_path / "c" / "recipients.jsonl", rows)
    result = render(campaign, out, "--redo", "failed")

    assert result.exit_code == 0, result.output
    entries = manifest(out)  # asserts each id once
    assert {rid: e["status"] for rid, e in entries.items()} == {f"d{i}": "rendered" for i in range(5)}
    assert report(out)["this_run"]["rendered"] == 2
    assert listed_files(out) == message_files(out) == [f"d{i}.eml" for i in range(5)]


def test_redo_fallback_replaces_lines_and_files(api: ScriptedAPI, tmp_path: Path) -> None:
    shop = api.serve("/users/*", lambda request: {"products": [request.path.split("/")[2].upper()]})
    api.serve("/users/u001/cart", status=500)
    campaign = cart_campaign(api, tmp_path / "c", people(4))
    out = tmp_path / "out"
    assert render(campaign, out, "--no-cache").exit_code == 0
    assert manifest(out)["u001"]["status"] == "fallback"

    del api.behaviours["/users/u001/cart"]
    result = render(campaign, out, "--no-cache", "--redo", "fallback,failed")

    assert result.exit_code == 0, result.output
    assert api.count("/users/u001/cart") == 2 and api.count("/users/u000/cart") == 1
    ids = [e["id"] for e in manifest_lines(out)]
    assert sorted(ids[:3]) == ["u000", "u002", "u003"] and ids[3] == "u001"  # its old line dropped, a new one added
    assert manifest(out)["u001"]["status"] == "rendered"
    assert "<p>Cart: U001</p>" in parts(parse_eml(out / "messages" / "u001.eml"))["html"]
    assert listed_files(out) == message_files(out)
    assert shop.status == 200


def test_render_help_documents_the_rerun_options() -> None:
    from conftest import invoke

    result = invoke("render", "--help")

    assert "--redo STATUS[,STATUS]" in result.stdout and "--max-failures N" in result.stdout
    assert "[default: 0.5;" in result.stdout and "no API secrets" in result.stdout


def test_redo_rejects_an_unknown_status(tmp_path: Path) -> None:
    result = render(write_campaign(tmp_path / "c"), tmp_path / "out", "--redo", "failed,broken")

    assert result.exit_code == 2
    assert "broken is not a status; use rendered, fallback, skipped, invalid, failed" in result.stderr


def test_a_redo_killed_midway_loses_and_doubles_no_one(api: ScriptedAPI, tmp_path: Path) -> None:
    """Run 1: every recipient falls back. Run 2 (--redo fallback, a real process)
    is killed with -9 midway. Run 3 ends with each recipient once, rendered, and
    messages/ holding exactly the listed files."""
    behaviour = api.serve("/users/*", status=500)
    campaign = cart_campaign(api, tmp_path / "c", people(30))
    out = tmp_path / "out"
    assert render(campaign, out, "--no-cache", "--max-error-rate", "1").exit_code == 0
    assert {e["status"] for e in manifest(out).values()} == {"fallback"}

    behaviour.status, behaviour.delay = 200, 0.05
    behaviour.body = lambda request: {"products": [request.path.split("/")[2].upper()]}
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out), "--no-cache",
               "--redo", "fallback", "--workers", "0", "--concurrency", "1", "--no-progress"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while len(complete_lines(out / "manifest.jsonl")) not in range(3, 30):
            assert process.poll() is None and time.monotonic() < deadline, "the redo did not get going"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=10)
    assert {e["status"] for e in complete_lines(out / "manifest.jsonl")} == {"rendered"}

    behaviour.delay = 0
    result = render(campaign, out, "--no-cache")

    assert result.exit_code == 0, result.output
    assert {rid: e["status"] for rid, e in manifest(out).items()} == {p["id"]: "rendered" for p in people(30)}
    assert listed_files(out) == message_files(out)


# -- messages/ holds what the manifest lists ---------------------------------------------------


def test_kill_9_orphans_are_swept_before_the_next_run(api: ScriptedAPI, tmp_path: Path) -> None:
    """Files written after the manifest's last flush belong to no line; the next
    run deletes them even when its (edited) list no longer has those ids."""
    api.serve("/users/*", {"products": ["Mug"]}, delay=0.02)
    campaign = cart_campaign(api, tmp_path / "c", people(200))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out),
               "--workers", "0", "--concurrency", "4", "--no-progress"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "never saw a file ahead of its line"
            if not (out / "messages").is_dir():
                continue
            files = set(message_files(out))  # files first: a line is only written after its file
            listed = {Path(f).name for e in complete_lines(out / "manifest.jsonl") for f in e["files"]}
            if files - listed and listed:
                break
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=10)
    listed = {Path(f).name for e in complete_lines(out / "manifest.jsonl") for f in e["files"]}
    orphans = set(message_files(out)) - listed
    assert orphans, "the kill must land between a file and its line"
    (out / "messages" / "notes").write_text("mine")  # not a name emailpers writes: kept

    done = {e["id"] for e in complete_lines(out / "manifest.jsonl")}
    write_recipients(tmp_path / "c" / "recipients.jsonl", [p for p in people(200) if p["id"] in done])
    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert report(out)["this_run"] == {"rendered": 0, "fallback": 0, "skipped": 0, "invalid": 0, "failed": 0}
    assert message_files(out) == sorted([*listed, "notes"])


def test_fresh_deletes_only_what_emailpers_wrote(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=people(2))
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    (out / "notes.md").write_text("my notes")
    (out / "messages" / "README").write_text("mine")
    (out / "messages" / "drafts").mkdir()
    (out / "messages" / "drafts" / "u000.eml").write_text("my draft")
    write_recipients(tmp_path / "c" / "recipients.jsonl", people(1))

    result = render(campaign, out, "--fresh")

    assert result.exit_code == 0, result.output
    assert message_files(out) == ["README", "drafts", "u000.eml"]
    assert (out / "notes.md").read_text() == "my notes"
    assert (out / "messages" / "drafts" / "u000.eml").read_text() == "my draft"
    assert [e["id"] for e in manifest_lines(out)] == ["u000"]


def test_ids_differing_in_case_get_distinct_file_names(tmp_path: Path) -> None:
    rows = [{"id": rid, "email": f"x{i}@example.com", "first_name": "X"} for i, rid in enumerate(["A1", "a1", "Bb", "bB", "c-2"])]
    campaign = write_campaign(tmp_path / "c", recipients=rows)
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    names = [Path(manifest(out)[row["id"]]["files"][0]).name for row in rows]
    assert len({name.lower() for name in names}) == 5, names
    assert names[1] == "a1.eml" and names[4] == "c-2.eml"
    assert re.fullmatch(r"A1~[0-9a-f]{10}\.eml", names[0])


@pytest.mark.parametrize("rid", ["a1", "A1", "Zz.9_-", "a/b", "../x", "x" * 100, "é" * 80, "CON", "."])
def test_every_file_name_is_one_a_sweep_recognises(rid: str) -> None:
    from emailpers.output import is_message_file

    for suffix in (".eml", ".html", ".txt"):
        assert is_message_file(file_stem(rid) + suffix)
    assert not is_message_file(file_stem(rid) + ".tmp")


# -- the error guard ---------------------------------------------------------------------------


def results(ok: int, failed: int) -> list[Fetched]:
    return [Fetched("live")] * ok + [Fetched("error", error="HTTP 503")] * failed


def test_guard_stops_only_above_the_rate() -> None:
    from emailpers.tally import HealthGuard

    guard = HealthGuard(0.5)
    for result in results(100, 100):  # exactly half of the last 200: not more than 50%
        guard.check("shop", result)
    with pytest.raises(Exception, match=r"source 'shop': 101 of its last 200 fetches failed .*HTTP 503"):
        guard.check("shop", Fetched("error", error="HTTP 503"))  # 101 of the last 200: the oldest success left


def test_guard_forgets_failures_older_than_its_window() -> None:
    from emailpers.tally import HealthGuard

    guard = HealthGuard(0.5)
    for result in results(10, 10) + results(200, 0) + results(0, 100):  # 100 of the last 200
        guard.check("shop", result)
    assert guard.failed["shop"] == 100
    assert HealthGuard(1.0).max_error_rate is None


@pytest.fixture
def outage() -> Any:
    """An API that answers 200 for its first 260 requests, then 503 for ever."""
    with running(Api()) as server:
        served = [0]
        lock = threading.Lock()

        @server.route(r"/users/(\w+)/cart")
        def _(request: Request, match: re.Match[str]) -> Response:
            with lock:
                served[0] += 1
                n = served[0]
            if n <= 260:
                return Response(200, {"products": [match.group(1)]})
            return Response(503, {"error": "down"})

        yield server


def test_an_outage_past_fetch_200_stops_the_run(outage: Api, tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=people(600),
                              sources={"shop": source(outage.url + "/users/{{ id }}/cart")})
    out = tmp_path / "out"

    result = render(campaign, out, "--no-cache", "--concurrency", "4", workers=0)

    assert result.exit_code == 4, result.output
    assert result.stderr.startswith("Error: source 'shop': ")
    assert "of its last " in result.stderr and "most common error: HTTP 503" in result.stderr
    assert len(outage.seen("/users/")) < 400
    statuses = [e["status"] for e in manifest_lines(out)]
    assert statuses.count("rendered") >= 250 and len(statuses) < 400
    assert listed_files(out) == message_files(out)
    assert "STOPPED EARLY: source 'shop'" in result.stdout
    assert report(out)["stopped"].startswith("source 'shop'")


def test_max_error_rate_1_runs_on_and_warns_of_a_degraded_source(outage: Api, tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", recipients=people(300),
                              sources={"shop": source(outage.url + "/users/{{ id }}/cart")})
    out = tmp_path / "out"

    result = render(campaign, out, "--no-cache", "--max-error-rate", "1")

    assert result.exit_code == 0, result.output
    assert ("  WARNING: source shop gave no data for 40 of 300 recipients (13%, more than 10%); "
            "those recipients got fallbacks or were skipped") in result.stdout.splitlines()
    data = report(out)
    assert data["degraded"] is True
    assert data["degraded_sources"] == {"shop": {"failed_recipients": 40, "recipients": 300}}


def test_a_few_failures_are_not_degraded(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Mug"]})
    api.serve("/users/u003/cart", status=500)
    campaign = cart_campaign(api, tmp_path / "c", people(10))  # 1 of 10: not more than 10%
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0
    assert "WARNING" not in result.stdout
    assert report(out)["degraded"] is False


# -- --max-failures --------------------------------------------------------------------------


def test_max_failures_stops_the_run_with_exit_3(tmp_path: Path) -> None:
    rows = [{"id": f"d{i:02d}", "email": f"d{i}@example.com", "first_name": "D", "divisor": i % 2} for i in range(40)]
    campaign = write_campaign(tmp_path / "c", recipients=rows, template=DIVIDE)
    out = tmp_path / "out"

    result = render(campaign, out, "--max-failures", "5")

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("Error: 5 recipients failed in this run (--max-failures 5); the last, 'd08': ")
    assert result.stderr.endswith("Stopped; fix the data, then run the same command with --redo failed (a fixed template needs --fresh)\n")
    statuses = [e["status"] for e in manifest_lines(out)]
    assert statuses.count("failed") >= 5 and len(statuses) < 40
    assert listed_files(out) == message_files(out)


# -- one run at a time ---------------------------------------------------------------------------


def test_a_second_run_on_the_same_out_refuses_until_the_first_is_gone(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Mug"]}, delay=0.2)
    campaign = cart_campaign(api, tmp_path / "c", people(30))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out),
               "--workers", "0", "--concurrency", "1", "--no-progress"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not complete_lines(out / "manifest.jsonl"):
            assert process.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(0.01)

        second = render(campaign, out)

        assert second.exit_code == 1
        assert second.stderr == (
            f"Error: {out}: another emailpers run is using this output folder; wait for it to end, "
            "or give this run another --out\n"
        )
        os.kill(process.pid, signal.SIGKILL)  # a dead holder leaves no lock behind
    finally:
        process.wait(timeout=10)
    api.behaviours["/users/*"].delay = 0

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    assert sorted(manifest(out)) == [p["id"] for p in people(30)]


# -- smaller -----------------------------------------------------------------------------------


def test_offline_needs_no_api_secret(api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api.serve("/users/*", {"products": ["Mug"]})
    campaign = write_campaign(tmp_path / "c", recipients=people(2), sources={
        "shop": source(api.url + "/users/{{ id }}/cart", auth={"type": "bearer", "token_env": "H4_SHOP_TOKEN"}),
    })
    monkeypatch.setenv("H4_SHOP_TOKEN", "s3cret")
    assert render(campaign, tmp_path / "warm").exit_code == 0
    monkeypatch.delenv("H4_SHOP_TOKEN")
    requests = api.count()

    result = render(campaign, tmp_path / "out", "--offline")

    assert result.exit_code == 0, result.output
    assert api.count() == requests
    assert report(tmp_path / "out")["this_run"]["fallback"] + report(tmp_path / "out")["this_run"]["rendered"] == 2


def test_cache_warm_summary_speaks_of_fetched_data(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/*", {"products": ["Mug"]})
    api.serve("/users/u001/cart", status=500)
    campaign = cart_campaign(api, tmp_path / "c", people(3))

    result = render_warm(campaign)

    assert result.exit_code == 3, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"Campaign test-campaign: cache warm, data for 3 recipients in .*", lines[0])
    assert lines[1].startswith("  cached 2  not fetched 1  invalid 0")
    assert "render" not in lines[0] + lines[1] and "fallbacks" not in result.stdout


def render_warm(campaign: Path) -> Any:
    from conftest import invoke

    return invoke("cache", "warm", campaign, "--no-progress")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_estimate_is_sane_from_the_first_second_and_redraws_rarely() -> None:
    """1,500 recipients at 64/s after 2 s of start-up (render processes, first
    fetches), the first 300 resumed from an earlier run at once."""
    from emailpers.cli import ProgressLine

    clock, draws = FakeClock(), []
    line = ProgressLine(1500, lambda steps, eta: draws.append((clock.now, line.position, steps, eta)), clock)
    clock.now += 2.0
    for _ in range(300):
        line(1, True)
    for _ in range(1200):
        clock.now += 1 / 64
        line(1, False)
    line.flush()

    assert sum(steps for _, _, steps, _ in draws) == 1500
    start = next(now for now, position, _, _ in draws if position > 300)  # this run's first recipients
    for now, position, _, eta in draws:
        if now - start < 1.0 + 1 / 64:  # under a second of this run's pace: no guess
            assert eta == "eta --", (now, eta)
        else:
            seconds = int(re.fullmatch(r"eta (\d+)s", eta).group(1))  # type: ignore[union-attr]
            assert abs(seconds - (1500 - position) / 64) <= 1, (now, position, eta)
    assert len(draws) <= 10 * (draws[-1][0] - draws[0][0]) + 2, len(draws)
    assert any(eta != "eta --" for _, _, _, eta in draws if _ - start < 1.2)
    assert draws[-1][3] == "eta 0s"


def test_the_readme_says_html_is_base64() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "text/html in base64" in readme and "UTF-8,\n  quoted-printable" not in readme


def test_report_json_is_written_when_the_run_stops(tmp_path: Path) -> None:
    rows = [{"id": f"d{i}", "email": f"d{i}@example.com", "first_name": "D", "divisor": 0} for i in range(3)]
    campaign = write_campaign(tmp_path / "c", recipients=rows, template=DIVIDE)
    out = tmp_path / "out"

    result = render(campaign, out, "--max-failures", "1")

    assert result.exit_code == 3
    data = json.loads((out / "report.json").read_text())
    assert data["stopped"].startswith("1 recipients failed")
