"""The Jinja environment templates run in, and the limits one render lives under.

Templates come from the campaign folder and data from APIs and recipient lists:
neither may read files outside the folder, run for ever, take the machine's
memory, or reach emailpers' own bookkeeping. What lives here:

- `CampaignLoader`: every template name resolves, symlinks followed, to a real
  file inside the campaign folder before a byte is read.
- `Sandbox`: jinja's `SandboxedEnvironment` plus a per-render `Budget` checked
  from its call, attribute, item and operator hooks and on every loop
  iteration, caps on the sizes `*`, `**` and `range()` can build, and the rule
  that a null or blank value is missing.
- `memory_cap`: a ceiling on the address space one render may add (Linux).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.loaders import split_template_path
from jinja2.sandbox import SandboxedEnvironment

RENDER_MEMORY = 512 * 1024 * 1024  # bytes of address space one render may add
MAX_SEQUENCE = 1_000_000  # characters or items one `*` or `range()` may build
MAX_INT_BITS = 4096  # one `*` or `**` on integers; 10 ** 10 ** 9 would never finish
_CHECK_EVERY = 256  # loop iterations between two looks at the clock


class RenderLimitExceeded(Exception):
    """A render ran past its deadline or built something too large. Never a
    data error: a live block does not fall back on it, the recipient fails."""


@dataclass
class Budget:
    """One render call's deadline and the live blocks that fell back. Held in
    a context variable for the length of the call, so templates never see it."""

    deadline: float
    clock: Callable[[], float]
    seconds: float
    failures: dict[str, str]  # source name -> why it has no data
    fallback_blocks: list[dict[str, Any]] = field(default_factory=list)

    def check(self) -> None:
        if self.clock() > self.deadline:
            raise RenderLimitExceeded(f"the template ran longer than the render deadline of {self.seconds:g} s")


current: ContextVar[Budget | None] = ContextVar("emailpers_render_budget", default=None)


def _tick() -> None:
    budget = current.get()
    if budget is not None:
        budget.check()


def is_blank(value: Any) -> bool:
    """Null or only white space: a value that is present but says nothing."""
    return value is None or (isinstance(value, str) and not value.strip())


class Missing(jinja2.StrictUndefined):
    """Printing, iterating or comparing a missing value fails (the recipient,
    or inside a live block its fallback); testing it is false, so
    `{% if first_name %}` and `|default("there")` read naturally."""

    __slots__ = ()

    def __bool__(self) -> bool:  # type: ignore[override]
        return False


def refuse_null(value: Any) -> Any:
    """`finalize`: what `{{ }}` prints. A null from a list or a call never
    prints as "None"."""
    if value is None:
        raise jinja2.UndefinedError("a value to print is empty (null)")
    return value


def _guarded(iterable: Iterable[Any]) -> Iterator[Any]:
    """Every `{% for %}` iterates through this: nested loops with empty
    bodies call no other hook."""
    budget = current.get()
    for i, item in enumerate(iterable):
        if budget is not None and i % _CHECK_EVERY == 0:
            budget.check()
        yield item


class _LoopCheckingCodeGenerator(CodeGenerator):
    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        guard = nodes.EnvironmentAttribute("emailpers_guarded", lineno=node.lineno)
        node.iter = nodes.Call(guard, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _safe_center(value: Any, width: int = 80) -> str:
    """`center` builds its string in C, out of every hook's reach: cap its width."""
    if _int(width) and width > MAX_SEQUENCE:
        raise RenderLimitExceeded(f"center() to {width} characters is more than the limit of {MAX_SEQUENCE}")
    return str(value).center(width)


def _safe_range(*args: int) -> range:
    result = range(*args)
    if len(result) > MAX_SEQUENCE:
        raise RenderLimitExceeded(f"range() of {len(result)} items is more than the limit of {MAX_SEQUENCE}")
    return result


