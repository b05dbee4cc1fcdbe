"""Dynamic batching across concurrent requests: a bounded asyncio queue, one batcher task that gathers up to
`max_batch` images or waits at most `max_wait` seconds, one inference at a time on a dedicated thread."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


class QueueFull(Exception):
    """The queue has no room for the request now (or the service is shutting down): answer 503, retry later."""


class BatchTooLarge(Exception):
    """More images in one request than the queue ever holds: answer 413, a retry cannot succeed."""


@dataclass
class Job:
    image: np.ndarray
    source: str
    future: asyncio.Future


PredictFn = Callable[[list[np.ndarray], list[str]], Sequence[Any]]


class Batcher:
    """`submit` queues decoded images and returns their futures; the batcher task (started on first use, in the
    running loop) resolves them with `predict(images, sources)` results, in order. `on_batch(size, seconds)` is
    called after each inference (metrics)."""

    def __init__(self, predict: PredictFn, max_batch: int = 8, max_wait: float = 0.005, max_queue: int = 64,
                 on_batch: Callable[[int, float], None] | None = None):
        self.predict, self.max_batch, self.max_wait, self.max_queue = predict, max_batch, max_wait, max_queue
        self.on_batch = on_batch
        self.queue: asyncio.Queue[Job] | None = None
        self.task: asyncio.Task | None = None
        self.closing = False
        self.executor = inference_pool()

    def open(self) -> None:
        """Ready to serve again after `close`: an app run through a second lifespan (two `with TestClient(app)`
        blocks, a server restarted in one process) had answered every request 503 "shutting down". The queue and
        the task belong to the event loop of their first use, so both are made anew."""
        if self.closing:
            self.closing, self.queue, self.task = False, None, None
            self.executor = inference_pool()

    @property
    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def _started(self) -> asyncio.Queue[Job]:
        if self.queue is None:
            self.queue = asyncio.Queue(self.max_queue)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="edgekd-batcher")
        return self.queue

    def check_room(self, n: int = 1) -> None:
        """QueueFull (or BatchTooLarge) unless `n` more images fit now: a request is refused before its upload is
        read and decoded, not after."""
        if self.closing:
            raise QueueFull("the service is shutting down")
        if n > self.max_queue:
            raise BatchTooLarge(f"{n} images in one request, more than the queue holds (--max-queue {self.max_queue}):"
                                f" send at most {self.max_queue} per request")
        waiting = self.depth
        room = self.max_queue - waiting
        if room < n:
            raise QueueFull(f"the queue is full ({waiting} of {self.max_queue} images waiting)" if room <= 0 else
                            f"the queue has room for {room} of the {n} images of this request ({waiting} of "
                            f"{self.max_queue} waiting)")

    def submit(self, items: Sequence[tuple[np.ndarray, str]]) -> list[asyncio.Future]:
        """Queue all of `items` or none: QueueFull when the queue lacks room for them now or the service is
        closing, BatchTooLarge when they could never fit."""
        self.check_room(len(items))  # first: a submit after close had started a batcher task nothing stopped
        queue = self._started()
        loop = asyncio.get_running_loop()
        futures = []
        for image, source in items:
            futures.append(loop.create_future())
            queue.put_nowait(Job(image, source, futures[-1]))
        return futures

    async def _gather(self, queue: asyncio.Queue[Job]) -> list[Job]:
        """The next batch: the first job, then whatever else arrives within max_wait, up to max_batch."""
        loop = asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        queue = self.queue
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(queue)
            live = [job for job in batch if not job.future.done()]  # a client that went away is skipped
            try:
                if live:
                    start = loop.time()
                    results = await loop.run_in_executor(self.executor, self.predict, [j.image for j in live],
                                                         [j.source for j in live])
                    if self.on_batch is not None:
                        self.on_batch(len(live), loop.time() - start)
                    if len(results) != len(live):  # a short list had left the rest waiting for ever
                        raise RuntimeError(f"the model gave {len(results)} results for {len(live)} images")
                    for job, result in zip(live, results):
                        if not job.future.done():
                            job.future.set_result(result)
            except Exception as err:  # the model failed: every request of this batch gets the error, the rest go on
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                for _ in batch:
                    queue.task_done()

    async def close(self) -> None:
        """Refuse new work, let the queued jobs finish, stop the task and the inference thread."""
        self.closing = True
        if self.queue is not None and self.task is not None and not self.task.done():
            await self.queue.join()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self.executor.shutdown, True)  # not on the event loop: it waits for the inference


def inference_pool() -> ThreadPoolExecutor:
    """One inference at a time: a compiled model's infer request is not thread-safe, and the backend's own threads
    (the runner's `threads`) already use the cores."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekd-infer")
