"""Load a campaign TOML file into frozen, validated configuration.

Everything the rest of the code trusts is checked here, once: unknown keys,
types, ranges, files that must exist, environment variables that must be set.
Errors name the file, the line when it can be found, the table and the key.
"""

from __future__ import annotations

import codecs
import difflib
import email.utils
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2

from emailpers.errors import CampaignError
from emailpers.signing import MIN_KEY_BYTES

DEFAULT_TIMEOUT = 2.0
DEFAULT_RETRIES = 3
DEFAULT_CACHE_TTL = 300
DEFAULT_DEADLINE = 10.0
DEFAULT_BACKOFF_INITIAL = 0.25
DEFAULT_BACKOFF_MAX = 4.0
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_BATCH_LINGER = 0.05
DEFAULT_TOKEN_LIFETIME = 3600.0  # seconds, for a token response without expires_in
DEFAULT_RENDER_DEADLINE = 10.0  # seconds of Jinja per recipient

_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322: printable ASCII but ':'
_OWN_HEADERS = frozenset(
    {"from", "to", "subject", "date", "message-id", "mime-version", "content-type", "content-transfer-encoding"}
)


def is_loopback(host: str | None) -> bool:
    """A host on this machine (localhost, 127.0.0.0/8, ::1): plain http or SMTP never leaves it."""
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


@dataclass(frozen=True)
class Auth:
    """Credentials for a source. Secrets are read from the environment at load
    time and kept out of repr() so they cannot reach a log by accident."""

    kind: str  # "bearer" | "header" | "basic" | "oauth2"
    where: str = ""  # "[auth.NAME]", or "[sources.NAME] auth" for inline auth: for messages
    header_name: str = "Authorization"
    secret: str = field(default="", repr=False)
    username: str = field(default="", repr=False)
    token_url: str = ""
    client_id: str = field(default="", repr=False)
    client_secret: str = field(default="", repr=False)
    scope: str = ""
    client_auth: str = "basic"  # "basic" | "post" | "json": how the token request carries the client's secret
    # Extra token request parameters, as (name, value) pairs so the table stays hashable.
    token_params: tuple[tuple[str, str | int], ...] = ()
    secret_token_params: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # from token_params_env
    token_lifetime: float = DEFAULT_TOKEN_LIFETIME


@dataclass(frozen=True)
class Batch:
    url: str
    size: int
    items: str
    key: str
    linger: float = DEFAULT_BATCH_LINGER


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    auth: Auth | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    cache_ttl: float = DEFAULT_CACHE_TTL
    required: bool = False
    deadline: float = DEFAULT_DEADLINE
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    backoff_max: float = DEFAULT_BACKOFF_MAX
    rate_limit: float | None = None
    concurrency: int | None = None
    stale_if_error: float = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    allow_insecure_http: bool = False
    follow_redirects: bool = False
    batch: Batch | None = None
    base_url_from: str | None = None  # a token response field naming the base URL; `url` is then a path


RECIPIENT_FORMATS = {".csv": ("csv", ","), ".tsv": ("csv", "\t"), ".jsonl": ("jsonl", "")}
DEFAULT_RECIPIENTS_ENCODING = "utf-8"


@dataclass(frozen=True)
class RecipientsConfig:
    path: Path
    id_field: str = "id"
    email_field: str = "email"
    format: str = "csv"  # "csv" (.csv, .tsv) or "jsonl", from the file name; ".gz" after it: gzip
    delimiter: str = ","  # CSV only: [recipients] delimiter, else "," (.csv) or tab (.tsv)
    encoding: str = DEFAULT_RECIPIENTS_ENCODING
    gzip: bool = False
    label: str = ""  # what errors call the file ("<stdin>" for `--recipients -`); default: the path

    @property
    def name(self) -> str:
        return self.label or str(self.path)


