# SMP over a UART: the two framings of docs/PROTOCOL.md ("Framings on the UART"), recognised
# frame by frame on one byte stream; each response goes out in its request's framing.
#
#   console  lines "06 09" / "04 14" + base64 + "\n" of: u16 BE length (packet + 2) | packet |
#            CRC16-XMODEM BE. At most 127 bytes per line sent (marker and newline included);
#            lines up to 128 bytes (or "\r\n"-ended) are accepted, each holding a multiple of
#            4 base64 characters (as Zephyr). Largest packet: buf_size - 4.
#   raw      COBS(packet | CRC16-XMODEM BE) 00. Largest packet: buf_size.
#
# Frame boundaries: the start of the stream and the byte after the 00 or "\n" ending a frame.
# At a boundary "06 09" / "04 14" start a console line (up to "\n"), 01 or 02 a raw frame (up
# to 00; the COBS code byte of an SMP request is 01 or 02) and any other byte is skipped, so
# CR/LF between frames, stray 00s and line noise cost nothing. A frame that fails (CRC, base64,
# COBS, packet too large) is dropped without an answer; a frame longer than the receive buffer
# is dropped up to the next 00 or "\n", where decoding resumes.
#
# Each framing keeps its own partial frame: raw frames between the lines of a console frame
# are answered, and the console frame then completes (its lines are decoded into con, apart
# from pkt). A raw frame has no inside to interleave with: every byte up to its 00 is its own.
#
# Memory: Framer(buf_size) allocates every buffer once: rx (one whole raw frame, 2.2 KiB for
# buf_size 2048), con (buf_size: the console frame being assembled), pkt (buf_size + 4: a raw
# request being decoded, then the response being framed), tx (256). Per frame, base64 lines
# allocate their decoded or encoded bytes (< 128) and slicing allocates memoryview objects;
# nothing grows with what arrives.
#
# A link is any object with
#   readinto(buf) -> n   bytes read into buf now; 0 or None when none are waiting (no blocking)
#   write(buf)           writes all of buf (may block while the transmit buffer is full)
#   wait(ms)             returns when bytes may be readable, or after ms
#   drain()  (optional)  returns once everything written has left the port
# mpboot.ports.<port>.uart(...) makes one. serve(link, server) runs an mpboot.smp.server.Server
# over it; serve_async(stream, server) does the same over an asyncio stream.
from array import array
from binascii import a2b_base64, b2a_base64
from micropython import const

CONSOLE = const(1)
RAW = const(2)

_LINE_IN = const(128)  # longest console line accepted, "\n" included
_LINE_DATA = const(90)  # frame bytes per console line sent: 120 base64 chars, 123-byte lines
_TX = const(256)  # transmit staging: one COBS block (code + 254 bytes) fits
_IDLE_MS = const(1000)  # longest wait without calling tick()
# Console line markers: a frame's first line starts 06 09, each further line 04 14.
_FIRST_0 = const(6)
_FIRST_1 = const(9)
_MORE_0 = const(4)
_MORE_1 = const(20)
_CR = const(13)
# Raw frames: the COBS code byte that starts an SMP request (its header's second byte, flags,
# is 0: code 1 when the first byte is 0 too, else 2); the largest block, 254 data bytes.
_RAW_START_A = const(1)
_RAW_START_B = const(2)
_COBS_BLOCK = const(254)
_COBS_FULL = const(0xFF)  # the code of a full block (no 00 implied after it)


def _table():
    t = array("H", bytes(512))
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = (c << 1) ^ 0x1021 if c & 0x8000 else c << 1
        t[i] = c & 0xFFFF
    return t


_T = _table()


def crc16_py(buf, off, n, c=0):
    # CRC16-XMODEM (poly 0x1021, init 0, no reflection) of buf[off:off + n], table-driven.
    t = _T
    for i in range(off, off + n):
        c = ((c << 8) & 0xFF00) ^ t[(c >> 8) ^ buf[i]]
    return c


# The same as a viper function, compiled at import by the device's own compiler: a .mpy or a
# frozen module holds bytecode only unless built for the board's architecture, and a port
# without a native emitter refuses the decorator. Either way the table version stays.
_VIPER = """
@micropython.viper
def crc(buf, off: int, n: int, c: int, tab) -> int:
    p = ptr8(buf)
    t = ptr16(tab)
    i = off
    e = off + n
    while i < e:
        c = ((c << 8) & 0xFF00) ^ t[((c >> 8) ^ p[i]) & 0xFF]
        i += 1
    return c
"""


def _native():
    try:
        g = {}
        exec(_VIPER, g)
        f = g["crc"]
        if f(b"123456789", 0, 9, 0, _T) == 0x31C3:
            return f
    except Exception:  # SyntaxError: no native emitter; no compiler in the firmware
        pass
    return None


_crcv = _native()
NATIVE = _crcv is not None


