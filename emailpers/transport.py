"""httpx on top of aiohttp's connection pool.

httpx stays the client API (requests, responses, exceptions); aiohttp moves the
bytes. On the reference machine httpx's own async pool managed about 190
requests/s at 64 concurrent requests against a 20 ms loopback API, aiohttp
about 2,600/s (see README, Performance).

Why our own transport rather than the `httpx-aiohttp` package: that one hands
aiohttp the URL as text, and aiohttp (yarl) then decodes percent-escapes such
as `%2E%2E` and normalises the path, so a recipient id of `..` would turn
`/v1/users/%2E%2E/cart` into `/v1/cart`. Here the URL goes over exactly as
httpx encoded it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from yarl import URL

_CHUNK = 64 * 1024


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk
        except aiohttp.ClientPayloadError as exc:
            raise httpx.ReadError(str(exc)) from exc
        except aiohttp.ClientConnectionError as exc:
            raise httpx.ReadError(str(exc)) from exc

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session per transport; redirects and decompression are left
    to the caller (emailpers decides about redirects itself)."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        return aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._open()
        body = await request.aread()
        try:
            response = await self._session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=list(request.headers.multi_items()),
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        headers = list(response.headers.items())
        if "Content-Encoding" in response.headers:  # aiohttp decodes it: httpx must not again
            headers = [(k, v) for k, v in headers if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(response.status, headers=headers, stream=_Body(response), request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