def recipient_format(name: str) -> tuple[str, str, bool] | None:
    """(format, default delimiter, gzip) of a recipient file name, any case;
    None for a name emailpers cannot read."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    stem = lower[:-3] if gz else lower
    for suffix, (kind, delimiter) in RECIPIENT_FORMATS.items():
        if stem.endswith(suffix):
            return kind, delimiter, gz
    return None


@dataclass(frozen=True)
class Unsubscribe:
    """`[campaign] unsubscribe`: where a recipient unsubscribes. Each message
    carries a token signed with `key` (emailpers/signing.py) naming its
    recipient, in the URL (`{{ token }}`) and the mailto subject."""

    url: str | None  # https, with {{ token }} in it: the RFC 8058 one-click endpoint
    mailto: str | None
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Dkim:
    """`[send] dkim`: read by `emailpers send`; the key is only read then, by
    the process that signs (never a render process)."""

    domain: str
    selector: str
    key_env: str | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Amp:
    """[campaign] amp_template and its link key (AMP for Email, see amp.py)."""

    template: Path
    key_env: str | None = None  # the variable holding the key of amp_url's tokens
    key: bytes = field(default=b"", repr=False)  # its value: main process only
    token_ttl: float = 30 * 24 * 3600.0  # seconds an amp_url stays valid; Gmail shows AMP for 30 days
    validate: bool = True  # False: --amp-unvalidated


@dataclass(frozen=True)
class PreviewConfig:
    """[preview]: what `check` and `preview` use when no flag says otherwise."""

    fixtures: Path | None = None  # a folder of recorded answers (it may not exist yet)
    recipients: Path | None = None  # a small recipient file for previews


@dataclass(frozen=True)
class Campaign:
    path: Path  # the TOML file
    name: str
    template: Path
    subject: str
    from_: str
    recipients: RecipientsConfig
    text_template: Path | None = None
    fallback_template: Path | None = None
    preheader: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    render_deadline: float = DEFAULT_RENDER_DEADLINE
    unsubscribe: Unsubscribe | None = None
    dkim: Dkim | None = None
    amp: Amp | None = None
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    backend: str | None = None  # [run] backend: redis://... shared by a run's shards (redis_backend.py)

    @property
    def root(self) -> Path:
        """The campaign's folder: relative paths and template includes resolve here."""
        return self.path.parent

    def template_name(self, path: Path) -> str:
        """The loader name of a template file (relative to the campaign folder)."""
        return path.relative_to(self.root).as_posix()


# -- schema ------------------------------------------------------------------

_NUMBER = (int, float)


