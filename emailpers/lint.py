"""Lint rules for what a campaign sends: a rendered message (.eml bytes) and
the MJML/Jinja template sources. Independent of the pipeline: `check` renders
a sample through the normal render path, then asks this module about the files.

Every rule has an id (RULES), a severity, and names where it found the problem:
the recipient and message file, or the template file and line.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any

ERROR, WARNING = "error", "warning"
# Gmail clips a message whose HTML passes 102 KB ("[Message clipped]"): the
# rest, the unsubscribe link often with it, is behind a click.
GMAIL_CLIP_BYTES = 102 * 1024
GMAIL_CLIP_WARN_BYTES = 90 * 1024
SUBJECT_MAX = 78
PREHEADER_MAX = 140
TEXT_SHARE_MIN = 0.3  # a text part under this share of the HTML's visible text is "much shorter"

RULES: dict[str, tuple[str, str]] = {
    "gmail-clip": (ERROR, "HTML over 102 KB: Gmail clips it (over 90 KB: a warning)"),
    "mjml-unknown-tag": (ERROR, "an mj-* tag MJML does not know (it ships raw into the HTML)"),
    "mjml-unknown-attribute": (WARNING, "an attribute the MJML tag does not have (MJML ignores it)"),
    "mjml-bad-parent": (ERROR, "an MJML tag inside a parent that does not allow it"),
    "merge-tag": (ERROR, "a merge tag left in the output: {{ }}, {% %}, *|X|*, %%X%%, [[X]]"),
    "empty-value": (ERROR, "an empty personalisation: 'Hi ,', None, undefined, nan"),
    "img-alt": (WARNING, "an <img> without alt"),
    "insecure-url": (WARNING, "an http:// image or link"),
    "javascript-link": (ERROR, "a javascript: link"),
    "bad-link": (ERROR, "a link with spaces or unbalanced quotes"),
    "list-unsubscribe": (ERROR, "no List-Unsubscribe header"),
    "list-unsubscribe-post": (ERROR, "no 'List-Unsubscribe-Post: List-Unsubscribe=One-Click' (RFC 8058)"),
    "from-domain": (ERROR, "a From address without a domain"),
    "subject": (ERROR, "an empty subject (over 78 characters: a warning)"),
    "preheader": (WARNING, "no preheader, or one over 140 characters"),
    "text-part": (ERROR, "an empty text part (much shorter than the HTML's text: a warning)"),
    "empty-fallback": (ERROR, "a {% live %} block whose fallback is empty: the recipient would see a hole"),
    "render": (ERROR, "the recipient's message could not be rendered"),
    "fixtures": (WARNING, "requests with no fixture: their sources fell back in the sample"),
    "amp": (ERROR, "the AMP part was dropped: AMP validator errors, over the size limit, or an amp_template error "
                   "(sent unvalidated: a warning)"),
}


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    message: str
    file: str | None = None  # a template, the campaign file, or the message file
    line: int | None = None
    recipient: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finding(rule: str, message: str, severity: str | None = None, **where: Any) -> Finding:
    return Finding(rule, severity or RULES[rule][0], message, **where)


# -- a rendered message -------------------------------------------------------------

_MERGE_TAGS = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{\{|\{%|\*\|[A-Za-z0-9_:]+\|\*|%%[A-Za-z_][A-Za-z0-9_]*%%|\[\[[^\]\n]{1,80}\]\]")
_EMPTY_WORDS = re.compile(r"(?<![\w.])(None|undefined|NaN|nan)(?![\w.])")
_BLANK_BEFORE_COMMA = re.compile(r"\b\w+[ \t]+,")
_SKIP = frozenset({"style", "script", "head", "title"})
_BLOCK = frozenset("p div br tr td th table li ul ol h1 h2 h3 h4 h5 h6 blockquote hr".split())


class _Html(HTMLParser):
    """Visible text (the hidden preheader apart), links, images."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.preheader: list[str] = []
        self.links: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self._skip = 0
        self._hidden = 0  # depth inside the preheader's hidden div

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in _SKIP:
            self._skip += 1
        elif tag == "div" and (self._hidden or "display:none" in (values.get("style") or "").replace(" ", "")):
            self._hidden += 1
        if tag in _BLOCK:
            self.text.append(" ")
        if tag == "a" and values.get("href") is not None:
            # A quote in an attribute's name: the href's quotes did not balance.
            stray = next((name for name, _ in attrs if re.search(r"[\"']", name)), None)
            self.links.append((values["href"] or "") + ("" if stray is None else f'"{stray}'))
        if tag == "img":
            self.images.append(values)

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK:
            self.text.append(" ")
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "div" and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        (self.preheader if self._hidden else self.text).append(data)