class Sandbox(SandboxedEnvironment):
    """Jinja's sandbox (no `__class__`, no `__globals__`, no unsafe format
    strings) with a budget on time and size, and null or blank data missing."""

    code_generator_class = _LoopCheckingCodeGenerator
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **options: Any) -> None:
        options.setdefault("finalize", refuse_null)  # the HTML one adds markers: skeleton.py
        super().__init__(undefined=Missing, **options)
        self.globals["range"] = _safe_range
        self.filters["center"] = _safe_center
        # lipsum(n=10**6) is a Python loop no hook sees, and no email needs it.
        self.globals.pop("lipsum", None)
        self.emailpers_guarded = _guarded

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                size = _size(seq)
                if size is not None and _int(times) and size * times > MAX_SEQUENCE:
                    raise RenderLimitExceeded(f"'*' would build {size * times} items, more than {MAX_SEQUENCE}")
            if _int(left) and _int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimitExceeded(f"'*' would build an integer of more than {MAX_INT_BITS} bits")
        elif operator == "**" and _int(left) and _int(right) and abs(left) > 1 and right > 0:
            if right * left.bit_length() > MAX_INT_BITS:
                raise RenderLimitExceeded(f"'**' would build an integer of more than {MAX_INT_BITS} bits")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        result = super().call(__context, __obj, *args, **kwargs)
        if result is None:  # `d.get("x")|default("y")` reads like a missing key
            return __self.undefined(hint=f"{getattr(__obj, '__name__', 'a call')}() gave null (empty)")
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        value = super().getattr(obj, attribute)
        return self._missing(obj, attribute) if is_blank(value) else value

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        value = super().getitem(obj, argument)
        return self._missing(obj, argument) if is_blank(value) else value

    def _missing(self, obj: Any, name: Any) -> jinja2.Undefined:
        return self.undefined(hint=f"{name!r} is empty (null or blank)", obj=obj, name=name)


class CampaignLoader(jinja2.BaseLoader):
    """Templates by name from the campaign folder. The real path (symlinks
    resolved) must be a file inside the folder, checked before reading."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        path = self.root.joinpath(*split_template_path(template))  # refuses ".."
        real = path.resolve()
        if not real.is_relative_to(self.root) or not real.is_file():
            raise jinja2.TemplateNotFound(template)
        return real.read_text(encoding="utf-8"), str(path), lambda: True


_size_cache = [0, 0]  # [renders left before the next reading, bytes]
_SIZE_EVERY = 64  # renders between two readings of /proc (one per render was a visible share of it)


def _process_size() -> int:
    """The process's address space now, re-read every few renders: the
    cap's margin is far larger than what a process grows by in between."""
    if _size_cache[0] <= 0:
        with open("/proc/self/statm", "rb") as f:
            _size_cache[1] = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _size_cache[0] = _SIZE_EVERY
    _size_cache[0] -= 1
    return _size_cache[1]


_capped_process = [False]  # set by enable_memory_cap() in each render process


def enable_memory_cap() -> None:
    """Called once in a render process (compose.init_process): from then on
    each render there runs under `memory_cap`. Not in the main process
    (`--workers 0`): RLIMIT_AS is process-wide, and the main process has
    other threads (connections, DNS, a caller's own) that must not start
    failing their allocations, or hang starting a thread, while a template renders."""
    _capped_process[0] = True


@contextlib.contextmanager
def memory_cap(extra: int = RENDER_MEMORY) -> Iterator[None]:
    """While inside, the process may grow by `extra` bytes of address space;
    beyond that an allocation raises MemoryError, which fails the recipient.
    Set per render, in render processes only (see enable_memory_cap). Linux
    only (elsewhere RLIMIT_AS is not enforced)."""
    if not _capped_process[0] or not sys.platform.startswith("linux"):
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _process_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield  # an operator's own, lower cap stays
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def budget(
    failures: dict[str, str], seconds: float, clock: Callable[[], float] = time.monotonic
) -> Iterator[Budget]:
    """One render call: its deadline starts now."""
    state = Budget(clock() + seconds, clock, seconds, failures)
    token = current.set(state)
    try:
        yield state
    finally:
        current.reset(token)
