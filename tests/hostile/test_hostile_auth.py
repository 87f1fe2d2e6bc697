"""Issue 8 #19 and the token endpoint as an attacker: secrets with control
characters are refused at load, and a token response that is huge, nested,
or carries a token or lifetime no header can hold stops the run with one
clear `[auth.NAME] token_url ...` error instead of a crash or a 1 GB read.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from emailpers.auth import TOKEN_MAX_BYTES
from emailpers.campaign import load_campaign
from emailpers.errors import CampaignError

from advanced_servers import Api, LoopbackServer, Request, Response, running
from conftest import make_campaign, people
from conftest import render_html as render


@pytest.fixture
def api() -> Iterator[Api]:
    with running(Api()) as server:
        yield server


def data_route(api: Api) -> None:
    api.echo(r"/v1/profile/(\w+)")


def oauth_campaign(tmp_path: Path, token_url: str, data_url: str) -> Path:
    sources = f"""
[auth.shop]
type = "oauth2"
token_url = "{token_url}"
client_id_env = "H_CLIENT_ID"
client_secret_env = "H_CLIENT_SECRET"

[sources.profile]
url = "{data_url}/v1/profile/{{{{ id }}}}"
auth = "shop"
retries = 0
"""
    return make_campaign(tmp_path, sources, people(3), live=["profile"])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("H_CLIENT_ID", "cid")
    monkeypatch.setenv("H_CLIENT_SECRET", "csecret")


# -- secrets with control characters --------------------------------------------------------

AUTHS = {
    "bearer": ('auth = { type = "bearer", token_env = "H_SECRET" }', "[sources.profile] auth token_env"),
    "header": (
        'auth = { type = "header", name = "X-Key", value_env = "H_SECRET" }',
        "[sources.profile] auth value_env",
    ),
    "basic": (
        'auth = { type = "basic", username_env = "H_USER", password_env = "H_SECRET" }',
        "[sources.profile] auth password_env",
    ),
    "oauth2": (
        'auth = "shop"\n\n[auth.shop]\ntype = "oauth2"\ntoken_url = "https://auth.example.com/token"\n'
        'client_id_env = "H_USER"\nclient_secret_env = "H_SECRET"',
        "[auth.shop] client_secret_env",
    ),
    "oauth2 token_params_env": (
        'auth = "shop"\n\n[auth.shop]\ntype = "oauth2"\ntoken_url = "https://auth.example.com/token"\n'
        'client_id_env = "H_USER"\nclient_secret_env = "H_USER"\ntoken_params_env = { account_id = "H_SECRET" }',
        "[auth.shop] token_params_env account_id = 'H_SECRET': ",
    ),
}


@pytest.mark.parametrize("kind", list(AUTHS))
@pytest.mark.parametrize(
    "secret",
    ["s3cr3t-VALUE\n", "s3cr3t-VALUE\r\n", "s3cr3t-VALUE\r", "s3cr3t-VALUE\x7f", "s3cr3t\x85-VALUE", "s3cr3t\tVALUE"],
)
def test_a_secret_with_a_control_character_is_refused_at_load(
    kind: str, secret: str, api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("H_SECRET", secret)
    monkeypatch.setenv("H_USER", "user")
    data_route(api)
    auth, where = AUTHS[kind]
    campaign = make_campaign(
        tmp_path, f'[sources.profile]\nurl = "{api.url}/v1/profile/{{{{ id }}}}"\n{auth}\n', people(2), live=["profile"]
    )

    with pytest.raises(CampaignError) as caught:
        load_campaign(campaign)
    result = render(campaign, tmp_path / "out")

    message = str(caught.value)
    assert re.match(rf"{re.escape(str(campaign))}:\d+: {re.escape(where)}", message), message
    assert "environment variable H_SECRET contains a control character" in message
    assert "s3cr" not in message and "VALUE" not in message
    assert result.exit_code == 1
    assert f"Error: {message}" in result.stderr
    assert api.requests == [], "nothing was sent"


# -- the token endpoint as an attacker ----------------------------------------------------


class HugeTokenServer:
    """A token endpoint answering a valid JSON token padded to `size` bytes,
    with or without Content-Length, and counting what it managed to send."""

    def __init__(self, size: int, *, chunked: bool) -> None:
        self.sent = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                head, tail = b'{"access_token": "t", "pad": "', b'"}'
                block = b"x" * (256 * 1024)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                pieces = [head] + [block] * ((size - len(head) - len(tail)) // len(block))
                pieces.append(b"x" * (size - len(head) - len(tail) - sum(map(len, pieces[1:]))) + tail)
                try:
                    for piece in pieces:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                        owner.sent += len(piece)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the client stopped reading

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HugeTokenServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_200_mb_token_response_is_not_read_whole(chunked: bool, api: Api, env: None, tmp_path: Path) -> None:
    data_route(api)
    size = 200 * 1024 * 1024
    with HugeTokenServer(size, chunked=chunked) as tokens:
        campaign = oauth_campaign(tmp_path, tokens.url, api.url)

        result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1, result.output
    assert (
        f"Error: [auth.shop] token_url {tokens.url}: the token endpoint's answer is larger than {TOKEN_MAX_BYTES} "
        "bytes" in result.stderr
    )
    # What the server got out before we hung up: socket buffers, not 200 MB.
    assert tokens.sent < 16 * 1024 * 1024
    assert api.requests == []


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ({"access_token": "tok\r\nX-Injected: 1"}, "access_token holds spaces, control or non-ASCII characters"),
        ({"access_token": "tök"}, "access_token holds spaces, control or non-ASCII characters"),
        ({"access_token": ""}, "access_token holds spaces, control or non-ASCII characters"),
        ({"access_token": ["t"]}, "answer is not JSON with an access_token"),
        (b"[" * 30000 + b"]" * 30000, "answer is not JSON with an access_token"),  # nested: a RecursionError
        (b"\xff\xfe", "answer is not JSON with an access_token"),
        ({"access_token": "t", "expires_in": "NaN"}, "expires_in must be a number of seconds > 0"),
        ({"access_token": "t", "expires_in": -5}, "expires_in must be a number of seconds > 0"),
        ({"access_token": "t", "expires_in": "soon"}, "expires_in must be a number of seconds > 0"),
        ({"access_token": "t", "expires_in": True}, "expires_in must be a number of seconds > 0"),
        ({"access_token": "t", "expires_in": 1e400}, "expires_in must be a number of seconds > 0"),
    ],
)
def test_a_token_answer_no_header_can_carry_stops_the_run_clearly(
    answer: Any, problem: str, api: Api, env: None, tmp_path: Path
) -> None:
    data_route(api)

    @api.route(r"/oauth/token", "POST")
    def _(request: Request, match: re.Match[str]) -> Response:
        return Response(200, answer)

    campaign = oauth_campaign(tmp_path, f"{api.url}/oauth/token", api.url)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1, result.output
    assert f"Error: [auth.shop] token_url {api.url}/oauth/token: the token endpoint's {problem}" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert [r.path for r in api.requests] == ["/oauth/token"], "asked once; no data request"


def test_an_error_answer_from_the_token_endpoint_is_not_echoed(api: Api, env: None, tmp_path: Path) -> None:
    @api.route(r"/oauth/token", "POST")
    def _(request: Request, match: re.Match[str]) -> Response:
        # A hostile or careless endpoint echoing what it got, or writing ANSI escapes.
        return Response(400, {"error": "invalid_request", "error_description": f"{request.body!r} \x1b[2J"})

    campaign = oauth_campaign(tmp_path, f"{api.url}/oauth/token", api.url)

    result = render(campaign, tmp_path / "out")

    assert result.exit_code == 1
    assert 'answered 400 (invalid_request) to client_auth = "basic"' in result.stderr
    assert "csecret" not in result.stderr and "\x1b" not in result.stderr