def _part(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_subtype() != subtype:
        return None
    content = part.get_content()
    return content if isinstance(content, str) else None


def _words(text: str) -> str:
    return " ".join(text.split())


def lint_message(eml: bytes, *, recipient: str | None = None, file: str | None = None) -> list[Finding]:
    """Every message rule on one .eml."""
    message = email.message_from_bytes(eml, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    where: dict[str, Any] = {"recipient": recipient, "file": file}
    found: list[Finding] = []

    def add(rule: str, text: str, severity: str | None = None) -> None:
        found.append(_finding(rule, text, severity, **where))

    html = _part(message, "html") or ""
    text = _part(message, "plain")
    size = len(html.encode("utf-8"))
    if size > GMAIL_CLIP_BYTES:
        add("gmail-clip", f"HTML is {size / 1024:.1f} KB, over Gmail's 102 KB: Gmail clips the rest")
    elif size > GMAIL_CLIP_WARN_BYTES:
        add("gmail-clip", f"HTML is {size / 1024:.1f} KB, close to Gmail's 102 KB clip", WARNING)
    for tag in sorted(set(re.findall(r"<(mj-[\w-]+)", html))):
        add("mjml-unknown-tag", f"<{tag}> reached the HTML raw: MJML does not know it")

    parsed = _Html()
    parsed.feed(html)
    parsed.close()
    # Joined with nothing but block edges: "<b>Paris</b>, France" must not read as "Paris , France".
    visible = _words("".join(parsed.text))
    preheader = _words("".join(parsed.preheader))
    subject = str(message.get("Subject", ""))
    attributes = [*parsed.links, *(str(i.get("src") or "") for i in parsed.images),
                  *(str(i.get("alt") or "") for i in parsed.images)]
    places = (("subject", subject), ("HTML", visible), ("preheader", preheader), ("text part", text or ""),
              ("a link or image", " ".join(attributes)))
    for place, value in places:
        for tag in dict.fromkeys(m.group(0) for m in _MERGE_TAGS.finditer(value)):
            add("merge-tag", f"{tag[:60]!r} left in the {place}")
    for place, value in places[:4]:
        for word in dict.fromkeys(m.group(1) for m in _EMPTY_WORDS.finditer(value)):
            add("empty-value", f"{word!r} in the {place}: a value that was missing was printed")
        for m in dict.fromkeys(m.group(0) for m in _BLANK_BEFORE_COMMA.finditer(value)):
            add("empty-value", f"{m!r} in the {place}: a blank value before the comma")

    for image in parsed.images:
        src = str(image.get("src") or "")
        if "alt" not in image:
            add("img-alt", f"<img src={src[:80]!r}> has no alt: screen readers and blocked images show nothing")
        if src.lower().startswith("http://"):
            add("insecure-url", f"image over http://: {src[:80]}")
    for href in parsed.links:
        value = href.strip().lower()
        if value.startswith("javascript:"):
            add("javascript-link", f"link to {href[:80]!r}: mail clients strip it or flag the message")
        elif value.startswith("http://"):
            add("insecure-url", f"link over http://: {href[:80]}")
        if re.search(r"\s", href):
            add("bad-link", f"link {href[:80]!r} has spaces: clients cut it at the first one")
        if re.search(r"[\"'<>]", href):
            add("bad-link", f"link {href[:80]!r} has a stray quote or bracket (unbalanced quotes in the template?)")

    if message.get("List-Unsubscribe") is None:
        add("list-unsubscribe", "no List-Unsubscribe header: Gmail and Yahoo require one from bulk senders")
    post = str(message.get("List-Unsubscribe-Post", "")).strip()
    if post != "List-Unsubscribe=One-Click":
        add("list-unsubscribe-post", "no 'List-Unsubscribe-Post: List-Unsubscribe=One-Click' header (RFC 8058 "
                                     "one-click unsubscribe, required by Gmail and Yahoo for bulk senders)")
    address = email.utils.parseaddr(str(message.get("From", "")))[1]
    domain = address.rpartition("@")[2]
    if "@" not in address or "." not in domain.strip("."):
        add("from-domain", f"From address {address!r} has no domain: receivers reject or spam-folder it")
    if not subject.strip():
        add("subject", "the subject is empty")
    elif len(subject) > SUBJECT_MAX:
        add("subject", f"the subject is {len(subject)} characters, over {SUBJECT_MAX}: clients cut it", WARNING)
    if not preheader:
        add("preheader", "no preheader: clients show the first text of the body next to the subject")
    elif len(preheader) > PREHEADER_MAX:
        add("preheader", f"the preheader is {len(preheader)} characters, over {PREHEADER_MAX}")
    if text is None or not text.strip():
        add("text-part", "the text part is empty: text-only clients and spam filters see nothing")
    elif len(_words(text)) < TEXT_SHARE_MIN * len(visible):
        add("text-part", f"the text part ({len(_words(text))} characters) is much shorter than the HTML's "
                         f"text ({len(visible)})", WARNING)
    return found


def lint_amp(outcome: dict[str, Any] | None, *, recipient: str | None, file: str | None) -> list[Finding]:
    """Findings for one message's AMP outcome (a manifest line's "amp" and
    "amp_errors"). A validator's line and column are the rendered AMP part's,
    not the template's: Jinja does not keep a map between them."""
    where: dict[str, Any] = {"recipient": recipient, "file": file}
    if not outcome or outcome.get("amp") == "sent":
        return []
    if outcome.get("amp") == "unvalidated":
        return [_finding("amp", "the AMP part was sent unvalidated: no AMP validator checked it (set "
                                "$EMAILPERS_AMP_VALIDATOR or run `emailpers amp fetch-validator`)", WARNING, **where)]
    found = []
    for error in outcome.get("amp_errors") or [{"code": "DROPPED", "message": "no reason recorded"}]:
        at = f"line {error['line']}, column {error['col']} of the AMP part: " if error.get("line") else ""
        found.append(_finding("amp", f"AMP part dropped (the email went without it): {at}{error['code']}: "
                                     f"{error['message']}", **where))
    return found


# -- template sources ---------------------------------------------------------------

_COMMON = {"css-class", "mj-class", "padding", "padding-top", "padding-bottom", "padding-left", "padding-right"}
_BORDERS = {"border", "border-top", "border-bottom", "border-left", "border-right", "border-radius"}
_BACKGROUND = {"background-color", "background-url", "background-repeat", "background-size", "background-position",
               "background-position-x", "background-position-y"}
_FONT = {"color", "font-family", "font-size", "font-style", "font-weight", "line-height", "letter-spacing",
         "text-decoration", "text-transform", "align", "container-background-color"}
_CONTENT = ("mj-column", "mj-hero")
_SECTION_PARENTS = ("mj-body", "mj-wrapper")
# tag -> (allowed parents, attributes); None: attributes not checked
MJML_TAGS: dict[str, tuple[tuple[str, ...], frozenset[str] | None]] = {
    "mjml": ((), frozenset({"lang", "dir", "owa", "version"})),
    "mj-head": (("mjml",), frozenset()),
    "mj-body": (("mjml",), frozenset({"background-color", "css-class", "width"})),
    "mj-attributes": (("mj-head",), frozenset()),
    "mj-breakpoint": (("mj-head",), frozenset({"width"})),
    "mj-font": (("mj-head",), frozenset({"name", "href"})),
    "mj-html-attributes": (("mj-head",), None),
    "mj-selector": (("mj-html-attributes",), None),
    "mj-html-attribute": (("mj-selector",), None),
    "mj-preview": (("mj-head",), frozenset()),
    "mj-style": (("mj-head",), frozenset({"inline"})),
    "mj-title": (("mj-head",), frozenset()),
    "mj-all": (("mj-attributes",), None),
    "mj-class": (("mj-attributes",), None),
    "mj-section": (_SECTION_PARENTS, frozenset(_COMMON | _BORDERS | _BACKGROUND | {
        "direction", "full-width", "text-align", "text-padding"})),
    "mj-wrapper": (("mj-body",), frozenset(_COMMON | _BORDERS | _BACKGROUND | {
        "direction", "full-width", "text-align", "gap"})),
    "mj-group": (("mj-section",), frozenset({"background-color", "direction", "vertical-align", "width",
                                             "css-class", "mj-class"})),
    "mj-column": (("mj-section", "mj-group"), frozenset(_COMMON | _BORDERS | {
        "background-color", "inner-background-color", "inner-border", "inner-border-radius", "vertical-align",
        "width", "direction"})),
    "mj-hero": (_SECTION_PARENTS, None),
    "mj-text": (_CONTENT, frozenset(_COMMON | _FONT | {"height", "vertical-align"})),
    "mj-button": (_CONTENT, frozenset(_COMMON | _FONT | _BORDERS | {
        "background-color", "height", "href", "inner-padding", "name", "rel", "target", "text-align", "title",
        "vertical-align", "width"})),
    "mj-image": (_CONTENT, frozenset(_COMMON | _BORDERS | {
        "align", "alt", "container-background-color", "fluid-on-mobile", "height", "href", "name", "rel", "sizes",
        "src", "srcset", "target", "title", "usemap", "width", "font-size", "max-height"})),
    "mj-divider": (_CONTENT, frozenset(_COMMON | {"align", "border-color", "border-style", "border-width",
                                                  "container-background-color", "width"})),
    "mj-spacer": (_CONTENT, frozenset(_COMMON | {"container-background-color", "height"})),
    "mj-table": (_CONTENT, None),
    "mj-social": (_CONTENT, None),
    "mj-social-element": (("mj-social",), None),
    "mj-navbar": (_CONTENT, None),
    "mj-navbar-link": (("mj-navbar",), None),
    "mj-accordion": (_CONTENT, None),
    "mj-accordion-element": (("mj-accordion",), None),
    "mj-accordion-title": (("mj-accordion-element",), None),
    "mj-accordion-text": (("mj-accordion-element",), None),
    "mj-carousel": (_CONTENT, None),
    "mj-carousel-image": (("mj-carousel",), None),
    "mj-raw": ((), None),  # anywhere
    "mj-include": ((), None),
}
_JINJA = re.compile(r"\{#.*?#\}|\{%.*?%\}|\{\{.*?\}\}", re.DOTALL)
_MJ_TAG = re.compile(r"<(/?)(mjml|mj-[\w-]+)\b((?:[^>\"']|\"[^\"]*\"|'[^']*')*?)(/?)>", re.IGNORECASE)
_ATTRIBUTE = re.compile(r"([^\s=\"'/]+)(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'>]+))?")
_ENDING = re.compile(r"<(mj-raw|mj-text|mj-button|mj-table|mj-style|mj-title|mj-preview)\b[^>]*(?<!/)>.*?</\1\s*>",
                     re.IGNORECASE | re.DOTALL)


def _blank(match: re.Match[str]) -> str:
    """Jinja markup as spaces, its line breaks kept: line numbers stay true."""
    return re.sub(r"[^\n]", " ", match.group(0))


def lint_template(name: str, source: str) -> list[Finding]:
    """MJML tags, attributes and nesting (what mjml's --validate strict
    checks), and {% live %} blocks with an empty fallback, in one template's source."""
    found = _empty_fallbacks(name, source)
    if "<mj" not in source.lower():
        return found
    markup = _JINJA.sub(_blank, source)

    # Ending tags hold HTML, not MJML: blank their inside, keep the tags themselves.
    def inside(match: re.Match[str]) -> str:
        whole = match.group(0)
        start, end = whole.index(">") + 1, whole.rindex("</")
        return whole[:start] + re.sub(r"[^\n]", " ", whole[start:end]) + whole[end:]

    markup = _ENDING.sub(inside, markup)
    stack: list[str] = []
    in_attributes = 0
    for match in _MJ_TAG.finditer(markup):
        closing, tag, attributes, self_closing = match.group(1), match.group(2).lower(), match.group(3), match.group(4)
        line = markup.count("\n", 0, match.start()) + 1
        where: dict[str, Any] = {"file": name, "line": line}
        if closing:
            if tag in stack:
                while stack and stack.pop() != tag:
                    pass
            if tag == "mj-attributes":
                in_attributes = 0
            continue
        known = MJML_TAGS.get(tag)
        if in_attributes and stack and stack[-1] == "mj-attributes":
            # <mj-attributes> holds defaults: any tag name, any of its attributes.
            if known is None and tag not in ("mj-all", "mj-class"):
                found.append(_finding("mjml-unknown-tag", f"<{tag}> is not an MJML tag", **where))
        elif known is None:
            found.append(_finding("mjml-unknown-tag", f"<{tag}> is not an MJML tag (a typo?); it would ship raw "
                                                      "into the HTML", **where))
        else:
            parents, allowed = known
            parent = stack[-1] if stack else None
            # Under an unknown tag (already reported), nesting tells nothing.
            if parents and parent in MJML_TAGS and parent not in parents:
                found.append(_finding("mjml-bad-parent", f"<{tag}> cannot be inside <{parent}>; it belongs in "
                                      + " or ".join(f"<{p}>" for p in parents), **where))
            for attribute in _ATTRIBUTE.findall(attributes) if allowed is not None else ():
                if allowed is not None and attribute.lower() not in allowed:
                    found.append(_finding("mjml-unknown-attribute", f"<{tag}> has no attribute {attribute!r}", **where))
        if tag == "mj-attributes":
            in_attributes = 1
        if not self_closing:
            stack.append(tag)
    return found


_LIVE = re.compile(r"\{%-?\s*(live|fallback|endlive)\b.*?-?%\}", re.DOTALL)


def _empty_fallbacks(name: str, source: str) -> list[Finding]:
    found: list[Finding] = []
    opened: list[tuple[int, int | None]] = []  # (line of {% live %}, end of its {% fallback %} tag)
    for match in _LIVE.finditer(source):
        kind = match.group(1)
        if kind == "live":
            opened.append((source.count("\n", 0, match.start()) + 1, None))
        elif kind == "fallback" and opened:
            opened[-1] = (opened[-1][0], match.end())
        elif kind == "endlive" and opened:
            line, fallback_at = opened.pop()
            content = "" if fallback_at is None else _JINJA.sub("", source[fallback_at:match.start()])
            if not re.sub(r"<!--.*?-->", "", content, flags=re.DOTALL).strip():
                what = "has no {% fallback %}" if fallback_at is None else "has an empty {% fallback %}"
                found.append(_finding("empty-fallback", f"this {{% live %}} block {what}: when its source fails "
                                      "the recipient sees a hole; write the static text to show instead",
                                      file=name, line=line))
    return found
