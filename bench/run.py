#!/usr/bin/env python
"""Throughput and memory benchmark for `emailpers render`.

    python bench/run.py                      # 20,000 recipients, naive baseline on 1,000
    python bench/run.py --recipients 2000 --naive 200
    python bench/run.py --memory             # peak RSS at 10,000 and 100,000 recipients (cold runs)
    python bench/run.py --heavy --recipients 5000 --baseline /tmp/emailpers-main
                                             # two heavy official templates, warm, this code vs --baseline
    python bench/run.py --latency 20ms,200ms,degrading --recipients 1500 --repeat 3   # adaptive vs fixed

It starts a user-data API on 127.0.0.1 in its own process (serve_http, 20 +/- 5 ms
a request, 1% of users answer 503 on their first attempt), writes recipients and
the one-source campaign bench/cart_bench.toml under bench/results/work/, and runs
every mode as a subprocess, timed and watched the same way (wall time; peak RSS
summed over the process tree, polled every 50 ms; CPU of the tree):

  emailpers cold        `emailpers render` on an empty response cache
  emailpers warm        the same again on the full cache, into a new output folder
  emailpers cache warm  `emailpers cache warm` on an empty cache: fetch and store, no render
  Fetcher, no cache     emailpers.fetch.Fetcher alone: the HTTP layer, no cache, no pipeline
  raw aiohttp           a bare aiohttp loop at the same concurrency: the fetch ceiling
  naive                 a hand-written script: sequential httpx, Jinja, MJML, EmailMessage

Results: a table on stdout and bench/results/latest.json (memory.json for --memory).
`other CPU s` is CPU used meanwhile by processes outside the benchmark: on a
small machine, anything above a second or two makes that row noise; --repeat 3
shows the median of three. To measure a frozen copy of the code while the
checkout changes, put its parent folder first: PYTHONPATH=/tmp/snapshot python bench/run.py
`_api`, `_fetch`, `_raw` and `_naive` are this file's own child processes.
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
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psutil
from mjml import mjml2html

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
HOST = "127.0.0.1"  # the API never listens anywhere else
TOKEN_ENV = "EMAILPERS_BENCH_TOKEN"
TEMPLATES = [BENCH / "cart_bench.mjml.j2", BENCH / "cart_bench.txt.j2",
             ROOT / "templates" / "_footer.mjml.j2", ROOT / "templates" / "generic.mjml.j2"]
NAMES = ["Ana", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Grace", "Hiro", "Inès", "José"]
CITIES = ["New York, NY", "Chicago, IL", "Austin, TX", "Seattle, WA", "Denver, CO", "Miami, FL"]
ITEMS = ["Wireless Headphones", "Laptop Sleeve", "USB-C Hub", "Desk Lamp", "Running Shoes", "Water Bottle"]
BROWSED = ["Smartphones > Accessories", "Home > Lighting", "Sports > Running", "Computers > Storage"]


# -- the user-data API (`run.py _api`, its own process) ------------------------------


def fails_first(uid: str) -> bool:
    """1% of users, the same ones every run, answer 503 on their first attempt."""
    return zlib.crc32(uid.encode()) % 100 == 0


def cart_for(uid: str) -> dict[str, Any]:
    h = zlib.crc32(uid.encode())
    items = [ITEMS[((h >> 4) + i * 7) % len(ITEMS)] for i in range(h % 4)]  # 1 in 4 empty: the other branch
    return {"user_id": uid, "cart_items": items, "location": CITIES[(h >> 8) % len(CITIES)],
            "last_browsed": BROWSED[(h >> 12) % len(BROWSED)]}


Handler = Callable[[str, str, "str | None"], Awaitable[tuple[int, Any]]]
REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests", 503: "Service Unavailable"}


def serve_http(handle: Handler) -> None:
    """The benchmark's stand-in for a remote API: HTTP/1.1 with keep-alive on
    127.0.0.1, answers in request order, JSON bodies. `handle(method, path,
    authorization)` gives (status, body). Written on asyncio.Protocol rather
    than aiohttp's server, which cost about 190 us of CPU a request (3.4-4.3 s
    of a 13 s run at 200 ms): on a 2-core machine that CPU is taken from the
    client, which a real API on other machines never does. Prints its port."""

    tasks: set[asyncio.Task[None]] = set()

    class Connection(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buffer = b""
            self.previous: asyncio.Task[None] | None = None

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                lines = self.buffer[:end].decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length") or 0)
                if len(self.buffer) < end + 4 + length:
                    return  # the body is still on its way
                self.buffer = self.buffer[end + 4 + length:]
                method, path, _ = lines[0].split(" ", 2)
                close = headers.get("connection", "").lower() == "close"
                task = asyncio.ensure_future(self.respond(self.previous, method, path, headers.get("authorization"), close))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.previous = task

        async def respond(self, previous: asyncio.Task[None] | None, method: str, path: str, auth: str | None,
                          close: bool) -> None:
            status, body = await handle(method, path, auth)
            if previous is not None:
                await previous  # answers leave in the order the requests came
            payload = json.dumps(body).encode()
            head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n")
            if not self.transport.is_closing():
                self.transport.write(head.encode() + payload)
                if close:
                    self.transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Connection, HOST, 0)
        print(server.sockets[0].getsockname()[1], flush=True)  # the port, for the parent
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_api(latency_ms: float, jitter_ms: float) -> None:
    import random

    expected = f"Bearer {os.environ[TOKEN_ENV]}"
    rng = random.Random(1)
    failed_once: set[str] = set()
    served = {"requests": 0}

    async def handle(method: str, path: str, auth: str | None) -> tuple[int, Any]:
        if method == "POST" and path == "/_reset":
            # Between modes: the same 1% fail again; returns what was served and the API's CPU.
            stats = {**served, "cpu_s": time.process_time()}
            failed_once.clear()
            served["requests"] = 0
            return 200, stats
        match = re.fullmatch(r"/v1/users/([^/]+)/cart", path)
        if method != "GET" or match is None:
            return 404, {"error": "not found"}
        served["requests"] += 1
        if auth != expected:
            return 401, {"error": "bad token"}
        uid = match[1]
        await asyncio.sleep(max(0.0, rng.uniform(latency_ms - jitter_ms, latency_ms + jitter_ms)) / 1000)
        if fails_first(uid) and uid not in failed_once:
            failed_once.add(uid)
            return 503, {"error": "try again"}
        return 200, cart_for(uid)

    serve_http(handle)


def api_reset(port: int) -> dict[str, Any]:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an *_proxy variable's proxy
    with direct.open(urllib.request.Request(f"http://{HOST}:{port}/_reset", method="POST")) as r:
        return dict(json.load(r))


# -- the workload ---------------------------------------------------------------------


def write_campaign(work: Path, port: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    for template in TEMPLATES:
        shutil.copy(template, work / template.name)
    text = (BENCH / "cart_bench.toml").read_text(encoding="utf-8")
    path = work / "campaign.toml"
    path.write_text(text.replace("@PORT@", str(port)).replace("@TOKEN_ENV@", TOKEN_ENV), encoding="utf-8")
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


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(itertools.islice(csv.DictReader(f), limit))


# -- heavy official templates (--heavy) ----------------------------------------------

# Read from the official corpus at bench time, never copied into the repository.
CORPUS_CANDIDATES = [ROOT.parent / "shared" / "mjml-official", Path("/work/shared/mjml-official")]
HEAVY = ("austin.mjml", "racoon.mjml")  # the largest official layout and the example
HEAVY_BLOCK = """<mj-text>Hi {{ first_name }}, delivering to {{ cart.location }}.</mj-text>
{% live "cart" %}{% if cart.cart_items %}<mj-text><ul>{% for item in cart.cart_items %}<li>{{ item }}</li>{% endfor %}</ul>
</mj-text>{% else %}<mj-text>We kept an eye on {{ cart.last_browsed }} for you.</mj-text>{% endif %}
{% fallback %}<mj-text>Your saved picks are waiting.</mj-text>{% endlive %}
<mj-text><a href="https://shop.example/u/{{ id }}">Unsubscribe</a></mj-text>"""


def write_heavy_campaign(work: Path, port: int, official: Path) -> Path:
    """The bench campaign with an official template as its layout: a
    personal block in its first column, no text template (the text part is
    made from the HTML, as most campaigns built on these layouts would)."""
    work.mkdir(parents=True, exist_ok=True)
    head, body = official.read_text(encoding="utf-8").split("<mj-body", 1)
    body = re.sub(r"(<mj-column\b[^>]*>)", lambda m: m[1] + HEAVY_BLOCK, body, count=1)
    (work / "heavy.mjml.j2").write_text(f"{head}<mj-body{body}", encoding="utf-8")
    for template in TEMPLATES[2:]:
        shutil.copy(template, work / template.name)
    text = (BENCH / "cart_bench.toml").read_text(encoding="utf-8")
    text = text.replace('template = "cart_bench.mjml.j2"', 'template = "heavy.mjml.j2"')
    text = text.replace('text_template = "cart_bench.txt.j2"\n', "")
    path = work / "campaign.toml"
    path.write_text(text.replace("@PORT@", str(port)).replace("@TOKEN_ENV@", TOKEN_ENV), encoding="utf-8")
    return path


def heavy(bench: Bench) -> dict[str, Any]:
    """Each heavy template: a cold run fills the cache, then warm runs of this
    code and (with --baseline FOLDER, a copy of an older emailpers package's
    parent folder) of the older code, side by side."""
    corpus = next((c for c in CORPUS_CANDIDATES if c.is_dir()), None)
    if corpus is None:
        sys.exit(f"--heavy needs the official MJML corpus; looked in {', '.join(map(str, CORPUS_CANDIDATES))}")
    n = bench.args.recipients
    recipients = write_recipients(bench.work, n)
    ratios: dict[str, float] = {}
    targets: dict[str, bool] = {}
    env = bench.env
    for name in HEAVY:
        stem = Path(name).stem
        bench.campaign = write_heavy_campaign(bench.work / f"heavy-{stem}", bench.port, corpus / name)
        cache = bench.work / f"cache-{stem}"
        bench.emailpers(f"{stem} cold", n, recipients, cache, f"out-{stem}-cold")
        new = bench.emailpers(f"{stem} warm", n, recipients, cache, f"out-{stem}-warm")
        if bench.args.baseline:
            bench.env = {**env, "PYTHONPATH": bench.args.baseline}
            try:
                old = bench.emailpers(f"{stem} warm baseline", n, recipients, cache, f"out-{stem}-base")
            finally:
                bench.env = env
            ratios[f"{stem}_warm_rate_over_baseline"] = round(new.rate / old.rate, 2)
            ratios[f"{stem}_warm_cpu_ms_per_rcpt"] = round(1000 * new.cpu_s / n, 3)
            ratios[f"{stem}_warm_cpu_ms_per_rcpt_baseline"] = round(1000 * old.cpu_s / n, 3)
            targets[f"{stem}: warm >= 2x the baseline's rate"] = new.rate >= 2 * old.rate
    return {"ratios": ratios, "targets": targets}


# -- the modes that are not emailpers' CLI (`run.py _fetch|_raw|_naive`) ----------------


async def fetch_only(campaign_file: Path, recipients: Path, concurrency: int) -> dict[str, Any]:
    """emailpers' fetch layer as `render` drives it (its client, 2 x concurrency
    recipients under way, the Fetcher's own request limit), minus cache and pipeline."""
    from emailpers.campaign import load_campaign
    from emailpers.fetch import Fetcher
    from emailpers.pipeline import make_client
    from emailpers.recipients import read_recipients

    campaign = load_campaign(campaign_file, recipients)
    rows = read_recipients(campaign.recipients)  # shared: each worker takes the next row
    ok = 0
    started = time.perf_counter()
    async with make_client(concurrency) as client:
        fetcher = Fetcher(campaign, client, None, concurrency=concurrency)

        async def worker() -> None:
            nonlocal ok
            for row in rows:
                fetched = await fetcher.fetch_all(row.fields)  # awaited before `ok +=` reads ok
                ok += all(r.ok for r in fetched.values())

        await asyncio.gather(*(worker() for _ in range(2 * concurrency)))
    return {"ok": ok, "run_s": time.perf_counter() - started}


