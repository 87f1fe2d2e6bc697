"""Render one recipient's email: Jinja (sandboxed, strict, autoescaped), then MJML.

The `{% live "source" %}...{% fallback %}...{% endlive %}` block is the heart
of the product: its body renders when every named source delivered data and
the body itself runs without a missing field or a wrong type; otherwise the
fallback renders and the block is recorded in the manifest.
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import SandboxedEnvironment
from mjml import mjml2html

from emailpers.campaign import Campaign
from emailpers.errors import CampaignError, RenderFailed

_MJML_SUFFIXES = (".mjml", ".mjml.j2")
_HTML_SUFFIXES = (".html", ".html.j2", ".htm", ".htm.j2")
_STATE = "_emailpers_live_state"

# What a live block's body may hit on data it did not expect. Anything else is
# a bug in the template or in emailpers and should not be silently hidden.
_DATA_ERRORS = (jinja2.UndefinedError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)


class SourceUnavailableError(jinja2.UndefinedError):
    """A template used a source that failed for this recipient, outside a live block."""


@dataclass
class _LiveState:
    failures: dict[str, str]  # source name -> why it has no data
    fallback_blocks: list[dict[str, Any]] = field(default_factory=list)


class LiveExtension(Extension):
    """`{% live "a", "b" %} body {% fallback %} static {% endlive %}`."""

    tags = {"live"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        names: list[nodes.Expr] = [parser.parse_expression()]
        while parser.stream.skip_if("comma"):
            names.append(parser.parse_expression())
        for name in names:
            if not (isinstance(name, nodes.Const) and isinstance(name.value, str)):
                parser.fail("live takes source names as quoted strings: {% live \"cart\" %}", lineno)
        body = parser.parse_statements(("name:fallback", "name:endlive"))
        fallback: list[nodes.Node] = []
        if next(parser.stream).value == "fallback":
            fallback = parser.parse_statements(("name:endlive",), drop_needle=True)
        # One caller, called with True for the body and False for the fallback.
        branch = nodes.Name("_live_branch", "param")
        choose = nodes.If(nodes.Name("_live_branch", "load"), body, [], fallback)
        call = self.call_method("_live", [nodes.List(names), nodes.Const(lineno)])
        return nodes.CallBlock(call, [branch], [], [choose]).set_lineno(lineno)

    @jinja2.pass_context
    def _live(self, context: jinja2.runtime.Context, names: list[str], lineno: int, caller: Callable[[bool], str]) -> str:
        state: _LiveState | None = context.get(_STATE)
        if state is None:  # rendered outside emailpers (a preview tool): everything is live
            return caller(True)
        unknown = [n for n in names if n not in context]
        failed = [f"{n}: {state.failures[n]}" for n in names if n in state.failures]
        if unknown:
            reason = f"unknown source {', '.join(unknown)}"
        elif failed:
            reason = "; ".join(failed)
        else:
            try:
                return caller(True)
            except _DATA_ERRORS as exc:
                reason = f"{type(exc).__name__}: {exc}"
        state.fallback_blocks.append({"template": context.name, "line": lineno, "sources": list(names), "reason": reason})
        return caller(False)


def _autoescape(name: str | None) -> bool:
    return name is not None and name.endswith(_MJML_SUFFIXES + _HTML_SUFFIXES)


def make_environment(root: Path) -> SandboxedEnvironment:
    """The one Jinja environment: sandboxed, strict, autoescaping MJML and HTML,
    loading only from the campaign folder (the loader refuses `..`)."""
    return SandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        autoescape=_autoescape,
        extensions=[LiveExtension],
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=-1,
    )


@dataclass(frozen=True)
class Email:
    subject: str
    html: str
    text: str
    headers: dict[str, str]
    fallback_blocks: list[dict[str, Any]]
    used_fallback_template: bool


class Renderer:
    """Everything that can be prepared once per run: the environment, the
    parsed templates, the MJML include loader. `render` is per recipient."""

    def __init__(self, campaign: Campaign) -> None:
        self.campaign = campaign
        self.env = make_environment(campaign.root)
        self.template_files: set[Path] = set()  # every file loaded: main, text, fallback, their includes
        self.template = self._load(campaign.template)
        self.text_template = self._load(campaign.text_template) if campaign.text_template else None
        self.fallback_template = self._load(campaign.fallback_template) if campaign.fallback_template else None
        where = f"{campaign.path}: [campaign]"
        self.subject = self._compile(campaign.subject, f"{where} subject")
        self.preheader = self._compile(campaign.preheader, f"{where} preheader") if campaign.preheader else None
        self.headers = {k: self._compile(v, f"{where} headers.{k}") for k, v in campaign.headers.items()}

    def _load(self, path: Path) -> jinja2.Template:
        """Compile a template and every template it includes, imports or
        extends by name: Jinja only loads those at render time, where a syntax
        error would stop the run with a traceback instead of this message."""
        try:
            template = self.env.get_template(self.campaign.template_name(path))
            pending, seen = [template], set()
            while pending:
                current = pending.pop()
                if current.filename is None or current.name in seen:
                    continue
                seen.add(current.name)
                self.template_files.add(Path(current.filename))
                ast = self.env.parse(Path(current.filename).read_text(encoding="utf-8"), current.name, current.filename)
                pending += [self.env.get_template(n) for n in meta.find_referenced_templates(ast) if n is not None]
            return template
        except jinja2.TemplateSyntaxError as exc:
            raise CampaignError(f"{exc.filename or path}:{exc.lineno}: template syntax error: {exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise CampaignError(f"{path}: template includes {exc.name}, which is not in {self.campaign.root}") from None

    def _compile(self, source: str, where: str) -> jinja2.Template | str:
        """A template, or the text itself when it has no Jinja in it (rendered
        once here rather than once per recipient)."""
        if "{" not in source:
            if "\n" in source or "\r" in source:
                raise CampaignError(f"{where}: a header value cannot contain a line break")
            return source.strip()
        try:
            return self.env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CampaignError(f"{where}: template syntax error: {exc.message}") from None

    def render(self, fields: dict[str, Any], data: dict[str, Any], failures: dict[str, str]) -> Email:
        """Render one email. `data` holds each delivered source's JSON, `failures`
        says why each other source has none. Raises RenderFailed."""
        state = _LiveState(failures)
        context: dict[str, Any] = {**fields, "recipient": fields, **data, _STATE: state}
        for name, why in failures.items():
            context[name] = jinja2.StrictUndefined(
                hint=f"source {name!r} is unavailable for this recipient ({why}); use it inside {{% live {name!r} %}}",
                exc=SourceUnavailableError,
            )
        subject = self._header_value("subject", self.subject, context)
        headers = {k: self._header_value(k, t, context) for k, t in self.headers.items()}
        preheader = self._header_value("preheader", self.preheader, context) if self.preheader else None
        context["preheader"] = preheader or ""

        used_fallback_template = False
        text: str | None = None
        rendering = self.template
        try:
            body = self.template.render(context)
            if self.text_template is not None:
                # In the same try: a failed source used outside a live block of
                # the text template also sends the recipient the fallback_template.
                rendering = self.text_template
                text = self.text_template.render(context)
            template = self.campaign.template
        except SourceUnavailableError as exc:
            if self.fallback_template is None:
                raise RenderFailed(f"{exc}; the campaign has no fallback_template") from None
            used_fallback_template = True
            state.fallback_blocks[:] = [{
                "template": self.fallback_template.name, "line": None, "sources": sorted(failures), "reason": str(exc),
            }]
            body = self._run(self.fallback_template, context, "fallback_template")
            template = self.campaign.fallback_template  # type: ignore[assignment]
            text = None
        except _DATA_ERRORS as exc:
            what = rendering.name if rendering is self.template else f"text_template {rendering.name}"
            raise RenderFailed(f"{what}: {_describe(exc)}") from None

        html = self._to_html(body, template)
        if preheader:
            html = _insert_preheader(html, preheader)
        if text is None:
            text = html_to_text(html)
        return Email(subject, html, text, headers, state.fallback_blocks, used_fallback_template)

    def _run(self, template: jinja2.Template, context: dict[str, Any], what: str) -> str:
        try:
            return template.render(context)
        except _DATA_ERRORS as exc:
            raise RenderFailed(f"{what} {template.name}: {_describe(exc)}") from None

    def _header_value(self, name: str, template: jinja2.Template | str, context: dict[str, Any]) -> str:
        if isinstance(template, str):
            return template
        value = self._run(template, context, name).strip()
        if "\n" in value or "\r" in value:
            raise RenderFailed(f"{name} would contain a line break (header injection refused): {value[:80]!r}")
        return value

    def _to_html(self, body: str, template: Path) -> str:
        if not template.name.endswith(_MJML_SUFFIXES):
            return body
        try:
            return str(mjml2html(body, include_loader=self._include))
        except ValueError as exc:
            raise RenderFailed(f"{self.campaign.template_name(template)}: MJML compile error: {exc}") from None

    def _include(self, path: str) -> str:
        """mj-include: files inside the campaign folder only."""
        root = self.campaign.root
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise ValueError(f"mj-include {path!r} is not a file inside {root}")
        return target.read_text(encoding="utf-8")


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, jinja2.UndefinedError) else str(exc)


_BODY = re.compile(r"<body[^>]*>", re.IGNORECASE)


def _insert_preheader(html: str, preheader: str) -> str:
    """The hidden first line mail clients show next to the subject."""
    block = (
        '<div style="display:none;font-size:1px;color:#ffffff;line-height:1px;max-height:0;'
        f'max-width:0;opacity:0;overflow:hidden;mso-hide:all;">{html_lib.escape(preheader)}</div>'
    )
    match = _BODY.search(html)
    if match is None:
        return block + html
    return html[: match.end()] + block + html[match.end() :]


_BLOCK_TAGS = frozenset(
    "p div br tr table h1 h2 h3 h4 h5 h6 li ul ol blockquote hr section article header footer".split()
)
_SKIP_TAGS = frozenset({"style", "script", "head", "title"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.links: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag == "a":
            self.links.append(dict(attrs).get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag == "a" and self.links:
            href = self.links.pop()
            if href and href.startswith(("http://", "https://", "mailto:")):
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


_SPACES = re.compile(r"[ \t\r\f\v\u00a0\u200b-\u200d\u034f]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def html_to_text(html: str) -> str:
    """A readable text/plain part from an HTML email: visible text, one block
    per paragraph, links written out."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = _SPACES.sub(" ", "".join(parser.parts))
    lines = (line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip() + "\n"

