#!/usr/bin/env python
"""Throughput and memory benchmark for `emailpers render`.

    python bench/run.py                      # 20,000 recipients, naive baseline on 1,000
    python bench/run.py --recipients 2000 --naive 200
    python bench/run.py --memory             # peak RSS at 10,000 and 100,000 recipients (cold)

One command starts a user-data API on 127.0.0.1 in its own process (aiohttp,
20 +/- 5 ms a request, 1% of users answer 503 on their first attempt), writes
recipients and a one-source campaign under bench/results/work/, and runs each
mode as a subprocess whose wall time and peak RSS (sum over the process tree,
polled every 50 ms) are measured the same way:

  emailpers cold   `emailpers render` on an empty response cache
  emailpers warm   the same campaign again on the full cache (--fresh output)
  emailpers fetch  emailpers' Fetcher alone, cache off: the fetch layer's rate
  raw aiohttp      a bare aiohttp loop at the same concurrency: the fetch ceiling
  naive            the script a user writes by hand: sequential httpx, Jinja, MJML, EmailMessage

The table goes to stdout and bench/results/latest.json (memory mode: memory.json).
The `_api`, `_fetch`, `_raw` and `_naive` subcommands are this file's own
child processes, not meant to be called by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import os
import platform
import re
import resource
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
HOST = "127.0.0.1"  # the API never listens anywhere else
TOKEN_ENV = "EMAILPERS_BENCH_TOKEN"
TEMPLATES = [(BENCH / "cart_bench.mjml.j2"), (BENCH / "cart_bench.txt.j2"),
             (ROOT / "templates" / "_footer.mjml.j2"), (ROOT / "templates" / "generic.mjml.j2")]
NAMES = ["Ana", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Grace", "Hiro", "Inès", "José"]
CITIES = ["New York, NY", "Chicago, IL", "Austin, TX", "Seattle, WA", "Denver, CO", "Miami, FL"]
ITEMS = ["Wireless Headphones", "Laptop Sleeve", "USB-C Hub", "Desk Lamp", "Running Shoes", "Water Bottle"]
BROWSED = ["Smartphones > Accessories", "Home > Lighting", "Sports > Running", "Computers > Storage"]
CAMPAIGN = """\
[campaign]
name = "bench-cart"
template = "cart_bench.mjml.j2"
text_template = "cart_bench.txt.j2"
fallback_template = "generic.mjml.j2"
subject = "{{{{ first_name }}}}, your cart is waiting"
preheader = "Still thinking it over? Your picks are saved."
from = "Shop <news@shop.example>"
headers = {{ "List-Unsubscribe" = "<https://shop.example/u/{{{{ id }}}}>", "X-Campaign" = "bench-cart" }}

[recipients]
path = "recipients.csv"