async def raw_loop(port: int, recipients: Path, concurrency: int) -> dict[str, Any]:
    """The ceiling: `concurrency` workers on one aiohttp session, a 503 retried at once."""
    import aiohttp

    ids = iter([r["id"] for r in read_rows(recipients)])  # shared: each worker takes the next id
    headers = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}", "Accept": "application/json"}
    ok = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers) as session:

        async def worker() -> None:
            nonlocal ok
            for uid in ids:
                for _ in range(3):
                    async with session.get(f"http://{HOST}:{port}/v1/users/{uid}/cart") as response:
                        body = await response.read()
                    if response.status != 503:
                        ok += response.status == 200 and isinstance(json.loads(body), dict)
                        break

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"ok": ok, "run_s": time.perf_counter() - started}


def plain_jinja(text: str) -> str:
    """The bench template without emailpers' `{% live %}` tag, as someone without
    emailpers would have it: the live body stays, the fallback goes."""
    text = re.sub(r"{%-?\s*fallback\s*-?%}.*?{%-?\s*endlive\s*-?%}", "", text, flags=re.S)
    return re.sub(r"{%-?\s*live\b[^%]*%}", "", text)


def naive_message(out: Path, row: dict[str, str], context: dict[str, Any], html_t: Any, text_t: Any) -> None:
    """The naive scripts' email: EmailMessage, Jinja, mjml2html, one file."""
    msg = EmailMessage()
    msg["From"], msg["To"] = "Shop <news@shop.example>", row["email"]
    msg["Subject"] = f"{row['first_name']}, your cart is waiting"
    msg.set_content(text_t.render(context))
    msg.add_alternative(mjml2html(html_t.render(context)), subtype="html")
    (out / f"{row['id']}.eml").write_bytes(bytes(msg))


