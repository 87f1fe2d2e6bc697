"""Signed, expiring tokens: HMAC-SHA256 over the parts a link stands for.

`sign(key, recipient_id, campaign, expires=...)` gives `EXPIRES.SIGNATURE`;
`verify` recomputes it from the parts the endpoint was given and the expiry
written in the token, so a token proves who and until when without a
database. Each part is length-prefixed: ("ab", "c") and ("a", "bc") sign
differently.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


def _mac(key: bytes, expires: str, parts: tuple[str, ...]) -> str:
    message = b"".join(len(p).to_bytes(4, "big") + p for p in (x.encode() for x in (expires, *parts)))
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign(key: bytes, *parts: str, expires: int | None = None) -> str:
    """A URL-safe token for `parts`, valid until `expires` (Unix seconds), or for ever."""
    stamp = "" if expires is None else str(int(expires))
    return f"{stamp}.{_mac(key, stamp, parts)}"


def verify(key: bytes, token: str, *parts: str, now: float | None = None) -> bool:
    """True when `token` was signed with `key` for exactly `parts` and has not expired."""
    stamp, dot, mac = token.partition(".")
    if not dot or (stamp and not (stamp.isascii() and stamp.isdigit())):
        return False
    if not hmac.compare_digest(mac.encode(), _mac(key, stamp, parts).encode()):
        return False
    return not stamp or int(stamp) > (time.time() if now is None else now)
