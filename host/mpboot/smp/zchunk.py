"""Compressed upload chunks (docs/PROTOCOL.md, "Compressed upload"): each is one whole raw
deflate stream, with a window the device can inflate, of as many image bytes as fit one
request.

A device inflates each request's `data` on its own (MicroPython's deflate cannot be fed a
stream in pieces), so no chunk refers to bytes of another: any offset is a place to start,
and resuming or resyncing needs nothing beyond a plain upload's offsets.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

ZUPLOAD_MAX: Final = 32768  # image bytes one chunk may inflate to (the device refuses more)
MIN_WBITS: Final = 9  # CPython's zlib makes no raw stream with a 256-byte window
MAX_WBITS: Final = 15
LEVEL: Final = 9
# The packer stops narrowing when the fit is within this many image bytes of the best: a
# chunk then carries at most this much less than it could (under 1% of a 2 KiB request).
TOLERANCE: Final = 16


@dataclass(frozen=True)
class Chunk:
    off: int
    end: int  # off + the image bytes it inflates to (`ulen`)
    data: bytes  # the raw deflate stream


def deflate_raw(data: bytes | memoryview, wbits: int) -> bytes:
    """One whole raw deflate stream of `data` with a 2**wbits-byte window."""
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -wbits, 9)
    return c.compress(data) + c.flush(zlib.Z_FINISH)


class Packer:
    """Packs `image` into chunks whose stream is at most `room` bytes, inflating to at most
    ZUPLOAD_MAX bytes each, with a window of 2**wbits bytes."""

    def __init__(self, image: bytes, wbits: int, room: int) -> None:
        if not MIN_WBITS <= wbits <= MAX_WBITS:
            raise ValueError(f"window bits {wbits}: raw deflate here takes {MIN_WBITS}..{MAX_WBITS}")
        if room < 1:
            raise ValueError("room must be at least 1 byte")
        self.image = memoryview(image)
        self.wbits = wbits
        self.room = room
        self.ratio = 1.5  # image bytes per stream byte: the next search's first guess
        self.compressions = 0  # streams made (the cost of packing)
        self._chunks: dict[int, Chunk] = {}

    def chunk(self, off: int) -> Chunk | None:
        """The chunk starting at `off` that carries the most image bytes (None: not even one
        byte fits `room`). The same `off` gives the same chunk (a re-send must repeat its
        request)."""
        got = self._chunks.get(off)
        if got is None:
            got = self._search(off)
            if got is None:
                return None
            self._chunks[off] = got
        return got

    def _make(self, off: int, n: int) -> bytes:
        self.compressions += 1
        return deflate_raw(self.image[off:off + n], self.wbits)

    def _search(self, off: int) -> Chunk | None:
        top = min(ZUPLOAD_MAX, len(self.image) - off)
        if top <= 0:
            return None
        # Stream length grows with the input (near enough for a search: a few bytes of
        # wobble). Bracket the answer between `lo` (fits) and `hi` (does not), starting from
        # the ratio the last chunk had, then halve the bracket.
        lo, best = 0, b""
        hi = top + 1
        guess = max(1, min(top, int(self.room * self.ratio)))
        tries = 0
        while hi - lo > TOLERANCE:
            blob = self._make(off, guess)
            tries += 1
            if len(blob) <= self.room:
                lo, best = guess, blob
                if guess == top:
                    break
            else:
                hi = guess
            if tries < 3:
                # Scale by how far the stream is from the room: usually close already.
                guess = int(guess * self.room / max(len(blob), 1) * (0.997 if len(blob) > self.room else 0.999))
                guess = min(hi - 1, max(lo + 1, guess))
                if hi <= top and not lo < guess < hi:
                    guess = (lo + hi) // 2
            else:
                guess = (lo + hi) // 2
        if lo == 0:
            return None
        self.ratio = lo / len(best)
        return Chunk(off, off + lo, best)
