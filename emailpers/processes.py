"""The life of the render processes and of a run under signals.

In the main process: `stop_on_signals` turns SIGINT and SIGTERM into a stop
request (the run winds down and raises `Interrupted`), `environment_without`
keeps the campaign's secrets out of every process started meanwhile (render
processes and multiprocessing's resource tracker), and `RenderPool` starts
the render processes and ends them, with a deadline.

In a render process: `bind_to_parent` leaves SIGINT and SIGTERM to the main
process (a terminal's Ctrl-C reaches the whole process group) and makes the
process die with its parent, even after `kill -9` of the parent.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# -- in the main process ----------------------------------------------------------------


@contextmanager
def stop_on_signals(on_signal: Callable[[int], object]) -> Iterator[None]:
    """Call `on_signal(signum)` on SIGINT or SIGTERM instead of raising
    KeyboardInterrupt or dying; the previous handlers come back afterwards.
    Only the main thread can handle signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def environment_without(values: Iterable[str]) -> Iterator[None]:
    """Remove every environment variable holding one of `values` for the
    duration, then put them back. A process started meanwhile inherits an
    environment without them, and /proc/<pid>/environ shows what a process
    was started with, whatever it does later: hiding them in the child would
    be too late. Called where no other thread runs."""
    secrets = {value for value in values if value}
    hidden = {name: value for name, value in os.environ.items() if value in secrets}
    for name in hidden:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(hidden)


class _ShieldedProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that starts with SIGINT and SIGTERM blocked (a
    process inherits the signal mask, across exec too), so that a Ctrl-C
    while it boots cannot kill it with a traceback before its initializer
    ignores them. multiprocessing's resource tracker starts the same way."""

    def start(self) -> None:
        if not hasattr(signal, "pthread_sigmask"):  # Windows
            super().start()
            return
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is handled now


class _RecordingSpawn(multiprocessing.context.SpawnContext):
    """The spawn context, keeping the processes it starts so they can be ended."""

    def __init__(self) -> None:
        self.processes: list[_ShieldedProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> _ShieldedProcess:  # type: ignore[override]  # noqa: N802
        process = _ShieldedProcess(*args, **kwargs)
        self.processes.append(process)
        return process


class RenderPool:
    """A ProcessPoolExecutor of spawned render processes that can always be
    closed: `close` gives them `timeout` seconds to finish, then kills them
    (a process stuck in a render or on a queue lock would otherwise make the
    shutdown wait forever)."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
        self._context = _RecordingSpawn()
        self.executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=self._context, initializer=initializer, initargs=initargs
        )

    def close(self, timeout: float) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        pending = {process.sentinel: process for process in self._context.processes}
        deadline = time.monotonic() + timeout
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for ready in multiprocessing.connection.wait(list(pending), remaining):
                del pending[ready]  # type: ignore[arg-type]
        for process in pending.values():
            process.kill()  # the pool's own thread ends once its processes are gone
        # Wait (boundedly) for that thread: left running into interpreter exit it races
        # concurrent.futures' exit hook on its wakeup pipe, which then prints "Exception
        # ignored ... Bad file descriptor" after our one Error line (seen once in CI, under load).
        manager = getattr(self.executor, "_executor_manager_thread", None)
        if manager is not None:
            manager.join(5.0)


# -- in a render process ----------------------------------------------------------------------


def bind_to_parent() -> None:
    """Called first in a render process. SIGINT and SIGTERM are the main
    process's to handle: it ends the render processes when it is done. When
    the main process dies, this one dies too: at once through the kernel on
    Linux, else through a thread that watches the parent's end of a pipe."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the start: see _ShieldedProcess
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent.pid:  # the parent died before the line above
        os._exit(1)
    threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), name="parent-watch", daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
