"""Signed tokens for links a recipient brings back: one-click unsubscribe, and
any other link an endpoint must be able to trust (AMP's signed URLs).

A token is `base64url(payload JSON) "." base64url(HMAC-SHA256(key, payload))`,
URL-safe without escaping. The payload is a flat JSON object of strings, plus
`exp` (Unix seconds) when the token expires. The endpoint that receives it
calls `verify` with the same key; anything altered, truncated or expired is
refused. The key never leaves the process that signs: only tokens do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping

MIN_KEY_BYTES = 16  # a shorter key can be guessed offline from one token


class BadToken(ValueError):
    """A token that was not signed with this key, was altered, or has expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def sign(key: bytes, claims: Mapping[str, str], *, expires_at: int | None = None) -> str:
    """A token carrying `claims` that only a holder of `key` can have made."""
    body: dict[str, str | int] = dict(claims)
    if expires_at is not None:
        body["exp"] = int(expires_at)
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def verify(key: bytes, token: str, *, clock: Callable[[], float] = time.time) -> dict[str, str]:
    """The claims of a token signed with `key`; BadToken if it was not, was
    altered, or its `exp` has passed."""
    payload_part, _, mac_part = token.partition(".")
    try:
        payload, mac = _unb64(payload_part), _unb64(mac_part)
    except (binascii.Error, ValueError):
        raise BadToken("not a token") from None
    if not hmac.compare_digest(mac, _mac(key, payload)):
        raise BadToken("the signature does not match")
    body = json.loads(payload)
    expires = body.pop("exp", None)
    if expires is not None and clock() >= expires:
        raise BadToken("the token has expired")
    return {str(k): str(v) for k, v in body.items()}
