"""The fetch layer's old single module, kept importable for one release.
New code imports from where each piece now lives: `emailpers.fetch` (the
fetcher and its results), `emailpers.urls` (URL templates),
`emailpers.pacing` (retry policy, rate limits, timing), `emailpers.http`
(the wire, Retry-After and Cache-Control)."""

from emailpers.fetch import OK_OUTCOMES, Fetched, Fetcher, SourceStats
from emailpers.urls import UrlTemplate, url_environment

__all__ = ["OK_OUTCOMES", "Fetched", "Fetcher", "SourceStats", "UrlTemplate", "url_environment"]
