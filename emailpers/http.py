"""The HTTP client under the fetch layer: aiohttp's connection pool behind a
small API of our own (GET with a body limit, a form or JSON POST for OAuth tokens).

Why not httpx, the library this project started with: httpx's own async pool
made a fraction of aiohttp's request rate, and httpx over an aiohttp transport
made the fetch layer spend about as much CPU in httpx (request building,
cookie handling, header merging) as in aiohttp itself. See README,
Performance, for the figures.

This module is the only one that imports aiohttp: `_mapped_errors` turns its
exceptions into our own (`ConnectionFailed`) in one place, as httpx's
`map_httpcore_exceptions` does for httpcore, so the layers above catch what
we define and aiohttp could be swapped here alone. It also reads the HTTP
headers the fetch layer acts on (Retry-After, Cache-Control).

Two properties matter beyond speed:
- the URL goes over exactly as emailpers encoded it (yarl would otherwise
  decode escapes such as %2E%2E and resolve the path);
- no cookie jar: a cookie one recipient's answer sets must never ride along
  with another recipient's request.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from emailpers import __version__

USER_AGENT = f"emailpers/{__version__}"
# Characters a URL may carry as they are; anything else (a space, non-ASCII
# written in the campaign file) is percent-encoded. '%' stays: values are
# already encoded and must not be encoded twice.
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~-._"


# The encodings _Body can decode, each with a bounded output; aiohttp's own
# decompression inflates a whole network chunk at once (~1000x for a gzip bomb)
# and, with a Content-Length, the whole body, blocking the event loop.
ACCEPT_ENCODING = "gzip, deflate"
_READ_CHUNK = 64 * 1024


class ConnectionFailed(Exception):
    """No HTTP answer: the connection was refused, reset, or broke mid-body.
    `kind` names what happened (the transport's exception class)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """aiohttp's exceptions as ours, the one place they are caught. A timeout
    stays a TimeoutError (aiohttp's own timeouts are TimeoutErrors too)."""
    try:
        yield
    except TimeoutError:
        raise
    except aiohttp.ClientError as exc:
        raise ConnectionFailed(type(exc).__name__, str(exc)) from None


class BadBody(Exception):
    """The response body cannot be used: too large, or encoded in a way we
    cannot (or, broken, could not) decode."""


class BodyTooLarge(BadBody):
    """The response body passed the caller's limit; reading stopped there."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response larger than max_bytes ({limit} bytes)")


class _Body:
    """A response body as it arrives, decoded, never more than `limit` bytes
    on the wire nor after decoding: a gzip bomb stops at limit + 1 bytes of
    output, whatever its Content-Length said."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.limit = limit
        self.wire = 0
        self.size = 0
        self.parts: list[bytes] = []
        name = encoding.strip().lower()
        self._mode: str | None = None if name in ("", "identity") else name
        self._inflater: zlib._Decompress | None = None
        if name in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self._mode not in (None, "deflate"):
            raise BadBody(f"unsupported Content-Encoding: {encoding[:40]!r}")

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise BodyTooLarge(self.limit)
        if data:
            self.parts.append(data)

    def feed(self, chunk: bytes) -> None:
        self.wire += len(chunk)
        if self.wire > self.limit:
            raise BodyTooLarge(self.limit)
        if not chunk:
            return
        if self._mode is None:
            self._keep(chunk)
            return
        if self._inflater is None:
            # "deflate" is zlib-wrapped by the standard, raw deflate by some
            # servers: a zlib stream starts with the method nibble 8.
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if chunk[0] & 0x0F == 8 else -zlib.MAX_WBITS)
        try:
            while chunk and not self._inflater.eof:
                self._keep(self._inflater.decompress(chunk, self.limit - self.size + 1))
                chunk = self._inflater.unconsumed_tail
        except zlib.error:
            raise BadBody(f"the {self._mode} body is corrupt") from None

    def finish(self) -> bytes:
        if self._mode is not None and (self._inflater is None or not self._inflater.eof):
            if self.wire == 0:
                return b""
            raise BadBody(f"the {self._mode} body is truncated")
        return b"".join(self.parts)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


_PLAIN_URL = re.compile(r"[A-Za-z0-9:/?#\[\]@!$&'()*+,;=%~._-]*")


def _url(url: str) -> URL:
    return URL(url if _PLAIN_URL.fullmatch(url) else quote(url, safe=_URL_SAFE), encoded=True)


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, streamed and decoded as it arrives, so neither a false
    Content-Length nor a compressed body gets past `max_bytes` (the response
    must come from a request made with auto_decompress=False)."""
    if response.content_length is not None and response.content_length > max_bytes:
        raise BodyTooLarge(max_bytes)
    body = _Body(response.headers.get("Content-Encoding", ""), max_bytes)
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        body.feed(chunk)
    return body.finish()


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
        """GET without following redirects; raises ConnectionFailed, BadBody
        (BodyTooLarge). The body is read whole and decoded, up to `max_bytes`
        on the wire and after decoding, whatever the headers announce."""
        request_headers = CIMultiDict(headers)
        request_headers.setdefault("Accept-Encoding", ACCEPT_ENCODING)
        with _mapped_errors():
            async with self._open().get(
                _url(url), headers=request_headers, allow_redirects=False, auto_decompress=False
            ) as response:
                return Response(response.status, response.headers, await _read_capped(response, max_bytes))

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
        following redirects; raises ConnectionFailed, TimeoutError,
        BodyTooLarge. At most `max_bytes` of the body are read, counted after
        any Content-Encoding is undone."""
        if json_body is not None:
            data: bytes | dict[str, str] | None = json.dumps(json_body).encode()
            headers = {**headers, "Content-Type": "application/json"}
        else:
            data = dict(form) if form is not None else None
        headers = {"Accept-Encoding": ACCEPT_ENCODING, **headers}
        with _mapped_errors():
            async with self._open().post(
                _url(url),
                data=data,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
                auto_decompress=False,
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


# -- headers the fetch layer acts on ------------------------------------------------

_ASCII_DIGITS = re.compile(r"[0-9]+")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date);
    `now` is wall-clock time, as the date is."""
    if not value:
        return None
    value = value.strip()
    if _ASCII_DIGITS.fullmatch(value):  # not str.isdigit(): '²' and '①' are digits to it
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, OverflowError, OSError, IndexError):
        return None


def parse_max_age(value: str | None) -> tuple[bool, float | None]:
    """(storable, max-age) from Cache-Control. `private` is not storable: the
    cache is shared by every recipient of every run, a shared cache in RFC 9111's
    sense, so `s-maxage` counts as well (the smaller of the two wins)."""
    if not value:
        return True, None
    storable, max_age = True, None
    for part in value.lower().split(","):
        name, _, arg = part.strip().partition("=")
        if name in ("no-store", "no-cache", "private"):
            storable = False
        elif name in ("max-age", "s-maxage") and _ASCII_DIGITS.fullmatch(arg := arg.strip().strip('"')):
            age = float(arg)
            max_age = age if max_age is None else min(max_age, age)
    return storable, max_age
