# The CBOR subset SMP needs (docs/PROTOCOL.md "CBOR subset"): a bounded decoder for requests
# and a deterministic encoder for responses.
#
# Decoder: unsigned/negative integers (up to 64 bits), byte strings (returned as memoryview
# slices of the input: upload data is never copied), text strings (str), arrays, maps,
# false/true/null. Anything else raises ValueError: indefinite lengths, tags, floats and
# other simple values, nesting deeper than 4, more than 16 items in a map or array (64 items
# in all, so a small packet cannot build a large object tree), a string
# longer than the input, text that is not strict UTF-8 (RFC 3629: no overlong forms, no
# UTF-16 surrogates, nothing above U+10FFFF, no truncated or stray sequences; MicroPython's
# own str() lets the first three through), map keys other than text or integers, a repeated
# key, trailing bytes after the top-level value, a top-level value that is not a map.
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
# Strict UTF-8 (RFC 3629 section 4): the first byte of a sequence, and the range its second
# byte must fall in where that differs from a continuation byte's 80-BF
_ASCII_END = const(0x80)
_LEAD2 = const(0xC2)  # C2-DF: 2 bytes (C0, C1 could only start overlong forms)
_LEAD3 = const(0xE0)  # E0-EF: 3 bytes
_LEAD4 = const(0xF0)  # F0-F4: 4 bytes
_LEAD_END = const(0xF5)  # F5-FF: above U+10FFFF (F4 8F BF BF), or not UTF-8 at all
_LEAD_SURR = const(0xED)  # ED A0-BF would be the UTF-16 surrogates U+D800-DFFF
_LEAD_MAX = const(0xF4)  # F4 90-BF would be above U+10FFFF
_CONT_LO = const(0x80)
_CONT_HI = const(0xBF)
_E0_LO = const(0xA0)  # E0 80-9F: overlong
_ED_HI = const(0x9F)
_F0_LO = const(0x90)  # F0 80-8F: overlong
_F4_HI = const(0x8F)


class Decoder:
    # strict: also refuse what canonical CBOR (RFC 8949 4.2.1) never writes: longer argument
    # forms than needed, and map keys other than unsigned integers in ascending order. SMP
    # clients are not canonical; signed trust records (mpboot.records) must be.
    strict = False

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
        if self.strict and v < (_AI_U8 if ai == _AI_U8 else 1 << (4 << (ai - _AI_U8))):
            raise ValueError  # not the shortest form
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
            m = mv[p:e]
            if major == _BYTES:
                return m
            s = str(m, "utf-8")  # (UnicodeError, a ValueError, for some malformed text)
            if (len(s) != n) if _STR_COUNTS else (n and max(m) >= _ASCII_END):
                _check_utf8(mv, p, e)  # not ASCII: the slow path
            return s
        if depth > _MAX_DEPTH or n > _MAX_ITEMS:
            raise ValueError
        depth += 1
        if major == _ARRAY:
            a = []
            for _ in range(n):
                a.append(self._item(depth))
            return a
        d = {}
        last = -1
        for _ in range(n):
            k = self._item(depth)
            t = type(k)
            if (t is not str and t is not int) or k in d:
                raise ValueError
            if self.strict:
                if t is not int or k <= last:
                    raise ValueError  # canonical order of unsigned keys: ascending
                last = k
            d[k] = self._item(depth)
        return d


def _str_counts():
    # True when str() refuses malformed UTF-8 (some of it) and len() counts characters
    # (MICROPY_PY_BUILTINS_STR_UNICODE and its _CHECK, on in the unix, rp2, esp32 and stm32
    # ports). Then a text as long in characters as in bytes is ASCII: the fast path, all in C.
    # Elsewhere max() tells ASCII apart, a loop in C too.
    try:
        str(b"\xc3", "utf-8")
    except ValueError:
        return len(str(b"\xc3\xa9", "utf-8")) == 1
    return False


_STR_COUNTS = _str_counts()


def _check_utf8(mv, p, e):
    # Raises ValueError unless mv[p:e] is strict UTF-8. No allocation: a loop over the bytes.
    while p < e:
        c = mv[p]
        p += 1
        if c < _ASCII_END:
            continue
        lo = _CONT_LO
        hi = _CONT_HI
        if c < _LEAD2:
            raise ValueError  # a stray continuation byte, or C0/C1
        if c < _LEAD3:
            k = 1
        elif c < _LEAD4:
            k = 2
            if c == _LEAD3:
                lo = _E0_LO
            elif c == _LEAD_SURR:
                hi = _ED_HI
        elif c < _LEAD_END:
            k = 3
            if c == _LEAD4:
                lo = _F0_LO
            elif c == _LEAD_MAX:
                hi = _F4_HI
        else:
            raise ValueError  # F5-FF: above U+10FFFF, or no UTF-8 at all
        if p + k > e:
            raise ValueError  # truncated
        c = mv[p]
        if c < lo or c > hi:
            raise ValueError
        p += 1
        while k > 1:
            c = mv[p]
            if c < _CONT_LO or c > _CONT_HI:
                raise ValueError
            p += 1
            k -= 1


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
