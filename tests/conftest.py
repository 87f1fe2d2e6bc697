"""Shared fixtures: a scripted loopback API, a campaign writer, the CLI runner
and readers for what a run leaves on disk (manifest, report, .eml files).

Everything is real: the API is an HTTP server on 127.0.0.1, the cache is a
diskcache folder under tmp_path, and commands run through click's CliRunner.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from emailpers.cli import cli

from advanced_servers import Api, Request, Response, running

# -- the loopback API ------------------------------------------------------------


@dataclass
class Behaviour:
    """What one path answers. The first `fail_times` requests get `fail_status`
    (after `fail_delay`), every later one `status` with `body` (after `delay`).
    A callable body is called with the request (an echo, say)."""

    body: Any = field(default_factory=dict)  # bytes as is, anything else as JSON
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    fail_times: int = 0
    fail_status: int = 500
    fail_body: Any = field(default_factory=lambda: {"error": "scripted failure"})
    fail_delay: float = 0.0
    fail_headers: dict[str, str] = field(default_factory=dict)


class ScriptedAPI:
    """Per-path behaviour keyed by the raw request path (as it arrived, still
    percent-encoded; a key ending in `*` matches by prefix), and a log of every
    request with its headers. Unscripted paths answer 404."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.url = api.url
        self.behaviours: dict[str, Behaviour] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        api.route(r".*")(self._dispatch)

    def serve(self, path: str, body: Any = None, **options: Any) -> Behaviour:
        behaviour = Behaviour(body={} if body is None else body, **options)
        self.behaviours[path] = behaviour
        return behaviour

    def _dispatch(self, request: Request, _: re.Match[str]) -> Response:
        with self._lock:
            self.hits[request.path] += 1
            hit = self.hits[request.path]
        behaviour = self.behaviours.get(request.path)
        if behaviour is None:
            prefixes = [k for k in self.behaviours if k.endswith("*") and request.path.startswith(k[:-1])]
            if not prefixes:
                return Response(404, {"error": f"no route {request.path}"})
            behaviour = self.behaviours[max(prefixes, key=len)]
        if hit <= behaviour.fail_times:
            return Response(behaviour.fail_status, behaviour.fail_body, dict(behaviour.fail_headers), behaviour.fail_delay)
        body = behaviour.body(request) if callable(behaviour.body) else behaviour.body
        return Response(behaviour.status, body, dict(behaviour.headers), behaviour.delay)

    @property
    def requests(self) -> list[Request]:
        with self.api.lock:
            return list(self.api.requests)

    def count(self, path: str | None = None) -> int:
        return len([r for r in self.requests if path is None or r.path == path])


@pytest.fixture
def api() -> Iterator[ScriptedAPI]:
    with running(Api()) as server:
        yield ScriptedAPI(server)


# -- campaigns -------------------------------------------------------------------

HTML_TEMPLATE = """<html><body>
<p>Hi {{ first_name }},</p>
{% live "shop" %}<p>Cart: {{ shop.products|join(", ") }}</p>{% fallback %}<p>See what is new.</p>{% endlive %}
</body></html>
"""
PLAIN_TEMPLATE = "<html><body>\n<p>Hi {{ first_name }},</p>\n<p>New arrivals are in.</p>\n</body></html>\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string accepts JSON's escapes
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


def source(url: str, **keys: Any) -> dict[str, Any]:
    """A source table with test-speed defaults: fast backoff, short deadline."""
    return {"url": url, "timeout": 2.0, "retries": 0, "backoff_initial": 0.01, "backoff_max": 0.05, **keys}


