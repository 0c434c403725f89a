"""p2p/loop.py: which event loop a process runs on, and the variable that chooses it."""

import asyncio

import pytest

from swarmlm.errors import UserError
from swarmlm.p2p import loop


async def _kind() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_peers_run_on_asyncios_loop_unless_asked_for_uvloop(monkeypatch):
    monkeypatch.delenv("SWARMLM_EVENT_LOOP", raising=False)
    assert loop.run(_kind()) == "asyncio"
    pytest.importorskip("uvloop")
    monkeypatch.setenv("SWARMLM_EVENT_LOOP", "uvloop")
    assert loop.run(_kind()) == "uvloop"
    client = loop.new_event_loop()
    try:
        assert client.run_until_complete(_kind()) == "uvloop"
    finally:
        client.close()
    monkeypatch.setenv("SWARMLM_EVENT_LOOP", "asyncio")
    assert loop.run(_kind()) == "asyncio"


def test_an_unknown_loop_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("SWARMLM_EVENT_LOOP", "trio")
    with pytest.raises(UserError, match="uvloop or asyncio, not 'trio'"):
        loop.new_event_loop()
