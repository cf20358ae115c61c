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

# Major types (the top 3 bits of an item's first byte; the low 5 are its argument)
_UINT = const(0)
_NINT = const(1)
_BYTES = const(2)
_TEXT = const(3)
_ARRAY = const(4)
_MAP = const(5)
_TAG = const(6)
_SIMPLE = const(7)
# Arguments: below _AI_U8 the value itself; _AI_U8.._AI_U64 a 1, 2, 4 or 8-byte value follows
_AI_U8 = const(24)
_AI_U16 = const(25)
_AI_U32 = const(26)
_AI_U64 = const(27)
# Simple values
_FALSE = const(20)
_TRUE = const(21)
_NULL = const(22)


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
        if ai < _AI_U8:
            return ai
        if ai > _AI_U64:
            raise ValueError  # 28-30 reserved, 31 indefinite length
        mv = self.mv
        p = self.pos
        e = p + (1 << (ai - _AI_U8))
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
        if major == _SIMPLE:
            ai = ib & 31
            if ai == _FALSE:
                return False
            if ai == _TRUE:
                return True
            if ai == _NULL:
                return None
            raise ValueError  # floats, undefined, other simple values, break
        if major == _TAG:
            raise ValueError
        n = self._arg(ib & 31)
        if major == _UINT:
            return n
        if major == _NINT:
            return -1 - n
        if major <= _TEXT:
            p = self.pos
            e = p + n
            if e > len(mv):
                raise ValueError
            self.pos = e
            if major == _BYTES:
                return mv[p:e]
            return str(mv[p:e], "utf-8")  # UnicodeError is a ValueError
        if depth > _MAX_DEPTH or n > _MAX_ITEMS:
            raise ValueError
        depth += 1
        if major == _ARRAY:
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
        if v < _AI_U8:
            k = 1
        elif v < 0x100:
            k, ai = 2, _AI_U8
        elif v < 0x10000:
            k, ai = 3, _AI_U16
        elif v < 0x100000000:
            k, ai = 5, _AI_U32
        else:
            k, ai = 9, _AI_U64
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
        self._head(_MAP, count)

    def array(self, count):
        self._head(_ARRAY, count)

    def uint(self, v):
        self._head(_UINT, v)

    def int(self, v):
        if v < 0:
            self._head(_NINT, -1 - v)
        else:
            self._head(_UINT, v)

    def bool(self, v):
        self._head(_SIMPLE, _TRUE if v else _FALSE)

    def null(self):
        self._head(_SIMPLE, _NULL)

    def bytes(self, data):
        self._head(_BYTES, len(data))
        self.raw(data)

    def text(self, s):
        # s: str (or UTF-8 bytes); its UTF-8 bytes through the buffer protocol, no copy.
        m = memoryview(s)
        self._head(_TEXT, len(m))
        self.raw(m)
