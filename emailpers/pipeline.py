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
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emailpers.batching import Batcher
from emailpers.cache import DEFAULT_CACHE_DIR, ResponseCache
from emailpers.campaign import Campaign
from emailpers.checks import check_campaign
from emailpers.errors import RenderProcessDied, UnhealthySource
from emailpers.http import HttpClient
from emailpers.output import REPORT, Done, Manifest, write_atomic
from emailpers.recipients import Row, columns, read_recipients
from emailpers.report import build_report
from emailpers.sources import Fetched, Fetcher, SourceStats
from emailpers.worker import Job, RenderJob, Served, init_worker, serve_chunk

DEFAULT_CONCURRENCY = 32
HEALTH_WINDOW = 200  # first fetches of a source judged by --max-error-rate
HEALTH_MINIMUM = 20  # fetches before the guard may judge at all
# Recipients go to the render processes in chunks: one pickle and one pipe
# round trip for many. Per recipient, that overhead was ~0.2 ms of the main
# process's time, which is the bottleneck of a run.
RENDER_CHUNK = 32
RENDER_LINGER = 0.005


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
    max_error_rate: float | None = None


def default_workers() -> int:
    return os.cpu_count() or 1


def cache_directory(campaign: Campaign, options: RunOptions) -> Path:
    return options.cache_dir or campaign.root / DEFAULT_CACHE_DIR


def make_client(concurrency: int) -> HttpClient:
    return HttpClient(max_connections=concurrency * 2)


# -- the run ------------------------------------------------------------------------


class _HealthGuard:
    def __init__(self, max_error_rate: float | None) -> None:
        self.max_error_rate = max_error_rate
        self.seen: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def check(self, name: str, result: Fetched, fetcher: Fetcher) -> None:
        if self.max_error_rate is None or result.outcome in ("cache", "skipped") or result.shared:
            return
        seen = self.seen.get(name, 0)
        if seen >= HEALTH_WINDOW:
            return
        self.seen[name] = seen = seen + 1
        failed = self.failed[name] = self.failed.get(name, 0) + (0 if result.ok else 1)
        if seen >= HEALTH_MINIMUM and failed / seen > self.max_error_rate:
            kinds = fetcher.sources[name].stats.error_kinds
            common = max(kinds, key=kinds.__getitem__) if kinds else "unknown"
            raise UnhealthySource(
                f"source {name!r}: {failed} of its first {seen} fetches failed (more than "
                f"{self.max_error_rate:.0%}); most common error: {common}. Stopped early; "
                "fix the API and run the same command again to resume"
            )


class Run:
    def __init__(
        self,
        campaign: Campaign,
        options: RunOptions,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.campaign = campaign
        self.options = options
        self.progress = progress or (lambda n: None)
        # Built first: it validates every template before anything runs.
        self.job = RenderJob(campaign, options.out, options.formats) if options.out is not None else None
        check_campaign(campaign, columns(campaign.recipients), self.job.renderer if self.job else None)
        self.manifest: Manifest | None = None
        self.render_queue: Batcher[Job, Served] | None = None
        self.counts: dict[str, int] = {}
        self.fatal: BaseException | None = None
        self.guard = _HealthGuard(options.max_error_rate)
        self.fetcher_stats: dict[str, SourceStats] = {}
        self.report: dict[str, Any] = {}

    def execute(self) -> dict[str, Any]:
        out = self.options.out
        self.manifest = Manifest(out, fresh=self.options.fresh) if out is not None else None
        cache = None
        if self.options.use_cache or self.options.offline:
            cache = ResponseCache(cache_directory(self.campaign, self.options))
        started = time.monotonic()
        stopped = None
        pool = self._pool()
        try:
            asyncio.run(self._run(cache, pool))
        except UnhealthySource as exc:
            stopped = str(exc)
            raise
        finally:
            if self.manifest is not None:
                self.manifest.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if cache is not None:
                cache.close()
            report = build_report(
                campaign=self.campaign.name,
                counts=self.counts,
                previous=self.manifest.done.counts if self.manifest else {},
                sources=self.fetcher_stats,
                elapsed=time.monotonic() - started,
                stopped=stopped,
            )
            self.report = report
            if out is not None:
                write_atomic(out / REPORT, (json.dumps(report, indent=2) + "\n").encode())
        return report

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor | None:
        workers = default_workers() if self.options.workers is None else self.options.workers
        if workers <= 0 or self.job is None:
            return None
        # Workers get the campaign without its sources: they never see a secret.
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,  # type: ignore[arg-type]  # typeshed cannot tie initargs to it
            initargs=(replace(self.campaign, sources={}), self.options.out, self.options.formats),  # type: ignore[arg-type]
        )

    async def _run(self, cache: ResponseCache | None, pool: concurrent.futures.Executor | None) -> None:
        options = self.options
        if pool is not None:
            loop = asyncio.get_running_loop()

            async def render_chunk(jobs: list[Job]) -> list[Served]:
                try:
                    return await loop.run_in_executor(pool, serve_chunk, jobs)
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
            tasks: set[asyncio.Task[None]] = set()
            seen: set[str] = set()

            def finished(task: asyncio.Task[None]) -> None:
                tasks.discard(task)
                window.release()
                if not task.cancelled() and task.exception() is not None and self.fatal is None:
                    self.fatal = task.exception()

            try:
                for row in self._rows(seen):
                    if row.problem is not None:
                        self._record(row, "invalid", error=row.problem)
                        continue
                    await window.acquire()
                    if self.fatal is not None:
                        break
                    task = asyncio.create_task(self._serve(row, fetcher))
                    tasks.add(task)
                    task.add_done_callback(finished)
                while tasks and self.fatal is None:
                    await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.fetcher_stats = fetcher.stats()
            if self.fatal is not None:
                raise self.fatal

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
                self.progress(1)
            else:
                yield row

    async def _serve(self, row: Row, fetcher: Fetcher) -> None:
        assert row.id is not None and row.email is not None
        fetched = await fetcher.fetch_all(row.fields)
        for name, result in fetched.items():
            self.guard.check(name, result, fetcher)
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
        served = self.job(*job) if self.render_queue is None else await self.render_queue.submit(job)
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
        self.progress(1)


def render_campaign(
    campaign: Campaign, options: RunOptions, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Render every recipient of `campaign` into `options.out`; return the report.
    Raises EmailpersError subclasses for what stops a run."""
    return Run(campaign, options, progress).execute()



def warm_cache(
    campaign: Campaign, options: RunOptions, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Fetch every recipient's data into the cache, render nothing."""
    return Run(campaign, replace(options, out=None, offline=False, use_cache=True), progress).execute()