def crc16(buf, off, n):
    # CRC16-XMODEM of buf[off:off + n]: viper when the port can compile it, else the table.
    if _crcv is not None:
        return _crcv(buf, off, n, 0, _T)
    return crc16_py(buf, off, n)


def frame_bytes(buf_size):
    # The most bytes one request can take on the wire (a console frame of buf_size bytes):
    # the receive buffer a port's UART needs per request in flight.
    chars = (buf_size + 2) // 3 * 4
    return chars + 3 * ((chars + 119) // 120)


class Framer:
    # Decodes requests from the bytes in rx[pos:fill] and frames responses. next() gives the
    # next request (its framing in .kind) or None: then read more into space() and call got(n).
    def __init__(self, buf_size):
        self.buf_size = buf_size
        n = buf_size + 2
        self.rmax = n + n // 254 + 1  # longest COBS frame of n bytes (no delimiter)
        self.rx = bytearray(max(self.rmax + 1, _LINE_IN) + 128)
        self.rmv = memoryview(self.rx)
        self.pkt = bytearray(buf_size + 4)
        self.pmv = memoryview(self.pkt)
        # The console frame being assembled (length field, packet, CRC: buf_size at most),
        # kept apart from pkt so raw requests and their responses leave it be.
        self.con = bytearray(buf_size)
        self.cmv = memoryview(self.con)
        self.tx = bytearray(_TX)
        self.tmv = memoryview(self.tx)
        self.pos = 0
        self.fill = 0
        self.skip = False  # dropping an overlong frame: resume after the next 00 or "\n"
        self.cn = -1  # console frame bytes decoded into con so far, -1: none open
        self.kind = 0
        self.dropped = 0  # frames dropped (CRC, encoding, size)

    def space(self):
        return self.rmv[self.fill :]

    def got(self, n):
        self.fill += n

    def _more(self, pos):
        # Keeps the incomplete frame at rx[pos:fill], moved to the front.
        n = self.fill - pos
        if pos:
            self.rmv[:n] = self.rmv[pos : self.fill]
        self.pos = 0
        self.fill = n
        return None

    def next(self):
        rx = self.rx
        while True:
            pos = self.pos
            fill = self.fill
            if pos >= fill:
                self.pos = self.fill = 0
                return None
            if self.skip:
                e = rx.find(b"\x00", pos, fill)
                e2 = rx.find(b"\n", pos, fill if e < 0 else e)
                if e2 >= 0:
                    e = e2
                if e < 0:
                    self.pos = self.fill = 0
                    return None
                self.skip = False
                self.pos = e + 1
                continue
            b = rx[pos]
            if b == _RAW_START_A or b == _RAW_START_B:
                e = rx.find(b"\x00", pos, min(fill, pos + self.rmax + 1))
                if e < 0:
                    if fill - pos <= self.rmax:
                        return self._more(pos)
                    self.dropped += 1  # (an open console frame stays open)
                    self.skip = True
                    self.pos = pos + self.rmax
                    continue
                self.pos = e + 1
                p = self._raw(pos, e)
                if p is not None:
                    self.kind = RAW
                    return p
                self.dropped += 1
                continue
            if b == _FIRST_0 or b == _MORE_0:
                if fill - pos < 2:
                    return self._more(pos)
                if rx[pos + 1] == (_FIRST_1 if b == _FIRST_0 else _MORE_1):
                    e = rx.find(b"\n", pos, min(fill, pos + _LINE_IN))
                    if e < 0:
                        if fill - pos < _LINE_IN:
                            return self._more(pos)
                        self._drop_console()
                        self.skip = True
                        self.pos = pos + _LINE_IN
                        continue
                    self.pos = e + 1
                    p = self._line(pos, e, b == _FIRST_0)
                    if p is not None:
                        self.kind = CONSOLE
                        return p
                    continue
            self.pos = pos + 1  # no frame starts here

    def _drop_console(self):
        self.cn = -1
        self.dropped += 1

    def _raw(self, s, e):
        # COBS-decodes rx[s:e] into pkt block by block; the packet if its CRC matches.
        rx = self.rx
        rmv = self.rmv
        pkt = self.pkt
        pmv = self.pmv
        cap = self.buf_size + 2
        o = 0
        while s < e:
            c = rx[s]
            s += 1
            k = c - 1
            if k:
                if s + k > e or o + k > cap:
                    return None
                pmv[o : o + k] = rmv[s : s + k]
                o += k
                s += k
            if c != _COBS_FULL and s < e:
                if o >= cap:
                    return None
                pkt[o] = 0
                o += 1
        if o <= 2:
            return None
        o -= 2
        if crc16(pkt, 0, o) != (pkt[o] << 8 | pkt[o + 1]):
            return None
        return pmv[:o]

    def _line(self, s, e, first):
        # One console line rx[s:e] ("\n" at e) into the frame in con; the packet once the
        # frame is complete and its CRC matches.
        if first:
            self.cn = 0
        cn = self.cn
        if cn < 0:
            return None  # a continuation without its start
        if self.rx[e - 1] == _CR:
            e -= 1
        s += 2
        try:
            d = a2b_base64(self.rmv[s:e]) if (e - s) & 3 == 0 else None
        except ValueError:
            d = None
        if d is None or cn + len(d) > self.buf_size:
            self._drop_console()
            return None
        n = len(d)
        self.cmv[cn : cn + n] = d
        cn += n
        self.cn = cn
        if cn < 2:
            return None
        con = self.con
        total = (con[0] << 8 | con[1]) + 2  # length field, packet, CRC
        if total < 5 or total > self.buf_size or cn > total:
            self._drop_console()
            return None
        if cn < total:
            return None
        self.cn = -1
        o = total - 2
        if crc16(con, 2, o - 2) != (con[o] << 8 | con[o + 1]):
            self.dropped += 1
            return None
        return self.cmv[2:o]

    def send(self, link, kind, r):
        # Writes the response packet r in framing `kind`. False if it does not fit the buffer.
        n = len(r)
        pkt = self.pkt
        pmv = self.pmv
        if kind == CONSOLE:
            if n + 4 > len(pkt):
                return False
            pmv[2 : 2 + n] = r  # may be a view of pkt itself: slice copies are memmove
            c = crc16(pkt, 2, n)
            pkt[0] = (n + 2) >> 8
            pkt[1] = (n + 2) & 0xFF
            pkt[n + 2] = c >> 8
            pkt[n + 3] = c & 0xFF
            tx = self.tx
            tmv = self.tmv
            tx[0] = _FIRST_0
            tx[1] = _FIRST_1
            i = 0
            n += 4
            while i < n:
                k = min(n - i, _LINE_DATA)
                b = b2a_base64(pmv[i : i + k])  # ends "\n"
                m = len(b) + 2
                tmv[2:m] = b
                link.write(tmv[:m])
                tx[0] = _MORE_0
                tx[1] = _MORE_1
                i += k
            return True
        if n + 2 > len(pkt):
            return False
        pmv[:n] = r
        c = crc16(pkt, 0, n)
        pkt[n] = c >> 8
        pkt[n + 1] = c & 0xFF
        self._cobs_out(link, n + 2)
        return True

    def _cobs_out(self, link, e):
        # 00 + COBS(pkt[:e]) + 00, as smpclient's and MCUboot's encoders (and a leading
        # delimiter, which their decoders skip): a 254-byte block ending the data is followed
        # by an empty one.
        pkt = self.pkt
        pmv = self.pmv
        tx = self.tx
        tmv = self.tmv
        tx[0] = 0  # a leading delimiter ends whatever a corrupted earlier reply left open
        t = 1
        s = 0
        while True:
            lim = min(e, s + _COBS_BLOCK)
            z = pkt.find(b"\x00", s, lim)
            k = (lim if z < 0 else z) - s
            if t + k + 1 > _TX:
                link.write(tmv[:t])
                t = 0
            tx[t] = k + 1
            if k:
                tmv[t + 1 : t + 1 + k] = pmv[s : s + k]
            t += k + 1
            if z >= 0:
                s = z + 1
            else:
                s = lim
                if k < _COBS_BLOCK:
                    break
        if t == _TX:
            link.write(tmv[:t])
            t = 0
        tx[t] = 0
        link.write(tmv[: t + 1])


def _report(e):
    import sys

    sys.print_exception(e)


def serve(link, server, tick=None):
    # Serves SMP requests from link, strictly in order, until the server asks for a reset:
    # then returns with that response sent and drained (the caller resets). Bytes of further
    # requests stay unread. tick() (e.g. a watchdog feed) runs after each request and at
    # least once a second while idle.
    f = Framer(server.buf_size)
    while True:
        p = f.next()
        if p is None:
            n = link.readinto(f.space())
            if n:
                f.got(n)
            else:
                if tick:
                    tick()
                link.wait(_IDLE_MS)
            continue
        try:
            r = server.handle(p)
        except Exception as e:  # a server bug: this request gets no answer, the service lives
            _report(e)
            r = None
        if r is not None:
            try:
                f.send(link, f.kind, r)
            except OSError as e:  # the line failed under this reply: the client will resend
                _report(e)
        if tick:
            tick()
        if server.reset_requested:
            d = getattr(link, "drain", None)
            if d:
                d()
            return


async def serve_async(stream, server, tick=None):
    # serve() over an asyncio stream (asyncio.StreamReader(uart), which also writes): other
    # tasks run while no request is pending.
    f = Framer(server.buf_size)
    while True:
        p = f.next()
        if p is None:
            n = await stream.readinto(f.space())
            if n:
                f.got(n)
            continue
        try:
            r = server.handle(p)
        except Exception as e:
            _report(e)
            r = None
        if r is not None:
            f.send(stream, f.kind, r)
            await stream.drain()
        if tick:
            tick()
        if server.reset_requested:
            return
