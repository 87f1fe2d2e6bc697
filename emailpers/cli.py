"""The command line. The only module that prints, exits or imports click."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import click

from emailpers import __version__
from emailpers.cache import ResponseCache
from emailpers.campaign import Campaign, load_campaign
from emailpers.dkimsign import load_signer
from emailpers.errors import CampaignError, EmailpersError, Interrupted
from emailpers.fixtures import check_fixtures_folder
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
from emailpers.processes import stop_on_signals
from emailpers.recipients import count_rows, recipients_argument
from emailpers.relay import (
    DEFAULT_BACKOFF,
    DEFAULT_CONNECTIONS,
    DEFAULT_PASSWORD_ENV,
    DEFAULT_RETRIES,
    DEFAULT_USER_ENV,
    SendOptions,
    credentials_from_env,
    parse_relay,
)
from emailpers.report import STATUSES, summary
from emailpers.send import send_messages
from emailpers.sendreport import send_exit_code, send_summary
from emailpers.shards import Shard, parse_shard, status


# auto_envvar_prefix: every option can also come from EMAILPERS_<COMMAND>_<OPTION>
# (EMAILPERS_RENDER_CONCURRENCY=8, EMAILPERS_CACHE_WARM_CONCURRENCY=8).
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                               "auto_envvar_prefix": "EMAILPERS"})
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

    Every option can also be set as EMAILPERS_<COMMAND>_<OPTION>, e.g.
    EMAILPERS_RENDER_CONCURRENCY=8.

    \b
    Example:
      emailpers render templates/campaign.toml --out out/
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


def _log_request(line: str) -> None:
    click.echo(line, err=True)


_record_option = click.option(
    "--record", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
    help="Save every answer the APIs give as a JSON fixture in DIR (one file per request; no credentials), "
         "for --replay. The cache is neither read nor written.",
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
            click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (the report) instead."),
            click.option("-q", "--quiet", is_flag=True, help="Print errors only (cron mails every line printed)."),
            click.option("-v", "--verbose", is_flag=True,
                         help="Print each request on stderr (method, URL, status or error, time) and each change of a "
                              "source's in-flight limit, with the reason."),
            click.option("--shard", metavar="K/N",
                         help="Do only shard K (0..N-1) of N: the recipients whose id hashes to K. auto/N reads K "
                              "from JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX, SLURM_ARRAY_TASK_ID or "
                              "CI_NODE_INDEX (1-based). Shards share one --out."),
            click.option("--backend", metavar="redis://HOST:PORT/DB", envvar="EMAILPERS_BACKEND", show_envvar=True,
                         help="Share the response cache, rate limits, concurrency caps, OAuth token, request "
                              "dedupe and error guard with every other shard through Redis [default: [run] "
                              "backend; none: this process alone, cache on disk]."),
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
@click.option("--amp-unvalidated", is_flag=True,
              help="Send the amp_template's AMP part without the AMP validator (the manifest says so).")
@_record_option
@click.option("--replay", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Answer every request from the fixtures in DIR (see --record): no network, no API secrets. "
                   "A request with no fixture is an error for that source (its fallback).")
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
    as_json: bool,
    quiet: bool,
    verbose: bool,
    workers: int | None,
    no_cache: bool,
    offline: bool,
    fresh: bool,
    redo: frozenset[str],
    max_failures: int | None,
    amp_unvalidated: bool,
    record: Path | None,
    replay: Path | None,
    shard: str | None,
    backend: str | None,
) -> None:
    """Render CAMPAIGN (a .toml file) for every recipient into --out.

    Running the same command again on the same --out resumes: recipients
    already in the manifest are not done again.

    \b
    Examples:
      emailpers render templates/campaign.toml --out out/
      emailpers render templates/campaign.toml --out out/ --replay fixtures/ --json
    """
    if no_cache and offline:
        raise click.UsageError("--offline reads the cache; it cannot be combined with --no-cache")
    if fresh and redo:
        raise click.UsageError("--redo does part of an earlier run again; --fresh starts over: choose one")
    if sum((offline, record is not None, replay is not None)) > 1:
        raise click.UsageError("--offline, --record and --replay each choose where answers come from: choose one")
    with _errors(), recipients_argument(recipients, getattr(sys.stdin, "buffer", None)) as (path, label):
        if replay is not None:
            check_fixtures_folder(replay)
        # Offline or replayed, nothing is sent: the API secrets are not needed.
        campaign = load_campaign(campaign_file, path, recipients_label=label,
                                 need_secrets=not (offline or replay is not None))
        if amp_unvalidated and campaign.amp is not None:
            campaign = replace(campaign, amp=replace(campaign.amp, validate=False))
        part = _shard(shard)
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
            record=record,
            replay=replay,
            log_request=_log_request if verbose else None,
            shard=part,
            backend=backend or campaign.backend,
        )
        with _progress(campaign, progress and not quiet) as update:
            report = render_campaign(campaign, options, update)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        click.echo(summary(report))
        journal = "manifest.jsonl, report.json" if part is None else f"shards/{part.name}.jsonl and .report.json"
        click.echo(f"Output: {out}/ ({journal}, messages/)")
    if report.failed_earlier:
        click.echo(f"{report.failed_earlier} recipients failed in an earlier run; --redo failed does them again", err=True)
    sys.exit(report.exit_code)


@cli.group()
def cache() -> None:
    """Warm, inspect or clear a campaign's response cache.

    \b
    Example:
      emailpers cache stats templates/campaign.toml
    """


@cache.command("warm")
@click.argument("campaign_file", metavar="CAMPAIGN", type=click.Path(dir_okay=False, path_type=Path))
@run_options
@_record_option
def cache_warm(
    campaign_file: Path,
    recipients: Path | None,
    concurrency: int,
    adaptive: bool,
    cache_dir: Path | None,
    max_error_rate: float | None,
    progress: bool,
    as_json: bool,
    quiet: bool,
    verbose: bool,
    record: Path | None,
    shard: str | None,
    backend: str | None,
) -> None:
    """Fetch every recipient's data into the cache, render nothing.

    Run it shortly before the send (within the sources' cache_ttl) so the
    render itself reads the cache. Exit 3 when some recipient's data could
    not be fetched.

    \b
    Example, minutes before the send:
      emailpers cache warm templates/campaign.toml && emailpers render templates/campaign.toml --out out/
    """
    with _errors(), recipients_argument(recipients, getattr(sys.stdin, "buffer", None)) as (path, label):
        campaign = load_campaign(campaign_file, path, recipients_label=label)
        options = RunOptions(out=None, concurrency=concurrency, adaptive=adaptive, cache_dir=cache_dir, max_error_rate=max_error_rate,
                             record=record, log_request=_log_request if verbose else None,
                             shard=_shard(shard), backend=backend or campaign.backend)
        with _progress(campaign, progress and not quiet, "Warming") as update:
            report = warm_cache(campaign, options, update)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        click.echo(summary(report))
    sys.exit(report.exit_code)


def _shard(spec: str | None) -> Shard | None:
    """--shard, parsed; auto/N says which runner variable it read."""
    if spec is None:
        return None
    part = parse_shard(spec, os.environ)
    if part.source:
        click.echo(f"Shard {part} (from {part.source}={os.environ[part.source].strip()})", err=True)
    return part


@cli.command("status")
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
def status_command(out: Path) -> None:
    """Totals of the run in OUT (a render's --out), per shard and overall.

    Exits with the code the whole run deserves: 0 when every shard finished
    and no recipient failed, 3 when some failed, 4 (or another stop's code)
    when a shard was stopped, 1 while a shard has not finished (never
    started, still running, or killed).

    \b
    Example, after the job runner's last shard:
      emailpers status out/ && emailpers send out/ --smtp smtp://relay.example:587
    """
    with _errors():
        shards, code = status(out)
    overall: dict[str, int] = {}
    for s in shards:
        for name, n in s.counts.items():
            overall[name] = overall.get(name, 0) + n
        figures = "  ".join(f"{name} {n}" for name, n in sorted(s.counts.items())) or "no recipients"
        state = s.problem or f"finished, exit {s.exit_code}"
        click.echo(f"shard {s.name}: {figures}   ({state})")
    total = "  ".join(f"{name} {n}" for name, n in sorted(overall.items()))
    click.echo(f"overall: {sum(overall.values())} recipients: {total or '-'}   (exit {code})")
    sys.exit(code)


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
    """Entries, size on disk and age of the cache, per source.

    \b
    Example:
      emailpers cache stats templates/campaign.toml --json
    """
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
    """Remove cached responses (all, or one source's).

    \b
    Example:
      emailpers cache clear templates/campaign.toml --source cart
    """
    with _errors():
        campaign, store = _open_cache(campaign_file, cache_dir)
        if source is not None and source not in campaign.sources:
            store.close()
            known = ", ".join(sorted(campaign.sources)) or "none"
            raise click.BadParameter(f"{source!r} is not a source of this campaign (sources: {known})", param_hint="--source")
        removed = store.clear(source)
        store.close()
    click.echo(f"Removed {removed} cached responses" + (f" of source {source}" if source else "") + ".")


def _address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A bare address (user@domain) for the SMTP envelope: no name, no space, no line break."""
    if value is not None and not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", value):
        raise click.BadParameter(f"{value!r} is not an address like seed@test.example")
    return value


@cli.command()
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option("--smtp", "smtp_url", required=True, metavar="URL",
              help="Relay: smtp://host:587 (STARTTLS) or smtps://host:465 (implicit TLS). No credentials here.")
@click.option("--user-env", default=DEFAULT_USER_ENV, show_default=True, metavar="VAR",
              help="Environment variable holding the SMTP login (unset with its password: no AUTH).")
@click.option("--password-env", default=DEFAULT_PASSWORD_ENV, show_default=True, metavar="VAR",
              help="Environment variable holding the SMTP password.")
@click.option("--campaign", "campaign_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The campaign file, for its [send] dkim signing settings.")
@click.option("--connections", type=click.IntRange(1, 100), default=DEFAULT_CONNECTIONS, show_default=True,
              help="SMTP connections at once; each sends many messages.")
@click.option("--rate", type=click.FloatRange(0, min_open=True), metavar="N",
              help="At most N messages per second, over all connections [default: no limit].")
@click.option("--retries", type=click.IntRange(0, 20), default=DEFAULT_RETRIES, show_default=True,
              help="Attempts after a 4xx reply or a lost connection, with backoff, before `deferred`.")
@click.option("--backoff", type=click.FloatRange(0), default=DEFAULT_BACKOFF, show_default=True, metavar="SECONDS",
              help="Wait before the first retry; doubles each time.")
@click.option("--to-override", metavar="ADDR", callback=_address, help="Send every message to ADDR instead (envelope only): a test inbox.")
@click.option("--mail-from", metavar="ADDR", callback=_address, help="Envelope sender (bounces) [default: the From address].")
@click.option("--limit", type=click.IntRange(1), metavar="N", help="Send only the first N messages still to send.")
@click.option("--dry-run", is_flag=True, help="Connect, EHLO, check TLS and the login; send nothing.")
@click.option("--resend-unknown", is_flag=True,
              help="Send again messages whose earlier send got no reply (the receiver can dedupe on Message-ID).")
@click.option("--partial", is_flag=True, help="Send from a render that stopped early or was killed.")
@click.option("--allow-plaintext", is_flag=True,
              help="Send without TLS to a relay that offers no STARTTLS (loopback relays are allowed anyway).")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Trust this CA bundle (PEM) for the relay's certificate, e.g. a company CA.")
@click.option("--shard", metavar="K/N",
              help="Send only shard K of a run rendered with --shard K/N (auto/N as for render), with its own "
                   "journal OUT/shards/K-of-N.sent.jsonl: N senders side by side [default: the whole run].")
def send(
    out: Path, smtp_url: str, user_env: str, password_env: str, campaign_file: Path | None, connections: int,
    rate: float | None, retries: int, backoff: float, to_override: str | None, mail_from: str | None,
    limit: int | None, dry_run: bool, resend_unknown: bool, partial: bool, allow_plaintext: bool,
    ca_file: Path | None, shard: str | None,
) -> None:
    """Send the messages a render wrote into OUT through an SMTP relay.

    Only manifest lines with status rendered or fallback are sent. OUT/sent.jsonl
    journals every transaction; running the same command again sends only what
    is not yet sent or rejected. Exit 0 when every message is sent, 3 when some
    are rejected, deferred or unknown, 1 on an error, 130/143 after SIGINT/SIGTERM
    (the transactions in flight finish first). A sharded run is sent whole (every
    shard's journal) or one shard per sender with --shard; not both.

    \b
    Example:
      emailpers send out/ --smtp smtp://email-smtp.eu-west-1.amazonaws.com:587 --rate 14
    """
    with _errors():
        signer = None
        if campaign_file is not None:
            config = load_campaign(campaign_file, need_secrets=False)
            signer = load_signer(config.dkim) if config.dkim is not None else None
        options = SendOptions(
            out=out, relay=parse_relay(smtp_url, allow_plaintext=allow_plaintext),
            credentials=credentials_from_env(user_env, password_env), connections=connections, rate=rate,
            retries=retries, backoff=backoff, to_override=to_override, mail_from=mail_from, limit=limit,
            dry_run=dry_run, resend_unknown=resend_unknown, partial=partial, dkim=signer, ca_file=ca_file,
        )  # fmt: skip
        part = _shard(shard)
        try:
            report = send_messages(options, shard=part)
        except EmailpersError as exc:
            if exc.send_report is not None:  # what the send did before it stopped
                click.echo(send_summary(exc.send_report))
            raise
    click.echo(send_summary(report))
    if not dry_run:
        where = f"{out}/" if part is None else f"{out}/shards/{part.name}."
        click.echo(f"Journal: {where}sent.jsonl, report: {where}send-report.json")
    sys.exit(send_exit_code(report))


def _sample_campaign(
    campaign_file: Path, recipients: Path | None, replay: Path | None, offline: bool
) -> tuple[Campaign, Path | None]:
    """`check` and `preview`: the campaign on the recipients to sample, and the
    fixtures to replay; [preview] gives what no flag does. Only live APIs need secrets."""
    campaign = load_campaign(campaign_file, recipients, need_secrets=False)
    recipients = recipients or campaign.preview.recipients
    replay = replay if replay is not None or offline else campaign.preview.fixtures
    live = replay is None and not offline
    if replay is not None:
        check_fixtures_folder(replay)
    if recipients is not None or live:
        campaign = load_campaign(campaign_file, recipients, need_secrets=live)
    return campaign, replay


def _ids(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i.strip() for i in (value or "").split(",") if i.strip()))


def sample_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `check` and `preview`: which recipients they render, and where the data comes from."""
    for option in reversed(
        [
            click.option("--sample", "size", type=click.IntRange(1), default=20, show_default=True, metavar="N",
                         help="Recipients to render, chosen by a hash of their id: the same ones every run."),
            click.option("--only", callback=_ids, metavar="ID[,ID]", help="These recipients instead of a sample."),
            click.option("--recipients", type=click.Path(dir_okay=False, path_type=Path),
                         help="Recipient file to sample [default: [preview] recipients, else [recipients] path]."),
            click.option("--replay", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                         help="Data from these fixtures (see render --record) [default: [preview] fixtures]; "
                              "no secrets needed."),
            click.option("--offline", is_flag=True, help="Data from the cache only; no network, no secrets."),
            _cache_dir_option,
        ]
    ):
        func = option(func)
    return func


@cli.command()
@click.argument("campaign_file", metavar="CAMPAIGN", type=click.Path(dir_okay=False, path_type=Path))
@sample_options
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the rendered sample here [default: a temporary folder, removed].")
@click.option("--strict", is_flag=True, help="Warnings fail the check too.")
@click.option("--format", "output", type=click.Choice(["text", "github"]), default="text", show_default=True,
              help="github: GitHub Actions annotations (::error file=...,line=...::), on the pull request's lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(
    campaign_file: Path,
    size: int,
    only: tuple[str, ...],
    recipients: Path | None,
    replay: Path | None,
    offline: bool,
    cache_dir: Path | None,
    out: Path | None,
    strict: bool,
    output: str,
    as_json: bool,
) -> None:
    """Render a sample of CAMPAIGN and lint it; exit 1 on errors.

    Checks the campaign as render does, renders --sample recipients (from
    fixtures, the cache, or the live APIs), then lints the templates and each
    message: Gmail's 102 KB clip, MJML tags and attributes, merge tags left in,
    empty values, images and links, unsubscribe headers, From, subject,
    preheader, the text part, {% live %} blocks without a fallback.

    \b
    Example, in CI with recorded fixtures:
      emailpers check templates/campaign.toml --replay fixtures/ --format github
    """
    import tempfile

    from emailpers.sample import check_sample, github_lines, json_value, text_lines

    if replay is not None and offline:
        raise click.UsageError("--replay and --offline each choose where the data comes from: choose one")
    with _errors():
        campaign, replay = _sample_campaign(campaign_file, recipients, replay, offline)
        with tempfile.TemporaryDirectory(prefix="emailpers-check-") as temporary:
            result = check_sample(campaign, out or Path(temporary), size=size, only=only, replay=replay,
                                  offline=offline, cache_dir=cache_dir)
    if as_json:
        click.echo(json.dumps(json_value(result), indent=2))
    else:
        lines = text_lines(result)
        for line in (github_lines(result) + lines[-1:]) if output == "github" else lines:
            click.echo(line)
    sys.exit(1 if result.failed(strict) else 0)  # 1: findings that fail the build


@cli.command()
@click.argument("campaign_file", metavar="CAMPAIGN", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Gallery folder: index.html, emails/, screenshots/.")
@sample_options
@click.option("--screenshots", is_flag=True, help="Also PNGs of every email at 600 and 375 px, in headless Chromium.")
@click.option("--open", "open_", is_flag=True, help="Open index.html in the default browser.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def preview(
    campaign_file: Path,
    out: Path,
    size: int,
    only: tuple[str, ...],
    recipients: Path | None,
    replay: Path | None,
    offline: bool,
    cache_dir: Path | None,
    screenshots: bool,
    open_: bool,
    as_json: bool,
) -> None:
    """Write a gallery of CAMPAIGN: each sampled recipient in each data state.

    For each recipient: the email as its data came (live), with each source
    failed (every {% live %} block shows its fallback), and the whole-email
    fallback_template; at 600 and 375 px, with subject, preheader, From, size
    against Gmail's clip, the text part, why blocks fell back, and lint
    findings. OUT/index.html is one file: no server, no CDN.

    \b
    Example, in CI with recorded fixtures:
      emailpers preview templates/campaign.toml --replay fixtures/ --out preview/
    """
    from emailpers.preview import build_gallery, dump, summary_json
    from emailpers.sample import sample_rows

    if replay is not None and offline:
        raise click.UsageError("--replay and --offline each choose where the data comes from: choose one")
    with _errors():
        campaign, replay = _sample_campaign(campaign_file, recipients, replay, offline)
        gallery = build_gallery(campaign, sample_rows(campaign, size, only), out, replay=replay, offline=offline,
                                cache_dir=cache_dir)
        shots = []
        if screenshots:
            from emailpers.browser import screenshots as take
            from emailpers.preview import WIDTHS

            shots = take(gallery.emails, out / "screenshots", WIDTHS)
    if as_json:
        click.echo(dump({**summary_json(gallery), "screenshots": len(shots)}))
    else:
        value = summary_json(gallery)
        click.echo(f"Preview of {len(value['recipients'])} recipients in {len(value['states'])} data states: "
                   f"{value['emails']} emails, {value['findings']} lint findings"
                   + (f", {len(shots)} screenshots" if screenshots else "") + f" -> {gallery.index}")
        for item in value["not_rendered"]:
            click.echo(f"  not rendered: {item}")
    if open_:
        click.launch(str(gallery.index))


@cli.command()
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Output folder for the demo's emails (with --serve: the campaign's copy).")
@click.option("--serve", is_flag=True,
              help="Keep the sample API running, with a copy of the campaign pointing at it, and print commands to try.")
def demo(out: Path, serve: bool) -> None:
    """Render the sample campaign against a sample API started on loopback.

    The sample API has realistic latency and a few deliberate failures (a user
    slower than the timeout, a 500, a flaky one that succeeds on retry). The
    campaign runs twice: cold, then again on the warm cache.

    \b
    Examples:
      emailpers demo
      emailpers demo --serve --out try-it    (Ctrl-C stops the API)
    """
    from emailpers.demo import run_demo

    if serve:
        _serve_demo(out)
        return
    with _errors():
        for title, report, folder in run_demo(out):
            click.echo(f"\n== {title} -> {folder}")
            click.echo(summary(report))
    click.echo(f"\nOpen {out}/messages/*.eml in a mail client, or read {out}/manifest.jsonl.")


@cli.group("amp")
def amp_group() -> None:
    """AMP for Email: the AMP validator that checks every amp_template part.

    \b
    Example:
      emailpers amp where || emailpers amp fetch-validator
    """


@amp_group.command("fetch-validator")
@click.option("--to", "dest", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write validator_wasm.js [default: the cache, see `emailpers amp where`].")
def amp_fetch_validator(dest: Path | None) -> None:
    """Download the AMP validator (validator_wasm.js) with npm and check its SHA-256.

    \b
    Example:
      emailpers amp fetch-validator
    """
    from emailpers.amp import VALIDATOR_PACKAGE, fetch_validator

    with _errors():
        path = fetch_validator(dest)
    click.echo(f"AMP validator from {VALIDATOR_PACKAGE} written to {path}")


@amp_group.command("where")
def amp_where() -> None:
    """Print the AMP validator file render would use (exit 1 when there is none).

    \b
    Example:
      emailpers amp where
    """
    from emailpers.amp import check_available

    with _errors():
        click.echo(check_available())


def _serve_demo(folder: Path) -> None:
    import json as json_module

    from emailpers.demo import DEMO_KEY, DEMO_TOKEN, SampleAPI, project_root, serve_copy

    with _errors():
        fixtures = json_module.loads((project_root() / "sample_data" / "api.json").read_text(encoding="utf-8"))
        api = SampleAPI(fixtures)
    with api:
        with _errors():
            campaign = serve_copy(api, folder)
        c = str(campaign)
        click.echo(f"Sample API on {api.origin} (Ctrl-C stops it); the campaign's copy, pointing there: {c}\n")
        for line in (
            f"export SHOP_API_TOKEN={DEMO_TOKEN} SHOP_API_KEY={DEMO_KEY}",
            f"emailpers render {c} --out {folder}/out",
            f"emailpers cache warm {c}",
            f"emailpers render {c} --out {folder}/offline --offline",
            f"emailpers render {c} --out {folder}/recorded --record {folder}/fixtures",
            f"emailpers check {c}",
            f"emailpers check {c} --replay {folder}/fixtures --format github",
            f"emailpers preview {c} --out {folder}/preview --open",
        ):
            click.echo(f"  {line}")
        sys.stdout.flush()
        # Its own handlers, not KeyboardInterrupt: a process started in the background of a
        # script inherits SIGINT ignored, and Python then installs no handler of its own.
        stopped = threading.Event()
        with stop_on_signals(lambda signum: stopped.set()):
            while not stopped.wait(1.0):
                pass
        click.echo("Sample API stopped.")


def _name_env_vars(group: click.Group, prefix: tuple[str, ...] = ("EMAILPERS",)) -> None:
    """auto_envvar_prefix names a variable after the parameter (`formats`,
    `as_json`); where that differs from the option a person types, name it
    after the option: EMAILPERS_RENDER_FORMAT, EMAILPERS_RENDER_JSON."""
    for name, command in group.commands.items():
        path = (*prefix, name.upper().replace("-", "_"))
        if isinstance(command, click.Group):
            _name_env_vars(command, path)
            continue
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar is None:
                flag = max(param.opts, key=len).lstrip("-").replace("-", "_").upper()
                if flag != (param.name or "").upper():
                    param.envvar = "_".join((*path, flag))


_name_env_vars(cli)


def main() -> None:
    cli(prog_name="emailpers")