def naive(work: Path, recipients: Path, limit: int, port: int) -> dict[str, Any]:
    """The hand-written script: one recipient after another."""

    import httpx
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(work), autoescape=True)
    html_t, text_t = (env.from_string(plain_jinja((work / f"cart_bench.{kind}.j2").read_text(encoding="utf-8")))
                      for kind in ("mjml", "txt"))
    out = Path(tempfile.mkdtemp(prefix="out-naive-", dir=work))  # each repeat its own: nothing deleted
    ok = 0
    started = time.perf_counter()
    auth = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
    with httpx.Client(headers=auth, timeout=10, trust_env=False) as client:  # trust_env: loopback, no proxy
        for row in read_rows(recipients, limit):
            for _ in range(3):
                response = client.get(f"http://{HOST}:{port}/v1/users/{row['id']}/cart")
                if response.status_code != 503:
                    break
                time.sleep(0.05)
            response.raise_for_status()
            naive_message(out, row, {**row, "cart": response.json()}, html_t, text_t)
            ok += 1
    return {"ok": ok, "run_s": time.perf_counter() - started}


# -- measuring ------------------------------------------------------------------------


@dataclass
class Result:
    mode: str
    recipients: int
    wall_s: float  # the whole process, interpreter start to exit
    peak_rss_mb: float  # summed over the process tree
    cpu_s: float  # user + system of the process and every child it waited for
    other_cpu_s: float  # used meanwhile by processes outside the benchmark: noise
    run_s: float | None = None  # the mode's own timing (report.json elapsed_s for emailpers)
    api: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    main_rss_mb: float = 0.0  # peak of the process started alone (emailpers' main process)

    @property
    def rate(self) -> float:
        return self.recipients / self.wall_s


