"""A real SMTP server on loopback for the send tests: aiosmtpd, with STARTTLS
(a self-signed certificate made here with `cryptography`), AUTH, and
scripted replies per recipient.

Every message that reaches the end of DATA is recorded with its envelope,
its bytes as they arrived and the time its DATA completed.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from advanced_servers import free_port


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1 and localhost."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "emailpers test relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "relay-cert.pem", folder / "relay-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float


@dataclass
class Relay:
    """The handler: scripted RCPT replies, recorded messages, AUTH check."""

    user: str = "relay-user"
    password: str = "relay-password"
    reject: set[str] = field(default_factory=set)  # 550 always
    tempfail: dict[str, int] = field(default_factory=dict)  # 451 this many times (-1: always)
    received: list[Received] = field(default_factory=list)
    rcpt_attempts: list[str] = field(default_factory=list)
    logins: int = 0
    hold_after: int | None = None  # take this many messages, then hold the reply to the next one
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        with self.lock:
            self.rcpt_attempts.append(address)
            if address in self.reject:
                return "550 5.1.1 <%s>: mailbox unavailable" % address
            left = self.tempfail.get(address, 0)
            if left:
                self.tempfail[address] = left - 1 if left > 0 else left
                return "451 4.3.0 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        with self.lock:
            number = len(self.received) + 1
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                                          time.monotonic()))
        if self.hold_after is not None and number > self.hold_after:
            while not self.release.is_set():  # the client is killed while it waits for this reply
                await asyncio.sleep(0.01)
            return "451 4.3.0 released"
        return f"250 2.0.0 Ok: queued as Q{number:05d}"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login == self.user.encode() and data.password == self.password.encode()
        if ok:
            self.logins += 1
        # handled=False: aiosmtpd answers 535 itself (handled=True with no reply leaves the client waiting).
        return AuthResult(success=ok, handled=False)


@contextmanager
def running_relay(
    folder: Path, *, tls: bool = True, auth: bool = True, smtputf8: bool = True, **script: Any
) -> Iterator[Relay]:
    """An SMTP server on 127.0.0.1: STARTTLS required (a self-signed cert
    whose file is `folder/relay-cert.pem`) and AUTH required, unless turned off."""
    relay = Relay(**script)
    relay.port = free_port()
    kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8}
    if tls:
        cert, key = self_signed(folder)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        kwargs.update(tls_context=context, require_starttls=True)
    if auth:
        kwargs.update(authenticator=relay.authenticate, auth_required=True, auth_require_tls=tls)
    controller = Controller(relay, hostname="127.0.0.1", port=relay.port, **kwargs)
    controller.start()
    try:
        yield relay
    finally:
        relay.release.set()
        controller.stop()
