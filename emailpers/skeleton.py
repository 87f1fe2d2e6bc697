"""Compile once per layout: the MJML compile memoised per distinct skeleton.

Recipients of one campaign share a handful of layouts and differ in the values
their templates print. While the HTML body renders, every `{{ }}` value that
MJML cannot treat specially is replaced by a numbered marker (`⟦0⟧`, `⟦1⟧`, ...)
and kept aside, already escaped; the marked text (the skeleton) is what MJML
compiles, once per distinct skeleton, and each recipient's values are put back
into the compiled HTML. The output is byte for byte the per-recipient compile,
guarded by these checks (any failure: that skeleton, or the whole template,
compiles per recipient as before):

- statically, at load: no construct that captures rendered output and
  transforms it (`{% set %}...{% endset %}`, `{% filter %}`, macros and
  `caller()`, `super()`/`self`, imports), and no marker character in a file;
- per value: only a value with no markup, no line break or control character,
  no white space at its ends, and not empty becomes a marker; any other value
  is written into the skeleton as it is (a `|safe` snippet of MJML compiles
  with the skeleton, which then is one layout per distinct snippet); a value
  holding a marker character aborts the recording and the body renders again
  without markers;
- per skeleton, when it is first compiled: each marker lies in text or in an
  `href`, `src`, `alt` or `title` attribute (never in CSS), and comes out of
  MJML exactly once;
- per template: the first `STARTUP_CHECKS` memoised renders are also compiled
  the plain way and compared, and so is one in every `RECHECK_EVERY` after;
  one difference turns the memo off for that template in this process (the
  plain compile is what is used).
"""

from __future__ import annotations

import html as html_lib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import nodes
from markupsafe import Markup, escape

from emailpers.sandbox import refuse_null

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: printable, so MRML keeps them in attributes too
MARKER = re.compile(f"{OPEN}([0-9]+){CLOSE}")
MEMO_BYTES = 32 * 1024 * 1024  # per render process: skeletons and compiled parts, approximate
STARTUP_CHECKS = 3
RECHECK_EVERY = 1000