def busy_cpu() -> float:
    """Machine-wide user + system CPU s (not irq, steal: nobody's rusage has those)."""
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "nice", 0.0))


Parser = Callable[[str, int], tuple[float | None, int | None, dict[str, Any]]]  # stdout, repeat -> run s, done, detail


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, port: int, env: dict[str, str]) -> None:
        self.args, self.work, self.port, self.env = args, work, port, env
        self.campaign = write_campaign(work, port)
        self.results: list[Result] = []

    def emailpers(self, mode: str, n: int, recipients: Path, cache: Path, out: str | None) -> Result:
        """`emailpers render` into `out`, or `emailpers cache warm` when `out` is None.
        Repeat i writes into its own folders, `out`-i and `cache`-i: nothing is
        deleted while timed (on this VM the disk's work after a large delete slowed
        file creation several-fold for seconds), and a warm mode's repeat i reads
        the cache the cold mode's repeat i filled."""

        def command(i: int) -> list[str]:
            cmd = [sys.executable, "-m", "emailpers"]
            if out is None:
                cmd += ["cache", "warm", str(self.campaign)]
            else:
                cmd += ["render", str(self.campaign), "--out", str(self.work / f"{out}-{i}")]
                cmd += [] if self.args.workers is None else ["--workers", str(self.args.workers)]
            cmd += ["--recipients", str(recipients), "--cache-dir", f"{cache}-{i}",
                    "--concurrency", str(self.args.concurrency), "--no-progress"]
            if self.args.profile:  # py-spy's cost lands in the figures: compare profiled runs only with each other
                spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
                speedscope = RESULTS / f"profile-{mode.replace(' ', '-')}.speedscope.json"
                cmd = [spy or "py-spy", "record", "--subprocesses", "--format", "speedscope", "-o", str(speedscope), "--", *cmd]
            return cmd

        def parse(stdout: str, i: int) -> tuple[float | None, int | None, dict[str, Any]]:
            if out is None:  # cache warm writes no report.json: its summary says enough
                found = re.search(r"recipients in ([\d.]+)s.*?cached (\d+)", stdout, re.S)
                return (float(found[1]), int(found[2]), {}) if found else (None, None, {})
            report = json.loads((self.work / f"{out}-{i}" / "report.json").read_text())
            cart = report["sources"]["cart"]
            detail = {"statuses": report["this_run"], **{k: cart[k] for k in
                      ("requests", "retries", "cache_hits", "errors", "latency_ms")}}
            return report["elapsed_s"], report["this_run"]["rendered"], detail

        return self.run(mode, n, command, parse)

    def helper(self, mode: str, n: int, *argv: str) -> Result:
        def parse(stdout: str, i: int) -> tuple[float | None, int | None, dict[str, Any]]:
            figures = json.loads(stdout.strip().splitlines()[-1])
            return round(figures["run_s"], 2), figures["ok"], {}

        return self.run(mode, n, lambda i: [sys.executable, __file__, *argv], parse)

    def run(self, mode: str, n: int, command: Callable[[int], list[str]], parse: Parser) -> Result:
        """The median (by wall time) of --repeat runs, `command(i)` the i-th."""
        print(f"  {mode}: {n:,} recipients x {self.args.repeat} ...", file=sys.stderr, flush=True)
        runs: list[Result] = []
        for i in range(self.args.repeat):
            result, stdout = self.once(mode, n, command(i))
            result.run_s, done, result.detail = parse(stdout, i)
            if done != n:
                print(f"  warning: {mode}: {done} of {n} recipients done; see {self.work}", file=sys.stderr)
            runs.append(result)
        runs.sort(key=lambda r: r.wall_s)
        median = runs[len(runs) // 2]
        median.detail["walls"] = [r.wall_s for r in runs]
        self.results.append(median)
        return median

    def once(self, mode: str, n: int, cmd: list[str], ok: tuple[int, ...] = (0,)) -> tuple[Result, str]:
        """Run `cmd` once, polling its tree's RSS."""
        log = self.work / f"{mode.replace(' ', '-')}.log"
        api_before = api_reset(self.port)["cpu_s"]  # also: the 1% fail on their first attempt again
        rusage, busy, own = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu(), time.process_time()
        with log.open("w") as err:
            started = time.perf_counter()
            proc = psutil.Popen(cmd, env=self.env, cwd=self.work, stdout=subprocess.PIPE, stderr=err, text=True)
            peak = main = 0
            while proc.poll() is None:
                rss = 0
                for p in [proc, *proc.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                        main = max(main, rss) if p is proc else main
                    except psutil.Error:
                        pass  # exited between listing and reading
                peak = max(peak, rss)
                time.sleep(0.05)
            wall = time.perf_counter() - started
        if proc.returncode not in ok:
            sys.exit(f"{mode} exited {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        after, served = resource.getrusage(resource.RUSAGE_CHILDREN), api_reset(self.port)
        cpu = after.ru_utime - rusage.ru_utime + after.ru_stime - rusage.ru_stime
        api_cpu = served["cpu_s"] - api_before
        other = max(0.0, busy_cpu() - busy - cpu - api_cpu - (time.process_time() - own))  # own: the polling
        result = Result(mode, n, round(wall, 2), round(peak / 2**20, 1), round(cpu, 2), round(other, 2),
                        api={"requests": served["requests"], "cpu_s": round(api_cpu, 2)},
                        main_rss_mb=round(main / 2**20, 1))
        return result, proc.stdout.read() if proc.stdout else ""


# -- the two programmes -----------------------------------------------------------------


def throughput(bench: Bench) -> dict[str, Any]:
    args, work, n, conc = bench.args, bench.work, bench.args.recipients, str(bench.args.concurrency)
    recipients = write_recipients(work, n)
    cold = bench.emailpers("emailpers cold", n, recipients, work / "cache", "out-cold")
    warm = bench.emailpers("emailpers warm", n, recipients, work / "cache", "out-warm")
    fetch = bench.emailpers("emailpers cache warm", n, recipients, work / "cache-fetch", None)
    fetcher = bench.helper("Fetcher, no cache", n, "_fetch", str(bench.campaign), str(recipients), conc)
    raw = bench.helper("raw aiohttp", n, "_raw", str(bench.port), str(recipients), conc)
    # Fetch rates compared on each mode's own timing: interpreter start and imports are not fetching.
    ratios = {"cache_warm_over_raw": round((raw.run_s or raw.wall_s) / (fetch.run_s or fetch.wall_s), 3),
              "fetcher_over_raw": round((raw.run_s or raw.wall_s) / (fetcher.run_s or fetcher.wall_s), 3)}
    targets = {"cold >= 1000 rec/s": cold.rate >= 1000, "warm >= 2500 rec/s": warm.rate >= 2500,
               "fetch (cache warm) >= 60% of raw aiohttp": ratios["cache_warm_over_raw"] >= 0.6}
    if not args.skip_naive:
        k = min(args.naive, n)
        slow = bench.helper("naive", k, "_naive", str(work), str(recipients), str(k), str(bench.port))
        ratios["cold_over_naive"] = round(cold.rate / slow.rate, 1)
        targets["cold >= 20x naive"] = ratios["cold_over_naive"] >= 20
    return {"ratios": ratios, "targets": targets}


def memory(bench: Bench) -> dict[str, Any]:
    """Cold runs, an empty cache each: the path holding the most at once
    (connections, fetches in flight, cache writes, render jobs queued)."""
    for n in (int(s) for s in bench.args.memory_sizes.split(",")):
        recipients = write_recipients(bench.work, n)
        bench.emailpers(f"emailpers cold {n}", n, recipients, bench.work / f"cache-{n}", f"out-{n}")
    small, large = bench.results[0], bench.results[-1]
    ratio = round(large.peak_rss_mb / small.peak_rss_mb, 2)
    main = {f"main_rss_mb_{r.recipients}": r.main_rss_mb for r in bench.results}
    at_100k = next((r for r in bench.results if r.recipients == 100_000), None)
    targets = {f"peak RSS <= 300 MB at {large.recipients:,}": large.peak_rss_mb <= 300}
    if at_100k is not None and small is not at_100k:  # the first throughput issue's: 100,000 against 10,000
        targets[f"peak RSS at 100,000 <= 1.2x {small.recipients:,}"] = at_100k.peak_rss_mb <= 1.2 * small.peak_rss_mb
    if at_100k is not None and large is not at_100k:  # issue 14's: flat past 100,000
        targets[f"main-process RSS at {large.recipients:,} within 10% of 100,000"] = (
            large.main_rss_mb <= 1.1 * at_100k.main_rss_mb)
    return {"ratios": {f"rss_{large.recipients}_over_{small.recipients}": ratio, **main}, "targets": targets}


def print_table(results: list[Result], summary: dict[str, Any]) -> None:
    columns = ["mode", "recipients", "wall s", "rec/s", "peak RSS MB", "CPU s", "run s", "API CPU s", "other CPU s"]
    widths = [21, 11, 8, 7, 12, 8, 7, 10, 12]
    print("".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True))))
    print("-" * sum(widths))
    for r in results:
        cells = [f"{r.recipients:,}", f"{r.wall_s:.2f}", f"{r.rate:.0f}", f"{r.peak_rss_mb:.1f}", f"{r.cpu_s:.2f}",
                 "-" if r.run_s is None else f"{r.run_s:.2f}", f"{r.api['cpu_s']:.2f}", f"{r.other_cpu_s:.2f}"]
        print(r.mode.ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(cells, widths[1:], strict=True)))
    print()
    for name, value in summary["ratios"].items():
        print(f"{name}: {value}")
    for name, met in summary["targets"].items():
        print(f"target {name}: {'met' if met else 'MISSED'}")


