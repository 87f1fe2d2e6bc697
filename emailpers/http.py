"""The HTTP client under the fetch layer: aiohttp's connection pool behind a
small API of our own (GET with a body limit, a form or JSON POST for OAuth tokens).

Why not httpx, the library this project started with: on the reference
machine (2 cores, 20 ms loopback API, 64 requests in flight) httpx's own async
pool made about 190 requests/s; httpx over an aiohttp transport made the
fetch layer spend about as much CPU in httpx (request building, cookie
handling, header merging) as in aiohttp itself, and a profile of a cold render
put 13% of all its time there. See README, Performance, for the figures.

Two properties matter beyond speed:
- the URL goes over exactly as emailpers encoded it (yarl would otherwise
  decode escapes such as %2E%2E and resolve the path);
- no cookie jar: a cookie one recipient's answer sets must never ride along
  with another recipient's request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from emailpers import __version__

USER_AGENT = f"emailpers/{__version__}"
# Characters a URL may carry as they are; anything else (a space, non-ASCII
# written in the campaign file) is percent-encoded. '%' stays: values are
# already encoded and must not be encoded twice.
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~-._"


class BodyTooLarge(Exception):
    """The response body passed the caller's limit; reading stopped there."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


_PLAIN_URL = re.compile(r"[A-Za-z0-9:/?#\[\]@!$&'()*+,;=%~._-]*")


def _url(url: str) -> URL:
    return URL(url if _PLAIN_URL.fullmatch(url) else quote(url, safe=_URL_SAFE), encoded=True)


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, streamed and counted as it is decoded, so neither a false
    Content-Length nor a compressed body gets past `max_bytes`."""
    if response.content_length is not None and response.content_length > max_bytes:
        raise BodyTooLarge(f"response larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"response larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class HttpClient:
    """One connection pool per run. Use as an async context manager."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None),  # callers bound each attempt themselves
            )
        return self._session

    async def get(self, url: str, headers: Mapping[str, str], *, max_bytes: int) -> Response:
        """GET without following redirects; raises aiohttp.ClientError,
        BodyTooLarge. The body is read whole, up to `max_bytes`."""
        async with self._open().get(_url(url), headers=headers, allow_redirects=False) as response:
            length = response.content_length
            if length is not None and length > max_bytes:
                raise BodyTooLarge(f"response larger than max_bytes ({max_bytes} bytes)")
            if length is not None:
                body = await response.read()
            else:
                chunks, size = [], 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        raise BodyTooLarge(f"response larger than max_bytes ({max_bytes} bytes)")
                    chunks.append(chunk)
                body = b"".join(chunks)
            return Response(response.status, response.headers, body)

    async def post(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json_body: object = None,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int,
    ) -> Response:
        """A POST of a form or a JSON body (the OAuth token request), without
        following redirects; raises aiohttp.ClientError, TimeoutError,
        BodyTooLarge. At most `max_bytes` of the body are read, counted after
        any Content-Encoding is undone."""
        if json_body is not None:
            data: bytes | dict[str, str] | None = json.dumps(json_body).encode()
            headers = {**headers, "Content-Type": "application/json"}
        else:
            data = dict(form) if form is not None else None
        async with self._open().post(
            _url(url),
            data=data,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            return Response(response.status, response.headers, await _read_capped(response, max_bytes))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
