"""Credentials on the wire: static auth headers, and OAuth 2.0 client
credentials (one token per [auth] table, shared by every request of the run).

The token request speaks the three dialects marketing platforms use
(`client_auth`): the client id and secret as HTTP Basic (`client_secret_basic`,
RFC 6749 2.3.1), as form fields (`client_secret_post`), or in a JSON body
(Salesforce Marketing Cloud). A token response may also name the API's base
URL (`rest_instance_url`); it is checked here, when the token arrives, so a
source that takes its origin from it only ever sees a vetted https origin.

Nothing here logs or formats a secret: error messages name the [auth] table,
the token URL and the method, never a value read from the environment.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from emailpers.backend import SharedToken, TokenStore
from emailpers.cache import request_identity
from emailpers.campaign import Auth, is_loopback
from emailpers.errors import AuthFailed
from emailpers.http import BadBody, BodyTooLarge, ConnectionFailed, HttpClient

TOKEN_MAX_BYTES = 64 * 1024  # a token response is a few KB; a larger one is refused, not read
TOKEN_TIMEOUT = 10.0  # seconds for one token request
_MAX_BASE_URL = 2048

_METHODS = {
    "basic": "the client id and secret as HTTP Basic auth",
    "post": "the client id and secret as form fields",
    "json": "the client id and secret in a JSON body",
}
# RFC 6750 b64token, widened to any visible ASCII: what a header can carry as is.
_TOKEN = re.compile(r"[!-~]+")
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")  # RFC 6749 5.2 codes; anything else the server wrote is not shown


class TokenProvider:
    """OAuth 2.0 client credentials: one token shared by every request of the
    run, renewed shortly before it expires or when a request gets a 401.

    `base_fields`: fields of the token response that sources take their base
    URL from (`base_url_from`); each is validated whenever a token arrives."""

    RENEW_MARGIN = 30.0  # seconds before expiry

    def __init__(
        self,
        auth: Auth,
        client: HttpClient,
        clock: Callable[[], float],
        *,
        store: TokenStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self.store = store  # shared with other shards: one token for all (backend.TokenStore)
        self.wall_clock = wall_clock
        self.client = client
        self.clock = clock
        self.token = ""
        self.expires_at = 0.0
        self.renewals = 0
        self.base_fields: set[str] = set()
        self._bases: dict[str, str] = {}  # of the current token
        self._lifetime = auth.token_lifetime  # of the current token
        self._failed: AuthFailed | None = None
        self._lock = asyncio.Lock()

    async def header(self, *, renew_from: str | None = None) -> str:
        """`renew_from`: the token a 401 rejected; renew unless someone already did."""
        async with self._lock:
            await self._fresh(renew_from)
            return f"Bearer {self.token}"

    async def base_url(self, name: str) -> str:
        """The API base the current token's response named in field `name`,
        without a trailing slash: a source's path is appended to it."""
        async with self._lock:
            await self._fresh(None)
            return self._bases[name]

    async def _fresh(self, renew_from: str | None) -> None:
        if self._failed is not None:
            # The run is stopping; the requests queued behind the failed one
            # must not each ask the endpoint again.
            raise self._failed
        stale = self.clock() >= self.expires_at - min(self.RENEW_MARGIN, self._lifetime / 10)
        if not self.token or stale or self.token == renew_from:
            try:
                await (self._renew() if self.store is None else self._renew_shared(renew_from))
            except AuthFailed as exc:
                self._failed = exc
                raise

    async def _renew_shared(self, renew_from: str | None) -> None:
        """Renew under the shards' lock: whoever holds it first asks the endpoint;
        the others, once they hold it, find its token stored and take it."""
        assert self.store is not None
        key = hashlib.sha256(request_identity({}, self.auth).encode()).hexdigest()[:32]  # no secret in a key
        async with self.store.lock(key):
            shared = await self.store.load(key)
            if shared is not None and shared.token not in (renew_from, self.token):
                left = shared.expires_at - self.wall_clock()
                if left > min(self.RENEW_MARGIN, shared.lifetime / 10) and _TOKEN.fullmatch(shared.token):
                    where = f"{self.auth.where} token_url {self.auth.token_url} (shared)"
                    self._adopt(shared.token, shared.lifetime, left, shared.bases, where)
                    return
            await self._renew()
            left = self.expires_at - self.clock()
            await self.store.save(key, SharedToken(self.token, self.wall_clock() + left, self._lifetime, self._bases))

    def _adopt(self, token: str, lifetime: float, left: float, answer: Mapping[str, Any], where: str) -> None:
        """Use `token` (`left` seconds more) and the base URLs its `answer` names."""
        self._bases = {name: _base_url(answer.get(name), name, where) for name in sorted(self.base_fields)}
        self.token, self._lifetime = token, lifetime
        self.expires_at = self.clock() + left

    def _request(self) -> tuple[dict[str, str] | None, dict[str, str | int] | None, dict[str, str]]:
        """(form, json, headers) of the token request, per `client_auth`. An
        integer parameter stays a number in JSON (Marketing Cloud's account_id)."""
        auth = self.auth
        params: dict[str, str | int] = {"grant_type": "client_credentials"}
        if auth.scope:
            params["scope"] = auth.scope
        params.update(auth.token_params)
        params.update(auth.secret_token_params)
        headers = {}
        if auth.client_auth == "basic":
            headers["Authorization"] = basic_authorization(auth.client_id, auth.client_secret)
        else:
            params |= {"client_id": auth.client_id, "client_secret": auth.client_secret}
        if auth.client_auth == "json":
            return None, params, headers
        return {name: str(value) for name, value in params.items()}, None, headers

    async def _renew(self) -> None:
        auth = self.auth
        where = f"{auth.where} token_url {auth.token_url}"
        form, body, headers = self._request()
        try:
            response = await self.client.post(
                auth.token_url,
                form=form,
                json_body=body,
                headers=headers,
                timeout=TOKEN_TIMEOUT,
                max_bytes=TOKEN_MAX_BYTES,
            )
        except BodyTooLarge:
            raise AuthFailed(
                f"{where}: the token endpoint's answer is larger than {TOKEN_MAX_BYTES} bytes; reading stopped there. "
                "Is token_url the token endpoint?"
            ) from None
        except BadBody as exc:
            raise AuthFailed(f"{where}: the token endpoint's answer cannot be read: {exc}") from None
        except ConnectionFailed as exc:
            raise AuthFailed(f"{where}: cannot reach the token endpoint: {exc}") from None
        except TimeoutError as exc:
            raise AuthFailed(f"{where}: cannot reach the token endpoint: {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            others = " or ".join(f'"{m}"' for m in _METHODS if m != auth.client_auth)
            raise AuthFailed(
                f"{where}: the token endpoint answered {response.status}{_error_code(response.body)} "
                f'to client_auth = "{auth.client_auth}" ({_METHODS[auth.client_auth]}); check the client id and '
                "secret in the environment, the scope and the token parameters, or whether the endpoint wants "
                f"client_auth = {others}"
            )
        try:
            answer = json.loads(response.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise AuthFailed(f"{where}: the token endpoint's answer is not JSON with an access_token")
        token = answer["access_token"]
        if not _TOKEN.fullmatch(token):
            raise AuthFailed(
                f"{where}: the token endpoint's access_token holds spaces, control or non-ASCII characters; "
                "it cannot go in a header"
            )
        lifetime = _lifetime(answer.get("expires_in"), auth.token_lifetime, where)
        renewed = bool(self.token)
        self._adopt(token, lifetime, lifetime, answer, where)
        self.renewals += renewed


def _error_code(body: bytes) -> str:
    """` (invalid_client)` from an RFC 6749 error answer; the rest of what the
    server wrote could echo what we sent, so it is never shown."""
    try:
        code = json.loads(body).get("error")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return ""
    return f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""


def _lifetime(value: Any, default: float, where: str) -> float:
    """Seconds from `expires_in`; without it, the campaign's `token_lifetime`
    (RFC 6749 only recommends the field)."""
    if value is None:
        return default
    try:
        seconds = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise AuthFailed(f"{where}: the token endpoint's expires_in must be a number of seconds > 0, got {value!r:.40}")
    return seconds


def _base_url(value: Any, name: str, where: str) -> str:
    """A base URL from the token response: https (plain http only on loopback),
    a host, no credentials, query or fragment. Returned without a trailing '/'."""
    if not isinstance(value, str):
        raise AuthFailed(f"{where}: the token endpoint's answer has no {name} (a base_url_from source needs it)")
    problem = ""
    parts = None
    if len(value) > _MAX_BASE_URL or not re.fullmatch(r"[!-~]+", value):
        problem = "holds spaces, control or non-ASCII characters, or is too long"
    else:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            problem = "is not a URL"
    if parts is not None and not problem:
        if parts.scheme not in ("https", "http") or not parts.hostname:
            problem = "must be an absolute https:// URL"
        elif parts.scheme == "http" and not is_loopback(parts.hostname):
            problem = "must be https:// (plain http only for a loopback host)"
        elif "@" in parts.netloc:
            problem = "must not carry credentials"
        elif parts.query or parts.fragment or "?" in value or "#" in value:
            problem = "must not have a query or fragment"
    if problem:
        raise AuthFailed(f"{where}: the token endpoint's {name} {problem}, got {value!r:.80}")
    return value.rstrip("/")


def basic_authorization(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def static_auth_headers(auth: Auth | None) -> dict[str, str]:
    if auth is None or auth.kind == "oauth2":
        return {}
    if auth.kind == "bearer":
        return {"Authorization": f"Bearer {auth.secret}"}
    if auth.kind == "basic":
        return {"Authorization": basic_authorization(auth.username, auth.secret)}
    return {auth.header_name: auth.secret}