# -- the latency programme (`--latency`): a three-source campaign against slow APIs -------
#
# Real APIs answer in 100-500 ms. Each mode starts its own API (`run.py _api3`) and
# renders bench/campaign_bench.toml (cart, profile, and weather deduped by city) with
# emailpers adaptive (no --concurrency: the default ceiling, untuned), then fixed at each
# --sweep value (the best of them is the oracle a user cannot know in advance), then
# the naive loop. Every repeat writes into new folders: nothing is deleted while timed.

DEGRADE_AT = 100  # the degrading API: past this many requests in flight its latency doubles ...
REFUSE_AT = 150  # ... and past this many it answers 429
LATENCY_MODES = {  # name: (latency ms, jitter ms, degrades)
    "20ms": (20.0, 5.0, False),
    "200ms": (200.0, 50.0, False),
    "degrading": (200.0, 50.0, True),
}
SUMMARIES = ["Clear", "Cloudy", "Light rain", "Sunny", "Windy"]


def serve_campaign_api(latency_ms: float, jitter_ms: float, degrades: bool) -> None:
    import random

    expected = f"Bearer {os.environ[TOKEN_ENV]}"
    rng = random.Random(1)
    failed_once: set[str] = set()
    state = {"requests": 0, "status_429": 0, "in_flight": 0, "max_in_flight": 0}
    routes = re.compile(r"/v1/(?:users/(?P<uid>[^/]+)/(?P<what>cart|profile)|weather/(?P<city>[^/]+))")

    def body(match: re.Match[str]) -> dict[str, Any]:
        if match["city"] is not None:
            city = urllib.parse.unquote(match["city"])
            h = zlib.crc32(city.encode())
            return {"city": city, "summary": SUMMARIES[h % len(SUMMARIES)], "temp_c": h % 30}
        if match["what"] == "cart":
            return cart_for(match["uid"])
        h = zlib.crc32(match["uid"].encode())
        return {"tier": ("bronze", "silver", "gold")[h % 3], "points": h % 5000}

    async def handle(method: str, path: str, auth: str | None) -> tuple[int, Any]:
        if method == "POST" and path == "/_reset":
            stats = {**state, "cpu_s": time.process_time()}
            failed_once.clear()
            state.update(requests=0, status_429=0, max_in_flight=0)
            return 200, stats
        match = routes.fullmatch(path)
        if method != "GET" or match is None:
            return 404, {"error": "not found"}
        state["requests"] += 1
        if auth != expected:
            return 401, {"error": "bad token"}
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            crowd = state["in_flight"]
            if degrades and crowd > REFUSE_AT:
                state["status_429"] += 1
                return 429, {"error": "too many requests"}
            delay = max(0.0, rng.uniform(latency_ms - jitter_ms, latency_ms + jitter_ms))
            await asyncio.sleep((2 * delay if degrades and crowd > DEGRADE_AT else delay) / 1000)
            uid = match["uid"] if match["what"] == "cart" else None
            if uid is not None and fails_first(uid) and uid not in failed_once:
                failed_once.add(uid)
                return 503, {"error": "try again"}
            return 200, body(match)
        finally:
            state["in_flight"] -= 1

    serve_http(handle)


