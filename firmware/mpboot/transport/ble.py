# SMP over BLE (docs/BLE.md section 1): Zephyr's SMP GATT service on MicroPython's `bluetooth`
# API, serving the same mpboot.smp.server.Server as the UART transport.
#
#   service  8D53DC1D-1DB7-4CD3-868B-8A527460AA84
#   char     DA2E7828-FBCE-4E01-AE9E-261174997C48  WRITE_NO_RESPONSE | NOTIFY
#
# Requests arrive as writes without response, in pieces of at most MTU - 3 bytes; responses
# leave as notifications of at most MTU - 3 bytes. Packets are found in the byte stream by the
# SMP header's length field (8 + length), as Zephyr's SMP BT transport does.
#
# Flow control is the SMP window: a client keeps at most buf_count requests of at most
# buf_size bytes in flight, so the characteristic's buffer (append mode) is sized to hold them
# all while one is being written to flash: nothing is queued elsewhere and nothing dropped.
# (Its default, 20 bytes, would silently truncate every longer write.)
#
# A link is any object with
#   ble                  a bluetooth.BLE
#   name                 the name to advertise (str)
#   wait(ms, ready)      returns when ready() is true or ms passed (ready None: ms passed);
#                        IRQs run meanwhile
# mpboot.ports.<port>.ble(...) makes one. serve(link, server) runs an mpboot.smp.server.Server
# over it.
#
# Memory: a buf_size reassembly buffer and a 13-byte error response, allocated once; the
# GATT buffer (buf_size * buf_count, in the BLE stack's heap). Each gatts_read allocates the
# bytes it returns (the API has no readinto), at most that buffer's size.
import time
from binascii import unhexlify

import bluetooth
from micropython import const

SERVICE = "8D53DC1D-1DB7-4CD3-868B-8A527460AA84"
CHARACTERISTIC = "DA2E7828-FBCE-4E01-AE9E-261174997C48"

_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_CENTRAL_DISCONNECT = const(2)
_IRQ_GATTS_WRITE = const(3)
_IRQ_MTU_EXCHANGED = const(21)
_FLAGS = const(0x0014)  # FLAG_WRITE_NO_RESPONSE | FLAG_NOTIFY

_MTU = const(247)  # one LL packet with data length extension (251 bytes: 4 of L2CAP)
_MTU_MIN = const(23)  # until the central exchanges MTUs
_ADV_US = const(100000)  # advertising interval
_ADV_MAX = const(31)
_HDR = const(8)
_IDLE_MS = const(1000)  # longest wait without calling tick()
_RETRY_MS = const(1000)  # how long a notification is retried while the controller is full
_GRACE_MS = const(100)  # before disconnecting: the last notifications leave the controller
_CLOSE_MS = const(1000)  # for the disconnect to complete before the caller resets
_EMSGSIZE = const(7)
_OP_READ = const(0)  # SMP ops: a response's op is its request's + 1
_OP_WRITE = const(2)


def uuid_le(s):
    # The UUID string as the 16 little-endian bytes advertising data carries.
    return bytes(reversed(unhexlify(s.replace("-", ""))))


def adv_payload(name):
    # (advertisement, scan response). The advertisement: flags (LE general discoverable, no
    # BR/EDR), the complete list of 128-bit service UUIDs and the local name, complete or
    # shortened to fit 31 bytes: all in it, since many centrals never ask for a scan response.
    # A shortened name is also sent complete in the scan response, for those that do ask.
    n = name.encode() if isinstance(name, str) else bytes(name)
    room = _ADV_MAX - 3 - 18 - 2
    if len(n) <= room:
        return b"\x02\x01\x06\x11\x07" + uuid_le(SERVICE) + bytes((len(n) + 1, 0x09)) + n, b""
    i = room
    while i > 0 and n[i] & 0xC0 == 0x80:
        i -= 1  # cut at a UTF-8 character boundary
    adv = b"\x02\x01\x06\x11\x07" + uuid_le(SERVICE) + bytes((i + 1, 0x08)) + n[:i]
    resp = bytes((len(n) + 1, 0x09)) + n if len(n) <= _ADV_MAX - 2 else b""
    return adv, resp


def _report(e):
    import sys

    sys.print_exception(e)


