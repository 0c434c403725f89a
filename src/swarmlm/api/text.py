"""From generated token ids to the text a client sees: incremental decoding and stop strings.

`TextStream` decodes ids as they arrive (each piece in constant time, however long the output)
and cuts the text at stop strings as OpenAI does: the output ends just before the first
occurrence of any stop string, which is not included. While streaming it holds back a tail that
could still become a stop string, so no piece ever has to be taken back. `cut_at_stop` is the
same rule on a whole text. Knows nothing of models or HTTP: `decode(ids) -> str` is passed in.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"       # what a decoder gives for the bytes of an unfinished UTF-8 character


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest occurrence of any stop string, whether one occurred)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def held_tail(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextStream:
    """Feed ids one by one; each `push` returns the new text that is safe to send (maybe "")."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self._prefix = 0           # ids[_prefix:_read] decode to context already turned into text
        self._read = 0
        self._pending = ""         # text decoded but not yet sent (it may begin a stop string)
        self.sent = ""             # everything sent so far
        self.stopped = False       # a stop string was found: the output is complete

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix:self._read])
        now = self.decode(self.ids[self._prefix:])
        if now.endswith(REPLACEMENT):
            return ""              # an unfinished character: wait for its next bytes
        # the window of decoded context moves on, so each decode costs the same however long the output
        self._prefix, self._read = self._read, len(self.ids)
        return self._take(now[len(before):], final=False)

    def finish(self) -> str:
        """The rest once generation has ended (an unfinished character decodes as the full decode would)."""
        if self.stopped:
            return ""
        tail = ""
        if self._read < len(self.ids):
            tail = self.decode(self.ids[self._prefix:])[len(self.decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._take(tail, final=True)

    def _take(self, new: str, *, final: bool) -> str:
        # a stop string cannot begin in text already sent: any tail that could begin one was held back
        text = self._pending + new
        cut, stopped = cut_at_stop(text, self.stops)
        if stopped:
            self.stopped = True
            self._pending = ""
            self.sent += cut
            return cut
        keep = 0 if final else held_tail(text, self.stops)
        out, self._pending = text[:len(text) - keep], text[len(text) - keep:]
        self.sent += out
        return out