def naive_campaign(work: Path, recipients: Path, limit: int, port: int) -> dict[str, Any]:
    """The hand-written script for the three-source campaign: one recipient,
    one request after another."""

    import httpx
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(work), autoescape=True)
    html_t, text_t = (env.from_string(plain_jinja((work / name).read_text(encoding="utf-8")))
                      for name in ("campaign_bench.mjml.j2", "cart_bench.txt.j2"))
    out = Path(tempfile.mkdtemp(prefix="out-naive-campaign-", dir=work))  # each repeat its own: nothing deleted
    ok = 0
    started = time.perf_counter()
    auth = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
    with httpx.Client(headers=auth, timeout=10, trust_env=False) as client:
        for row in read_rows(recipients, limit):
            context: dict[str, Any] = dict(row)
            for name, path in (("cart", f"users/{row['id']}/cart"), ("profile", f"users/{row['id']}/profile"),
                               ("weather", f"weather/{row['city']}")):
                for _ in range(5):
                    response = client.get(f"http://{HOST}:{port}/v1/{path}")
                    if response.status_code not in (429, 503):
                        break
                    time.sleep(0.1)
                response.raise_for_status()
                context[name] = response.json()
            naive_message(out, row, context, html_t, text_t)
            ok += 1
    return {"ok": ok, "run_s": time.perf_counter() - started}


