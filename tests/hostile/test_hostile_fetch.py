"""Issue 8, the fetch path against hostile loopback servers: compression
bombs, bodies that never end or dribble in, broken headers, nesting that
breaks parsers, redirects that leave the origin, and answers that differ by
credentials. Each one is an outcome for one recipient (its fallback), never a
stop of the run, and never more memory or time than the source allows."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from emailpers.campaign import load_campaign
from emailpers.errors import AuthFailed
from emailpers.fetch import Fetched, Fetcher
from emailpers.http import HttpClient, Response
from emailpers.jsondata import MAX_VALUES
from emailpers.pipeline import make_client

from conftest import ScriptedAPI, eml_of, manifest, parts, render, source, write_campaign

CART = "/users/{{ id }}/cart"


def one_source(tmp_path: Path, url: str, *, recipients: int = 1, **keys: Any) -> Path:
    people = [{"id": f"r{i}", "email": f"r{i}@example.com", "first_name": "Ann"} for i in range(1, recipients + 1)]
    return write_campaign(tmp_path / "campaign", sources={"shop": source(url + CART, **keys)}, recipients=people)


def shop(out: Path, rid: str = "r1") -> dict[str, Any]:
    return dict(manifest(out)[rid]["sources"]["shop"])


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback TCP server whose `answer` writes whatever bytes it likes
    after reading the request head; one thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                answer(conn)
            except OSError:  # the client gave up: that is the point
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


# -- compression -----------------------------------------------------------------------


def _deflate(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


BOMB = b'{"products": ["' + b"A" * (32 * 2**20) + b'"]}'  # 32 MiB of JSON, ~32 KiB compressed
ENCODINGS = {
    "gzip": lambda data: gzip.compress(data, 9),
    "deflate": lambda data: _deflate(data, zlib.MAX_WBITS),  # zlib-wrapped, as the standard says
    "raw-deflate": lambda data: _deflate(data, -zlib.MAX_WBITS),  # what some servers send instead
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compression_bomb_with_a_content_length_stops_at_max_bytes(
    api: ScriptedAPI, tmp_path: Path, encoding: str
) -> None:
    packed = ENCODINGS[encoding](BOMB)
    assert len(packed) < 2**20 < len(BOMB)  # small on the wire, far past max_bytes decoded
    name = encoding.removeprefix("raw-")
    api.serve("/users/r1/cart", packed, headers={"Content-Encoding": name})  # the server sets Content-Length
    campaign = one_source(tmp_path, api.url)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert shop(tmp_path / "out")["outcome"] == "error"
    assert shop(tmp_path / "out")["error"] == "response larger than max_bytes (1048576 bytes)"
    assert manifest(tmp_path / "out")["r1"]["status"] == "fallback"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_answers_within_max_bytes_are_decoded(api: ScriptedAPI, tmp_path: Path, encoding: str) -> None:
    packed = ENCODINGS[encoding](b'{"products": ["Desk Lamp"]}')
    api.serve("/users/r1/cart", packed, headers={"Content-Encoding": encoding.removeprefix("raw-")})
    campaign = one_source(tmp_path, api.url)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert shop(tmp_path / "out")["outcome"] == "live"
    assert "<p>Cart: Desk Lamp</p>" in parts(eml_of(tmp_path / "out", manifest(tmp_path / "out")["r1"]))["html"]
    assert api.requests[0].headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize(
    ("encoding", "body", "error"),
    [
        ("br", b"\x0b\x02\x80{}\x03", "unsupported Content-Encoding: 'br'"),
        ("gzip", gzip.compress(b'{"products": []}', mtime=0)[:-12], "the gzip body is truncated"),
        ("gzip", b"\x1f\x8b\x08\x00garbage-garbage", "the gzip body is corrupt"),
    ],
)
def test_an_encoding_we_cannot_decode_is_an_error_for_that_recipient(
    api: ScriptedAPI, tmp_path: Path, encoding: str, body: bytes, error: str
) -> None:
    api.serve("/users/r1/cart", body, headers={"Content-Encoding": encoding})
    campaign = one_source(tmp_path, api.url)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert (shop(tmp_path / "out")["outcome"], shop(tmp_path / "out")["error"]) == ("error", error)


# -- bodies that never end -----------------------------------------------------------------


def test_a_server_dribbling_bytes_cannot_outlast_the_timeout(tmp_path: Path) -> None:
    def dribble(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n[")
        for _ in range(600):  # one byte every 50 ms: each read is quick, the whole never ends in time
            conn.sendall(b" ")
            time.sleep(0.05)

    with raw_server(dribble) as url:
        campaign = one_source(tmp_path, url, timeout=0.5)
        result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert (shop(tmp_path / "out")["outcome"], shop(tmp_path / "out")["error"]) == ("timeout", "no answer within 0.5s")
    assert manifest(tmp_path / "out")["r1"]["status"] == "fallback"


def test_an_endless_chunked_body_stops_at_max_bytes(tmp_path: Path) -> None:
    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"[" + b"0," * 8000
        while True:
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    with raw_server(endless) as url:
        campaign = one_source(tmp_path, url, max_bytes=65536, timeout=30.0)
        result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert shop(tmp_path / "out")["error"] == "response larger than max_bytes (65536 bytes)"


# -- headers and bodies that used to stop the run ---------------------------------------------


@pytest.mark.parametrize("depth", [5000, 900])  # past the parser; past pickling for the render processes
def test_json_nested_too_deep_is_an_error_for_that_recipient(api: ScriptedAPI, tmp_path: Path, depth: int) -> None:
    api.serve("/users/r1/cart", b'{"products": ["x"], "deep": ' + b"[" * depth + b"]" * depth + b"}")
    api.serve("/users/r2/cart", {"products": ["Desk Lamp"], "shallow": [[[[[[[[]]]]]]]]})
    campaign = one_source(tmp_path, api.url, recipients=2)

    result = render(campaign, tmp_path / "out", workers=1)

    assert result.exit_code == 0, result.output
    assert (shop(tmp_path / "out")["outcome"], shop(tmp_path / "out")["error"]) == (
        "error", "HTTP 200 but the body nests deeper than 64 levels"
    )
    assert manifest(tmp_path / "out")["r2"]["status"] == "rendered"


def http_answer(status: str, headers: dict[str, str], body: bytes) -> bytes:
    """One HTTP/1.1 response as bytes; header values go out as UTF-8, as a
    careless server writes them."""
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode() + b"\r\n" + body


def answering(*answers: bytes) -> Callable[[socket.socket], None]:
    """A raw_server answer: the given responses in turn, the last one again and again."""
    served = []

    def answer(conn: socket.socket) -> None:
        served.append(1)
        conn.sendall(answers[min(len(served), len(answers)) - 1])

    return answer


CART_JSON = b'{"products": ["Desk Lamp"]}'


@pytest.mark.parametrize("value", ["²", "①", "٣"])
def test_a_retry_after_that_is_no_ascii_number_is_ignored(tmp_path: Path, value: str) -> None:
    busy = http_answer("503 Busy", {"Retry-After": value, "Connection": "close"}, b"{}")
    with raw_server(answering(busy, http_answer("200 OK", {}, CART_JSON))) as url:
        campaign = one_source(tmp_path, url, retries=1)
        result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert shop(tmp_path / "out") | {"ms": 0} == {"outcome": "live", "attempts": 2, "status_code": 200, "ms": 0}


@pytest.mark.parametrize("value", ["max-age=²", "max-age=①", 's-maxage="³"', "max-age=" + "9" * 400])
def test_a_cache_control_that_is_no_ascii_number_is_ignored(tmp_path: Path, value: str) -> None:
    with raw_server(answering(http_answer("200 OK", {"Cache-Control": value}, CART_JSON))) as url:
        campaign = one_source(tmp_path, url, cache_ttl=60)
        first = render(campaign, tmp_path / "out")
        second = render(campaign, tmp_path / "out2")

    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    assert (shop(tmp_path / "out")["outcome"], shop(tmp_path / "out2")["outcome"]) == ("live", "cache")


def test_a_malformed_redirect_location_is_an_error_for_that_recipient(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/users/r1/cart", {}, status=302, headers={"Location": "http://[::1/x"})
    api.serve("/users/r2/cart", {"products": ["Desk Lamp"]})
    campaign = one_source(tmp_path, api.url, recipients=2, follow_redirects=True)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert shop(tmp_path / "out") | {"ms": 0} == {
        "outcome": "error", "attempts": 1, "status_code": 302, "ms": 0,
        "error": "HTTP 302 redirect to a malformed Location",
    }
    assert manifest(tmp_path / "out")["r2"]["status"] == "rendered"


@pytest.mark.parametrize("target", ["http://localhost:{port}/elsewhere", "https://127.0.0.1:{port}/elsewhere",
                                    "//localhost:{port}/elsewhere"])
def test_a_redirect_off_the_origin_is_refused(api: ScriptedAPI, tmp_path: Path, target: str) -> None:
    port = api.url.rsplit(":", 1)[1]
    api.serve("/users/r1/cart", {}, status=307, headers={"Location": target.format(port=port)})
    api.serve("/elsewhere", {"products": ["Stolen"]})
    campaign = one_source(tmp_path, api.url, follow_redirects=True)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert shop(tmp_path / "out")["error"].startswith("HTTP 307 redirect to another host refused: ")
    assert api.count("/elsewhere") == 0


# -- decoded size -------------------------------------------------------------------------------


def test_a_response_with_too_many_json_values_is_an_error_for_that_recipient(
    api: ScriptedAPI, tmp_path: Path
) -> None:
    api.serve("/users/r1/cart", b"[" + b",".join([b"{}"] * (2**20 // 3)) + b"]")  # 1 MiB: 24 MiB decoded
    api.serve("/users/r2/cart", {"products": ["Desk Lamp"], "pad": "{[," * 2 * MAX_VALUES})  # in a string
    campaign = one_source(tmp_path, api.url, recipients=2)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert shop(tmp_path / "out")["error"] == f"HTTP 200 but the body holds more than {MAX_VALUES} JSON values"
    assert shop(tmp_path / "out", "r2")["outcome"] == "live"


# -- error counts ----------------------------------------------------------------------------------


def test_error_counts_are_keyed_by_kind_not_by_text_the_api_controls(api: ScriptedAPI, tmp_path: Path) -> None:
    people = 60
    for i in range(1, people + 1):
        if i <= 20:  # 20 distinct redirect targets: one kind
            api.serve(f"/users/r{i}/cart", {}, status=302, headers={"Location": f"http://evil{i}.example/x"})
        else:  # 40 distinct statuses: more kinds than are kept
            api.serve(f"/users/r{i}/cart", {}, status=400 + i)
    campaign = load_campaign(one_source(tmp_path, api.url, recipients=people, follow_redirects=True))

    async def fetch_all() -> dict[str, int]:
        async with make_client(8) as client:
            fetcher = Fetcher(campaign, client, None)
            for ids in (range(1, 21), range(21, people + 1)):  # the redirects first: their kind gets a slot
                await asyncio.gather(*(fetcher.fetch("shop", {"id": f"r{i}"}) for i in ids))
            return fetcher.stats()["shop"].error_kinds

    kinds = asyncio.run(fetch_all())

    assert sum(kinds.values()) == people
    assert kinds["HTTP 302 redirect to another host refused"] == 20
    assert len(kinds) == 32 and kinds["other"] == people - 20 - 30
    assert not any("evil" in kind for kind in kinds)


# -- who asks is part of the question ------------------------------------------------------------


def _echo_caller(request: Any) -> dict[str, Any]:
    return {"products": [request.headers.get("x-tenant", "-"), request.headers.get("authorization", "-")]}


@pytest.mark.parametrize("flags", [[], ["--no-cache"]])
def test_sources_with_the_same_url_but_other_headers_or_credentials_never_share_answers(
    api: ScriptedAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str]
) -> None:
    monkeypatch.setenv("TOKEN_A", "secret-a")
    monkeypatch.setenv("TOKEN_B", "secret-b")
    api.serve("/users/r1/cart", _echo_caller)
    url = api.url + CART
    sources = {
        "plain": source(url),
        "tenant_a": source(url, headers={"X-Tenant": "a"}),
        "tenant_b": source(url, headers={"X-Tenant": "b"}),
        "token_a": source(url, auth={"type": "bearer", "token_env": "TOKEN_A"}),
        "token_b": source(url, auth={"type": "bearer", "token_env": "TOKEN_B"}),
    }
    blocks = "".join(f'{{% live "{n}" %}}<p>{n}={{{{ {n}.products|join("|") }}}}</p>{{% endlive %}}' for n in sources)
    campaign = write_campaign(tmp_path / "campaign", sources=sources, template=f"<html><body>{blocks}</body></html>")

    result = render(campaign, tmp_path / "out", *flags)

    assert result.exit_code == 0, result.output
    html = parts(eml_of(tmp_path / "out", manifest(tmp_path / "out")["r1"]))["html"]
    for expected in ["plain=-|-", "tenant_a=a|-", "tenant_b=b|-", "token_a=-|Bearer secret-a", "token_b=-|Bearer secret-b"]:
        assert f"<p>{expected}</p>" in html
    assert api.count("/users/r1/cart") == 5


# -- whatever else goes wrong ------------------------------------------------------------------------


class Exploding(HttpClient):
    """What cannot be made real: an exception no one foresaw, from deep in the fetch."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(max_connections=4)
        self.exc = exc

    async def get(self, url: str, headers: Mapping[str, str], *, max_bytes: int) -> Response:
        await asyncio.sleep(0.01)  # long enough for a second recipient to wait on this request
        raise self.exc


def test_any_unexpected_exception_is_an_error_for_that_recipient_but_auth_failures_stop_the_run(
    tmp_path: Path,
) -> None:
    campaign = load_campaign(one_source(tmp_path, "http://127.0.0.1:9"))

    async def fetch_twice(exc: Exception) -> list[Fetched]:
        async with Exploding(exc) as client:
            fetcher = Fetcher(campaign, client, None)
            same = {"id": "r1"}  # the second one waits on the first's request (dedupe)
            return list(await asyncio.gather(fetcher.fetch("shop", same), fetcher.fetch("shop", same)))

    first, waiter = asyncio.run(fetch_twice(ZeroDivisionError("x")))

    assert (first.outcome, first.error) == ("error", "unexpected error: ZeroDivisionError")
    assert (waiter.outcome, waiter.error) == ("error", "unexpected error: ZeroDivisionError")
    with pytest.raises(AuthFailed):
        asyncio.run(fetch_twice(AuthFailed("[auth.shop] token_url: refused")))
