"""Group single requests into batches: a batch leaves when it is full, or after
a short linger when items arrive slowly. Used for batched API sources and for
handing recipients to the render processes in chunks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """`await submit(item)` returns that item's result; `send` gets a whole
    batch and returns one result per item, in order. An exception from `send`
    goes to every item of its batch."""

    def __init__(self, size: int, linger: float, send: Callable[[list[Item]], Awaitable[list[Result]]]) -> None:
        self.size = size
        self.linger = linger
        self.send = send
        self._items: list[Item] = []
        self._futures: list[asyncio.Future[Result]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        if len(self._items) >= self.size:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self.flush)
        return await future

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        task = asyncio.ensure_future(self._send(items, futures))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, items: list[Item], futures: list[asyncio.Future[Result]]) -> None:
        try:
            results = await self.send(items)
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancelled: stay cancelled; an error lives on in the futures
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)