[sources.cart]
url = "http://{host}:{port}/v1/users/{{{{ id }}}}/cart"
headers = {{ Accept = "application/json" }}
auth = {{ type = "bearer", token_env = "{token_env}" }}
timeout = 2.0
retries = 2
backoff_initial = 0.05
cache_ttl = 3600
"""


# -- the user-data API (`run.py _api`, its own process) -------------------------------


def _hash(uid: str) -> int:
    return zlib.crc32(uid.encode())


def fails_first(uid: str) -> bool:
    """1% of users, the same ones every run: 503 on their first attempt."""
    return _hash(uid) % 100 == 0


def cart_for(uid: str) -> dict[str, Any]:
    h = _hash(uid)
    count = h % 4  # a quarter of the carts are empty: the template's other branch
    items = [ITEMS[((h >> 4) + i * 7) % len(ITEMS)] for i in range(count)]
    return {"user_id": uid, "cart_items": items, "location": CITIES[(h >> 8) % len(CITIES)],
            "last_browsed": BROWSED[(h >> 12) % len(BROWSED)]}


def serve_api(latency_ms: float, jitter_ms: float) -> None:
    import random

    from aiohttp import web

    expected = f"Bearer {os.environ[TOKEN_ENV]}"
    rng = random.Random(1)
    failed_once: set[str] = set()
    served = {"requests": 0}

    async def cart(request: web.Request) -> web.Response:
        served["requests"] += 1
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "bad token"}, status=401)
        uid = request.match_info["uid"]
        await asyncio.sleep(max(0.0, rng.uniform(latency_ms - jitter_ms, latency_ms + jitter_ms)) / 1000)
        if fails_first(uid) and uid not in failed_once:
            failed_once.add(uid)
            return web.json_response({"error": "try again"}, status=503)
        return web.json_response(cart_for(uid))

    async def reset(request: web.Request) -> web.Response:
        """Each mode starts with the same 1% failing again; returns what was served."""
        stats = {**served, "cpu_s": time.process_time()}
        failed_once.clear()
        served["requests"] = 0
        return web.json_response(stats)

    async def main() -> None:
        app = web.Application()
        app.add_routes([web.get("/v1/users/{uid}/cart", cart), web.post("/_reset", reset)])
        runner = web.AppRunner(app, access_log=None)  # logging 20k lines would cost the API CPU, not emailpers
        await runner.setup()
        await web.TCPSite(runner, HOST, 0).start()
        print(runner.addresses[0][1], flush=True)  # the port, for the parent
        await asyncio.Event().wait()

    asyncio.run(main())


def start_api(args: argparse.Namespace, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, __file__, "_api", str(args.latency_ms), str(args.jitter_ms)]
    api = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    assert api.stdout is not None
    return api, int(api.stdout.readline())


def api_reset(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(urllib.request.Request(f"http://{HOST}:{port}/_reset", method="POST")) as r:
        return dict(json.load(r))


# -- the workload -----------------------------------------------------------------------


def write_campaign(work: Path, port: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    for template in TEMPLATES:
        shutil.copy(template, work / template.name)
    path = work / "campaign.toml"
    path.write_text(CAMPAIGN.format(host=HOST, port=port, token_env=TOKEN_ENV), encoding="utf-8")
    return path


def write_recipients(work: Path, n: int) -> Path:
    path = work / f"recipients-{n}.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["id", "email", "first_name", "city"])
        for i in range(n):
            uid = str(100000 + i)
            out.writerow([uid, f"user{uid}@example.com", NAMES[i % len(NAMES)], CITIES[i % len(CITIES)].split(",")[0]])
    return path


def read_ids(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(itertools.islice(csv.DictReader(f), limit))


# -- the modes that are not emailpers' CLI (`run.py _fetch|_raw|_naive`) -----------------


async def fetch_only(campaign_file: Path, recipients: Path, concurrency: int) -> dict[str, Any]:
    """emailpers' fetch layer as `render` drives it (same client, same window of
    2 x concurrency tasks), minus rendering and the cache."""
    from emailpers.campaign import load_campaign
    from emailpers.pipeline import make_client
    from emailpers.recipients import read_recipients
    from emailpers.sources import Fetcher

    campaign = load_campaign(campaign_file, recipients)
    ok = done = 0
    started = time.perf_counter()
    async with make_client(concurrency) as client:
        fetcher = Fetcher(campaign, client, None, concurrency=concurrency)
        window = asyncio.Semaphore(2 * concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def one(fields: dict[str, Any]) -> None:
            nonlocal ok, done
            try:
                fetched = await fetcher.fetch_all(fields)
                ok += all(r.ok for r in fetched.values())
                done += 1
            finally:
                window.release()

        for row in read_recipients(campaign.recipients):
            await window.acquire()
            task = asyncio.create_task(one(row.fields))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return {"done": done, "ok": ok, "run_s": time.perf_counter() - started}


async def raw_loop(port: int, recipients: Path, concurrency: int) -> dict[str, Any]:
    """The ceiling: N workers sharing one aiohttp session, a 503 retried at once."""
    import aiohttp

    ids = iter([r["id"] for r in read_ids(recipients)])  # one iterator: each worker takes the next id
    headers = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}", "Accept": "application/json"}
    ok = done = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers) as session:

        async def worker() -> None:
            nonlocal ok, done
            for uid in ids:
                for _ in range(3):
                    async with session.get(f"http://{HOST}:{port}/v1/users/{uid}/cart") as response:
                        body = await response.read()
                        if response.status != 503:
                            ok += response.status == 200 and isinstance(json.loads(body), dict)
                            break
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"done": done, "ok": ok, "run_s": time.perf_counter() - started}


def plain_jinja(text: str) -> str:
    """The bench template without emailpers' `{% live %}` tag, as a user without
    emailpers would write it: the live body stays, the fallback goes."""
    text = re.sub(r"{%-?\s*fallback\s*-?%}.*?{%-?\s*endlive\s*-?%}", "", text, flags=re.S)
    return re.sub(r"{%-?\s*live\b[^%]*%}", "", text)


def naive(work: Path, recipients: Path, limit: int, port: int) -> dict[str, Any]:
    """What a user writes by hand: one recipient after another."""
    from email.message import EmailMessage

    import httpx
    import jinja2
    from mjml import mjml2html

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(work), autoescape=True)
    html_t = env.from_string(plain_jinja((work / "cart_bench.mjml.j2").read_text(encoding="utf-8")))
    text_t = env.from_string(plain_jinja((work / "cart_bench.txt.j2").read_text(encoding="utf-8")))
    out = work / "out-naive"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    ok = done = 0
    started = time.perf_counter()
    with httpx.Client(headers={"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}, timeout=10) as client:
        for row in read_ids(recipients, limit):
            for _ in range(3):
                response = client.get(f"http://{HOST}:{port}/v1/users/{row['id']}/cart")
                if response.status_code != 503:
                    break
                time.sleep(0.05)
            response.raise_for_status()
            context = {**row, "cart": response.json()}
            msg = EmailMessage()
            msg["From"] = "Shop <news@shop.example>"
            msg["To"] = row["email"]
            msg["Subject"] = f"{row['first_name']}, your cart is waiting"
            msg.set_content(text_t.render(context))
            msg.add_alternative(mjml2html(html_t.render(context)), subtype="html")
            (out / f"{row['id']}.eml").write_bytes(bytes(msg))
            ok += 1
            done += 1
    return {"done": done, "ok": ok, "run_s": time.perf_counter() - started}


# -- measuring --------------------------------------------------------------------------


@dataclass
class Result:
    mode: str
    recipients: int
    wall_s: float  # the whole process, interpreter start to exit
    peak_rss_mb: float  # sum over the process tree
    cpu_s: float  # user + system, the process and every child it waited for
    run_s: float | None = None  # the mode's own timing (report.json elapsed_s for emailpers)
    api: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.recipients / self.wall_s


def measure(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, float, float, str]:
    """Run `cmd`; return wall s, peak tree RSS MB, CPU s, stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as err:
        started = time.perf_counter()
        proc = psutil.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            rss = 0
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass  # exited between listing and reading
            peak = max(peak, rss)
            time.sleep(0.05)
        wall = time.perf_counter() - started
    stdout = proc.stdout.read() if proc.stdout else ""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{cmd[2:4]} exited {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, peak / 2**20, cpu, stdout


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, campaign: Path, port: int, env: dict[str, str]) -> None:
        self.args, self.work, self.campaign, self.port, self.env = args, work, campaign, port, env
        self.results: list[Result] = []

    def emailpers(self, mode: str, recipients: Path, n: int, out: str, cache: Path) -> Result:
        cmd = [sys.executable, "-m", "emailpers", "render", str(self.campaign), "--recipients", str(recipients),
               "--out", str(self.work / out), "--cache-dir", str(cache), "--concurrency", str(self.args.concurrency),
               "--fresh", "--no-progress"]
        if self.args.workers is not None:
            cmd += ["--workers", str(self.args.workers)]
        if self.args.profile:  # py-spy's own cost lands in the figures: compare profiled runs only to each other
            speedscope = RESULTS / f"profile-{mode.split()[-1]}.speedscope.json"
            spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
            cmd = [spy or "py-spy", "record", "--subprocesses", "--format", "speedscope", "-o", str(speedscope), "--", *cmd]
        result = self.run(mode, n, cmd)
        report = json.loads((self.work / out / "report.json").read_text())
        cart = report["sources"]["cart"]
        result.run_s = report["elapsed_s"]
        result.detail = {"statuses": report["this_run"], "requests": cart["requests"], "retries": cart["retries"],
                         "cache_hits": cart["cache_hits"], "errors": cart["errors"], "latency_ms": cart["latency_ms"]}
        if report["this_run"]["rendered"] != n:
            print(f"  warning: {mode}: {report['this_run']} (expected {n} rendered)", file=sys.stderr)
        return result

    def helper(self, mode: str, n: int, *argv: str) -> Result:
        result = self.run(mode, n, [sys.executable, __file__, *argv])
        result.detail = json.loads(result.detail["stdout"].strip().splitlines()[-1])
        result.run_s = result.detail.pop("run_s")
        if result.detail["ok"] != n:
            print(f"  warning: {mode}: {result.detail['ok']} of {n} fetched", file=sys.stderr)
        return result

    def run(self, mode: str, n: int, cmd: list[str]) -> Result:
        print(f"  {mode}: {n} recipients ...", file=sys.stderr, flush=True)
        cpu_before = api_reset(self.port)["cpu_s"]  # also clears the 503s already served
        log = self.work / f"{mode.replace(' ', '-')}.log"
        wall, rss, cpu, stdout = measure(cmd, self.env, self.work, log)
        served = api_reset(self.port)
        api = {"requests": served["requests"], "cpu_s": round(served["cpu_s"] - cpu_before, 2)}
        result = Result(mode, n, round(wall, 2), round(rss, 1), round(cpu, 2), api=api, detail={"stdout": stdout})
        self.results.append(result)
        return result


