"""Continuous batching: requests join the running batch between decode steps and leave it as
soon as they finish.

The model replica hands each request to its one scheduler, which owns the replica's decode loop:
before each step it admits the waiting requests that fit (prepare -> prefill -> merge into the
running decoder), then steps every row, sends each request its events, and drops finished rows.
A lone request starts at once (or after ``wait_s``, when set, in case company arrives).

    scheduler = Scheduler(service, engine, max_rows=16)
    async for event in scheduler.submit(request):   # serve.events.Event objects; the last is final
        ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from .engine import ChatEngine
from .events import Event
from .service import ChatService

log = logging.getLogger(__name__)

INLINE_S = 0.005
"""A call of the decode loop (prepare, prefill, step, ...) whose last run of the same kind took
less than this runs on the event loop instead of a worker thread: the thread's hand-off costs a
large share of a small LM's step (docs/SERVING.md, "Short calls on the loop"), and a call this
short holds the loop no longer than the interpreter's GIL switch interval (5 ms) would. Longer
calls (real LMs on a CPU, media to encode, long prompts) leave the loop free for new requests,
cancellations and streamed events while they run."""


@dataclass
class _Waiting:
    request: object
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """What the request hears: Events, the last one final, or the exception that failed it."""


@dataclass
class _Row:
    job: object
    events: asyncio.Queue


class Scheduler:
    def __init__(self, service: ChatService, engine: ChatEngine, max_rows: int, wait_s: float = 0.0) -> None:
        self.service, self.engine, self.max_rows, self.wait_s = service, engine, max_rows, wait_s
        self._pending: deque[_Waiting] = deque()
        self._worker: asyncio.Task | None = None
        self._took: dict[str, float] = {}  # seconds the last call of each kind took

    async def submit(self, request) -> AsyncIterator[Event]:
        waiting = _Waiting(request)
        self._pending.append(waiting)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        while True:
            event = await waiting.events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.final:
                return

    def _take(self, room: int) -> list[_Waiting]:
        """Up to ``room`` waiting requests, oldest first. One whose client left while it waited is
        dropped here, before its media are decoded and encoded for nobody."""
        taken = []
        while self._pending and len(taken) < room:
            waiting = self._pending.popleft()
            if waiting.request.cancelled:
                self.service.drop_waiting()
            else:
                taken.append(waiting)
        return taken

    async def _admit(self, decoder, rows: list[_Row]):
        """Prepare and prefill the waiting requests that fit, and merge them into the batch. A failure
        before the merge is theirs alone (their prefill runs apart from the batch's state), so the
        running rows go on; a failed merge may have left the batch half-changed and fails it all."""
        waiting = self._take(self.max_rows - len(rows))
        if not waiting:
            return decoder, rows
        try:
            fresh, new_rows = await self._prefill(waiting)
        except Exception as e:  # out of the queue and not yet rows: the loop's handler cannot reach them
            log.exception("preparing or prefilling %d requests failed; they get the error, the %d running go on",
                          len(waiting), len(rows))
            for w in waiting:
                w.events.put_nowait(e)
            return decoder, rows
        if fresh is None:
            return decoder, rows
        if decoder is None:
            return fresh, new_rows
        try:
            await self._call("merge", decoder.merge, fresh)
        except Exception as e:
            for r in new_rows:
                r.events.put_nowait(e)
            raise
        return decoder, rows + new_rows

    async def _prefill(self, waiting: list[_Waiting]):
        """Prepare and prefill the requests; their first events; a decoder over their rows (None
        when every one of them has already ended) and the rows."""
        requests = [w.request for w in waiting]
        # Media to decode and encode take a thread whatever the last prepare took: a 10-minute clip
        # after cached photos must not hold the loop (arrivals, cancellations, streamed events).
        encodes = self.service.needs_encoding(requests)
        prepared = await self._call("encode" if encodes else "prepare", self.service.prepare, requests,
                                    may_inline=not encodes)
        new_rows = []
        for w, job in zip(waiting, prepared):
            event = self.service.first_event(job)
            if event is None and job.req.cancelled:  # its client left while it waited
                event = self.service.advance(job, None)
            if event is not None:
                w.events.put_nowait(event)
            if event is None or not event.final:
                new_rows.append(_Row(job, w.events))
        if not new_rows:
            return None, []
        fresh = await self._call("start", self.engine.start, [self.service.decoder_input(r.job) for r in new_rows],
                                 [r.job.req.params for r in new_rows])
        return fresh, new_rows

    async def _call(self, kind: str, fn, *args, may_inline: bool = True):
        """``fn(*args)``: on the loop when it may run there and the last call of this kind was short,
        else in a thread. The call's own time decides, not the thread's hand-off and the wait for
        the loop to resume: those would keep a short call in a thread for good once one run of it
        was slow."""

        def timed():
            t0 = time.perf_counter()
            out = fn(*args)
            self._took[kind] = time.perf_counter() - t0
            return out

        if may_inline and self._took.get(kind, float("inf")) < INLINE_S:
            return timed()
        return await asyncio.to_thread(timed)

    async def _step(self, decoder, rows: list[_Row]) -> list[_Row]:
        t0 = time.perf_counter()
        tokens = await self._call("step", decoder.step)
        keep = []
        for r, (row, token) in enumerate(zip(rows, tokens)):
            event = self.service.advance(row.job, token)
            if event is not None:
                row.events.put_nowait(event)
            if row.job.finish_reason is None:
                keep.append(r)
        if len(keep) < len(rows):
            await self._call("keep", decoder.keep, keep)
        self.service.record_step(len(rows), time.perf_counter() - t0)
        return [rows[r] for r in keep]

    async def _loop(self) -> None:
        decoder, rows = None, []
        try:
            while self._pending or rows:
                if decoder is None and self.wait_s > 0:  # idle until now: give company a moment to arrive
                    await asyncio.sleep(self.wait_s)
                if self._pending and len(rows) < self.max_rows and (decoder is None or decoder.can_merge):
                    decoder, rows = await self._admit(decoder, rows)
                if rows:
                    rows = await self._step(decoder, rows)
                    await asyncio.sleep(0)  # after calls run on the loop: let arrivals and cancellations in
                if not rows:
                    decoder = None
        except Exception as e:  # a bug in the model path: every caller in flight gets it (a 500)
            log.exception("the decode loop failed; its %d running and %d waiting requests get the error",
                          len(rows), len(self._pending))
            for row in rows:
                row.events.put_nowait(e)
            while self._pending:
                self._pending.popleft().events.put_nowait(e)
        finally:
            self._worker = None
