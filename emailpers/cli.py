"""The command line. The only module that prints, exits or imports click."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click

from emailpers import __version__
from emailpers.cache import ResponseCache
from emailpers.campaign import Campaign, load_campaign
from emailpers.errors import CampaignError, EmailpersError, Interrupted
from emailpers.output import FORMATS
from emailpers.pipeline import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_ERROR_RATE,
    Progress,
    RunOptions,
    cache_directory,
    render_campaign,
    warm_cache,
)
from emailpers.recipients import count_rows, recipients_argument
from emailpers.report import STATUSES, summary


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="emailpers")
def cli() -> None:
    """Render personalised emails with live API data, moments before the send.

    For every recipient, emailpers fetches the campaign's sources (retries,
    backoff, a short disk cache), renders the MJML/Jinja templates, and writes
    an .eml file. Where live data is late, down or wrong, the email still goes
    out with its static fallback blocks, and the manifest says what happened.

    \b
    Exit codes: 0 every recipient has an outcome, 1 the run could not start
    (or stopped on an error: a disk error, a folder in use), 2 usage, 3 some
    recipient in the manifest failed (or --max-failures stopped the run),
    4 stopped early by --max-error-rate, 130 and 143 stopped by SIGINT
    (Ctrl-C) and SIGTERM: rerun to resume.
    """


def _fail(exc: EmailpersError) -> None:
    if exc.report is not None:  # a run that stopped: what it did, then why it stopped
        click.echo(summary(exc.report))
    click.echo(f"Error: {exc}", err=True)
    sys.exit(exc.report.exit_code if exc.report is not None else exc.exit_code)


class _Terminated(BaseException):
    """SIGTERM outside a run (which handles it itself): a BaseException, like
    KeyboardInterrupt, so that no `except Exception` swallows it."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


@contextmanager
def _errors() -> Iterator[None]:
    """Errors become `Error: ...` and their exit code; SIGINT and SIGTERM
    become 130 and 143 (128 + the signal's number, as a shell reports it)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        yield
    except Interrupted as exc:  # not an error: no "Error:" in front
        if exc.report is not None:
            click.echo(summary(exc.report))
        click.echo(str(exc), err=True)
        sys.exit(exc.report.exit_code if exc.report is not None else exc.exit_code)
    except EmailpersError as exc:
        _fail(exc)
    except (KeyboardInterrupt, _Terminated) as exc:
        signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        click.echo(f"Interrupted by {signum.name}: finished recipients are in the manifest; run the same command "
                   "to resume.", err=True)
        sys.exit(128 + signum)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class ProgressLine:
    """Feeds a progress bar at most every REDRAW seconds, with a time estimate
    from this run's own pace over the last WINDOW seconds. (click's estimate
    averages from the moment the bar appeared, so the render processes starting
    and the first fetches made it read 11:50:04 for a 15 s job, and recipients
    resumed from an earlier run, skipped at once, made it read too little.)"""

    REDRAW = 0.1
    WINDOW = 10.0

    def __init__(self, total: int, draw: Callable[[int, str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.draw = draw  # (steps since the last draw, the estimate to show)
        self.clock = clock
        self.position = 0  # rows behind us, resumed ones included
        self.processed = 0  # rows this run worked on: the pace
        self.pending = 0
        self.last_draw = -float("inf")
        self.samples: deque[tuple[float, int]] = deque()

    def __call__(self, count: int, resumed: bool) -> None:
        self.position += count
        self.pending += count
        if not resumed:
            self.processed += count
        now = self.clock()
        if now - self.last_draw >= self.REDRAW:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.processed:  # the pace starts with this run's first recipient, not with the bar
            self.samples.append((now, self.processed))
            while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
                self.samples.popleft()
        self.draw(self.pending, self.estimate(now))
        self.pending = 0
        self.last_draw = now

    def estimate(self, now: float) -> str:
        since, then = self.samples[0] if self.samples else (now, 0)
        if now - since < 1.0 or self.processed == then:
            return "eta --"  # under a second of pace: no guess beats a wild one
        seconds = round(max(self.total - self.position, 0) * (now - since) / (self.processed - then))
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return f"eta {hours}h{minutes:02d}m" if hours else f"eta {minutes}m{seconds:02d}s" if minutes else f"eta {seconds}s"


@contextmanager
def _progress(campaign: Campaign, enabled: bool, label: str = "Rendering") -> Iterator[Progress | None]:
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    total = count_rows(campaign.recipients.path)
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=False,
                           item_show_func=lambda eta: eta) as bar:
        line = ProgressLine(total, lambda steps, eta: bar.update(steps, eta))
        yield line
        line.flush()


def _statuses(ctx: click.Context, param: click.Parameter, value: str | None) -> frozenset[str]:
    statuses = frozenset(s.strip() for s in (value or "").split(",") if s.strip())
    unknown = sorted(statuses - set(STATUSES))
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)} is not a status; use {', '.join(STATUSES)}")
    return statuses


_cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="EMAILPERS_CACHE_DIR", show_envvar=True,
    help="Response cache folder [default: .emailpers-cache next to the campaign file].",
)


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `render` and `cache warm`."""
    for option in reversed(
        [
            click.option("--recipients", type=click.Path(dir_okay=False, path_type=Path),
                         help="Recipient file (.csv, .tsv, .jsonl, optionally .gz; - reads stdin); overrides [recipients] path."),
            click.option("--concurrency", type=click.IntRange(1, 4096), default=DEFAULT_CONCURRENCY, show_default=True,
                         help="Ceiling on each source's requests in flight."),
            click.option("--adaptive/--no-adaptive", default=True, show_default=True,
                         help="Each source finds its own in-flight limit below the ceiling, backing off when its "
                              "API slows down or answers 429/5xx; --no-adaptive holds every source at the ceiling."),
            _cache_dir_option,
            click.option("--max-error-rate", type=click.FloatRange(0, 1, min_open=True),
                         default=DEFAULT_MAX_ERROR_RATE, show_default=True,
                         help="Stop (exit 4) when more than this share of a source's last 200 fetches failed; "
                              "1 never stops."),
            click.option("--progress/--no-progress", default=True, help="Progress bar on a terminal."),
        ]
    ):
        func = option(func)
    return func