# -- the two programmes -------------------------------------------------------------------


def throughput(bench: Bench) -> dict[str, Any]:
    args, work = bench.args, bench.work
    n, conc = args.recipients, str(args.concurrency)
    recipients = write_recipients(work, n)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cold = bench.emailpers("emailpers cold", recipients, n, "out-cold", cache)
    warm = bench.emailpers("emailpers warm", recipients, n, "out-warm", cache)
    fetch = bench.helper("emailpers fetch", n, "_fetch", str(bench.campaign), str(recipients), conc)
    raw = bench.helper("raw aiohttp", n, "_raw", str(bench.port), str(recipients), conc)
    ratios: dict[str, float] = {"fetch_over_raw": round(fetch.rate / raw.rate, 3)}
    if not args.skip_naive:
        naive_n = min(args.naive, n)
        slow = bench.helper("naive", naive_n, "_naive", str(work), str(recipients), str(naive_n), str(bench.port))
        ratios["cold_over_naive"] = round(cold.rate / slow.rate, 1)
    targets = {
        "cold >= 1000 rec/s": cold.rate >= 1000,
        "warm >= 2500 rec/s": warm.rate >= 2500,
        "fetch >= 60% of raw aiohttp": ratios["fetch_over_raw"] >= 0.6,
    }
    if "cold_over_naive" in ratios:
        targets["cold >= 20x naive"] = ratios["cold_over_naive"] >= 20
    return {"ratios": ratios, "targets": targets}