def campaign_run(bench: Bench, label: str, setting: str, i: int, n: int, recipients: Path, campaign: Path,
                 concurrency: int | None) -> Result:
    """`emailpers render` of the three-source campaign once, into new output
    and cache folders. `concurrency` None: adaptive at the default ceiling."""
    mode = f"{label} {setting}"
    print(f"  {mode}: {n:,} recipients, run {i + 1} of {bench.args.repeat} ...", file=sys.stderr, flush=True)
    out, cache = bench.work / f"out-{label}-{setting}-{i}", bench.work / f"cache-{label}-{setting}-{i}"
    cmd = [sys.executable, "-m", "emailpers", "render", str(campaign), "--out", str(out),
           "--recipients", str(recipients), "--cache-dir", str(cache), "--no-progress", "--max-error-rate", "1"]
    cmd += ["--adaptive"] if concurrency is None else ["--no-adaptive", "--concurrency", str(concurrency)]
    cmd += [] if bench.args.workers is None else ["--workers", str(bench.args.workers)]
    result, _ = bench.once(mode, n, cmd, ok=(0, 3))  # 3: some recipient failed, which the table shows
    report = json.loads((out / "report.json").read_text())
    sources = report["sources"]
    result.run_s = report["elapsed_s"]
    result.detail = {
        "rendered": report["this_run"]["rendered"], "failed": report["this_run"]["failed"],
        "fallback": report["this_run"]["fallback"],
        "status_429": sum(s["status_429"] for s in sources.values()),
        "retries": sum(s["retries"] for s in sources.values()),
        "limits": {name: s["concurrency"] for name, s in sources.items()},
        "cpu_ms_per_recipient": round(1000 * result.cpu_s / n, 2),
    }
    return result


def median_run(runs: list[Result]) -> Result:
    """The median of one setting's runs by the run's own time, with every run's figures."""
    runs = sorted(runs, key=lambda r: r.run_s or r.wall_s)
    median = runs[len(runs) // 2]
    median.detail["cpu_ms_per_recipient_each"] = [r.detail["cpu_ms_per_recipient"] for r in runs]
    median.detail["run_s_each"] = [r.run_s for r in runs]
    return median


def run_rate(result: Result) -> float:
    """Recipients per second of the run's own time (report.json elapsed_s):
    interpreter start and imports are not what is compared."""
    return result.recipients / (result.run_s or result.wall_s)


def latency_mode(args: argparse.Namespace, env: dict[str, str], label: str) -> tuple[list[Result], dict[str, Any]]:
    latency, jitter, degrades = LATENCY_MODES[label]
    api = subprocess.Popen([sys.executable, __file__, "_api3", str(latency), str(jitter), str(int(degrades))],
                           stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert api.stdout is not None
        work = RESULTS / "work" / label
        bench = Bench(args, work, int(api.stdout.readline()), env)
        for name in ("campaign_bench.mjml.j2",):
            shutil.copy(BENCH / name, work / name)
        text = (BENCH / "campaign_bench.toml").read_text(encoding="utf-8")
        campaign = work / "campaign-3.toml"
        campaign.write_text(text.replace("@PORT@", str(bench.port)).replace("@TOKEN_ENV@", TOKEN_ENV), encoding="utf-8")
        n = args.recipients
        recipients = write_recipients(work, n)
        # Round-robin: repeat i of every setting before repeat i + 1 of any, so a
        # slow spell of the machine falls on all settings alike, not on one.
        settings: dict[str, int | None] = {"adaptive": None, **{f"fixed {c}": int(c) for c in args.sweep.split(",")}}
        runs: dict[str, list[Result]] = {setting: [] for setting in settings}
        for i in range(args.repeat):
            for setting, concurrency in settings.items():
                runs[setting].append(campaign_run(bench, label, setting, i, n, recipients, campaign, concurrency))
        medians = {setting: median_run(results) for setting, results in runs.items()}
        bench.results += medians.values()
        adaptive = medians["adaptive"]
        fixed = {concurrency: medians[setting] for setting, concurrency in settings.items() if concurrency is not None}
        if not args.skip_naive:
            k = min(args.naive, n)
            bench.helper(f"{label} naive", k, "_naive3", str(work), str(recipients), str(k), str(bench.port))
    finally:
        api.terminate()
        api.wait()
    best = max(fixed, key=lambda c: run_rate(fixed[c]))
    oracle, old_default = fixed[best], fixed.get(32)
    summary: dict[str, Any] = {
        "oracle_concurrency": best,
        "adaptive_over_oracle": round(run_rate(adaptive) / run_rate(oracle), 3),
        "adaptive_429s": adaptive.detail["status_429"], "oracle_429s": oracle.detail["status_429"],
        "adaptive_failed": adaptive.detail["failed"],
    }
    if old_default is not None:
        summary["adaptive_over_fixed_32"] = round(run_rate(adaptive) / run_rate(old_default), 2)
    return bench.results, summary


def print_latency_table(results: list[Result]) -> None:
    columns = ["mode", "recipients", "run s", "rcpt/s", "CPU ms/rcpt (each run)", "429s", "failed",
               "limit min/median/max per source"]
    widths = [26, 11, 8, 8, 24, 7, 7, 0]
    print("".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns[:-1], widths[:-1], strict=True)))
          + "  " + columns[-1])
    print("-" * 120)
    for r in results:
        d = r.detail
        cpu = d.get("cpu_ms_per_recipient_each") or [round(1000 * r.cpu_s / r.recipients, 2)]
        limits = "  ".join(f"{name} {f['min']}/{f['median']}/{f['max']}" for name, f in d.get("limits", {}).items()
                           if f["changes"])
        cells = [f"{r.recipients:,}", f"{r.run_s or r.wall_s:.2f}", f"{run_rate(r):.0f}",
                 " / ".join(f"{c:.2f}" for c in cpu), str(d.get("status_429", "-")), str(d.get("failed", "-"))]
        print(r.mode.ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(cells, widths[1:7], strict=True))
              + "  " + limits)


