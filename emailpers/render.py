"""Render one recipient's email: Jinja (sandboxed, strict, autoescaped), then MJML.

The `{% live "source" %}...{% fallback %}...{% endlive %}` block is the heart
of the product: its body renders when every named source delivered data and
the body itself runs without a missing field or a wrong type; otherwise the
fallback renders and the block is recorded in the manifest.
"""

from __future__ import annotations

import html as html_lib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from mjml import mjml2html

from emailpers import amp, skeleton
from emailpers.campaign import Campaign
from emailpers.errors import CampaignError, RenderFailed
from emailpers.sandbox import (
    RENDER_MEMORY,
    Budget,
    CampaignLoader,
    RenderLimitExceeded,
    Sandbox,
    budget,
    current,
    is_blank,
    memory_cap,
)
from emailpers.unsubscribe import unsubscribe_headers, unsubscribe_token, unsubscribe_url

_MJML_SUFFIXES = (".mjml", ".mjml.j2")
MAX_BODY = 10 * 1024 * 1024  # characters of rendered HTML or MJML; Gmail clips an email at 102 KB
MAX_HEADER = 16 * 1024  # characters of one header value
MAX_NESTING = 256  # tags open at once in MJML; mjml-python's process dies near 3,000

# What a live block's body may hit on data it did not expect. Anything else is
# a bug in the template or in emailpers and should not be silently hidden.
_DATA_ERRORS = (jinja2.UndefinedError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)
# C0 controls but tab, line feed and carriage return, and DEL: MJML refuses
# them and no mail client shows them.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class SourceUnavailableError(jinja2.UndefinedError):
    """A template used a source that failed for this recipient, outside a live block."""


class LiveExtension(Extension):
    """`{% live "a", "b" %} body {% fallback %} static {% endlive %}`.

    Which sources failed and which blocks fell back live on the render call's
    budget (see sandbox.py), never in the template context: a template can
    neither read nor forge what the manifest is built from."""

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
        state = current.get()
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