def memory(bench: Bench) -> dict[str, Any]:
    """Cold runs (an empty cache each): the path that holds the most at once,
    with HTTP connections, in-flight fetches and cache writes."""
    sizes = [int(s) for s in bench.args.memory_sizes.split(",")]
    for n in sizes:
        cache = bench.work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        bench.emailpers(f"emailpers cold {n}", write_recipients(bench.work, n), n, f"out-mem-{n}", cache)
    small, large = bench.results[0], bench.results[-1]
    ratio = round(large.peak_rss_mb / small.peak_rss_mb, 2)
    return {"ratios": {f"rss_{large.recipients}_over_{small.recipients}": ratio},
            "targets": {"peak RSS <= 300 MB at the largest size": large.peak_rss_mb <= 300, "ratio <= 1.2": ratio <= 1.2}}


def print_table(results: list[Result], summary: dict[str, Any]) -> None:
    head = f"{'mode':<24}{'recipients':>11}{'wall s':>9}{'rec/s':>9}{'peak RSS MB':>13}{'CPU s':>8}{'run s':>8}{'API CPU s':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        run_s = "-" if r.run_s is None else f"{r.run_s:.2f}"
        print(f"{r.mode:<24}{r.recipients:>11,}{r.wall_s:>9.2f}{r.rate:>9.0f}{r.peak_rss_mb:>13.1f}"
              f"{r.cpu_s:>8.2f}{run_s:>8}{r.api.get('cpu_s', 0):>11.2f}")
    print()
    for name, value in summary["ratios"].items():
        print(f"{name}: {value}")
    for name, met in summary["targets"].items():
        print(f"target {name}: {'met' if met else 'MISSED'}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # this file's own child processes
        cmd, rest = sys.argv[1], sys.argv[2:]
        if cmd == "_api":
            return serve_api(float(rest[0]), float(rest[1]))
        if cmd == "_fetch":
            out = asyncio.run(fetch_only(Path(rest[0]), Path(rest[1]), int(rest[2])))
        elif cmd == "_raw":
            out = asyncio.run(raw_loop(int(rest[0]), Path(rest[1]), int(rest[2])))
        else:
            out = naive(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(out))
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=20_000, help="recipients for every mode but naive")
    parser.add_argument("--naive", type=int, default=1_000, help="recipients for the (slow) naive baseline")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="API latency, mean")
    parser.add_argument("--jitter-ms", type=float, default=5.0, help="API latency, +/- uniform")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight: emailpers, fetch and raw alike")
    parser.add_argument("--workers", type=int, help="emailpers render processes [emailpers' default: one per core]")
    parser.add_argument("--memory", action="store_true", help="only the memory comparison (cold runs)")
    parser.add_argument("--memory-sizes", default="10000,100000", help="recipient counts for --memory")
    parser.add_argument("--profile", action="store_true",
                        help="record emailpers runs with py-spy into bench/results/profile-*.speedscope.json")
    args = parser.parse_args()

    work = RESULTS / "work"
    shutil.rmtree(work, ignore_errors=True)
    # A token made per run unless given: the API checks it, emailpers reads it from the environment.
    env = {**os.environ, TOKEN_ENV: os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(16)}
    api, port = start_api(args, env)
    try:
        bench = Bench(args, work, write_campaign(work, port), port, env)
        summary = memory(bench) if args.memory else throughput(bench)
    finally:
        api.terminate()
        api.wait()
    print_table(bench.results, summary)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "machine": machine,
              "options": vars(args), "results": [{**asdict(r), "rate": round(r.rate, 1)} for r in bench.results],
              **summary}
    path = RESULTS / ("memory.json" if args.memory else "latest.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
