"""LoopThread.stream: an async iterator on the client's loop, consumed from plain code."""

import asyncio
import threading
import time

import pytest

from swarmlm.swarm.client.model import LoopThread


@pytest.fixture
def runner():
    r = LoopThread()
    yield r
    r.close()


def test_items_arrive_in_order_and_the_stream_ends(runner):
    async def items():
        for i in range(50):
            await asyncio.sleep(0)
            yield i

    t0 = time.monotonic()
    assert list(runner.stream(items(), stop_timeout_s=20)) == list(range(50))
    assert time.monotonic() - t0 < 10           # a finished stream does not wait out stop_timeout_s


def test_an_exception_is_raised_in_the_caller_after_the_items_before_it(runner):
    async def items():
        yield 1
        raise ValueError("broken producer")

    got = []
    with pytest.raises(ValueError, match="broken producer"):
        for x in runner.stream(items()):
            got.append(x)
    assert got == [1]


def test_the_producer_runs_exactly_window_items_ahead_and_then_waits(runner):
    produced = []
    four_made = threading.Event()

    async def items():        # awaits nothing: only the stream's credit can make it stop
        for i in range(20):
            produced.append(i)
            if len(produced) == 4:
                four_made.set()
            yield i

    stream = runner.stream(items(), window=2)
    assert next(stream) == 0
    assert four_made.wait(10)                    # the one taken, `window` waiting, one blocked on its credit
    runner.run(asyncio.sleep(0), timeout_s=10)   # runs after the producer's step: it is parked, or done
    assert produced == [0, 1, 2, 3]
    assert list(stream) == list(range(1, 20))


def test_closing_early_cancels_the_producer_and_waits_for_it(runner):
    state = {"finally": False, "cancelled": False}
    started = threading.Event()

    async def items():
        try:
            yield 0
            started.set()
            await asyncio.sleep(60)
            yield 1
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        finally:
            state["finally"] = True

    stream = runner.stream(items())
    assert next(stream) == 0
    assert started.wait(5)
    stream.close()
    assert state == {"finally": True, "cancelled": True}


def test_stream_from_the_loop_thread_itself_is_refused(runner):
    async def items():
        yield 1

    async def inside():
        with pytest.raises(RuntimeError, match="own loop"):
            next(runner.stream(items()))
    runner.run(inside())
