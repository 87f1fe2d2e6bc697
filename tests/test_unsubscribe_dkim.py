"""Built into every message: one-click unsubscribe (RFC 2369 + RFC 8058) with
a per-recipient signed token, and DKIM signing at send time, verified with
dkimpy against the public key, on what a real SMTP server received."""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from smtp_server import running_relay

from emailpers.signing import BadToken, sign, verify

from conftest import eml_of, invoke, manifest, render, write_campaign

KEY = "k" * 32
UNSUBSCRIBE = {"url": "https://shop.example/u/{{ token }}", "mailto": "unsub@shop.example", "key_env": "UNSUB_KEY"}
PEOPLE = [{"id": "a1", "email": "ann@example.com", "first_name": "Ann"},
          {"id": "b2", "email": "bob@example.com", "first_name": "Bob"}]


def test_sign_and_verify() -> None:
    token = sign(b"key-of-sixteen-bytes", {"id": "a1", "email": "ann@example.com"})
    assert verify(b"key-of-sixteen-bytes", token) == {"id": "a1", "email": "ann@example.com"}
    with pytest.raises(BadToken):
        verify(b"another-key-of-16-bytes", token)
    payload, mac = token.split(".")
    forged = base64.urlsafe_b64encode(b'{"email":"eve@example.com","id":"a1"}').rstrip(b"=").decode()
    for tampered in (f"{forged}.{mac}", f"{payload}.{mac[:-2]}AA", payload, "", "..."):
        with pytest.raises(BadToken):
            verify(b"key-of-sixteen-bytes", tampered)


def test_expiring_tokens() -> None:
    token = sign(b"key-of-sixteen-bytes", {"amp": "x"}, expires_at=1000)
    assert verify(b"key-of-sixteen-bytes", token, clock=lambda: 999.0) == {"amp": "x"}
    with pytest.raises(BadToken, match="expired"):
        verify(b"key-of-sixteen-bytes", token, clock=lambda: 1000.0)


def unsubscribe_campaign(folder: Path, extra: str = "", **unsubscribe: Any) -> Path:
    template = '<html><body><p>Hi {{ first_name }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a></body></html>'
    return write_campaign(folder, recipients=PEOPLE, template=template,
                          campaign={"unsubscribe": {**UNSUBSCRIBE, **unsubscribe}}, extra=extra)


def test_unsubscribe_headers_carry_a_token_signed_per_recipient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNSUB_KEY", KEY)
    campaign = unsubscribe_campaign(tmp_path / "c")
    out = tmp_path / "out"
    result = render(campaign, out)
    assert result.exit_code == 0, result.output
    for rid, entry in manifest(out).items():
        message = eml_of(out, entry)
        url, mailto = (link.strip().strip("<>") for link in message["List-Unsubscribe"].split(","))
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert url.startswith("https://shop.example/u/")
        token = url.removeprefix("https://shop.example/u/")
        assert verify(KEY.encode(), token) == {"id": rid, "email": entry["email"], "campaign": "test-campaign"}
        assert mailto == f"mailto:unsub@shop.example?subject={'unsubscribe%20' + token}"
        assert unquote(mailto.partition("subject=")[2]) == f"unsubscribe {token}"
        body = message.get_body(("html",))
        assert body is not None
        html = body.get_content()
        assert f'href="{url}"' in html  # {{ unsubscribe_url }} for the footer link
        # One character changed anywhere in the token and it no longer verifies.
        for i in (0, len(token) // 2, len(token) - 1):
            tampered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
            with pytest.raises(BadToken):
                verify(KEY.encode(), tampered)


@pytest.mark.parametrize(
    ("unsubscribe", "env", "expected"),
    [
        ({"url": "http://shop.example/u/{{ token }}"}, KEY, "url must be an https:// URL (RFC 8058)"),
        ({"url": "https://shop.example/u/"}, KEY, "url must contain {{ token }}"),
        ({"mailto": "not an address"}, KEY, "mailto must be a plain address"),
        ({}, "short", "the signing key must be at least 16 bytes"),
        ({}, None, "environment variable UNSUB_KEY is not set"),
    ],
)
def test_unsubscribe_settings_are_checked_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unsubscribe: dict[str, str], env: str | None, expected: str
) -> None:
    if env is None:
        monkeypatch.delenv("UNSUB_KEY", raising=False)
    else:
        monkeypatch.setenv("UNSUB_KEY", env)
    campaign = unsubscribe_campaign(tmp_path / "c", **unsubscribe)
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {campaign}:")
    assert "[campaign] unsubscribe" in result.stderr and expected in result.stderr, result.stderr


def test_headers_cannot_also_write_list_unsubscribe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNSUB_KEY", KEY)
    campaign = write_campaign(tmp_path / "c", recipients=PEOPLE,
                              campaign={"unsubscribe": UNSUBSCRIBE, "headers": {"List-Unsubscribe": "<x>"}})
    result = render(campaign, tmp_path / "out")
    assert result.exit_code == 1
    assert "cannot set 'List-Unsubscribe': emailpers writes that header itself" in result.stderr, result.stderr


def dkim_key(folder: Path) -> tuple[Path, bytes]:
    """(private key file, the DNS TXT record's value with the public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "dkim.pem"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def test_dkim_signature_verifies_against_the_public_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNSUB_KEY", KEY)
    key_file, record = dkim_key(tmp_path)
    extra = f'\n[send]\ndkim = {{ domain = "shop.example", selector = "s2026", key_file = "{key_file}" }}\n'
    campaign = unsubscribe_campaign(tmp_path / "c", extra=extra)
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    with running_relay(tmp_path, auth=False) as relay:
        result = invoke("send", out, "--smtp", relay.url, "--ca-file", tmp_path / "relay-cert.pem",
                        "--campaign", campaign)
    assert result.exit_code == 0, result.output
    assert len(relay.received) == 2

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s2026._domainkey.shop.example."
        return record

    for received in relay.received:
        assert dkim.verify(received.data, dnsfunc=dns)
        header = email.message_from_bytes(received.data, policy=email.policy.default)["DKIM-Signature"]
        tags = dict(t.strip().split("=", 1) for t in "".join(header.split()).split(";") if t)
        assert tags["c"] == "relaxed/relaxed" and tags["d"] == "shop.example" and tags["s"] == "s2026"
        signed = tags["h"].lower().split(":")
        assert {"from", "to", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post"} <= set(signed)
        # The signature covers the final bytes: what follows it is the rendered file, unchanged.
        rid = "a1" if "ann@" in received.rcpt_tos[0] else "b2"
        assert received.data.endswith((out / "messages" / f"{rid}.eml").read_bytes())
        tampered = received.data.replace(b"Subject: Hello", b"Subject: Hallo")
        assert not dkim.verify(tampered, dnsfunc=dns)


def test_a_bad_dkim_key_stops_before_any_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DKIM_KEY", "not a key")
    extra = '\n[send]\ndkim = { domain = "shop.example", selector = "s1", key_env = "DKIM_KEY" }\n'
    campaign = write_campaign(tmp_path / "c", recipients=PEOPLE, extra=extra)
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    with running_relay(tmp_path, auth=False) as relay:
        result = invoke("send", out, "--smtp", relay.url, "--campaign", campaign)
    assert result.exit_code == 1
    assert "Error: [send] dkim: environment variable DKIM_KEY is not a usable private key" in result.stderr
    assert "not a key" not in result.stderr and relay.received == []