# A value printed as a marker: MJML cannot tell it from the marker (no tag,
# no entity-sensitive edge white space, nothing stripped after Jinja).
_NOT_A_MARKER = re.compile(f"[<>\\s\x00-\x1f\x7f{OPEN}{CLOSE}]")
_ATTRIBUTES = frozenset({"href", "src", "alt", "title"})
_ATTRIBUTE_BEFORE = re.compile(r"([A-Za-z_:][-A-Za-z0-9_:.]*)\s*=\s*(\"[^\"]*|'[^']*)$")
_STYLE = re.compile(r"<(mj-style|style)\b.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
# Constructs whose rendered output a template can capture and transform.
_CAPTURING = (nodes.AssignBlock, nodes.FilterBlock, nodes.Macro, nodes.Import, nodes.FromImport)
_CAPTURING_NAMES = frozenset({"super", "self", "caller", "varargs", "kwargs"})


class Poisoned(Exception):
    """A printed value holds a marker character: render again without markers."""


class Recording:
    """The values one body render printed, in marker order."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: list[str] = []


_recording: ContextVar[Recording | None] = ContextVar("emailpers_skeleton", default=None)


@jinja2.pass_eval_context
def finalize(eval_ctx: jinja2.nodes.EvalContext, value: Any) -> Any:
    """The HTML environment's `finalize`: as the sandbox's, plus markers
    while a skeleton is being recorded."""
    value = refuse_null(value)
    recording = _recording.get()
    if recording is None:
        return value
    text = str(escape(value)) if eval_ctx.autoescape else str(value)
    if OPEN in text or CLOSE in text:
        raise Poisoned
    if not text or _NOT_A_MARKER.search(text.replace(" ", "x")) or text != text.strip():
        return Markup(text)  # written into the skeleton as it is
    number = len(recording.values)
    recording.values.append(text)
    return Markup(f"{OPEN}{number}{CLOSE}")


def restart() -> None:
    """Forget the values recorded so far (the body starts again, as the fallback template)."""
    state = _recording.get()
    if state is not None:
        state.values.clear()


@contextmanager
def recording(on: bool) -> Iterator[Recording | None]:
    """Record the values printed inside, or not (`on` False)."""
    if not on:
        yield None
        return
    state = Recording()
    token = _recording.set(state)
    try:
        yield state
    finally:
        _recording.reset(token)


def template_allows(asts: list[nodes.Template], sources: list[str]) -> str | None:
    """Why these templates cannot be memoised, or None when they can."""
    for source in sources:
        if OPEN in source or CLOSE in source:
            return f"a template contains {OPEN} or {CLOSE}"
    for ast in asts:
        for node in ast.find_all((*_CAPTURING, nodes.CallBlock, nodes.Name)):
            if isinstance(node, nodes.CallBlock) and not isinstance(node.call.node, nodes.ExtensionAttribute):
                return f"line {node.lineno}: {{% call %}} captures output"
            if isinstance(node, nodes.Name):
                if node.name in _CAPTURING_NAMES and node.ctx == "load":
                    return f"line {node.lineno}: {node.name} captures output"
            elif isinstance(node, _CAPTURING):
                return f"line {node.lineno}: {type(node).__name__} captures output"
    return None


def fill(skeleton: str, values: list[str]) -> str:
    """The text with each marker replaced by its value."""
    return MARKER.sub(lambda m: values[int(m.group(1))], skeleton)


def _safe_places(skeleton: str) -> bool:
    """Every marker lies in text or in a pass-through attribute, never in CSS."""
    styles = [m.span() for m in _STYLE.finditer(skeleton)]
    for match in MARKER.finditer(skeleton):
        at = match.start()
        if any(start <= at < end for start, end in styles):
            return False
        if skeleton.rfind("<", 0, at) > skeleton.rfind(">", 0, at):
            inside = _ATTRIBUTE_BEFORE.search(skeleton, skeleton.rfind("<", 0, at), at)
            if inside is None or inside.group(1).lower() not in _ATTRIBUTES:
                return False
    return True


Parts = tuple[str | int, ...]  # text and value numbers, alternating


def _join(parts: Parts, values: list[str]) -> str:
    return "".join([p if isinstance(p, str) else values[p] for p in parts])


def _split(text: str) -> Parts:
    return tuple(int(p) if i % 2 else p for i, p in enumerate(MARKER.split(text)))


# What the text part makes of a value: the parser unescapes it, then white
# space collapses. A value whose text holds no white space the text part
# would change (and no partial character reference) reads the same in place.
_COMPLETE_REFS = re.compile(r"(?:[^&]|&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z0-9]+);)*")
_TEXT_SPACE = re.compile("[\t\r\n\f\v\u00a0\u200b-\u200d\u034f]|  ")
_OPEN_REF = re.compile(r"&[#A-Za-z0-9]*$")
_LINK_DECIDED = 8  # characters of an href that decide whether the text part writes it out


def _text_value(value: str) -> str | None:
    if "&" in value:
        if not _COMPLETE_REFS.fullmatch(value):
            return None
        value = html_lib.unescape(value)
    if not value or value != value.strip() or _TEXT_SPACE.search(value):
        return None
    return value


def _text_safe_places(html: str) -> bool:
    """No marker right after a partial character reference, nor in the first
    characters of a link (which decide whether the text part writes it out)."""
    for match in MARKER.finditer(html):
        at = match.start()
        if _OPEN_REF.search(html, max(0, at - 40), at):
            return False
        tag = html.rfind("<", 0, at)
        if tag > html.rfind(">", 0, at):
            inside = _ATTRIBUTE_BEFORE.search(html, tag, at)
            if inside is None or (inside.group(1).lower() == "href" and len(inside.group(2)) <= _LINK_DECIDED):
                return False
    return True


class _Entry:
    __slots__ = ("html", "text", "cost")

    def __init__(self, html: Parts, text: Parts | None, cost: int) -> None:
        self.html, self.text, self.cost = html, text, cost


class Memo:
    """One template's compiled skeletons, least recently used first out,
    within `max_bytes`. `compile_` is MJML, `finish` inserts the preheader,
    `to_text` makes the text part: as the plain render does them."""

    def __init__(
        self,
        compile_: Callable[[str], str],
        finish: Callable[[str, str], str],
        to_text: Callable[[str], str],
        max_bytes: int = MEMO_BYTES,
    ) -> None:
        self.compile, self.finish, self.to_text = compile_, finish, to_text
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[str, bool], _Entry | None] = OrderedDict()
        self.size = 0
        self.on = True
        self.uses = 0

    def plain(self, skeleton: str, values: list[str], preheader: str | None, text: bool) -> tuple[str, str | None]:
        """The per-recipient way: fill, compile, preheader, text (if wanted)."""
        html = self.compile(fill(skeleton, values))
        if preheader:
            html = self.finish(html, preheader)
        return html, self.to_text(html) if text else None

    def render(self, skeleton: str, values: list[str], preheader: str | None, text: bool) -> tuple[str, str | None]:
        """The HTML (and text if wanted) of `skeleton` with `values` in place of its markers."""
        if not self.on or (preheader and (OPEN in preheader or CLOSE in preheader)):
            return self.plain(skeleton, values, preheader, text)
        key = (skeleton, bool(preheader))
        entry = self.entries.get(key, ())
        if entry == ():
            entry = self._build(skeleton, len(values), bool(preheader))
            self._store(key, entry)
        else:
            self.entries.move_to_end(key)
        if entry is None:
            return self.plain(skeleton, values, preheader, text)
        assert isinstance(entry, _Entry)
        if preheader:
            # The preheader is one more value; finish() escapes it, so its HTML is escaped here.
            values = [*values, html_lib.escape(preheader)]
        html = _join(entry.html, values)
        plain_text: str | None = None
        if text:
            texts = [_text_value(v) for v in values]
            if entry.text is not None and all(texts[p] is not None for p in entry.text if isinstance(p, int)):
                plain_text = _join(entry.text, texts)  # type: ignore[arg-type]
            else:
                plain_text = self.to_text(html)
        self.uses += 1
        if self.uses <= STARTUP_CHECKS or self.uses % RECHECK_EVERY == 0:
            plain = self.plain(skeleton, values[: len(values) - bool(preheader)], preheader, True)
            if plain[0] != html or (text and plain[1] != plain_text):
                self.on = False
                self.entries.clear()
                self.size = 0
                return plain
        return html, plain_text

    def _build(self, skeleton: str, count: int, preheader: bool) -> _Entry | None:
        numbers = [int(n) for n in MARKER.findall(skeleton)]
        if len(set(numbers)) != len(numbers) or any(n >= count for n in numbers) or not _safe_places(skeleton):
            return None
        try:
            compiled = self.compile(skeleton)
        except Exception:  # noqa: BLE001 - the plain compile will say what is wrong
            return None
        found = [int(n) for n in MARKER.findall(compiled)]
        if sorted(found) != sorted(numbers) or compiled.count(OPEN) != len(numbers):
            return None
        if preheader:
            compiled = self.finish(compiled, f"{OPEN}{count}{CLOSE}")
        text = self.to_text(compiled)
        text_parts = _split(text) if _text_safe_places(compiled) and text.count(OPEN) == len(MARKER.findall(text)) else None
        html_parts = _split(compiled)
        cost = 200 + 2 * (len(skeleton) + len(compiled) + (len(text) if text_parts else 0))
        return _Entry(html_parts, text_parts, cost)

    def _store(self, key: tuple[str, bool], entry: _Entry | None) -> None:
        cost = entry.cost if entry is not None else 200 + 2 * len(key[0])
        if cost > self.max_bytes:
            return
        while self.size + cost > self.max_bytes and self.entries:
            old_key, old = self.entries.popitem(last=False)
            self.size -= old.cost if old is not None else 200 + 2 * len(old_key[0])
        self.entries[key] = entry
        self.size += cost
