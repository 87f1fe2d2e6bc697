"""JSON from outside (an API's answer, a cache row), decoded within limits.

json.loads bounds neither what a text becomes nor how deep it nests: decoded,
a value takes 30-70 bytes, so 1 MiB of `[{},{},...]` became 24 MiB, and 64
such recipients in flight 2 GB; and data nested 900 levels parses, then stops
the run where pickling hands it to a render process. Both limits are checked
on the bytes, at C speed, before anything is decoded.
"""

from __future__ import annotations

import json
from typing import Any

# Values (objects, arrays, scalars) a text may hold for one recipient: one
# response then decodes to a few MiB at most (~3.5 MiB for 50,000 empty
# objects), so memory follows the recipients in flight, not what APIs send.
MAX_VALUES = 50_000
# Levels of nesting. Everything downstream that walks the data recursively
# (pickle, json.dumps into the cache, templates) stays far from Python's
# recursion limit.
MAX_DEPTH = 64

_STRUCTURE = bytes(c if c in b'"[]{},' else ord("0") for c in range(256))
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b'"[]{}')


class Refused(ValueError):
    """The text is not JSON, or is JSON past a limit. The message completes
    "the body ..."."""


def load(text: bytes, max_values: int = MAX_VALUES, max_depth: int = MAX_DEPTH) -> Any:
    """`text` decoded; Refused when it is not JSON, holds more than
    `max_values` values or nests deeper than `max_depth`."""
    if count_values(text, max_values) > max_values:
        raise Refused(f"holds more than {max_values} JSON values")
    if nests_deeper(text, max_depth):
        raise Refused(f"nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise Refused("is not JSON") from None
    except RecursionError:  # within max_depth, but the stack was already deep
        raise Refused(f"nests deeper than {max_depth} levels") from None


def _outside_strings(text: bytes, table: bytes | None, delete: bytes, glue: bytes) -> bytes:
    """`text` translated (`bytes.translate`) with its strings replaced by
    `glue`: escaped backslashes and quotes go first, so every quote left
    opens or closes a string."""
    bare = text.replace(b"\\\\", b"").replace(b'\\"', b"").translate(table, delete)
    return glue.join(bare.split(b'"')[::2])


def count_values(text: bytes, cap: int) -> int:
    """How many values a JSON text holds: each value but the first follows a
    `[`, a `{` (a pair) or a `,` outside strings; an empty `{}` or `[]` holds
    none. The count over the whole text is an upper bound, and the answer
    when it is within `cap`; past it, the exact count is made with strings
    and scalars reduced to `0` (spaces inside `{ }` only count more)."""
    rough = text.count(b",") + text.count(b"{") + text.count(b"[") + 1
    if rough <= cap:
        return rough
    bare = _outside_strings(text, _STRUCTURE, b" \t\r\n", b"0")
    return bare.count(b",") + bare.count(b"{") + bare.count(b"[") + 1 - bare.count(b"{}") - bare.count(b"[]")


def nests_deeper(text: bytes, depth: int) -> bool:
    """Whether a JSON text nests more than `depth` levels: with all but the
    brackets outside strings cut out, each pass drops the innermost `[]` and
    `{}` pairs, so the passes it takes to empty them are the depth. Done
    before json.loads, and cheaper than it (README, Performance)."""
    if text.count(b"[") + text.count(b"{") <= depth:
        return False
    brackets = _outside_strings(text, None, _NOT_BRACKETS, b"")
    for _ in range(depth):
        inner = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(inner) == len(brackets):  # empty, or unbalanced: then not JSON, json.loads says so
            return False
        brackets = inner
    return bool(brackets)
