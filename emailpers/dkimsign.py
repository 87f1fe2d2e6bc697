"""DKIM signing at send time (RFC 6376), with dkimpy.

Signing happens in `emailpers send`, just before the bytes go to the relay,
so the signature covers exactly what is sent, and the private key is read
only by the sending process (never by a render process, never written).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dkim

from emailpers.campaign import Dkim
from emailpers.errors import SendError

# RFC 6376 5.4.1's recommended headers (dkimpy's list), plus RFC 8058's
# List-Unsubscribe-Post, which the one-click rule says the signature must cover.
SIGNED_HEADERS = frozenset(dkim.DKIM.SHOULD) | {b"list-unsubscribe-post"}


def _header_names(message: bytes) -> list[bytes]:
    head = message.split(b"\r\n\r\n", 1)[0]
    names = []
    for line in head.split(b"\r\n"):
        if line and line[:1] not in b" \t":
            name = line.partition(b":")[0].strip().lower()
            if name not in names:
                names.append(name)
    return names


class DkimSigner:
    """Prepends a DKIM-Signature (rsa-sha256, relaxed/relaxed)."""

    def __init__(self, domain: str, selector: str, key: bytes) -> None:
        self.domain = domain.encode()
        self.selector = selector.encode()
        self._key = key

    def __repr__(self) -> str:  # the key stays out of any repr
        return f"DkimSigner(domain={self.domain!r}, selector={self.selector!r})"

    def sign(self, message: bytes) -> bytes:
        include = [name for name in _header_names(message) if name in SIGNED_HEADERS]
        signature: bytes = dkim.sign(
            message, self.selector, self.domain, self._key,
            canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
        )  # fmt: skip
        return signature + message


def load_signer(config: Dkim, environ: Mapping[str, str] = os.environ) -> DkimSigner:
    """Read the key named by `[send] dkim` and prove it signs, before the first
    message: a bad key is an error now, not 100 000 unsigned messages."""
    if config.key_env is not None:
        value = environ.get(config.key_env)
        if not value:
            raise SendError(f"[send] dkim key_env: environment variable {config.key_env} is not set; export the PEM key")
        key, where = value.encode(), f"environment variable {config.key_env}"
    else:
        assert config.key_file is not None
        try:
            key, where = config.key_file.read_bytes(), str(config.key_file)
        except OSError as exc:
            raise SendError(f"{config.key_file}: cannot read the DKIM key: {exc.strerror}") from None
    signer = DkimSigner(config.domain, config.selector, key)
    try:
        signer.sign(b"From: a@b.example\r\nSubject: key check\r\n\r\nkey check\r\n")
    except (dkim.DKIMException, ValueError, IndexError, TypeError):
        raise SendError(
            f"[send] dkim: {where} is not a usable private key (an RSA key in PEM)"
        ) from None
    return signer