class Gatt:
    # The SMP service on link.ble for server: registered and advertising once made.
    def __init__(self, link, server):
        ble = link.ble
        self.ble = ble
        self.link = link
        self.server = server
        self.buf = bytearray(server.buf_size)  # the request being reassembled
        self.bmv = memoryview(self.buf)
        self.n = 0  # bytes of it so far
        self.need = _HDR  # bytes it has: the header's 8 until the header is in
        self.skip = 0  # bytes of an oversize request still to discard
        # EMSGSIZE response: the request's header (op + 1, length 5) then {"rc": 7}
        self.err = bytearray(b"\x00\x00\x00\x05\x00\x00\x00\x00\xa1\x62rc\x07")
        # What the IRQ handler records (it may run between any two bytecodes: it only sets
        # these, the loop acts on them).
        self.conn = -1  # the central's connection handle, -1: none
        self.mtu = _MTU_MIN
        self.written = False  # the characteristic got bytes since the loop last read it
        self.lost = 0  # connections ended; the loop has handled self.seen of them
        self.seen = 0
        self.ready = self._ready  # bound once: wait() calls it often
        self.adv, self.resp = adv_payload(link.name)
        self.adv_due = True
        ble.active(True)
        ble.config(mtu=_MTU)  # what we answer a central's MTU exchange with
        try:
            ble.config(gap_name=link.name)  # the GAP Device Name characteristic
        except (ValueError, OSError):
            pass  # a stack without it still advertises the name
        ble.irq(self._irq)
        ((self.h,),) = ble.gatts_register_services(
            ((bluetooth.UUID(SERVICE), ((bluetooth.UUID(CHARACTERISTIC), _FLAGS),)),))
        ble.gatts_set_buffer(self.h, server.buf_size * server.buf_count, True)
        self.advertise()

    def _irq(self, event, data):
        if event == _IRQ_GATTS_WRITE:
            if data[1] == self.h:
                self.written = True
        elif event == _IRQ_CENTRAL_CONNECT:
            self.mtu = _MTU_MIN
            self.conn = data[0]
        elif event == _IRQ_CENTRAL_DISCONNECT:
            if data[0] == self.conn:
                self.conn = -1
                self.lost += 1
        elif event == _IRQ_MTU_EXCHANGED:
            if data[0] == self.conn:
                self.mtu = data[1]

    def _ready(self):
        return self.written or self.lost != self.seen

    def advertise(self):
        self.adv_due = True  # until the stack took it: tried again at the next idle wake-up
        try:
            self.ble.gap_advertise(_ADV_US, self.adv, resp_data=self.resp)
            self.adv_due = False
        except OSError as e:
            _report(e)

    def _dropped(self):
        # A connection ended: its partial request goes with it; bytes it wrote that the loop
        # had not read yet are dropped too, unless a new central already connected (then they
        # cannot be told apart from its own; a new connection first discovers services and
        # subscribes, so in practice the old bytes were read long before).
        self.seen = self.lost
        self.n = 0
        self.need = _HDR
        self.skip = 0
        if self.conn < 0:
            self.written = False
            self.ble.gatts_read(self.h)
            self.advertise()

    def run(self, tick=None):
        # Serves until a reset was requested and its response sent: returns with the central
        # disconnected (the caller resets).
        ble = self.ble
        while True:
            if self.lost != self.seen:
                self._dropped()
            if self.written:
                self.written = False  # before the read: a write after it sets it again
                data = ble.gatts_read(self.h)
                if self.conn >= 0 and data:
                    self.feed(data, tick)
                    if self.server.reset_requested:
                        self.close()
                        return
                continue
            if self.adv_due and self.conn < 0:
                self.advertise()
            if tick:
                tick()
            self.link.wait(_IDLE_MS, self.ready)

    def feed(self, data, tick=None):
        # Reassembles requests from data (what the central wrote), handling each as it completes.
        mv = memoryview(data)
        end = len(mv)
        buf = self.buf
        bmv = self.bmv
        lost = self.lost
        i = 0
        while i < end:
            if self.skip:
                k = min(self.skip, end - i)
                self.skip -= k
                i += k
                continue
            n = self.n
            k = min(self.need - n, end - i)
            bmv[n : n + k] = mv[i : i + k]
            n += k
            i += k
            self.n = n
            if n < self.need:
                return
            if n == _HDR:
                need = _HDR + (buf[2] << 8 | buf[3])
                if need > len(buf):
                    # Larger than buf_size: answered at once, its bytes discarded as they come.
                    self.skip = need - _HDR
                    self.n = 0
                    self.too_big()
                    continue
                self.need = need
                if need > _HDR:
                    continue
            self.n = 0
            self.need = _HDR
            try:
                r = self.server.handle(bmv[:n])
            except Exception as e:  # a server bug: this request gets no answer, the service lives
                _report(e)
                r = None
            if r is not None:
                self.send(r)
            if tick:
                tick()
            if self.server.reset_requested or self.lost != lost:
                return  # the rest is unread (reset) or void (its connection ended)

    def too_big(self):
        b = self.buf
        op = b[0] & 7
        if op != _OP_READ and op != _OP_WRITE:
            return  # a response, or no SMP op: never answered
        e = self.err
        e[0] = (op + 1) | min((b[0] >> 3) & 3, 1) << 3
        e[4] = b[4]
        e[5] = b[5]
        e[6] = b[6]
        e[7] = b[7]
        self.send(e)

    def send(self, r):
        # Notifies r in pieces of MTU - 3 bytes; a piece the stack refuses (ENOMEM: the
        # controller's queue is full) is retried every millisecond for up to a second. False
        # if the central went away or the stack kept refusing.
        conn = self.conn
        if conn < 0:
            return False
        mv = memoryview(r)
        n = len(mv)
        i = 0
        while i < n:
            k = min(self.mtu - 3, n - i)
            t0 = 0
            while True:
                try:
                    self.ble.gatts_notify(conn, self.h, mv[i : i + k])
                    break
                except OSError as e:
                    if not t0:
                        t0 = time.ticks_ms() | 1
                    elif time.ticks_diff(time.ticks_ms(), t0) >= _RETRY_MS:
                        _report(e)
                        return False
                    self.link.wait(1, None)
                    if self.conn != conn:
                        return False
            i += k
        return True

    def close(self):
        # After the reset response: let it leave, disconnect, and wait for the link to end.
        conn = self.conn
        if conn < 0:
            return
        link = self.link
        link.wait(_GRACE_MS, None)
        if self.conn != conn:
            return
        try:
            self.ble.gap_disconnect(conn)
        except OSError:
            return
        lost = self.lost
        link.wait(_CLOSE_MS, lambda: self.lost != lost)


def serve(link, server, tick=None):
    # Serves SMP requests from link's central, strictly in order, until the server asks for a
    # reset: then returns with that response sent and the central disconnected (the caller
    # resets). tick() (e.g. a watchdog feed) runs after each request and at least once a
    # second while idle.
    Gatt(link, server).run(tick)
