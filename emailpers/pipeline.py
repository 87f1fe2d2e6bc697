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
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from emailpers.batching import Batcher
from emailpers.cache import DEFAULT_CACHE_DIR, ResponseCache
from emailpers.campaign import Campaign
from emailpers.checks import check_campaign
from emailpers.errors import (
    EmailpersError,
    Interrupted,
    OutputError,
    RenderProcessDied,
    TooManyFailures,
    UnhealthySource,
)
from emailpers.http import HttpClient
from emailpers.manifest import Done, Manifest, fingerprint
from emailpers.output import REPORT, write_atomic
from emailpers.processes import RenderPool, environment_without, stop_on_signals
from emailpers.recipients import Preflight, Row, preflight, read_recipients
from emailpers.report import build_report
from emailpers.sources import Fetched, Fetcher, SourceStats
from emailpers.worker import Job, RenderJob, Served, init_worker, serve_chunk

DEFAULT_CONCURRENCY = 32
DEFAULT_MAX_ERROR_RATE = 0.5
HEALTH_WINDOW = 200  # a source's latest fetches judged by --max-error-rate
HEALTH_MINIMUM = 20  # fetches before the guard may judge at all
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
    workers: int | None = None  # render processes; None: one per core, 0: render in this process
    cache_dir: Path | None = None
    use_cache: bool = True
    offline: bool = False
    fresh: bool = False
    max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE  # None or 1: never stop on errors
    max_failures: int | None = None  # stop once this many recipients failed in this run
    redo: frozenset[str] = field(default_factory=frozenset)  # statuses to do again on resume


def default_workers() -> int:
    return os.cpu_count() or 1


def cache_directory(campaign: Campaign, options: RunOptions) -> Path:
    return options.cache_dir or campaign.root / DEFAULT_CACHE_DIR


def make_client(concurrency: int) -> HttpClient:
    return HttpClient(max_connections=concurrency * 2)


# -- the run ------------------------------------------------------------------------


