"""Continuous batching over ``@serve.batch`` groups: requests join the running batch between
decode steps and leave it as soon as they finish.

``@serve.batch`` forms a group as soon as its wait timeout passes, even while the previous batch is
still generating; with ``max_concurrent_batches=1`` those small groups then queue up behind it
(docs/PERFORMANCE.md, "Serving: one decode loop"). So the deployment lets many groups
in at once and this class owns the one decode loop of the replica: before each step it admits the
waiting groups that fit (prepare -> prefill -> merge into the running decoder), then steps every
row, sends each request its events, and drops finished rows. A lone request starts at once.

    scheduler = Scheduler(service, engine, max_rows=16)
    async for events in scheduler.submit(requests):   # one entry per request of the group
        ...   # None (nothing new), a serve.events.Event, or StopIteration once that request is over
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from .engine import ChatEngine
from .events import Event
from .service import ChatService

_END = object()
INLINE_S = 0.005
"""A call of the decode loop (prepare, prefill, step, ...) whose last run of the same kind took
less than this runs on the event loop instead of a worker thread: the thread's hand-off costs a
large share of a small LM's step (docs/SERVING.md, "Short calls on the loop"), and a call this
short holds the loop no longer than the interpreter's GIL switch interval (5 ms) would. Longer
calls (real LMs on a CPU, media to encode, long prompts) leave the loop free for new requests,
cancellations and streamed events while they run."""


@dataclass
class _Group:
    requests: list
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    live: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.live = [True] * len(self.requests)

    def send(self, news: dict[int, Event]) -> None:
        """One list for the group: new events, None where a live request has none, StopIteration for
        requests already over. A request's final event is followed at once by a list that ends its
        stream, so that @serve.batch releases it now rather than at the group's next step, and a
        caller that reads to the end of its stream waits for nothing more. Ends the group when all
        are over."""
        self.queue.put_nowait([news.get(i) if live else StopIteration for i, live in enumerate(self.live)])
        finished = [i for i, event in news.items() if event.final]
        for i in finished:
            self.live[i] = False
        if not any(self.live):
            self.queue.put_nowait(_END)
        elif finished:
            self.queue.put_nowait([None if live else StopIteration for live in self.live])


@dataclass
class _Row:
    job: object
    group: _Group
    index: int


class Scheduler:
    def __init__(self, service: ChatService, engine: ChatEngine, max_rows: int) -> None:
        self.service, self.engine, self.max_rows = service, engine, max_rows
        self._pending: deque[_Group] = deque()
        self._worker: asyncio.Task | None = None
        self._took: dict[str, float] = {}  # seconds the last call of each kind took

    async def submit(self, requests: list) -> AsyncIterator[list]:
        group = _Group(list(requests))
        self._pending.append(group)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        while True:
            item = await group.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _take(self, room: int) -> list[_Group]:
        groups = []
        idle = room == self.max_rows  # an oversized group still runs, alone, when nothing else does
        while self._pending and (len(self._pending[0].requests) <= room or (idle and not groups)):
            groups.append(self._pending.popleft())
            room -= len(groups[-1].requests)
        return groups

    async def _admit(self, decoder, rows: list[_Row]):
        """Prepare and prefill the waiting groups that fit, and merge them into the batch."""
        groups = self._take(self.max_rows - len(rows))
        if not groups:
            return decoder, rows
        try:
            return await self._join(decoder, rows, groups)
        except Exception as e:  # out of the queue and not yet rows: the loop's handler cannot reach them
            for group in groups:
                group.queue.put_nowait(e)
            raise

    async def _join(self, decoder, rows: list[_Row], groups: list[_Group]):
        """Prepare and prefill the groups; their requests' first events; the batch with their rows."""
        requests = [r for g in groups for r in g.requests]
        prepared = await self._call("prepare", self.service.prepare, requests)
        new_rows, k = [], 0
        for g in groups:
            news = {}
            for i in range(len(g.requests)):
                event = self.service.first_event(prepared[k])
                if event is None and prepared[k].req.cancelled:  # its client left while it waited
                    event = self.service.advance(prepared[k], None)
                if event is not None:
                    news[i] = event
                if event is None or not event.final:
                    new_rows.append(_Row(prepared[k], g, i))
                k += 1
            if news:
                g.send(news)
        if not new_rows:
            return decoder, rows
        fresh = await self._call("start", self.engine.start, [self.service.decoder_input(r.job) for r in new_rows],
                                 [r.job.req.params for r in new_rows])
        if decoder is None:
            return fresh, new_rows
        await self._call("merge", decoder.merge, fresh)
        return decoder, rows + new_rows

    async def _call(self, kind: str, fn, *args):
        """``fn(*args)``: on the loop when the last call of this kind was short, else in a thread.
        The call's own time decides, not the thread's hand-off and the wait for the loop to resume:
        those would keep a short call in a thread for good once one run of it was slow."""

        def timed():
            t0 = time.perf_counter()
            out = fn(*args)
            self._took[kind] = time.perf_counter() - t0
            return out

        if self._took.get(kind, float("inf")) < INLINE_S:
            return timed()
        return await asyncio.to_thread(timed)

    async def _step(self, decoder, rows: list[_Row]) -> list[_Row]:
        t0 = time.perf_counter()
        tokens = await self._call("step", decoder.step)
        news: dict[int, dict[int, Event]] = {}
        groups: dict[int, _Group] = {}
        keep = []
        for r, (row, token) in enumerate(zip(rows, tokens)):
            event = self.service.advance(row.job, token)
            if event is not None:
                news.setdefault(id(row.group), {})[row.index] = event
                groups[id(row.group)] = row.group
            if row.job.finish_reason is None:
                keep.append(r)
        if len(keep) < len(rows):
            await self._call("keep", decoder.keep, keep)
        self.service.record_step(len(rows), time.perf_counter() - t0)
        for gid, group in groups.items():
            group.send(news[gid])
        return [rows[r] for r in keep]

    async def _loop(self) -> None:
        decoder, rows = None, []
        try:
            while self._pending or rows:
                if self._pending and len(rows) < self.max_rows and (decoder is None or decoder.can_merge):
                    decoder, rows = await self._admit(decoder, rows)
                if rows:
                    rows = await self._step(decoder, rows)
                    await asyncio.sleep(0)  # after calls run on the loop: let arrivals and cancellations in
                if not rows:
                    decoder = None
        except Exception as e:  # a bug in the model path: every caller in flight gets it (a 500)
            for group in {id(r.group): r.group for r in rows}.values():
                group.queue.put_nowait(e)
            while self._pending:
                self._pending.popleft().queue.put_nowait(e)
            raise
        finally:
            self._worker = None
