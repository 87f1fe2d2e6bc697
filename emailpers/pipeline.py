"""Wire the stages: recipients -> sources -> render -> output -> report.

The event loop streams recipients and runs their fetches concurrently; the
CPU-bound part (Jinja, MJML, building the .eml) runs in a pool of render
processes so both cores work while the next recipients' data is in flight.
The main process alone writes the manifest, after each recipient's files are
whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from emailpers import amp
from emailpers.backend import SharedBackend
from emailpers.batching import Batcher
from emailpers.cache import DEFAULT_CACHE_DIR, ResponseCache
from emailpers.campaign import Campaign
from emailpers.checks import check_campaign
from emailpers.compose import Composer, compose_chunk, init_process
from emailpers.errors import EmailpersError, Interrupted, OutputError, RenderProcessDied
from emailpers.fetch import Fetched, Fetcher
from emailpers.fixtures import LoggingClient, RecordingClient, ReplayClient
from emailpers.flat import FirstSeen
from emailpers.http import HttpClient
from emailpers.manifest import Done, Manifest, fingerprint
from emailpers.outcome import Outcome, RenderRequest, RenderResult, SourceResult, decide
from emailpers.output import REPORT, write_atomic
from emailpers.pacing import REAL_TIMING, Timing
from emailpers.processes import RenderPool, environment_without, stop_on_signals
from emailpers.recipients import Preflight, Row, preflight, read_recipients
from emailpers.report import Report, SourceFigures, build_report
from emailpers.shards import Shard
from emailpers.tally import HealthGuard, Tally, error_of, judged
from emailpers.unsubscribe import unsubscribe_token

# A ceiling: each source's limit adapts below it (limits.py). High enough for an
# API at 200-500 ms to be kept busy: at 32, a run at 200 ms made a fifth of its rate at 256.
DEFAULT_CONCURRENCY = 256
DEFAULT_MAX_ERROR_RATE = 0.5
# Recipients go to the render processes in chunks: one pickle and one pipe
# round trip for many: per recipient, that overhead was a real share of the
# main process's time, which is the bottleneck of a run (README, Performance).
RENDER_CHUNK = 32
RENDER_LINGER = 0.005
# After a stop (a signal, an error), recipients already in a render process
# get this long to finish and be recorded; the pool's processes then get this
# long to exit before they are killed. A supervisor sends SIGKILL ~10 s after
# SIGTERM (docker stop, systemd's default is 90 s).
STOP_GRACE = 3.0


@dataclass(frozen=True)
class RunOptions:
    out: Path | None  # None: fetch only (cache warm), nothing rendered or written
    formats: str = "eml"
    concurrency: int = DEFAULT_CONCURRENCY
    adaptive: bool = True  # False: every source at its ceiling, as before
    workers: int | None = None  # render processes; None: one per core, 0: render in this process
    cache_dir: Path | None = None
    use_cache: bool = True
    offline: bool = False
    fresh: bool = False
    max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE  # None or 1: never stop on errors
    max_failures: int | None = None  # stop once this many recipients failed in this run
    redo: frozenset[str] = field(default_factory=frozenset)  # statuses to do again on resume
    # Fixtures (emailpers.fixtures): save every answer into this folder, or answer
    # from it with no network. Either way the cache is neither read nor written.
    record: Path | None = None
    replay: Path | None = None
    log_request: Callable[[str], None] | None = None  # -v: a line per request (method, URL, status, time) and limit change
    shard: Shard | None = None  # do only this shard's recipients (shards.py)
    backend: str | None = None  # redis://...: share cache, limits, token, dedupe and guard with other shards

    @property
    def reads_cache(self) -> bool:
        """Whether answers come from, and go to, the cache (on disk, or the backend's)."""
        return (self.use_cache or self.offline) and self.record is None and self.replay is None


def default_workers() -> int:
    return os.cpu_count() or 1


def cache_directory(campaign: Campaign, options: RunOptions) -> Path:
    return options.cache_dir or campaign.root / DEFAULT_CACHE_DIR


def make_client(concurrency: int) -> HttpClient:
    return HttpClient(max_connections=concurrency * 2)


def run_client(options: RunOptions) -> HttpClient:
    """The run's client: the network, the network with every answer recorded, or the fixtures."""
    if options.replay is not None:
        client: HttpClient = ReplayClient(options.replay)
    else:
        client = make_client(options.concurrency)
        client = RecordingClient(client, options.record) if options.record is not None else client
    return LoggingClient(client, options.log_request) if options.log_request is not None else client


# -- the run ------------------------------------------------------------------------


def source_result(fetched: Fetched) -> SourceResult:
    """What the outcome keeps of a fetch: everything but the data."""
    return SourceResult(fetched.outcome, fetched.attempts, fetched.ms, fetched.status_code, fetched.error, fetched.shared)


_MJ_INCLUDE = re.compile(r"""<mj-include\b[^>]*?\bpath\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def campaign_files(campaign: Campaign, templates: set[Path]) -> list[Path]:
    """The campaign file, every Jinja template it uses (`templates`), and the
    files they name in <mj-include> (read statically: MJML resolves them after
    Jinja, inside the campaign folder)."""
    found = set(templates)
    pending = list(templates)
    while pending:
        text = pending.pop().read_text(encoding="utf-8", errors="replace")
        for name in _MJ_INCLUDE.findall(text):
            path = (campaign.root / name).resolve()
            if path not in found and path.is_relative_to(campaign.root) and path.is_file():
                found.add(path)
                pending.append(path)
    return [campaign.path, *sorted(found)]


Progress = Callable[[int, bool], None]  # (recipients, whether an earlier run had done them)


class Run:
    def __init__(
        self,
        campaign: Campaign,
        options: RunOptions,
        progress: Progress | None = None,
        *,
        timing: Timing = REAL_TIMING,
    ) -> None:
        self.campaign = campaign
        self.options = options
        self.timing = timing
        self.progress = progress or (lambda n, resumed: None)
        # Built first: it validates every template before anything runs.
        self.job = Composer(campaign, options.out, options.formats) if options.out is not None else None
        self.required = [name for name, source in campaign.sources.items() if source.required]
        self.manifest: Manifest | None = None
        self.render_queue: Batcher[RenderRequest, RenderResult] | None = None
        self.tally = Tally(HealthGuard(options.max_error_rate), options.max_failures)
        self.fatal: BaseException | None = None
        self.network: dict[str, SourceFigures] = {}  # the fetcher's counters, as the run ended
        self.on_disk: Done | None = None  # the manifest as read back after a failed write
        self.preflight = Preflight(columns=(), rows=0)
        self.signal: int | None = None  # SIGINT or SIGTERM, once one asked the run to stop
        self.abandoned: list[str] = []  # ids whose render was given up: their files may exist, unrecorded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._rendering: set[asyncio.Task[None]] = set()  # tasks whose recipient is in a render process
        self._wake = asyncio.Event()  # set on a stop, and when the last task ends
        self.shared: SharedBackend | None = None  # --backend: what every shard shares

    def execute(self) -> Report:
        """Run, then always: close, sweep what a stop left unlisted, report.
        Raises the error that stopped the run (the first one), its report attached."""
        out = self.options.out
        # The whole list is read first: a list that cannot be trusted stops the run
        # before anything is fetched or written (not even the output folder).
        self.preflight = preflight(self.campaign.recipients)
        # Then the names the templates and URLs read, against the list's columns.
        check_campaign(self.campaign, self.preflight.columns, self.job.renderer if self.job else None)
        started = time.monotonic()
        error: BaseException | None = None
        cache = pool = None
        running = False  # past the checks that keep a run from starting: from here on, a report
        try:
            if self.options.backend is not None:
                # Before anything is written: a backend that is not there stops the run at once (exit 1).
                from emailpers.redis_backend import check_reachable

                check_reachable(self.options.backend)
            elif self.options.reads_cache:
                # First: an unusable cache folder stops the run before --fresh clears anything.
                cache = ResponseCache(cache_directory(self.campaign, self.options), clock=self.timing.wall_clock)
            if out is not None and self.job is not None:
                files = campaign_files(self.campaign, self.job.renderer.template_files)
                run = fingerprint(self.campaign.root, files, self.options.formats)
                self.manifest = Manifest(
                    out, fresh=self.options.fresh, run=run, redo=self.options.redo, shard=self.options.shard
                )
            pool = self._pool()
            running = True
            asyncio.run(self._run(cache, pool))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the report
            error = exc
        if pool is not None:
            pool.close(0 if self.abandoned else STOP_GRACE)
        if cache is not None:
            cache.close()
        if self.manifest is not None:
            try:
                self.manifest.close()
            except OutputError as exc:
                error = error or exc
            if error is not None:
                on_disk = self.manifest.sweep()  # files of recipients in flight at the stop, whose lines were never written
                if self.manifest.broken:  # report what the manifest holds, not what was meant for it
                    self.on_disk = on_disk
        report = self._build_report(time.monotonic() - started, error)
        if out is not None and running:
            shard = self.options.shard
            path = out / REPORT if shard is None else shard.report(out)
            # A shard's report carries its exit code: `emailpers status` totals the shards.
            extra = {} if shard is None else {"shard": str(shard), "exit_code": report.exit_code}
            try:
                write_atomic(path, (json.dumps({**report.to_json(), **extra}, indent=2) + "\n").encode())
            except OSError as exc:
                if error is None:  # the run's exit code is this error's now
                    error = OutputError(f"{path}: cannot write the report: {exc.strerror}")
                    report = replace(report, stop_code=error.exit_code)
        if error is not None:
            if isinstance(error, EmailpersError) and running:
                error.report = report
            raise error
        return report

    def _build_report(self, elapsed: float, error: BaseException | None) -> Report:
        done = self.manifest.done if self.manifest else Done()
        tally = self.tally
        counts: dict[str, int] = dict(tally.counts)
        recipients, failures = dict(done.source_recipients), dict(done.source_failures)
        for name, n in tally.source_recipients.items():
            recipients[name] = recipients.get(name, 0) + n
        for name, n in tally.source_failures.items():
            failures[name] = failures.get(name, 0) + n
        if self.on_disk is not None:
            counts = {s: n - done.counts.get(s, 0) for s, n in self.on_disk.counts.items() if n > done.counts.get(s, 0)}
            recipients, failures = self.on_disk.source_recipients, self.on_disk.source_failures
        stopped = error if isinstance(error, EmailpersError) else None
        return build_report(
            campaign=self.campaign.name,
            counts=counts,
            previous=done.counts,
            sources={name: stats.snapshot(tally.fallbacks[name]) for name, stats in self.network.items()},
            source_failures={name: (failures.get(name, 0), n) for name, n in recipients.items()},
            elapsed=elapsed,
            stopped=str(stopped) if stopped else None,
            stop_code=stopped.exit_code if stopped else None,
            warm=self.job is None,
            warnings=self.preflight.warnings,
            amp=(self.tally.amp, done.amp) if self.campaign.amp else None,
        )

    def _pool(self) -> RenderPool | None:
        workers = default_workers() if self.options.workers is None else self.options.workers
        if workers <= 0 or self.job is None:
            return None
        # Workers get the campaign without its sources: they never see a secret.
        # Render processes get the campaign without its secrets: no sources (credentials), no
        # unsubscribe signing key and no AMP link key (the main process signs each recipient's tokens).
        unsubscribe, amp_config = self.campaign.unsubscribe, self.campaign.amp
        campaign = replace(
            self.campaign,
            sources={},
            unsubscribe=replace(unsubscribe, key=b"") if unsubscribe else None,
            amp=replace(amp_config, key=b"") if amp_config else None,
        )
        return RenderPool(workers, init_process, (campaign, self.options.out, self.options.formats))

    # -- stopping ---------------------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self.fatal is not None or self.signal is not None

    def _on_signal(self, signum: int) -> None:
        """SIGINT or SIGTERM, in the main thread between two bytecodes: note
        it, and let the event loop (if one runs) stop the run."""
        if self.signal is None:
            self.signal = signum
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _stop(self) -> None:
        """Stop taking recipients. Fetches in flight are abandoned at once:
        nothing of theirs is on disk yet."""
        for task in self._tasks - self._rendering:
            task.cancel()
        self._wake.set()

    async def _wind_down(self) -> None:
        """End the run's tasks. Recipients already in a render process get
        STOP_GRACE seconds to finish and be recorded, then are abandoned too."""
        for task in self._tasks - self._rendering:
            task.cancel()
        if self._rendering:
            await asyncio.wait(set(self._rendering), timeout=STOP_GRACE)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _interrupted(self, signum: int) -> Interrupted:
        done = self.tally.recipients
        return Interrupted(
            signum,
            f"Interrupted by {signal.Signals(signum).name}: the {done} recipients finished this run are in the "
            "manifest; run the same command to resume",
        )

    # -- the event loop ------------------------------------------------------------------

    async def _run(self, cache: ResponseCache | None, pool: RenderPool | None) -> None:
        options = self.options
        self._loop = asyncio.get_running_loop()
        if pool is not None:
            loop = self._loop

            async def render_chunk(requests: list[RenderRequest]) -> list[RenderResult]:
                try:
                    return await loop.run_in_executor(pool.executor, compose_chunk, requests)
                except concurrent.futures.BrokenExecutor:
                    raise RenderProcessDied(
                        "a render process died (out of memory, or killed); finished recipients are in the "
                        "manifest: run the same command again to resume, with --workers 0 to render in one process"
                    ) from None

            self.render_queue = Batcher(RENDER_CHUNK, RENDER_LINGER, render_chunk)
        backend: SharedBackend | None = None
        if options.backend is not None:
            from emailpers.redis_backend import RedisBackend

            backend = await RedisBackend.connect(options.backend, self.campaign.name, self.tally.guard.max_error_rate)
            self.shared = backend
        store = backend.cache if backend is not None and options.reads_cache else cache
        async with run_client(options) as client:
            fetcher = Fetcher(
                self.campaign, client, store, offline=options.offline, concurrency=options.concurrency,
                adaptive=options.adaptive, timing=self.timing, backend=backend, log_limit=options.log_request,
            )  # fmt: skip
            batch_sizes = [s.batch.size for s in self.campaign.sources.values() if s.batch]
            window = asyncio.Semaphore(2 * max([options.concurrency, *batch_sizes]))
            tasks = self._tasks
            seen = FirstSeen()  # flat in memory at any N: flat.py

            def finished(task: asyncio.Task[None]) -> None:
                tasks.discard(task)
                self._rendering.discard(task)
                window.release()
                if not task.cancelled() and task.exception() is not None and self.fatal is None:
                    self.fatal = task.exception()
                    self._stop()
                if not tasks:
                    self._wake.set()

            try:
                for row in self._rows(seen):
                    if self._stopping:
                        break
                    if row.problem is not None:
                        invalid = decide(row)
                        assert invalid is not None  # a row with a problem is invalid, before anything else
                        self._record(invalid)
                        continue
                    await window.acquire()
                    if self._stopping:
                        break
                    task = asyncio.create_task(self._serve(row, fetcher))
                    tasks.add(task)
                    task.add_done_callback(finished)
                while tasks and not self._stopping:
                    self._wake.clear()
                    await self._wake.wait()
            finally:
                seen.close()
                await self._wind_down()
                self._loop = None
                self.network = fetcher.stats()  # read at the report, whatever ends the run
                if backend is not None:
                    await backend.close()
            if self.fatal is not None:
                raise self.fatal
            if self.signal is not None:
                raise self._interrupted(self.signal)

    def _rows(self, seen: FirstSeen) -> Iterator[Row]:
        """Rows still to do, with duplicate ids turned invalid. Rows an earlier
        run finished count as progress at once."""
        done = self.manifest.done if self.manifest else Done()
        shard = self.options.shard
        for row in read_recipients(self.campaign.recipients):
            # Every copy of an id hashes to the same shard, so duplicates are still found.
            if shard is not None and not (shard.owns(row.id) if row.id is not None else shard.owns_row(row.number)):
                self.progress(1, True)  # another shard's: behind us, like a resumed row (the bar counts the file)
                continue
            if row.problem is None and row.id is not None and seen.first(row.id) is not None:
                row = replace(row, problem=f"duplicate id {row.id!r} (first seen earlier in the file)")
            finished = row.number in done.invalid_rows if row.problem is not None else row.id in done.ids
            if finished:
                self.progress(1, True)
            else:
                yield row

    async def _serve(self, row: Row, fetcher: Fetcher) -> None:
        assert row.id is not None and row.email is not None
        if self.fatal is not None:
            return
        fetched = await fetcher.fetch_all(row.fields)
        results = {name: source_result(r) for name, r in fetched.items()}
        if self.shared is None:
            self.tally.fetched(results)
        else:  # the window every shard shares judges, instead of this run's own: an outage stops them all
            for name, result in results.items():
                if judged(result):
                    await self.shared.guard.check(name, error_of(result))
        if self.job is None:  # cache warm: the fetch was the whole job
            self._record(decide(row, results, warm=True))
            return
        outcome = decide(row, results, required=self.required)
        if outcome is not None:  # not to be rendered
            self._record(outcome)
            return
        data = {name: r.data for name, r in fetched.items() if r.ok}
        failures = {name: r.reason for name, r in results.items() if not r.ok}
        unsubscribe = self.campaign.unsubscribe
        token = unsubscribe_token(unsubscribe, self.campaign.name, row.id, row.email) if unsubscribe else None
        link = amp.link_for(self.campaign, row.id, self.timing.wall_clock())
        request = RenderRequest(row.id, row.email, row.fields, data, failures, token, link)
        if self.render_queue is None:
            rendered = self.job(request)
        else:
            task = asyncio.current_task()
            assert task is not None
            self._rendering.add(task)
            try:
                rendered = await self.render_queue.submit(request)
            except BaseException:  # given up, or its process died: it may have written files
                self.abandoned.append(row.id)
                raise
        if self.fatal is not None:  # the run is stopping on an error: this recipient's files are swept, it is redone
            return
        self._record(decide(row, results, required=self.required, render=rendered))

    def _record(self, outcome: Outcome) -> None:
        """The one place a recipient's manifest line is made and counted."""
        if self.manifest is not None:
            self.manifest.add(outcome.manifest_line())
        self.progress(1, False)
        try:
            self.tally.add(outcome)
        except EmailpersError as exc:
            # Set at once, not when this task ends: recipients already under way record nothing more.
            self.fatal = self.fatal or exc
            raise


def render_campaign(
    campaign: Campaign, options: RunOptions, progress: Progress | None = None, *, timing: Timing = REAL_TIMING
) -> Report:
    """Render every recipient of `campaign` into `options.out`; return the report.
    Raises EmailpersError subclasses for what stops a run. `timing`: the clocks,
    sleep and random source the fetches read (a test passes fake ones)."""
    return _execute(Run(campaign, options, progress, timing=timing))


def _execute(run: Run) -> Report:
    """SIGINT and SIGTERM stop the run (it raises Interrupted). While it runs,
    the campaign's secrets are out of os.environ, so that no process started
    meanwhile (render processes, multiprocessing's resource tracker) has them
    in its environment."""
    # The backend URL may carry Redis's password; the render processes need neither.
    backend = [run.options.backend] if run.options.backend else []
    with stop_on_signals(run._on_signal), environment_without([*_secrets(run.campaign), *backend]):
        return run.execute()


def _secrets(campaign: Campaign) -> list[str]:
    """Every credential value of the campaign: the Auth fields kept out of repr()."""
    found: list[str] = []
    for source in campaign.sources.values():
        for f in dataclasses.fields(source.auth) if source.auth is not None else ():
            if f.repr:
                continue
            value = getattr(source.auth, f.name)
            # secret_token_params: (name, value) pairs
            found += [v for _, v in value] if isinstance(value, tuple) else [value]
    if campaign.unsubscribe is not None:
        found.append(campaign.unsubscribe.key.decode(errors="replace"))
    if campaign.amp is not None and campaign.amp.key:
        found.append(campaign.amp.key.decode(errors="replace"))
    return found


def warm_cache(
    campaign: Campaign, options: RunOptions, progress: Progress | None = None, *, timing: Timing = REAL_TIMING
) -> Report:
    """Fetch every recipient's data into the cache, render nothing."""
    options = replace(options, out=None, offline=False, use_cache=True)
    return _execute(Run(campaign, options, progress, timing=timing))
