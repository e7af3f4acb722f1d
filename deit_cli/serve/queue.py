"""The dynamic batching queue: images from every client wait here, and one worker runs
them through the model together.

    queue = BatchQueue(run, max_batch_size=32, max_delay_ms=5, max_queue=256)
    await queue.start()
    done = await queue.infer([x1, x2], timeout=30)  # [Done(result, queue_s, inference_s, batch_size)]
    await queue.stop()                              # runs what is queued, then ends

`run(items) -> results` (one result per item, in order) runs in one inference thread,
off the event loop. The worker takes up to `max_batch_size` items: all that wait, and
while more are on their way (`announce`d by requests still decoding their images) it
waits for them, until its oldest item has waited `max_delay_ms`. With nothing on its way
(an idle server, or one client at a time) a batch runs at once: the delay is only ever
spent where there is company to wait for. Items pile up while a batch runs, so the next
batch takes them all. At most `max_queue` items wait or are announced: past that
`announce`/`submit` raise QueueFull at once, so memory stays bounded however many
clients push. No HTTP here: the queue is tested on its own.

    ticket = queue.announce(2)            # QueueFull now, before any decoding
    xs = decode(...)                      # meanwhile the worker waits for these two
    done = await queue.infer(xs, ticket=ticket)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchQueue", "Done", "QueueClosed", "QueueFull", "QueueTimeout", "Ticket"]


class QueueFull(Exception):
    """More items than the queue holds; try again after `retry_after` seconds."""

    def __init__(self, depth: int, limit: int, retry_after: int):
        super().__init__(f"the queue is full ({depth} of {limit} images waiting)")
        self.retry_after = retry_after


class QueueTimeout(Exception):
    """The items were not done within the request's timeout (those still queued are dropped)."""


class QueueClosed(Exception):
    """The queue is shutting down and takes no new items."""


@dataclass(frozen=True)
class Done:
    """One item's result and what it cost."""

    result: Any
    queue_s: float  # from submit to the start of its batch
    inference_s: float  # its batch's run time
    batch_size: int  # how many items ran in its batch


class Ticket:
    """Room held in the queue for items on their way (see BatchQueue.announce)."""

    def __init__(self, queue: BatchQueue, n: int) -> None:
        self._queue, self.n, self._held = queue, n, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._queue._incoming -= self.n
            if self._queue._wakeup is not None:
                self._queue._wakeup.set()  # a waiting batch need not wait for these any more


@dataclass
class _Entry:
    item: Any
    future: asyncio.Future
    enqueued: float


class BatchQueue:
    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int, list[float], float], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_delay_ms < 0:
            raise ValueError("max_delay_ms must not be negative")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # (batch size, each item's queue seconds, inference seconds)
        self._pending: deque[_Entry] = deque()
        self._waiting = 0  # items in _pending whose future is not done
        self._incoming = 0  # items announced but not submitted yet
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = executor
        self._own_executor = executor is None
        self._closed = False
        self._last_inference_s = 0.0
        self.batches = 0  # batches run so far
        self.items = 0  # items run so far

    # ------------------------------------------------------------------ the small API

    @property
    def depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return self._waiting

    async def start(self) -> None:
        if self._worker is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="deit-inference")
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="deit-batching")

    def check_room(self, n: int) -> None:
        """Raise QueueFull if `n` more items would not fit now (to refuse before any work)."""
        if self._waiting + self._incoming + n > self.max_queue:
            raise QueueFull(self._waiting + self._incoming, self.max_queue, self.retry_after())

    def announce(self, n: int) -> Ticket:
        """Hold room for `n` items that are on their way (QueueFull if there is none); the
        worker waits for them (up to max_delay_ms). Pass the ticket to `submit`/`infer`,
        or `release()` it if they never come."""
        if self._closed or self._worker is None:
            raise QueueClosed("the server is shutting down")
        self.check_room(n)
        self._incoming += n
        return Ticket(self, n)

    def submit(self, items: Sequence[Any], ticket: Ticket | None = None) -> list[asyncio.Future]:
        """Queue `items` (all or none); one future per item, resolving to a Done."""
        if ticket is not None:
            ticket.release()
        if self._closed or self._worker is None:
            raise QueueClosed("the server is shutting down")
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for item in items:
            fut = loop.create_future()
            fut.add_done_callback(self._forget)
            self._pending.append(_Entry(item, fut, now))
            futures.append(fut)
        self._waiting += len(items)
        self._wakeup.set()
        return futures

    async def infer(
        self, items: Sequence[Any], timeout: float | None = None, ticket: Ticket | None = None
    ) -> list[Done]:
        """Submit `items` and wait for all of them, at most `timeout` seconds (QueueTimeout)."""
        futures = self.submit(items, ticket)
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()  # still queued: never run; already running: result dropped
            raise QueueTimeout(f"not done within {timeout:g} s") from None
        for d in done:
            if isinstance(d, BaseException):
                raise d
        return done

    async def stop(self) -> None:
        """Take no more items, finish the queued ones, end the worker."""
        self._closed = True
        if self._worker is None:
            return
        self._wakeup.set()
        await self._worker
        self._worker = None
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ the worker

    def _forget(self, fut: asyncio.Future) -> None:
        # A future is done when its batch ends or when its request gave up (cancelled);
        # either way it no longer counts against the queue's bound once it left _pending.
        if fut.cancelled():
            self._prune()

    def _prune(self) -> None:
        self._waiting = sum(1 for e in self._pending if not e.future.done())

    def retry_after(self) -> int:
        """Seconds until the queue has drained at the last batch's pace (at least 1)."""
        batches = math.ceil(self._waiting / self.max_batch_size)
        return max(1, math.ceil(batches * self._last_inference_s))

    def _take(self, batch: list[_Entry]) -> None:
        while self._pending and len(batch) < self.max_batch_size:
            entry = self._pending.popleft()
            if not entry.future.done():  # a request that timed out left its items behind
                batch.append(entry)
        self._prune()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch: list[_Entry] = []
            self._take(batch)
            if not batch:
                continue
            if self._incoming and len(batch) < self.max_batch_size:
                # Company is on its way: wait for it, until the oldest item has waited max_delay.
                deadline = batch[0].enqueued + self.max_delay
                while self._incoming and len(batch) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except asyncio.TimeoutError:
                        break
                    self._take(batch)
            await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry]) -> None:
        start = time.monotonic()
        try:
            results = await loop.run_in_executor(self._executor, self.run, [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - the requests in this batch get the error
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            results = None
        end = time.monotonic()
        self._last_inference_s = end - start
        self.batches += 1
        self.items += len(batch)
        n = len(batch)
        waits = [start - e.enqueued for e in batch]
        if results is not None:
            for e, r, w in zip(batch, results, waits):
                if not e.future.done():
                    e.future.set_result(Done(r, w, end - start, n))
        if self.on_batch is not None:
            self.on_batch(n, waits, end - start)