def write_recipients(path: Path, rows: list[dict[str, Any]] | str) -> Path:
    """Rows as .jsonl or .csv (by the suffix); a str is written verbatim."""
    if isinstance(rows, str):
        path.write_text(rows, encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    else:
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_campaign(
    folder: Path,
    *,
    sources: dict[str, dict[str, Any]] | None = None,
    recipients: list[dict[str, Any]] | str | None = None,
    recipients_file: str = "recipients.jsonl",
    template: str | None = None,
    template_name: str = "email.html.j2",
    text_template: str | None = None,
    fallback_template: str | None = None,
    fallback_name: str = "generic.html.j2",
    files: dict[str, str] | None = None,
    campaign: dict[str, Any] | None = None,
    extra: str = "",
) -> Path:
    """Write a campaign folder and return its campaign.toml. `campaign` adds or
    overrides [campaign] keys (a value of None removes the key). The default
    template has a live block over source "shop" when there are sources."""
    folder.mkdir(parents=True, exist_ok=True)
    if template is None:
        template = HTML_TEMPLATE if sources else PLAIN_TEMPLATE
    (folder / template_name).write_text(template, encoding="utf-8")
    table: dict[str, Any] = {
        "name": "test-campaign",
        "template": template_name,
        "subject": "Hello {{ first_name }}",
        "from": "Shop <news@shop.example>",
    }
    if text_template is not None:
        (folder / "email.txt.j2").write_text(text_template, encoding="utf-8")
        table["text_template"] = "email.txt.j2"
    if fallback_template is not None:
        (folder / fallback_name).write_text(fallback_template, encoding="utf-8")
        table["fallback_template"] = fallback_name
    for key, value in (campaign or {}).items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    for name, text in (files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    if recipients is None:
        recipients = [{"id": "r1", "email": "r1@example.com", "first_name": "Ann"}]
    write_recipients(folder / recipients_file, recipients)
    parts = [toml_table("campaign", table), toml_table("recipients", {"path": recipients_file})]
    parts += [toml_table(f"sources.{name}", values) for name, values in (sources or {}).items()]
    path = folder / "campaign.toml"
    path.write_text("\n".join(parts) + extra, encoding="utf-8")
    return path


# -- campaigns of the source tests: TOML text for the sources, one live block each --

CITIES = ("Paris", "Lagos", "Lima")


def people(n: int) -> list[dict[str, str]]:
    return [
        {"id": f"u{i}", "email": f"u{i}@example.com", "first_name": f"Name{i}", "city": CITIES[i % 3]}
        for i in range(1, n + 1)
    ]


def make_campaign(tmp_path: Path, sources: str, rows: list[dict[str, str]], *, live: list[str]) -> Path:
    """A campaign whose HTML template has one live block per name in `live`,
    showing that source's JSON, with a static fallback."""
    blocks = "\n".join(
        f'{{% live "{n}" %}}<p id="{n}">{n}={{{{ {n}|tojson }}}}</p>{{% fallback %}}<p>{n} unavailable</p>{{% endlive %}}'
        for n in live
    )
    (tmp_path / "email.html.j2").write_text(f"<html><body><p>Hi {{{{ first_name }}}}</p>\n{blocks}\n</body></html>\n")
    lines = ["id,email,first_name,city", *(f"{r['id']},{r['email']},{r['first_name']},{r['city']}" for r in rows)]
    (tmp_path / "recipients.csv").write_text("\n".join(lines) + "\n")
    path = tmp_path / "campaign.toml"
    path.write_text(
        '[campaign]\nname = "adv"\ntemplate = "email.html.j2"\nsubject = "Hi {{ first_name }}"\n'
        'from = "Shop <news@shop.example>"\n\n[recipients]\npath = "recipients.csv"\n\n' + sources
    )
    return path


# -- running commands ---------------------------------------------------------------


def invoke(*args: str | Path) -> Result:
    """Run the real CLI in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="emailpers", catch_exceptions=False)


def render(campaign: Path, out: Path, *args: str | Path, workers: int = 0) -> Result:
    return invoke("render", campaign, "--out", out, "--workers", str(workers), "--no-progress", *args)


def render_html(campaign: Path, out: Path, *args: str | Path) -> Result:
    """`render --format html`: the source tests read the .html of a message."""
    return render(campaign, out, "--format", "html", *args)


# -- reading the output ----------------------------------------------------------------


def manifest_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Manifest lines of recipients with an id, by id (asserting each appears once)."""
    lines = [entry for entry in manifest_lines(out) if entry["status"] != "invalid"]
    ids = [entry["id"] for entry in lines]
    assert len(ids) == len(set(ids)), f"an id appears twice in the manifest: {ids}"
    return {entry["id"]: entry for entry in lines}


def outcomes(out: Path, source: str) -> dict[str, str]:
    return {rid: e["sources"][source]["outcome"] for rid, e in manifest(out).items()}


def report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return data


def parse_eml(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> dict[str, str]:
    """{"plain": text, "html": html} of a multipart/alternative message."""
    assert message.get_content_type() == "multipart/alternative"
    found = {}
    for part in message.iter_parts():
        assert isinstance(part, EmailMessage)
        found[part.get_content_subtype()] = part.get_content()
    return found


def eml_of(out: Path, entry: dict[str, Any]) -> EmailMessage:
    (name,) = [f for f in entry["files"] if f.endswith(".eml")]
    return parse_eml(out / name)
