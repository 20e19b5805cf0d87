"""Stop strings over streamed text: what may be shown now, and where the text ends.

Text arrives piece by piece (one generated token at a time). A stop string may span pieces, so
the end of the text that could be the start of a stop string is held back until later text
shows whether it is; at a stop string the text ends where the stop string begins. Text once
released is therefore final: no stop string ever begins inside it.
"""

from __future__ import annotations

from typing import Sequence


class StopText:
    """push(piece) -> (text to release now, stopped); `flush` releases what is held back when
    the generation ends without a stop. `text` is everything released so far."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            self.text += piece
            return piece, False
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = buf[:min(hits)], "", True
        else:
            keep = _stop_prefix(buf, self.stops)
            out, self.pending = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out, self.stopped

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