def latency_main(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    results: list[Result] = []
    summaries: dict[str, Any] = {}
    for label in args.latency.split(","):
        mode_results, summaries[label] = latency_mode(args, env, label)
        results += mode_results
    print_latency_table(results)
    print()
    targets: dict[str, bool] = {}
    for label, s in summaries.items():
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
        if label == "200ms":
            targets["200ms: adaptive >= 85% of the best fixed"] = s["adaptive_over_oracle"] >= 0.85
            if "adaptive_over_fixed_32" in s:
                targets["200ms: adaptive >= 5x fixed 32 (the old default)"] = s["adaptive_over_fixed_32"] >= 5
        if label == "degrading":
            targets["degrading: no more 429s than the best fixed"] = s["adaptive_429s"] <= s["oracle_429s"]
            targets["degrading: no recipient failed"] = s["adaptive_failed"] == 0
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'MISSED'}")
    return {"results": [{**asdict(r), "rate": round(run_rate(r), 1)} for r in results], "modes": summaries,
            "targets": targets}


def child(command: str, argv: list[str]) -> None:
    if command == "_api":
        return serve_api(float(argv[0]), float(argv[1]))
    if command == "_api3":
        return serve_campaign_api(float(argv[0]), float(argv[1]), argv[2] == "1")
    if command == "_naive3":
        out = naive_campaign(Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]))
        return print(json.dumps(out))
    if command == "_fetch":
        out = asyncio.run(fetch_only(Path(argv[0]), Path(argv[1]), int(argv[2])))
    elif command == "_raw":
        out = asyncio.run(raw_loop(int(argv[0]), Path(argv[1]), int(argv[2])))
    else:
        out = naive(Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]))
    print(json.dumps(out))


def set_aside(work: Path) -> Callable[[], None]:
    """Give this run an empty `work` folder without deleting now: the last
    run's is renamed aside, and the function returned deletes it once every
    timed run is over (on this VM, file creation ran several times slower for
    seconds after a large delete)."""
    old = work.with_name(f"{work.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a run that was interrupted
    if work.exists():
        work.rename(old)
    return lambda: shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_api", "_fetch", "_raw", "_naive", "_api3", "_naive3"):
        return child(sys.argv[1], sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=20_000, help="recipients for every mode but naive")
    parser.add_argument("--naive", type=int, default=1_000, help="recipients for the (slow) naive baseline")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="API latency, mean")
    parser.add_argument("--jitter-ms", type=float, default=5.0, help="API latency, +/- uniformly")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight: emailpers, fetch and raw alike")
    parser.add_argument("--workers", type=int, help="emailpers render processes [emailpers' default: one per core]")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each mode; the table shows the median")
    parser.add_argument("--memory", action="store_true", help="only the memory comparison (cold runs)")
    parser.add_argument("--memory-sizes", default="10000,100000", help="recipient counts for --memory")
    parser.add_argument("--heavy", action="store_true", help="only the heavy official templates, warm (see heavy())")
    parser.add_argument("--baseline", help="with --heavy: PYTHONPATH of an older emailpers to compare with")
    parser.add_argument("--profile", action="store_true",
                        help="record emailpers runs with py-spy into bench/results/profile-*.speedscope.json")
    parser.add_argument("--latency", metavar="MODE[,MODE]",
                        help=f"only the three-source campaign against APIs at these latencies ({', '.join(LATENCY_MODES)}): "
                             "adaptive vs each --sweep fixed concurrency vs naive; bench/results/latency.json")
    parser.add_argument("--sweep", default="32,64,128,256,512", help="fixed concurrencies for --latency")
    args = parser.parse_args()
    if args.latency:
        env = {**os.environ, TOKEN_ENV: os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(16)}
        discard = set_aside(RESULTS / "work")
        record = latency_main(args, env)
        discard()
        git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
        record = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python", *sys.argv]),
                  "emailpers_git": git.stdout.strip(), "options": vars(args), **record}
        (RESULTS / "latency.json").write_text(json.dumps(record, indent=2) + "\n")
        return print("\nwritten: bench/results/latency.json")

    work = RESULTS / "work"
    discard = set_aside(work)  # empty caches and output folders, every time
    work.mkdir(parents=True)
    # A token made per run unless given: the API checks it, emailpers reads it from the environment.
    env = {**os.environ, TOKEN_ENV: os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(16)}
    api = subprocess.Popen([sys.executable, __file__, "_api", str(args.latency_ms), str(args.jitter_ms)],
                           stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert api.stdout is not None
        bench = Bench(args, work, int(api.stdout.readline()), env)
        summary = memory(bench) if args.memory else heavy(bench) if args.heavy else throughput(bench)
    finally:
        api.terminate()
        api.wait()
    print_table(bench.results, summary)
    discard()
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python", *sys.argv]),
        "emailpers_git": git.stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "options": vars(args), "results": [{**asdict(r), "rate": round(r.rate, 1)} for r in bench.results], **summary,
    }
    path = RESULTS / ("memory.json" if args.memory else "heavy.json" if args.heavy else "latest.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
