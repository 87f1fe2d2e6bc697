"""One-click unsubscribe (RFC 2369, RFC 8058): the headers each message carries.

Gmail and Yahoo require one-click unsubscribe from bulk senders (2024): a
`List-Unsubscribe` header with an https URL, and `List-Unsubscribe-Post:
List-Unsubscribe=One-Click` so the mailbox provider can POST to it without a
human on a web page. The URL carries a token signed for the recipient
(emailpers/signing.py), so the endpoint can trust whom to unsubscribe without
a database lookup of guessable ids.
"""

from __future__ import annotations

from urllib.parse import quote

from emailpers.campaign import Unsubscribe
from emailpers.signing import sign

ONE_CLICK = "List-Unsubscribe=One-Click"


def unsubscribe_token(config: Unsubscribe, campaign: str, recipient_id: str, email: str) -> str:
    """The signed token naming this recipient: claims `id`, `email`, `campaign`.
    It does not expire: RFC 8058 and CAN-SPAM expect the link to keep working."""
    return sign(config.key, {"id": recipient_id, "email": email, "campaign": campaign})


def unsubscribe_url(config: Unsubscribe, token: str) -> str | None:
    return None if config.url is None else config.url.replace("{{ token }}", token)


def unsubscribe_headers(config: Unsubscribe, token: str) -> dict[str, str]:
    """List-Unsubscribe with the https URL first (the one-click one) and the
    mailto second; List-Unsubscribe-Post only with a URL (RFC 8058 3.1)."""
    links = []
    url = unsubscribe_url(config, token)
    if url is not None:
        links.append(f"<{url}>")
    if config.mailto is not None:
        links.append(f"<mailto:{config.mailto}?subject={quote('unsubscribe ' + token)}>")
    headers = {"List-Unsubscribe": ", ".join(links)}
    if url is not None:
        headers["List-Unsubscribe-Post"] = ONE_CLICK
    return headers
