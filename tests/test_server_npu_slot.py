"""The NPU slot outlives a cancelled coroutine: embeddings and model loads release it only when their native
call has returned, as generations do (a cancelled client must not let a second call onto the NPU beside it)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rkedge.errors import InputError
from rkedge.runtime.server.engine import NpuQueue, Params, embed
from rkedge.runtime.server.models import ModelEntry, ModelPool


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_hold_keeps_the_slot_until_the_work_ends_when_cancelled() -> None:
    async def scenario() -> None:
        queue = NpuQueue(max_queue=4, timeout_s=10)
        native = threading.Event()
        started = threading.Event()

        def work() -> int:
            started.set()
            native.wait(10)
            return 7

        assert await queue.acquire(asyncio.Event()) == 0.0
        holder = asyncio.ensure_future(queue.hold(work))
        await _until(started.is_set)
        await _cancel(holder)
        assert queue.busy  # the native call still runs
        waiter = asyncio.ensure_future(queue.acquire(asyncio.Event()))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # nobody else reaches the NPU beside it
        native.set()
        assert await asyncio.wait_for(waiter, 5) is not None  # handed on once the work ended
        queue.release()
        assert not queue.busy

    asyncio.run(scenario())


def test_hold_returns_the_result_and_raises_the_error() -> None:
    async def scenario() -> None:
        queue = NpuQueue(max_queue=1, timeout_s=10)
        await queue.acquire(asyncio.Event())
        assert await queue.hold(lambda: "done") == "done"
        assert not queue.busy
        await queue.acquire(asyncio.Event())

        def fail() -> None:
            raise InputError("no")

        with pytest.raises(InputError):
            await queue.hold(fail)
        assert not queue.busy

    asyncio.run(scenario())


def test_cancelled_embedding_keeps_the_slot_until_the_native_call_ends() -> None:
    native = threading.Event()
    started = threading.Event()

    def generate(*_args: Any, **_kwargs: Any) -> Any:
        started.set()
        native.wait(10)
        return SimpleNamespace(finish_reason="stop", values=[1.0, 0.0], num_tokens=1, width=2,
                               stats=SimpleNamespace(prompt_tokens=1))

    async def scenario() -> None:
        queue = NpuQueue(max_queue=4, timeout_s=10)
        engine: Any = SimpleNamespace(llm=SimpleNamespace(generate=generate), queue=queue, admit=lambda: None,
                                      retry_after=lambda: 1, _check_context=lambda _text, _params: None)
        task = asyncio.ensure_future(embed(engine, ["hello"], "mean"))
        await _until(started.is_set)
        await _cancel(task)
        assert queue.busy
        native.set()
        await _until(lambda: not queue.busy)
        # Uncancelled, the same call answers and frees the slot.
        assert (await embed(engine, ["again"], "last")).vectors == [[1.0, 0.0]]
        assert not queue.busy

    assert Params().max_tokens is None
    asyncio.run(scenario())


def test_cancelled_model_load_keeps_the_slot_until_the_native_load_ends(tmp_path: Path) -> None:
    native = threading.Event()
    started = threading.Event()

    def opener(_entry: ModelEntry) -> Any:  # rkllm_init still running when the client goes away
        started.set()
        native.wait(10)
        raise InputError("the load failed after all")

    async def scenario() -> None:
        entry = ModelEntry("m", tmp_path / "m.rkllm", {}, 1)
        pool = ModelPool([entry], opener, max_queue=4, queue_timeout_s=10)
        task = asyncio.ensure_future(pool.lease(entry))
        await _until(started.is_set)
        await _cancel(task)
        assert pool.queue.busy
        assert entry.leases == 0
        native.set()
        await _until(lambda: not pool.queue.busy)

    asyncio.run(scenario())