@cli.command()
@click.argument("campaign_file", metavar="CAMPAIGN", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: messages/, manifest.jsonl, report.json.")
@click.option("--format", "formats", type=click.Choice(FORMATS), default="eml", show_default=True,
              help="eml: one .eml per recipient; html: .html and .txt; all: both.")
@run_options
@click.option("--workers", type=click.IntRange(0, 64),
              help="Render processes [default: one per core; 0 renders in the main process].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the response cache.")
@click.option("--offline", is_flag=True,
              help="Use only the cache; no network, no API secrets needed. Recipients without cached data fall back.")
@click.option("--fresh", is_flag=True,
              help="Start over: delete what emailpers wrote in --out (manifest, report, messages) instead of resuming.")
@click.option("--redo", callback=_statuses, metavar="STATUS[,STATUS]",
              help="On resume, do again the recipients with these statuses (failed, fallback, ...): "
                   "their lines and files are replaced.")
@click.option("--max-failures", type=click.IntRange(1), metavar="N",
              help="Stop (exit 3) once N recipients failed in this run.")
def render(
    campaign_file: Path,
    out: Path,
    formats: str,
    recipients: Path | None,
    concurrency: int,
    adaptive: bool,
    cache_dir: Path | None,
    max_error_rate: float | None,
    progress: bool,
    workers: int | None,
    no_cache: bool,
    offline: bool,
    fresh: bool,
    redo: frozenset[str],
    max_failures: int | None,
) -> None:
    """Render CAMPAIGN (a .toml file) for every recipient into --out.

    Running the same command again on the same --out resumes: recipients
    already in the manifest are not done again.
    """
    if no_cache and offline:
        raise click.UsageError("--offline reads the cache; it cannot be combined with --no-cache")
    if fresh and redo:
        raise click.UsageError("--redo does part of an earlier run again; --fresh starts over: choose one")
    with _errors(), recipients_argument(recipients, getattr(sys.stdin, "buffer", None)) as (path, label):
        # Offline, nothing is sent: the API secrets are not needed.
        campaign = load_campaign(campaign_file, path, recipients_label=label, need_secrets=not offline)
        options = RunOptions(
            out=out,
            formats=formats,
            concurrency=concurrency,
            adaptive=adaptive,
            workers=workers,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            offline=offline,
            fresh=fresh,
            max_error_rate=max_error_rate,
            max_failures=max_failures,
            redo=redo,
        )
        with _progress(campaign, progress) as update:
            report = render_campaign(campaign, options, update)
    click.echo(summary(report))
    click.echo(f"Output: {out}/ (manifest.jsonl, report.json, messages/)")
    if report.failed_earlier:
        click.echo(f"{report.failed_earlier} recipients failed in an earlier run; --redo failed does them again", err=True)
    sys.exit(report.exit_code)


@cli.group()
def cache() -> None:
    """Warm, inspect or clear a campaign's response cache."""


@cache.command("warm")
@click.argument("campaign_file", metavar="CAMPAIGN", type=click.Path(dir_okay=False, path_type=Path))
@run_options
def cache_warm(
    campaign_file: Path,
    recipients: Path | None,
    concurrency: int,
    adaptive: bool,
    cache_dir: Path | None,
    max_error_rate: float | None,
    progress: bool,
) -> None:
    """Fetch every recipient's data into the cache, render nothing.

    Run it shortly before the send (within the sources' cache_ttl) so the
    render itself reads the cache. Exit 3 when some recipient's data could
    not be fetched.
    """
    with _errors(), recipients_argument(recipients, getattr(sys.stdin, "buffer", None)) as (path, label):
        campaign = load_campaign(campaign_file, path, recipients_label=label)
        options = RunOptions(out=None, concurrency=concurrency, adaptive=adaptive, cache_dir=cache_dir, max_error_rate=max_error_rate)
        with _progress(campaign, progress, "Warming") as update:
            report = warm_cache(campaign, options, update)
    click.echo(summary(report))
    sys.exit(report.exit_code)


def _open_cache(campaign_file: Path, cache_dir: Path | None) -> tuple[Campaign, ResponseCache]:
    campaign = load_campaign(campaign_file, need_secrets=False)
    directory = cache_directory(campaign, RunOptions(out=None, cache_dir=cache_dir))
    if not directory.is_dir():
        raise CampaignError(f"{directory}: no cache here yet; `emailpers cache warm` or a render creates it")
    return campaign, ResponseCache(directory)


@cache.command("stats")
@click.argument("campaign_file", metavar="CAMPAIGN", type=click.Path(dir_okay=False, path_type=Path))
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def cache_stats(campaign_file: Path, cache_dir: Path | None, as_json: bool) -> None:
    """Entries, size on disk and age of the cache, per source."""
    with _errors():
        _, store = _open_cache(campaign_file, cache_dir)
        stats = store.stats()
        store.close()
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    oldest = "-" if stats["oldest_age_s"] is None else f"{stats['oldest_age_s']:g}s ago"
    click.echo(f"{stats['directory']}: {stats['entries']} entries, {stats['bytes'] / 1024:.1f} KiB, oldest {oldest}")
    for name, s in sorted(stats["sources"].items()):
        click.echo(f"  {name}: {s['entries']} entries ({s['fresh']} fresh), oldest {s['oldest_age_s']:g}s ago")


@cache.command("clear")
@click.argument("campaign_file", metavar="CAMPAIGN", type=click.Path(dir_okay=False, path_type=Path))
@_cache_dir_option
@click.option("--source", help="Clear only this source's entries.")
def cache_clear(campaign_file: Path, cache_dir: Path | None, source: str | None) -> None:
    """Remove cached responses (all, or one source's)."""
    with _errors():
        campaign, store = _open_cache(campaign_file, cache_dir)
        if source is not None and source not in campaign.sources:
            store.close()
            known = ", ".join(sorted(campaign.sources)) or "none"
            raise click.BadParameter(f"{source!r} is not a source of this campaign (sources: {known})", param_hint="--source")
        removed = store.clear(source)
        store.close()
    click.echo(f"Removed {removed} cached responses" + (f" of source {source}" if source else "") + ".")


@cli.command()
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Output folder for the demo's emails.")
def demo(out: Path) -> None:
    """Render the sample campaign against a sample API started on loopback.

    The sample API has realistic latency and a few deliberate failures (a user
    slower than the timeout, a 500, a flaky one that succeeds on retry). The
    campaign runs twice: cold, then again on the warm cache.
    """
    from emailpers.demo import run_demo

    with _errors():
        for title, report, folder in run_demo(out):
            click.echo(f"\n== {title} -> {folder}")
            click.echo(summary(report))
    click.echo(f"\nOpen {out}/messages/*.eml in a mail client, or read {out}/manifest.jsonl.")


def main() -> None:
    cli(prog_name="emailpers")
