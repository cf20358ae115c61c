# The CBOR subset SMP needs (docs/PROTOCOL.md "CBOR subset"): a bounded decoder for requests
# and a deterministic encoder for responses.
#
# Decoder: unsigned/negative integers (up to 64 bits), byte strings (returned as memoryview
# slices of the input: upload data is never copied), text strings (str), arrays, maps,
# false/true/null. Anything else raises ValueError: indefinite lengths, tags, floats and
# other simple values, nesting deeper than 4, more than 16 items in a map or array (64 items
# in all, so a small packet cannot build a large object tree), a string
# longer than the input, map keys other than text or integers, a repeated key, trailing
# bytes after the top-level value, a top-level value that is not a map.
#
# Encoder: writes into a buffer the caller owns, from position `n`; definite lengths and the
# shortest argument forms. Callers emit map keys in canonical order (RFC 8949 4.2.1: shorter
# encodings first, then bytewise). A value that does not fit raises OverflowError.
from micropython import const

_MAX_DEPTH = const(4)
_MAX_ITEMS = const(16)
_MAX_TOTAL = const(64)  # items in one packet: depth and width alone would allow 16**4


class Decoder:
    def decode(self, buf):
        # buf: bytes-like or memoryview holding exactly one CBOR map. Returns a dict.
        self.mv = memoryview(buf)
        self.pos = 0
        self.left = _MAX_TOTAL
        try:
            v = self._item(1)
            if type(v) is not dict or self.pos != len(self.mv):
                raise ValueError
            return v
        finally:
            self.mv = None

    def _arg(self, ai):
        if ai < 24:
            return ai
        if ai > 27:
            raise ValueError  # 28-30 reserved, 31 indefinite length
        mv = self.mv
        p = self.pos
        e = p + (1 << (ai - 24))
        if e > len(mv):
            raise ValueError
        v = 0
        while p < e:
            v = (v << 8) | mv[p]
            p += 1
        self.pos = e
        return v

    def _item(self, depth):
        mv = self.mv
        p = self.pos
        if p >= len(mv):
            raise ValueError
        ib = mv[p]
        self.pos = p + 1
        self.left -= 1
        if self.left < 0:
            raise ValueError
        major = ib >> 5
        if major == 7:
            if ib == 0xF4:
                return False
            if ib == 0xF5:
                return True
            if ib == 0xF6:
                return None
            raise ValueError  # floats, undefined, other simple values, break
        if major == 6:
            raise ValueError  # tags
        n = self._arg(ib & 31)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major <= 3:
            p = self.pos
            e = p + n
            if e > len(mv):
                raise ValueError
            self.pos = e
            if major == 2:
                return mv[p:e]
            return str(mv[p:e], "utf-8")  # UnicodeError is a ValueError
        if depth > _MAX_DEPTH or n > _MAX_ITEMS:
            raise ValueError
        depth += 1
        if major == 4:
            a = []
            for _ in range(n):
                a.append(self._item(depth))
            return a
        d = {}
        for _ in range(n):
            k = self._item(depth)
            t = type(k)
            if (t is not str and t is not int) or k in d:
                raise ValueError
            d[k] = self._item(depth)
        return d


class Encoder:
    def __init__(self, buf):
        self.buf = buf
        self.mv = memoryview(buf)
        self.n = 0  # where the next item goes

    def _head(self, major, v):
        b = self.buf
        n = self.n
        if v < 24:
            k = 1
        elif v < 0x100:
            k, ai = 2, 24
        elif v < 0x10000:
            k, ai = 3, 25
        elif v < 0x100000000:
            k, ai = 5, 26
        else:
            k, ai = 9, 27
        if n + k > len(b):
            raise OverflowError
        self.n = n + k
        if k == 1:
            b[n] = major << 5 | v
            return
        b[n] = major << 5 | ai
        i = n + k - 1
        while i > n:
            b[i] = v & 0xFF
            v >>= 8
            i -= 1

    def raw(self, data):
        # Appends data as it is: already-encoded CBOR (factory labels) or a string's bytes.
        n = self.n
        e = n + len(data)
        if e > len(self.buf):
            raise OverflowError
        self.mv[n:e] = data
        self.n = e

    def map(self, count):
        self._head(5, count)

    def array(self, count):
        self._head(4, count)

    def uint(self, v):
        self._head(0, v)

    def int(self, v):
        if v < 0:
            self._head(1, -1 - v)
        else:
            self._head(0, v)

    def bool(self, v):
        self._head(7, 21 if v else 20)

    def null(self):
        self._head(7, 22)

    def bytes(self, data):
        self._head(2, len(data))
        self.raw(data)

    def text(self, s):
        # s: str (or UTF-8 bytes); its UTF-8 bytes through the buffer protocol, no copy.
        m = memoryview(s)
        self._head(3, len(m))
        self.raw(m)
