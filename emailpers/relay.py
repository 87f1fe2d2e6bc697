"""Where and how `emailpers send` connects: the relay URL, the login from the
environment, the options of a send. Checked here, once, before any connection."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from emailpers.campaign import is_loopback
from emailpers.dkimsign import DkimSigner
from emailpers.errors import SendError

DEFAULT_CONNECTIONS = 4
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 2.0  # seconds before the first retry of a 4xx; doubles each time
DEFAULT_TIMEOUT = 60.0
DEFAULT_USER_ENV = "EMAILPERS_SMTP_USER"
DEFAULT_PASSWORD_ENV = "EMAILPERS_SMTP_PASSWORD"

@dataclass(frozen=True)
class Relay:
    """Where messages go. `url` is safe to show (it cannot hold credentials)."""

    url: str
    host: str
    port: int
    implicit_tls: bool
    plaintext_ok: bool  # loopback, or --allow-plaintext


def parse_relay(url: str, *, allow_plaintext: bool = False) -> Relay:
    """smtp://host[:587] (STARTTLS) or smtps://host[:465] (implicit TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise SendError(f"--smtp {url!r}: use smtp://host:587 (STARTTLS) or smtps://host:465 (implicit TLS)")
    if parts.username is not None or parts.password is not None:
        # Never echo the URL back: it holds a password.
        raise SendError(
            "--smtp: the URL holds credentials; a command line is visible to every user of the machine. "
            f"Put them in the environment ({DEFAULT_USER_ENV}, {DEFAULT_PASSWORD_ENV}) instead"
        )
    try:
        port = parts.port
    except ValueError:
        raise SendError(f"--smtp {url!r}: the port is not a number from 1 to 65535") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SendError(f"--smtp {url!r}: give only a scheme, a host and a port, like smtp://relay.example:587")
    implicit = parts.scheme == "smtps"
    port = port or (465 if implicit else 587)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return Relay(f"{parts.scheme}://{shown}:{port}", host, port, implicit, allow_plaintext or is_loopback(host))


@dataclass(frozen=True)
class Credentials:
    user: str = field(repr=False)
    password: str = field(repr=False)


def credentials_from_env(user_env: str, password_env: str, environ: Mapping[str, str] = os.environ) -> Credentials | None:
    """Both set: log in; neither: no AUTH (a relay that trusts the network); one: an error."""
    user, password = environ.get(user_env), environ.get(password_env)
    if user is None and password is None:
        return None
    if user is None or password is None:
        missing = user_env if user is None else password_env
        raise SendError(f"environment variable {missing} is not set (the other half of the SMTP login is); export it")
    return Credentials(user, password)


@dataclass(frozen=True)
class SendOptions:
    out: Path
    relay: Relay
    credentials: Credentials | None = field(default=None, repr=False)
    connections: int = DEFAULT_CONNECTIONS
    rate: float | None = None  # messages per second over all connections
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    timeout: float = DEFAULT_TIMEOUT
    to_override: str | None = None
    mail_from: str | None = None
    limit: int | None = None
    dry_run: bool = False
    resend_unknown: bool = False
    partial: bool = False
    dkim: DkimSigner | None = None
    ca_file: Path | None = None


