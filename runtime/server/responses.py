"""The response that owns a generate request's turn on the NPU.

A route checks admission (429) and shapes the request into a :class:`~rkedge.runtime.server.engine.Job`, then
returns a :class:`GenerationResponse`. Only when Starlette calls it does it enter the queue, so a response
that is never sent never queues. While queued and while running it watches the connection: a client that
leaves while queued is taken out of the queue; one that leaves mid-run (streaming or not), or stops reading
for ``send_timeout_s``, has its run aborted; a cancelled call (shutdown) aborts too. The NPU slot is
released by the run itself once the native run has ended, never by this coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from rkedge.errors import RkedgeError
from rkedge.runtime.server.engine import Engine, Job, Outcome, Run
from rkedge.runtime.server.errors import error_response

#: Status recorded (metrics, access log) for a client that left before its answer: nginx's "client closed".
CLIENT_CLOSED = 499
#: Where a response tells the metrics middleware the status it counts (a stream that ended in an error
#: was sent as 200 but is counted as a 500).
STATUS_KEY = "rkedge.status"


class Answer(Protocol):
    """How one API family and endpoint spells a generation's answer."""

    def whole(self, outcome: Outcome, run: Run) -> Response: ...

    def stream(self, run: Run, scope: Scope) -> Response: ...


class GenerationResponse(Response):
    def __init__(self, engine: Engine, job: Job, answer: Answer, *, stream: bool,
                 on_end: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.engine, self.job, self.answer, self.streams = engine, job, answer, stream
        self.on_end = on_end  # ends the request's lease on its model (once, whatever happened)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def receive_until_gone() -> Message:  # the one reader of `receive` is `watch`
            await gone.wait()
            return {"type": "http.disconnect"}

        settings = scope["app"].state.settings if "app" in scope else None
        send_timeout_s = settings.send_timeout_s if settings is not None else None

        async def timed_send(message: Message) -> None:  # a client that stops reading (a phone asleep) is let go
            await asyncio.wait_for(send(message), send_timeout_s)

        watcher = asyncio.ensure_future(watch())
        run: Run | None = None
        try:
            try:
                run = await self.engine.start(self.job, gone)
            except RkedgeError as exc:  # the queue timed out: answered in the family's shape
                await error_response(scope["path"], exc)(scope, receive_until_gone, send)
                return
            if run is None:
                await self._client_left(scope, receive_until_gone, send)
                return
            if self.streams:
                response = self.answer.stream(run, scope)
            else:
                ended = asyncio.ensure_future(run.ended.wait())
                left = asyncio.ensure_future(gone.wait())
                try:
                    await asyncio.wait([ended, left], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ended.cancel()
                    left.cancel()
                if not run.ended.is_set():
                    await self._client_left(scope, receive_until_gone, send)
                    return
                response = self.answer.whole(await run.wait(), run)
            try:
                await response(scope, receive_until_gone, timed_send)
            except asyncio.TimeoutError:
                scope.setdefault("state", {})[STATUS_KEY] = CLIENT_CLOSED  # the run is aborted below
        finally:
            watcher.cancel()
            if run is not None:
                run.abort()  # a no-op when the run has ended
            if self.on_end is not None:
                on_end, self.on_end = self.on_end, None
                on_end()

    @staticmethod
    async def _client_left(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})[STATUS_KEY] = CLIENT_CLOSED
        with contextlib.suppress(OSError):  # nobody is listening; sent for the server's bookkeeping only
            await JSONResponse({"error": "client closed the request"}, status_code=CLIENT_CLOSED)(scope, receive, send)