class HealthGuard:
    """Stops the run when more than `max_error_rate` of a source's latest
    HEALTH_WINDOW network fetches failed: an API that dies at recipient 10,000
    of 200,000 stops the run as surely as one that was never up."""

    def __init__(self, max_error_rate: float | None, window: int = HEALTH_WINDOW, minimum: int = HEALTH_MINIMUM) -> None:
        self.max_error_rate = max_error_rate if max_error_rate is not None and max_error_rate < 1 else None
        self.window = window
        self.minimum = minimum
        self.recent: dict[str, deque[str | None]] = {}  # per source: None for a success, else the error
        self.failed: dict[str, int] = {}

    def check(self, name: str, result: Fetched) -> None:
        if self.max_error_rate is None or result.outcome in ("cache", "skipped") or result.shared:
            return
        recent = self.recent.setdefault(name, deque())
        error = None if result.ok else (result.error or result.outcome)
        recent.append(error)
        failed = self.failed[name] = self.failed.get(name, 0) + (error is not None)
        if len(recent) > self.window and recent.popleft() is not None:
            failed = self.failed[name] = failed - 1
        if len(recent) >= self.minimum and failed / len(recent) > self.max_error_rate:
            common = Counter(e for e in recent if e is not None).most_common(1)[0][0]
            raise UnhealthySource(
                f"source {name!r}: {failed} of its last {len(recent)} fetches failed (more than "
                f"{self.max_error_rate:.0%}); most common error: {common}. Stopped early; "
                "fix the API and run the same command again to resume"
            )


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
    ) -> None:
        self.campaign = campaign
        self.options = options
        self.progress = progress or (lambda n, resumed: None)
        # Built first: it validates every template before anything runs.
        self.job = RenderJob(campaign, options.out, options.formats) if options.out is not None else None
        self.manifest: Manifest | None = None
        self.render_queue: Batcher[Job, Served] | None = None
        self.counts: dict[str, int] = {}
        self.fatal: BaseException | None = None
        self.guard = HealthGuard(options.max_error_rate)
        self.fetcher_stats: dict[str, SourceStats] = {}
        # per source, over this run's recipients: asked for, and gave no data
        self.source_recipients: dict[str, int] = {}
        self.source_failures: dict[str, int] = {}
        self.on_disk: Done | None = None  # the manifest as read back after a failed write
        self.report: dict[str, Any] = {}
        self.preflight = Preflight(columns=(), rows=0)
        self.signal: int | None = None  # SIGINT or SIGTERM, once one asked the run to stop
        self.abandoned: list[str] = []  # ids whose render was given up: their files may exist, unrecorded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._rendering: set[asyncio.Task[None]] = set()  # tasks whose recipient is in a render process
        self._wake = asyncio.Event()  # set on a stop, and when the last task ends

    def execute(self) -> dict[str, Any]:
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
            if self.options.use_cache or self.options.offline:
                # First: an unusable cache folder stops the run before --fresh clears anything.
                cache = ResponseCache(cache_directory(self.campaign, self.options))
            if out is not None and self.job is not None:
                files = campaign_files(self.campaign, self.job.renderer.template_files)
                run = fingerprint(self.campaign.root, files, self.options.formats)
                self.manifest = Manifest(out, fresh=self.options.fresh, run=run, redo=self.options.redo)
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
        self.report = self._build_report(time.monotonic() - started, error)
        if out is not None and running:
            try:
                write_atomic(out / REPORT, (json.dumps(self.report, indent=2) + "\n").encode())
            except OSError as exc:
                error = error or OutputError(f"{out / REPORT}: cannot write the report: {exc.strerror}")
        if error is not None:
            if isinstance(error, EmailpersError) and running:
                error.report = self.report
            raise error
        return self.report

    def _build_report(self, elapsed: float, error: BaseException | None) -> dict[str, Any]:
        done = self.manifest.done if self.manifest else Done()
        counts = self.counts
        recipients, failures = dict(done.source_recipients), dict(done.source_failures)
        for name, n in self.source_recipients.items():
            recipients[name] = recipients.get(name, 0) + n
        for name, n in self.source_failures.items():
            failures[name] = failures.get(name, 0) + n
        if self.on_disk is not None:
            counts = {s: n - done.counts.get(s, 0) for s, n in self.on_disk.counts.items() if n > done.counts.get(s, 0)}
            recipients, failures = self.on_disk.source_recipients, self.on_disk.source_failures
        return build_report(
            campaign=self.campaign.name,
            counts=counts,
            previous=done.counts,
            sources=self.fetcher_stats,
            source_failures={name: (failures.get(name, 0), n) for name, n in recipients.items()},
            elapsed=elapsed,
            stopped=str(error) if isinstance(error, EmailpersError) else None,
            warm=self.job is None,
            warnings=self.preflight.warnings,
        )

    def _pool(self) -> RenderPool | None:
        workers = default_workers() if self.options.workers is None else self.options.workers
        if workers <= 0 or self.job is None:
            return None
        # Workers get the campaign without its sources: they never see a secret.
        return RenderPool(workers, init_worker, (replace(self.campaign, sources={}), self.options.out, self.options.formats))

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
        done = sum(self.counts.values())
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

            async def render_chunk(jobs: list[Job]) -> list[Served]:
                try:
                    return await loop.run_in_executor(pool.executor, serve_chunk, jobs)
                except concurrent.futures.BrokenExecutor:
                    raise RenderProcessDied(
                        "a render process died (out of memory, or killed); finished recipients are in the "
                        "manifest: run the same command again to resume, with --workers 0 to render in one process"
                    ) from None

            self.render_queue = Batcher(RENDER_CHUNK, RENDER_LINGER, render_chunk)
        async with make_client(options.concurrency) as client:
            fetcher = Fetcher(self.campaign, client, cache, offline=options.offline, concurrency=options.concurrency)
            self.fetcher_stats = fetcher.stats()
            batch_sizes = [s.batch.size for s in self.campaign.sources.values() if s.batch]
            window = asyncio.Semaphore(2 * max([options.concurrency, *batch_sizes]))
            tasks = self._tasks
            seen: set[str] = set()

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
                        self._record(row, "invalid", error=row.problem)
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
                await self._wind_down()
                self._loop = None
                self.fetcher_stats = fetcher.stats()
            if self.fatal is not None:
                raise self.fatal
            if self.signal is not None:
                raise self._interrupted(self.signal)

    def _rows(self, seen: set[str]) -> Iterator[Row]:
        """Rows still to do, with duplicate ids turned invalid. Rows an earlier
        run finished count as progress at once."""
        done = self.manifest.done if self.manifest else Done()
        for row in read_recipients(self.campaign.recipients):
            if row.problem is None and row.id is not None and row.id in seen:
                row = replace(row, problem=f"duplicate id {row.id!r} (first seen earlier in the file)")
            elif row.problem is None and row.id is not None:
                seen.add(row.id)
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
        for name, result in fetched.items():
            self.guard.check(name, result)
        data = {name: r.data for name, r in fetched.items() if r.ok}
        failures = {name: (r.error or r.outcome) for name, r in fetched.items() if not r.ok}
        if self.job is None:  # cache warm: the fetch was the whole job
            self._record(row, "failed" if failures else "warmed", fetched=fetched, error="; ".join(failures.values()) or None)
            return
        required = [n for n in failures if self.campaign.sources[n].required]
        if required:
            reason = "; ".join(f"required source {n} unavailable: {failures[n]}" for n in required)
            self._record(row, "skipped", fetched=fetched, error=reason)
            return
        job: Job = (row.id, row.email, row.fields, data, failures)
        if self.render_queue is None:
            served = self.job(*job)
        else:
            task = asyncio.current_task()
            assert task is not None
            self._rendering.add(task)
            try:
                served = await self.render_queue.submit(job)
            except BaseException:  # given up, or its process died: it may have written files
                self.abandoned.append(row.id)
                raise
        if self.fatal is not None:  # the run is stopping on an error: this recipient's files are swept, it is redone
            return
        self._count_fallbacks(served, failures, fetcher)
        self._record(row, served.status, fetched=fetched, served=served)

    def _count_fallbacks(self, served: Served, failures: dict[str, str], fetcher: Fetcher) -> None:
        if served.status != "fallback":
            return
        names = {n for block in served.fallback_blocks for n in block["sources"]} or set(failures)
        for name in names:
            if name in fetcher.sources:
                fetcher.sources[name].stats.fallbacks += 1

    def _record(
        self,
        row: Row,
        status: str,
        *,
        fetched: dict[str, Fetched] | None = None,
        served: Served | None = None,
        error: str | None = None,
    ) -> None:
        """The one place a recipient's manifest line is made."""
        entry = {
            "id": row.id,
            "email": row.email,
            "row": row.number,
            "status": status,
            "sources": {name: r.manifest() for name, r in (fetched or {}).items()},
            "fallback_blocks": served.fallback_blocks if served else [],
            "files": served.files if served else [],
            "error": served.error if served else error,
        }
        if self.manifest is not None:
            self.manifest.add(entry)
        self.counts[status] = self.counts.get(status, 0) + 1
        for name, result in (fetched or {}).items():
            self.source_recipients[name] = self.source_recipients.get(name, 0) + 1
            if not result.ok:
                self.source_failures[name] = self.source_failures.get(name, 0) + 1
        self.progress(1, False)
        limit = self.options.max_failures
        if status == "failed" and limit is not None and self.counts[status] >= limit:
            # Set at once, not when this task ends: recipients already under way record nothing more.
            self.fatal = TooManyFailures(
                f"{limit} recipients failed in this run (--max-failures {limit}); the last, {row.id!r}: "
                f"{entry['error']}. Stopped; fix the data, then run the same command with --redo failed (a fixed template needs --fresh)"
            )
            raise self.fatal


def render_campaign(campaign: Campaign, options: RunOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Render every recipient of `campaign` into `options.out`; return the report.
    Raises EmailpersError subclasses for what stops a run."""
    return _execute(Run(campaign, options, progress))


def _execute(run: Run) -> dict[str, Any]:
    """SIGINT and SIGTERM stop the run (it raises Interrupted). While it runs,
    the campaign's secrets are out of os.environ, so that no process started
    meanwhile (render processes, multiprocessing's resource tracker) has them
    in its environment."""
    with stop_on_signals(run._on_signal), environment_without(_secrets(run.campaign)):
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
    return found


def warm_cache(campaign: Campaign, options: RunOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Fetch every recipient's data into the cache, render nothing."""
    return _execute(Run(campaign, replace(options, out=None, offline=False, use_cache=True), progress))
