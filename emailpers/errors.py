"""The exceptions emailpers raises.

    EmailpersError                 anything the CLI turns into "Error: ..." and an exit code
    ├── CampaignError              the run cannot start: campaign file, templates, env vars (exit 1)
    │   └── RecipientListError     the recipient list as a whole is unusable (found before any request)
    ├── OutputError                the output folder cannot be used, or the disk refused a write (exit 1)
    ├── CacheError                 the cache folder cannot be used (exit 1)
    ├── BrowserError               preview --screenshots found no usable Chromium (exit 1)
    ├── BackendError               the shared backend (Redis) is unreachable at start, or was lost (exit 1)
    ├── AuthFailed                 the OAuth token endpoint gave no token; the run stopped (exit 1)
    ├── RenderProcessDied          a render process was killed; the run stopped (exit 1)
    ├── SendError                  `send` cannot start or go on: relay, TLS, login, folder (exit 1)
    ├── TooManyFailures            --max-failures recipients failed; the run stopped (exit 3)
    ├── UnhealthySource            a source failed too often; the run stopped early (exit 4)
    └── Interrupted                SIGINT or SIGTERM stopped the run (exit 130 or 143)

    RecipientError                 one recipient cannot be served; recorded in the manifest,
    │                              the run goes on
    └── RenderFailed               rendering failed (the recipient fails: outcome.decide)

    SourceError                    one fetch for one recipient failed; becomes a fallback
    ├── FetchTimeout               no answer within the source's timeout
    ├── BadResponse                a final HTTP status, a body that is not JSON, too large
    └── TransientError             worth retrying: connection error, 429, 5xx
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emailpers.report import Report


class EmailpersError(Exception):
    """Base of the errors that end a command."""

    exit_code = 1
    report: Report | None = None  # a run that stopped: its report (and exit code), set as the error leaves it
    send_report: dict[str, Any] | None = None  # a send that stopped: its send-report.json


class BrowserError(EmailpersError):
    """No headless Chromium (or Playwright) to take screenshots with."""


class CampaignError(EmailpersError):
    """The campaign (TOML, templates, environment) is unusable; nothing was run."""


class RecipientListError(CampaignError):
    """The recipient file cannot be trusted as a whole (not text, no id or email
    column, a stray quote merging rows); nothing was fetched or written."""


class OutputError(EmailpersError):
    """The output folder cannot be written or its manifest cannot be read."""


class CacheError(EmailpersError):
    """The response cache folder cannot be opened: not writable, damaged, locked."""


class BackendError(EmailpersError):
    """The backend the shards share (--backend redis://...) cannot be reached, or
    stopped answering mid-run: the run stops rather than go on with limits of its own."""


class AuthFailed(EmailpersError):
    """The OAuth token endpoint did not give us a token: every request would fail."""


class RenderProcessDied(EmailpersError):
    """A render process ended abruptly; the pool cannot go on."""


class SendError(EmailpersError):
    """`emailpers send` cannot start or go on: the relay URL, TLS, the login,
    the DKIM key, or an output folder that is not ready to send."""


class TooManyFailures(EmailpersError):
    """As many recipients failed as --max-failures allows."""

    exit_code = 3


class UnhealthySource(EmailpersError):
    """A source failed for too large a share of its latest fetches."""

    exit_code = 4


class Interrupted(EmailpersError):
    """SIGINT or SIGTERM stopped the run; what finished is in the manifest.
    The exit code is the shell's for death by that signal: 128 + its number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class RecipientError(Exception):
    """One recipient cannot be served. The message goes into the manifest."""


class RenderFailed(RecipientError):
    """A recipient's email could not be rendered."""


class SourceError(Exception):
    """One source's fetch for one recipient failed."""

    outcome = "error"

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class FetchTimeout(SourceError):
    outcome = "timeout"


class BadResponse(SourceError):
    """A final answer: retrying will not change it."""


class TransientError(SourceError):
    """Worth another attempt (connection error, 429, 5xx)."""

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status_code)
        self.retry_after = retry_after
