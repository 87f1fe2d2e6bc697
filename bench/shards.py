#!/usr/bin/env python
"""Shards on this machine: N `emailpers render --shard K/N` processes sharing a
redis-server (--backend), against a loopback API with a global rate limit.

    python bench/shards.py                          # 4 shards, 600 recipients, rate_limit 100/s
    python bench/shards.py --shards 2 --recipients 300 --rate 50

It starts redis-server (Debian's package) on a free 127.0.0.1 port, an API on
127.0.0.1 that answers /cart/<id> after 20 ms and records when each request
arrived, writes a one-source campaign under bench/results/shards-work/, runs the
shards at once and reports: wall time and recipients per second over all shards,
and what the API saw: requests, their mean rate from first to last, and the most
that arrived in any one-second window (never above --rate when the shared
limit holds). Results also in bench/results/shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
WORK = RESULTS / "shards-work"

TEMPLATE = """<html><body><p>Hi {{ first_name }},</p>
{% live "shop" %}<p>Cart: {{ shop.products|join(", ") }}</p>{% fallback %}<p>See what is new.</p>{% endlive %}
</body></html>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Api(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with api.lock:
                    api.arrivals.append(time.monotonic())
                time.sleep(0.020)
                body = json.dumps({"products": ["Mug", "Tea"]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    j = best = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--recipients", type=int, default=600)
    parser.add_argument("--rate", type=int, default=100, help="the source's rate_limit, shared by all shards")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("bench/shards.py needs redis-server (Debian: apt-get install redis-server)")

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                              "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    api = Api()
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        (WORK / "email.html.j2").write_text(TEMPLATE, encoding="utf-8")
        with open(WORK / "recipients.csv", "w", encoding="utf-8") as f:
            f.write("id,email,first_name\n")
            f.writelines(f"u{i},u{i}@example.com,N{i}\n" for i in range(args.recipients))
        url = f"http://127.0.0.1:{api.server_address[1]}/cart/{{{{ id }}}}"
        (WORK / "campaign.toml").write_text(
            '[campaign]\nname = "shards-bench"\ntemplate = "email.html.j2"\nsubject = "Hi"\n'
            'from = "Shop <news@shop.example>"\n\n[recipients]\npath = "recipients.csv"\n\n'
            f'[sources.shop]\nurl = "{url}"\nrate_limit = {args.rate}\ntimeout = 5\ncache_ttl = 0\n',
            encoding="utf-8",
        )
        for _ in range(200):  # until redis-server accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.025)
        backend = f"redis://127.0.0.1:{port}/0"
        command = [sys.executable, "-m", "emailpers", "render", str(WORK / "campaign.toml"), "--out",
                   str(WORK / "out"), "--no-progress", "--workers", "1", "--backend", backend]
        started = time.monotonic()
        shards = [subprocess.Popen([*command, "--shard", f"{k}/{args.shards}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True) for k in range(args.shards)]
        codes = [p.wait() for p in shards]
        wall = time.monotonic() - started
        errors = [p.stderr.read() for p in shards if p.stderr is not None]
    finally:
        api.shutdown()
        redis.terminate()
        redis.wait()
    arrivals = sorted(api.arrivals)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    result = {
        "shards": args.shards,
        "recipients": args.recipients,
        "rate_limit": args.rate,
        "exit_codes": codes,
        "wall_s": round(wall, 2),
        "recipients_per_s": round(args.recipients / wall, 1),
        "api_requests": len(arrivals),
        "api_mean_rate_per_s": round((len(arrivals) - 1) / span, 1) if span else None,
        "api_most_in_one_second": most_in_one_second(arrivals),
        "cpus": os.cpu_count(),
    }
    if any(codes):
        print("".join(errors), file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shards.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for key, value in result.items():
        print(f"{key:24} {value}")


if __name__ == "__main__":
    main()
