"""Loopback OAuth token endpoints that each accept exactly one way of sending
the client's secret, as real identity providers do:

- "basic": `Authorization: Basic ...`, a form body, no secret in the body;
- "post":  no Authorization header, client_id and client_secret as form fields;
- "json":  a JSON body with client_id, client_secret (Salesforce Marketing Cloud).

Anything else gets 401 `invalid_client`. Each answer can name an API base URL
(`rest_instance_url`) and can leave out `expires_in`.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from advanced_servers import Api, Request, Response, TokenServer


class OneMethodTokenServer(TokenServer):
    def __init__(
        self,
        api: Api,
        method: str,
        *,
        client_id: str = "cid",
        client_secret: str = "csecret",
        required: dict[str, Any] | None = None,
        expires_in: float | None = 600,
        base_url: Callable[[int], Any] | None = None,
        prefix: str = "tok",
    ) -> None:
        # Without expires_in in the answer the API still lets a token live for ever.
        super().__init__(
            api,
            client_id=client_id,
            client_secret=client_secret,
            expires_in=math.inf if expires_in is None else expires_in,
            prefix=prefix,
        )
        self.method = method
        self.required = required or {}  # parameters the request must carry, with their values
        self.send_expires_in = expires_in is not None
        self.base_url = base_url  # token number (1, 2, ...) -> rest_instance_url
        self.params: list[dict[str, Any]] = []  # every accepted request's parameters, secrets included

    def _token(self, request: Request, _: re.Match[str]) -> Response:
        if self.fail_with is not None:
            return Response(self.fail_with, {"error": "invalid_client"})
        params = self._params(request)
        if (
            params is None
            or params.get("grant_type") != "client_credentials"
            or any(params.get(k) != v for k, v in self.required.items())
        ):
            return Response(401, {"error": "invalid_client", "error_description": f"echo {request.body[:200]!r}"})
        with self.api.lock:
            token = f"{self.prefix}{len(self.issued) + 1}"
            self.issued.append((token, time.monotonic()))
            self.params.append(params)
            number = len(self.issued)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.send_expires_in:
            answer["expires_in"] = self.expires_in
        if self.base_url is not None:
            answer["rest_instance_url"] = self.base_url(number)
        return Response(200, answer)

    def _params(self, request: Request) -> dict[str, Any] | None:
        """The request's parameters if it used this server's method, else None."""
        content_type = request.headers.get("content-type", "")
        authorization = request.headers.get("authorization")
        if self.method == "json":
            if not content_type.startswith("application/json") or authorization is not None:
                return None
            try:
                body = json.loads(request.body)
            except ValueError:
                return None
            if not isinstance(body, dict):
                return None
            params = body
        else:
            if not content_type.startswith("application/x-www-form-urlencoded"):
                return None
            params = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        if self.method == "basic":
            expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
            if authorization != expected or "client_secret" in params:
                return None
            return params
        if authorization is not None:
            return None
        if (params.get("client_id"), params.get("client_secret")) != (self.client_id, self.client_secret):
            return None
        return params


def guard(api: Api, tokens: TokenServer, pattern: str = r"/data/v1/profile/(\w+)") -> list[tuple[str, str]]:
    """A data route answering 200 only with a valid token. Returns the list of
    (api url, recipient id) it served, in order."""
    served: list[tuple[str, str]] = []

    @api.route(pattern)
    def _(request: Request, match: re.Match[str]) -> Response:
        if tokens.check(request) is None:
            return Response(401, {"error": "invalid_token"})
        with api.lock:
            served.append((api.url, match.group(1)))
        return Response(200, {"user": match.group(1), "server": api.port})

    return served