def make_environment(root: Path, *, autoescape: bool) -> Sandbox:
    """A sandboxed, strict environment loading only from the campaign folder.
    Escaping follows what is being produced, never a file name: everything
    that ends up in the HTML (its partials and macros whatever their names)
    is escaped; the text template and its includes, and header values, not."""
    return Sandbox(
        loader=CampaignLoader(root),
        autoescape=autoescape,
        **({"finalize": skeleton.finalize} if autoescape else {}),
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
    amp: str | None = None  # the validated AMP4EMAIL part, None when there is none to send
    amp_outcome: dict[str, Any] | None = None  # for the manifest: {"amp": "sent" | "dropped" | "unvalidated", ...}


@dataclass(frozen=True)
class _Jinja:
    """What the templates produced for one recipient, before MJML."""

    subject: str
    headers: dict[str, str]
    preheader: str | None
    body: str
    text: str | None
    template: Path
    used_fallback_template: bool


@dataclass(frozen=True)
class Parsed:
    """A template's syntax tree and where it came from, for the load checks."""

    path: Path  # the template file, or the campaign file for a [campaign] value
    ast: nodes.Template
    key: str | None = None  # the [campaign] key of a subject, preheader or header
    text: bool = False  # loaded for the text part, which renders without markers (skeleton.py)

    def where(self, lineno: int) -> str:
        """`file:line` (and key) to put in front of a message about `lineno`."""
        if self.key is None:
            return f"{self.path}:{lineno}"
        return campaign_key_where(self.path, self.key)


class Renderer:
    """Everything that can be prepared once per run: the environments, the
    parsed templates, the MJML include loader. `render` is per recipient."""

    def __init__(self, campaign: Campaign, *, clock: Callable[[], float] = time.monotonic, memo: bool = True) -> None:
        self.campaign = campaign
        self.clock = clock
        self.deadline = campaign.render_deadline
        self.html_env = make_environment(campaign.root, autoescape=True)
        self.text_env = make_environment(campaign.root, autoescape=False)
        self.parsed: list[Parsed] = []
        self.template = self._load(self.html_env, campaign.template)
        self.text_template = self._load(self.text_env, campaign.text_template) if campaign.text_template else None
        self.fallback_template = (
            self._load(self.html_env, campaign.fallback_template) if campaign.fallback_template else None
        )
        self.subject = self._compile("subject", campaign.subject)
        self.preheader = self._compile("preheader", campaign.preheader) if campaign.preheader else None
        self.headers = {k: self._compile(f"headers.{k}", v) for k, v in campaign.headers.items()}
        # Compile once per layout (skeleton.py) where the templates of the HTML allow it.
        files = [p for p in self.parsed if p.key is None and not p.text]
        mjml = [t for t in (campaign.template, campaign.fallback_template) if t and t.name.endswith(_MJML_SUFFIXES)]
        self.memo_off = None if memo and mjml else "memo=False" if mjml else "no MJML template"
        self.memo_off = self.memo_off or skeleton.template_allows(
            [p.ast for p in files], [p.path.read_text(encoding="utf-8") for p in files]
        )
        self.memos: dict[Path, skeleton.Memo] = {}
        self.amp_template = self._load(self.html_env, campaign.amp.template) if campaign.amp else None
        self.amp_validator = self._amp_validator()

    def _amp_validator(self) -> Path | None:
        if self.campaign.amp is None or not self.campaign.amp.validate:
            return None
        try:
            # Loaded here, once per process (0.5-1.5 s): a file that is not a
            # working validator stops the run before the first request.
            path = amp.check_available()
            amp.validator(path)
            return path
        except amp.ValidatorUnavailable as exc:
            where = campaign_key_where(self.campaign.path, "amp_template")
            raise amp.ValidatorUnavailable(f"{where}: {exc}; or render with --amp-unvalidated") from None

    @property
    def template_files(self) -> set[Path]:
        """Every template file loaded: main, text, fallback, and what they include."""
        return {parsed.path for parsed in self.parsed if parsed.key is None}

    def _load(self, env: Sandbox, path: Path) -> jinja2.Template:
        """Compile a template and every template it includes, imports or
        extends by name: Jinja only loads those at render time, where a syntax
        error would stop the run with a traceback instead of this message."""
        try:
            template = env.get_template(self.campaign.template_name(path))
            pending, seen = [template], set()
            while pending:
                current_ = pending.pop()
                if current_.filename is None or current_.name in seen:
                    continue
                seen.add(current_.name)
                filename = current_.filename
                ast = env.parse(Path(filename).read_text(encoding="utf-8"), current_.name, filename)
                self.parsed.append(Parsed(Path(filename), ast, text=env is self.text_env))
                pending += [env.get_template(n) for n in meta.find_referenced_templates(ast) if n is not None]
            return template
        except jinja2.TemplateSyntaxError as exc:
            raise CampaignError(f"{exc.filename or path}:{exc.lineno}: template syntax error: {exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise CampaignError(
                f"{path}: template includes {exc.name}, which is not in {self.campaign.root}"
            ) from None
        except UnicodeDecodeError as exc:
            raise CampaignError(f"{path}: a template it uses is not UTF-8 text ({exc.reason})") from None

    def _compile(self, key: str, source: str) -> jinja2.Template | str:
        """A template, or the text itself when it has no Jinja in it (rendered
        once here rather than once per recipient). Header values render
        without escaping: they are not HTML."""
        if "{" not in source:
            if "\n" in source or "\r" in source:
                raise CampaignError(f"{campaign_key_where(self.campaign.path, key)}: a header value cannot contain a line break")
            return source.strip()
        env = self.text_env
        try:
            self.parsed.append(Parsed(self.campaign.path, env.parse(source), key))
            return env.template_class.from_code(env, env.compile(source, name=key), env.make_globals(None), None)
        except jinja2.TemplateSyntaxError as exc:
            raise CampaignError(f"{campaign_key_where(self.campaign.path, key)}: template syntax error: {exc.message}") from None

    def render(
        self,
        fields: dict[str, Any],
        data: dict[str, Any],
        failures: dict[str, str],
        unsubscribe_token: str | None = None,
        amp_link: amp.AmpLink | None = None,
    ) -> Email:
        """Render one email. `data` holds each delivered source's JSON, `failures`
        says why each other source has none. A null or blank field or answer is
        missing. `amp_link` signs the AMP template's `amp_url(...)` links.
        Raises RenderFailed; an AMP part that fails is dropped, not the email."""
        failures = {**failures, **{name: "the answer is empty (null)" for name, v in data.items() if is_blank(v)}}
        context: dict[str, Any] = {
            k: self.html_env.undefined(hint=f"{k!r} is empty (null or blank)", name=k) if is_blank(v) else v
            for k, v in fields.items()
        }
        context["recipient"] = fields
        extra_headers = self._unsubscribe(fields, context, unsubscribe_token)
        context.update((name, value) for name, value in data.items() if name not in failures)
        for name, why in failures.items():
            context[name] = jinja2.StrictUndefined(
                hint=f"source {name!r} is unavailable for this recipient ({why}); use it inside {{% live {name!r} %}}",
                exc=SourceUnavailableError,
            )
        try:
            # The cap covers Jinja only: mjml-python aborts the process on a
            # failed allocation instead of raising.
            with budget(failures, self.deadline, self.clock) as state, memory_cap():
                try:
                    with skeleton.recording(self.memo_off is None) as recorded:
                        out = self._jinja(context, state)
                except skeleton.Poisoned:  # data holding a marker character: no skeleton for this one
                    del state.fallback_blocks[:]
                    recorded = None
                    out = self._jinja(context, state)
                amp_doc, amp_outcome = self._amp(context, amp_link)
        except RenderLimitExceeded as exc:
            raise RenderFailed(str(exc)) from None
        except MemoryError:
            raise RenderFailed(
                f"the template needed more than the render memory cap ({RENDER_MEMORY >> 20} MiB)"
            ) from None
        body = _CONTROL.sub("", out.body)  # markers and the values kept aside hold no control character
        values = None if recorded is None else recorded.values
        # An upper bound of the filled body's length (markers counted too), exact when it matters.
        size = len(body) + sum(map(len, values or ()))
        if size > MAX_BODY and values is not None:
            size = len(skeleton.fill(body, values))
        for length in (size, len(out.text or "")):
            if length > MAX_BODY:
                raise RenderFailed(f"the rendered email is {length >> 20} MiB, more than the {MAX_BODY >> 20} MiB limit")
        preheader = _CONTROL.sub("", out.preheader) if out.preheader else None
        html, made = self._to_html(body, out.template, values, preheader, text=out.text is None)
        text = out.text if out.text is not None else made or ""
        headers = {**out.headers, **extra_headers}
        if amp_doc is not None:
            amp_doc, amp_outcome = self._check_amp(amp_doc)
        return Email(
            out.subject, html, text, headers, state.fallback_blocks, out.used_fallback_template, amp_doc, amp_outcome
        )

    def _amp(self, context: dict[str, Any], amp_link: amp.AmpLink | None) -> tuple[str | None, dict[str, Any] | None]:
        """The AMP part from its template, or None and why it was dropped."""
        if self.amp_template is None:
            return None, None
        try:
            document = self.amp_template.render({**context, "amp_url": amp_link.url if amp_link else _no_amp_key})
        except _DATA_ERRORS as exc:
            error = amp.AmpError(None, None, "TEMPLATE_ERROR", f"{self.amp_template.name}: {_describe(exc)}")
            return None, _amp_dropped([error])
        return _CONTROL.sub("", document), None

    def _check_amp(self, document: str) -> tuple[str | None, dict[str, Any]]:
        """Gmail's size limit, then the AMP validator: what fails either is not sent."""
        size = len(document.encode())
        if size > amp.MAX_AMP_BYTES:
            message = f"the AMP part is {size:,} bytes, over the {amp.MAX_AMP_BYTES:,} AMP for Email allows"
            return None, _amp_dropped([amp.AmpError(None, None, "SIZE_LIMIT", message)])
        if self.amp_validator is None:
            return document, {"amp": "unvalidated"}
        errors = amp.validator(self.amp_validator).errors(document)
        if errors:
            return None, _amp_dropped(errors)
        return document, {"amp": "sent"}

    def _unsubscribe(self, fields: dict[str, Any], context: dict[str, Any], token: str | None) -> dict[str, str]:
        """[campaign] unsubscribe: this recipient's signed headers; the URL is
        also `{{ unsubscribe_url }}` for the footer link. The run signs the
        token in the main process (`token`); a Renderer used on its own signs it."""
        config = self.campaign.unsubscribe
        if config is None:
            return {}
        if token is None:
            r = self.campaign.recipients
            token = unsubscribe_token(config, self.campaign.name, str(fields[r.id_field]), str(fields[r.email_field]))
        if config.url is not None:
            context["unsubscribe_url"] = unsubscribe_url(config, token)
        return unsubscribe_headers(config, token)

    def _jinja(self, context: dict[str, Any], state: Budget) -> _Jinja:
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
            skeleton.restart()  # the fallback's markers number from 0 whatever the main template printed
            state.fallback_blocks[:] = [{
                "template": self.fallback_template.name, "line": None, "sources": sorted(state.failures),
                "reason": str(exc),
            }]
            body = self._run(self.fallback_template, context, f"fallback_template {self.fallback_template.name}")
            template = self.campaign.fallback_template  # type: ignore[assignment]
            text = None
        except _DATA_ERRORS as exc:
            what = rendering.name if rendering is self.template else f"text_template {rendering.name}"
            raise RenderFailed(f"{what}: {_describe(exc)}") from None
        return _Jinja(subject, headers, preheader, body, text, template, used_fallback_template)

    def _run(self, template: jinja2.Template, context: dict[str, Any], what: str) -> str:
        try:
            return template.render(context)
        except _DATA_ERRORS as exc:
            raise RenderFailed(f"{what}: {_describe(exc)}") from None

    def _header_value(self, key: str, template: jinja2.Template | str, context: dict[str, Any]) -> str:
        if isinstance(template, str):
            return template
        value = self._run(template, context, key).strip()
        if len(value) > MAX_HEADER:
            raise RenderFailed(f"{key} is {len(value)} characters long, more than the {MAX_HEADER} allowed")
        if "\n" in value or "\r" in value:
            raise RenderFailed(f"{key} would contain a line break (header injection refused): {value[:80]!r}")
        return value

    def _to_html(
        self, body: str, template: Path, values: list[str] | None, preheader: str | None, *, text: bool
    ) -> tuple[str, str | None]:
        """The HTML (and text part if wanted) of a body, or of a skeleton and its values (skeleton.py)."""
        if values is not None and template.name.endswith(_MJML_SUFFIXES):
            return self._memo(body, template).render(body, values, preheader, text)
        html = body if values is None else skeleton.fill(body, values)
        if template.name.endswith(_MJML_SUFFIXES):
            html = self._mjml(html, template)
        if preheader:
            html = _insert_preheader(html, preheader)
        return html, html_to_text(html) if text else None

    def _memo(self, body: str, template: Path) -> skeleton.Memo:
        """The template's memo. (Every compile it makes, of a skeleton or of the
        filled body, checks the depth: values hold no markup.)"""
        memo = self.memos.get(template)
        if memo is None:
            memo = skeleton.Memo(lambda text: self._mjml(text, template), _insert_preheader, html_to_text)
            self.memos[template] = memo
        return memo

    def _check_depth(self, body: str, template: Path) -> None:
        # Opening tags bound the depth: the scan only runs when they could pass the cap.
        depth = nesting_depth(body) if body.count("<") - body.count("</") > MAX_NESTING else 0
        if depth > MAX_NESTING:
            name = self.campaign.template_name(template)
            raise RenderFailed(f"{name}: markup nested {depth} deep, more than the {MAX_NESTING} MJML accepts")

    def _mjml(self, body: str, template: Path) -> str:
        self._check_depth(body, template)
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


_TABLE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")


def toml_where(path: Path, table: str, key: str) -> str:
    """`file:line` of `key` (its part before a dot) in `[table]` of a TOML
    file, for messages; the file alone when the line cannot be found."""
    name = key.partition(".")[0]
    pattern = re.compile(rf"^\s*(\"?){re.escape(name)}\1\s*=")
    current_table = ""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for number, line in enumerate(lines, start=1):
        if m := _TABLE.match(line):
            current_table = m.group(1).replace('"', "").replace(" ", "")
        elif current_table == table and pattern.match(line):
            return f"{path}:{number}"
    return str(path)


def campaign_key_where(path: Path, key: str) -> str:
    return f"{toml_where(path, 'campaign', key)}: [campaign] {key}"


_TAG = re.compile(r"<(/?)([A-Za-z][^\s/>]*)[^>]*?(/?)>")
_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())


def nesting_depth(markup: str) -> int:
    """How many tags are open at once at the deepest point (a linear scan:
    the point is to refuse what would crash a recursive parser)."""
    depth = deepest = 0
    for closing, tag, self_closing in _TAG.findall(markup):
        if closing:
            depth = max(0, depth - 1)
        elif not self_closing and tag.lower() not in _VOID:
            depth += 1
            deepest = max(deepest, depth)
    return deepest


def _no_amp_key(url: str) -> str:
    raise ValueError("amp_url needs [campaign] amp_key_env (the key that signs its links)")


def _amp_dropped(errors: list[amp.AmpError]) -> dict[str, Any]:
    return {"amp": "dropped", "amp_errors": [e.manifest() for e in errors[: amp.MAX_ERRORS]]}


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