class _Table:
    """One TOML table being validated: typed lookups that fail with the file,
    line, table and key in the message, and a check for unknown keys."""

    def __init__(self, loader: _Loader, data: Any, where: str) -> None:
        self.loader = loader
        self.where = where
        if not isinstance(data, dict):
            raise loader.error(where, None, f"must be a table, got {_show(data)}")
        self.data: dict[str, Any] = data

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise self.loader.error(self.where, key, "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            ok = False  # TOML true is not a number
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise self.loader.error(self.where, key, f"must be {_kind_name(kind)}, got {_show(value)}")
        return float(value) if kind == _NUMBER else value

    def number(self, key: str, default: float | None, *, minimum: float = 0, above: bool = False) -> Any:
        value = self.get(key, _NUMBER, default)
        if value is not None and (value < minimum or (above and value == minimum)):
            relation = ">" if above else ">="
            raise self.loader.error(self.where, key, f"must be {relation} {minimum:g}, got {value:g}")
        return value

    def integer(self, key: str, default: int | None, *, minimum: int = 0) -> Any:
        value = self.get(key, int, default)
        if value is not None and value < minimum:
            raise self.loader.error(self.where, key, f"must be >= {minimum}, got {value}")
        return value

    def strings(self, key: str) -> dict[str, str]:
        table = self.get(key, dict, {})
        for name, value in table.items():
            if not isinstance(value, str):
                raise self.loader.error(self.where, key, f"value of {name!r} must be a string, got {_show(value)}")
        return dict(table)

    def env(self, key: str, *, required: bool = True) -> str:
        """The value of the environment variable named by `key` (a `*_env` key)."""
        var = self.get(key, str, required=required)
        return "" if var is None else self._secret(key, var)

    def signing_key(self, key: str, *, required: bool = True) -> bytes:
        """The HMAC key in the environment variable named by `key`, when the
        run needs secrets: at least MIN_KEY_BYTES, or anyone could guess it
        offline from one token."""
        value = self.env(key, required=required).encode()
        if self.loader.need_secrets and key in self.data and len(value) < MIN_KEY_BYTES:
            raise self.loader.error(
                self.where, key, f"the signing key must be at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)"
            )
        return value

    def env_table(self, key: str) -> dict[str, str]:
        """`{ name = "VAR" }` -> `{ name: value of $VAR }` (token_params_env)."""
        return {name: self._secret(key, var, f"{name} = {var!r}: ") for name, var in self.strings(key).items()}

    def _secret(self, key: str, var: str, item: str = "") -> str:
        value = self.loader.env.get(var)
        if value is None and not self.loader.need_secrets:
            return ""
        if value is None:
            raise self.loader.error(
                self.where, key, f"{item}environment variable {var} is not set; export it before running"
            )
        if _CONTROL.search(value) and self.loader.need_secrets:
            # A secret pasted with its line break would fail every request (or
            # split a header); the value itself is never shown.
            raise self.loader.error(
                self.where,
                key,
                f"{item}environment variable {var} contains a control character (a trailing newline or CR?); "
                "export it again without it",
            )
        return value

    def no_unknown(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                guess = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.loader.error(self.where, key, f"unknown key{guess}; known keys: {', '.join(sorted(known))}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}
    if kind == _NUMBER:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HEADER = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
_KEY = re.compile(r"""^\s*("?)([A-Za-z0-9_.-]+)\1\s*=""")


class _Loader:
    def __init__(self, path: Path, text: str, need_secrets: bool, env: Mapping[str, str]) -> None:
        self.path = path
        self.need_secrets = need_secrets
        self.env = env
        self.lines: dict[tuple[str, str | None], int] = {}
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            if m := _HEADER.match(line):
                table = m.group(1).replace('"', "").replace(" ", "")
                self.lines.setdefault((table, None), number)
                self.lines.setdefault(("", table.partition(".")[0]), number)  # a top-level key, for messages
            elif m := _KEY.match(line):
                self.lines.setdefault((table, m.group(2)), number)

    def error(self, where: str, key: str | None, message: str) -> CampaignError:
        table, _, inline = where.strip("[").partition("]")
        table = "" if where == "campaign file" else table
        line = self.lines.get((table, inline.strip() or key)) or self.lines.get((table, None))
        location = f"{self.path}:{line}" if line else str(self.path)
        subject = f"{where} {key}" if key else where
        return CampaignError(f"{location}: {subject} {message}")

    def file(self, table: _Table, key: str, *, required: bool) -> Path | None:
        value = table.get(key, str, required=required)
        if value is None:
            return None
        path: Path = (self.path.parent / value).resolve()
        if not path.is_file():
            raise self.error(table.where, key, f"file not found: {path}; check the path (relative to {self.path.parent})")
        return path


def load_campaign(
    path: str | Path,
    recipients: str | Path | None = None,
    *,
    need_secrets: bool = True,
    recipients_label: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Campaign:
    """Read and validate a campaign file. `recipients` overrides [recipients] path
    (`recipients_label` is what errors then call it, "<stdin>" for a spooled copy).
    `need_secrets=False` (cache stats, clear) tolerates unset `*_env` variables.
    `env`: where `*_env` keys are looked up; None: the process environment."""
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CampaignError(f"{path}: cannot read campaign file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError(f"{path}: not valid TOML: {exc}") from None
    loader = _Loader(path, text, need_secrets, os.environ if env is None else env)
    top = _Table(loader, data, "campaign file")
    top.no_unknown({"campaign", "recipients", "sources", "auth", "send", "preview", "run"})
    run_table = _Table(loader, top.get("run", dict, {}), "[run]")
    run_table.no_unknown({"backend"})
    backend = run_table.get("backend", str)
    if backend is not None and not backend.startswith(("redis://", "rediss://", "unix://")):
        raise loader.error("[run]", "backend", "must be a redis://, rediss:// or unix:// URL")

    c = _Table(loader, top.get("campaign", dict, required=True), "[campaign]")
    c.no_unknown({
        "name", "template", "text_template", "fallback_template", "subject", "preheader", "from", "headers",
        "render_deadline", "unsubscribe", "amp_template", "amp_key_env", "amp_token_ttl",
    })  # fmt: skip
    template = loader.file(c, "template", required=True)
    assert template is not None
    root = path.parent
    for key in ("template", "text_template", "fallback_template", "amp_template"):
        p = loader.file(c, key, required=False)
        if p is not None and not p.is_relative_to(root):
            raise loader.error("[campaign]", key, f"must be inside the campaign folder {root}")

    recipients_config = _load_recipients(loader, top.get("recipients", dict, {}), recipients, recipients_label)
    from_ = c.get("from", str, required=True)
    if "@" not in email.utils.parseaddr(from_)[1]:
        raise loader.error("[campaign]", "from", f"has no email address: {from_!r}; write it as 'Name <user@domain>'")
    headers = c.strings("headers")
    for name in headers:
        # A bad name would end the header block early; a second To, Subject or
        # Content-Type would make the message ambiguous or unreadable.
        if not _FIELD_NAME.fullmatch(name):
            raise loader.error("[campaign]", "headers", f"{name!r} is not a header name (printable ASCII, no space or ':')")
        if name.lower() in _OWN_HEADERS or (c.data.get("unsubscribe") and name.lower() in UNSUBSCRIBE_HEADERS):
            raise loader.error("[campaign]", "headers", f"cannot set {name!r}: emailpers writes that header itself")
    auths = _load_auths(loader, top.get("auth", dict, {}))
    sources_table = top.get("sources", dict, {})
    sources = {name: _load_source(loader, name, value, auths) for name, value in sources_table.items()}

    return Campaign(
        path=path,
        name=c.get("name", str, required=True),
        template=template,
        text_template=loader.file(c, "text_template", required=False),
        fallback_template=loader.file(c, "fallback_template", required=False),
        subject=c.get("subject", str, required=True),
        preheader=c.get("preheader", str),
        from_=from_,
        headers=headers,
        recipients=recipients_config,
        sources=sources,
        render_deadline=c.number("render_deadline", DEFAULT_RENDER_DEADLINE, above=True),
        unsubscribe=_load_unsubscribe(loader, c),
        dkim=_load_dkim(loader, _Table(loader, top.get("send", dict, {}), "[send]")),
        amp=_load_amp(loader, c),
        preview=_load_preview(loader, top.get("preview", dict, {})),
        backend=backend,
    )


def _load_preview(loader: _Loader, value: Any) -> PreviewConfig:
    p = _Table(loader, value, "[preview]")
    p.no_unknown({"fixtures", "recipients"})
    fixtures = p.get("fixtures", str)
    return PreviewConfig(
        fixtures=None if fixtures is None else (loader.path.parent / fixtures).resolve(),
        recipients=loader.file(p, "recipients", required=False),
    )


def _load_amp(loader: _Loader, c: _Table) -> Amp | None:
    template = loader.file(c, "amp_template", required=False)
    if template is None:
        for key in ("amp_key_env", "amp_token_ttl"):
            if key in c.data:
                raise loader.error("[campaign]", key, "needs amp_template")
        return None
    key_env = c.get("amp_key_env", str)
    return Amp(
        template=template,
        key_env=key_env,
        key=c.signing_key("amp_key_env", required=False),
        token_ttl=c.number("amp_token_ttl", Amp.token_ttl, above=True),
    )


UNSUBSCRIBE_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
_TOKEN = "{{ token }}"


def _load_unsubscribe(loader: _Loader, c: _Table) -> Unsubscribe | None:
    if "unsubscribe" not in c.data:
        return None
    u = _Table(loader, c.get("unsubscribe", dict), "[campaign] unsubscribe")
    u.no_unknown({"url", "mailto", "key_env"})
    url, mailto = u.get("url", str), u.get("mailto", str)
    if url is None and mailto is None:
        raise loader.error("[campaign]", "unsubscribe", "needs url (one-click, https) or mailto, or both")
    if url is not None:
        # RFC 8058: the one-click URI must be HTTPS; it carries the token, so it must be where the token goes.
        if urlsplit(url).scheme != "https" or not urlsplit(url).hostname:
            raise loader.error("[campaign]", "unsubscribe", f"url must be an https:// URL (RFC 8058), got {url!r}")
        if _TOKEN not in url or _CONTROL.search(url) or " " in url.replace(_TOKEN, ""):
            raise loader.error(
                "[campaign]", "unsubscribe", f"url must contain {_TOKEN} where the signed token goes, and no space: {url!r}"
            )
    if mailto is not None and not re.fullmatch(r"[^@\s<>,?]+@[A-Za-z0-9.-]+", mailto):
        raise loader.error("[campaign]", "unsubscribe", f"mailto must be a plain address like unsub@shop.example, got {mailto!r}")
    return Unsubscribe(url=url, mailto=mailto, key=u.signing_key("key_env"))


def _load_dkim(loader: _Loader, s: _Table) -> Dkim | None:
    s.no_unknown({"dkim"})
    if "dkim" not in s.data:
        return None
    d = _Table(loader, s.get("dkim", dict), "[send] dkim")
    d.no_unknown({"domain", "selector", "key_env", "key_file"})
    domain, selector = d.get("domain", str, required=True), d.get("selector", str, required=True)
    for key, value in (("domain", domain), ("selector", selector)):
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise loader.error("[send] dkim", key, f"is not a DNS name: {value!r}")
    if ("key_env" in d.data) == ("key_file" in d.data):
        raise loader.error("[send]", "dkim", "needs exactly one of key_env (the PEM private key) or key_file")
    return Dkim(domain, selector, key_env=d.get("key_env", str), key_file=loader.file(d, "key_file", required=False))


def _ascii_compatible(codec: codecs.CodecInfo) -> bool:
    sample = 'id,email;"\t\r\n'
    try:
        encoded = codec.encode(sample)[0]
    except (TypeError, ValueError):  # a bytes-to-bytes codec such as base64
        return False
    return isinstance(encoded, bytes) and encoded.removeprefix(codecs.BOM_UTF8) == sample.encode("ascii")


_SUFFIXES = ".csv, .tsv or .jsonl (any case), optionally gzipped (.csv.gz)"


def _load_recipients(
    loader: _Loader, value: Any, override: str | Path | None, label: str | None
) -> RecipientsConfig:
    r = _Table(loader, value, "[recipients]")
    r.no_unknown({"path", "id_field", "email_field", "delimiter", "encoding"})
    if override is not None:
        path = Path(override).resolve()
        name = label or str(path)
        if not path.is_file():
            raise CampaignError(f"{name}: recipient file not found (given by --recipients)")
        kind = recipient_format(path.name)
        if kind is None:
            raise CampaignError(f"{name}: a recipient file must be {_SUFFIXES} (given by --recipients)")
    else:
        found = loader.file(r, "path", required=True)
        assert found is not None
        path, name = found, str(found)
        kind = recipient_format(path.name)
        if kind is None:
            raise loader.error("[recipients]", "path", f"must be {_SUFFIXES}, got {path.name}")
    file_format, delimiter, gz = kind
    chosen = r.get("delimiter", str)
    if chosen is not None:
        # The csv module takes one character; a quote or line break would make every row ambiguous.
        if len(chosen) != 1 or chosen in "\"\r\n" or chosen.isalnum():
            raise loader.error(
                "[recipients]", "delimiter", f'must be one character such as ";" or "\\t" (tab), got {chosen!r}'
            )
        delimiter = chosen
    encoding = r.get("encoding", str, DEFAULT_RECIPIENTS_ENCODING)
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise loader.error(
            "[recipients]", "encoding", f'{encoding!r} is not an encoding Python knows; try "utf-8", "cp1252" or "latin-1"'
        ) from None
    if not _ascii_compatible(codec):
        # Lines are split on the byte b"\n" before decoding: UTF-16 and the like would split mid-character.
        raise loader.error(
            "[recipients]", "encoding", f"{encoding!r} is not supported (not ASCII-compatible); save the file as UTF-8"
        )
    return RecipientsConfig(
        path=path,
        id_field=r.get("id_field", str, "id"),
        email_field=r.get("email_field", str, "email"),
        format=file_format,
        delimiter=delimiter,
        encoding=codec.name,
        gzip=gz,
        label=name if name != str(path) else "",
    )


_AUTH_KEYS = {
    "bearer": {"token_env"},
    "header": {"name", "value_env"},
    "basic": {"username_env", "password_env"},
    "oauth2": {
        "token_url", "client_id_env", "client_secret_env", "scope", "client_auth", "token_params",
        "token_params_env", "token_lifetime",
    },
}  # fmt: skip
_CLIENT_AUTH = ("basic", "post", "json")
# Set by emailpers itself (or by `scope`); a token parameter may not replace them.
_RESERVED_TOKEN_PARAMS = frozenset({"grant_type", "client_id", "client_secret", "scope"})


def _load_auths(loader: _Loader, tables: dict[str, Any]) -> dict[str, Auth]:
    return {name: _load_auth(loader, _Table(loader, value, f"[auth.{name}]")) for name, value in tables.items()}


def _load_auth(loader: _Loader, a: _Table) -> Auth:
    where = a.where
    kind = a.get("type", str, required=True)
    if kind not in _AUTH_KEYS:
        raise loader.error(a.where, "type", f"must be one of {', '.join(sorted(_AUTH_KEYS))}, got {kind!r}")
    a.no_unknown({"type"} | _AUTH_KEYS[kind])
    if kind == "bearer":
        return Auth(kind, where, secret=a.env("token_env"))
    if kind == "header":
        return Auth(kind, where, header_name=a.get("name", str, required=True), secret=a.env("value_env"))
    if kind == "basic":
        return Auth(kind, where, username=a.env("username_env"), secret=a.env("password_env"))
    token_url = a.get("token_url", str, required=True)
    _check_url(loader, a.where, "token_url", token_url, allow_http=False)
    client_auth = a.get("client_auth", str, "basic")
    if client_auth not in _CLIENT_AUTH:
        choices = ", ".join(map(repr, _CLIENT_AUTH))
        raise loader.error(where, "client_auth", f"must be one of {choices}, got {client_auth!r}")
    params = a.get("token_params", dict, {})
    for name, value in params.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            problem = f"value of {name!r} must be a string or an integer, got {_show(value)}"
            raise loader.error(where, "token_params", problem)
    secret_params = a.env_table("token_params_env")
    for key, names in (("token_params", params), ("token_params_env", secret_params)):
        for name in names:
            if name in _RESERVED_TOKEN_PARAMS:
                raise loader.error(where, key, f"cannot set {name!r}: emailpers sends it itself (use the scope key)")
            if key == "token_params_env" and name in params:
                raise loader.error(where, key, f"sets {name!r}, which token_params sets too; keep one")
    return Auth(
        kind,
        where,
        token_url=token_url,
        client_id=a.env("client_id_env"),
        client_secret=a.env("client_secret_env"),
        scope=a.get("scope", str, ""),
        client_auth=client_auth,
        token_params=tuple(sorted(params.items())),
        secret_token_params=tuple(sorted(secret_params.items())),
        token_lifetime=a.number("token_lifetime", DEFAULT_TOKEN_LIFETIME, above=True),
    )


_SOURCE_KEYS = {
    "url", "headers", "auth", "timeout", "retries", "cache_ttl", "required", "deadline",
    "backoff_initial", "backoff_max", "rate_limit", "concurrency", "stale_if_error",
    "max_bytes", "allow_insecure_http", "follow_redirects", "batch", "base_url_from",
}  # fmt: skip


def _load_source(loader: _Loader, name: str, value: Any, auths: dict[str, Auth]) -> Source:
    where = f"[sources.{name}]"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise loader.error(where, None, "name must be a template identifier (letters, digits, _), so templates can use it")
    s = _Table(loader, value, where)
    s.no_unknown(_SOURCE_KEYS)
    allow_http = s.get("allow_insecure_http", bool, False)
    url = s.get("url", str, required=True)
    base_url_from = s.get("base_url_from", str)
    check_url = _check_path if base_url_from is not None else _check_url
    check_url(loader, where, "url", url, allow_http)

    auth_value = s.get("auth", (str, dict))
    auth = None
    if isinstance(auth_value, str):
        if auth_value not in auths:
            known = ", ".join(sorted(auths)) or "none defined"
            raise loader.error(where, "auth", f"names [auth.{auth_value}], which is not defined ({known})")
        auth = auths[auth_value]
    elif auth_value is not None:
        auth = _load_auth(loader, _Table(loader, auth_value, f"{where} auth"))
    if base_url_from is not None and (auth is None or auth.kind != "oauth2"):
        raise loader.error(where, "base_url_from", "needs oauth2 auth: the base URL comes from its token response")
    if base_url_from is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", base_url_from):
        raise loader.error(where, "base_url_from", f"must name a field of the token response, got {base_url_from!r}")

    batch = None
    if (batch_value := s.get("batch", dict)) is not None:
        b = _Table(loader, batch_value, f"{where} batch")
        b.no_unknown({"url", "size", "items", "key", "linger"})
        batch_url = b.get("url", str, required=True)
        check_url(loader, b.where, "url", batch_url, allow_http)
        batch = Batch(
            url=batch_url,
            size=b.integer("size", 100, minimum=1),
            items=b.get("items", str, required=True),
            key=b.get("key", str, required=True),
            linger=b.number("linger", DEFAULT_BATCH_LINGER),
        )

    backoff_initial = s.number("backoff_initial", DEFAULT_BACKOFF_INITIAL)
    backoff_max = s.number("backoff_max", DEFAULT_BACKOFF_MAX)
    if backoff_max < backoff_initial:
        raise loader.error(where, "backoff_max", f"must be >= backoff_initial ({backoff_initial:g})")
    concurrency = s.integer("concurrency", None, minimum=1)
    return Source(
        name=name,
        url=url,
        headers=s.strings("headers"),
        auth=auth,
        timeout=s.number("timeout", DEFAULT_TIMEOUT, above=True),
        retries=s.integer("retries", DEFAULT_RETRIES),
        cache_ttl=s.number("cache_ttl", DEFAULT_CACHE_TTL),
        required=s.get("required", bool, False),
        deadline=s.number("deadline", DEFAULT_DEADLINE, above=True),
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        rate_limit=s.number("rate_limit", None, above=True),
        concurrency=concurrency,
        stale_if_error=s.number("stale_if_error", 0),
        max_bytes=s.integer("max_bytes", DEFAULT_MAX_BYTES, minimum=1),
        allow_insecure_http=allow_http,
        follow_redirects=s.get("follow_redirects", bool, False),
        batch=batch,
        base_url_from=base_url_from,
    )


def _check_path(loader: _Loader, where: str, key: str, url: str, allow_http: bool) -> None:
    """With base_url_from, `url` is only a path (and query) after the base URL
    of the token response: the origin comes from the token endpoint the
    campaign names, never from the campaign's templates or recipient data."""
    if not url.startswith("/") or url.startswith("//"):
        raise loader.error(
            where, key, f"must be a path starting with a single '/' (base_url_from gives the origin), got {url!r}"
        )
_URL_SYNTAX = jinja2.Environment()  # parses only: URLs render in urls.url_environment


def _check_url(loader: _Loader, where: str, key: str, url: str, allow_http: bool) -> None:
    """The scheme, host and port must be written out: recipient data may fill
    the path and query, never choose where a request goes. A Jinja syntax
    error stops the load here, not at the first recipient's request."""
    try:
        _URL_SYNTAX.parse(url)
    except jinja2.TemplateSyntaxError as exc:
        raise loader.error(where, key, f"template syntax error: {exc.message}; the URL is {url!r}") from None
    origin_end = url.find("/", url.find("://") + 3) if "://" in url else -1
    origin = url if origin_end == -1 else url[:origin_end]
    if "{" in origin or "%" in origin:
        raise loader.error(where, key, "must not template the scheme, host or port; put {{ }} in the path or query only")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise loader.error(where, key, f"must be an absolute http(s) URL, got {url!r}")
    if parts.username or parts.password:
        raise loader.error(where, key, "must not carry credentials; use auth = { ... } with *_env keys")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_http:
        raise loader.error(
            where,
            key,
            f"uses plain http:// for {parts.hostname}; use https://, or set allow_insecure_http = true in the source",
        )
