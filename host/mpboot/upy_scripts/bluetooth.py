# The MicroPython `bluetooth` module for the unix port, whose firmware has none: the subset
# of the API mpboot's BLE transport uses, with the semantics of the real module on NimBLE
# (docs/BLE.md section 2). The simulated device finds it on its sys.path as `bluetooth`.
#
# The radio is the simulator's companion (CPython, Bumble) on 127.0.0.1:PORT, reached once per
# power-on by _radio(PORT) (mpboot.ports.unix.ble does it) before BLE() is used. Messages both
# ways are `u8 type | u16 LE length | payload`; integers in payloads are little-endian, device
# addresses and UUIDs big-endian (as printed and written). The companion speaks first (READY).
#
# What is faithful, because firmware bugs hide behind it:
# - A characteristic's value buffer is 20 bytes until gatts_set_buffer(); a longer write is
#   truncated to the buffer. In append mode writes are added after what is there and bytes
#   beyond the buffer are dropped; gatts_read() returns the value and, in append mode, empties
#   it (NimBLE, extmod/modbluetooth.c).
# - A notification longer than the connection's MTU - 3 is truncated (NimBLE truncates ATT
#   PDUs to the MTU); gatts_notify on a connection that is not there raises OSError(ENOTCONN).
# - Handles: per characteristic its declaration, its value, then a CCCD if it notifies or
#   indicates, then its descriptors (NimBLE's order). gatts_register_services returns the value
#   (and descriptor) handles, one tuple per service.
# - IRQs run from _pump() only (the unix link's wait), one at a time, never re-entrantly; the
#   address in CONNECT/DISCONNECT data is a memoryview, as on hardware (copy it to keep it).
# - Advertising stops when a central connects (a peripheral takes one connection at a time).
# - BLE() is one object; other calls before active(True) raise OSError(ENODEV).
#
# Test knob: _fail_notify = N makes the next N gatts_notify calls raise OSError(ENOMEM), as a
# controller whose transmit queue is full does.
import select
import socket
import sys
import time
from binascii import unhexlify
from micropython import const

FLAG_READ = const(0x0002)
FLAG_WRITE_NO_RESPONSE = const(0x0004)
FLAG_WRITE = const(0x0008)
FLAG_NOTIFY = const(0x0010)
FLAG_INDICATE = const(0x0020)

_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_CENTRAL_DISCONNECT = const(2)
_IRQ_GATTS_WRITE = const(3)
_IRQ_MTU_EXCHANGED = const(21)

# messages (docs/BLE.md section 2)
_M_CONFIG = const(0x01)
_M_REGISTER = const(0x02)
_M_ADVERTISE = const(0x03)
_M_NOTIFY = const(0x04)
_M_DISCONNECT = const(0x05)
_M_VALUE = const(0x06)
_M_READY = const(0x80)
_M_CONNECT = const(0x81)
_M_DISCONNECTED = const(0x82)
_M_WRITE = const(0x83)
_M_MTU = const(0x84)

_ENOMEM = const(12)
_ENODEV = const(19)
_EINVAL = const(22)
_ENOTCONN = const(107)

_DEFAULT_LEN = const(20)  # MP_BLUETOOTH_DEFAULT_ATTR_LEN
_MTU_MIN = const(23)
_MTU_MAX = const(517)
_ADV_MAX = const(31)  # legacy advertising PDU payload

# 0000xxxx-0000-1000-8000-00805F9B34FB, little-endian, for 16- and 32-bit UUIDs
_BASE = b"\xfb\x34\x9b\x5f\x80\x00\x00\x80\x00\x10\x00\x00"

_fail_notify = 0


def _le(v, n):
    return v.to_bytes(n, "little")


class UUID:
    # bytes(uuid) is the UUID little-endian, as on hardware (and so as advertising data wants).
    def __init__(self, v):
        if isinstance(v, UUID):
            b = v._b
        elif isinstance(v, int):
            if v < 0 or v > 0xFFFFFFFF:
                raise ValueError("invalid UUID")
            b = _le(v, 2 if v <= 0xFFFF else 4)
        elif isinstance(v, str):
            h = v.replace("-", "")
            if len(h) != 32:
                raise ValueError("invalid UUID")
            b = bytes(reversed(unhexlify(h)))
        else:
            b = bytes(v)
            if len(b) not in (2, 4, 16):
                raise ValueError("invalid UUID")
        self._b = b

    def __iter__(self):
        return iter(self._b)

    def __eq__(self, other):
        return isinstance(other, UUID) and other._b == self._b

    def __hash__(self):
        return hash(self._b)

    def __repr__(self):
        b = self._b
        if len(b) < 16:
            return "UUID(0x%x)" % int.from_bytes(b, "little")
        h = bytes(reversed(b)).hex()
        return "UUID('%s-%s-%s-%s-%s')" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])

    def _be128(self):
        b = self._b
        if len(b) < 16:
            b = _BASE + b + bytes(4 - len(b))
        return bytes(reversed(b))


class _Attr:
    def __init__(self):
        self.buf = bytearray(_DEFAULT_LEN)
        self.n = 0
        self.append = False


# --------------------------------------------------------------------------- the radio link

_sock = None
_poll = None
_rx = bytearray(1024)
_rmv = memoryview(_rx)
_pos = 0
_fill = 0
_addr = (0, bytes(6))
_pumping = False
_ble = None


def _radio(port, host="127.0.0.1"):
    # Connects to the companion and waits for its READY (the device address).
    global _sock, _poll, _addr
    s = socket.socket()
    s.connect(socket.getaddrinfo(host, port)[0][-1])
    s.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY: a notification leaves at once
    s.setblocking(False)
    _sock = s
    _poll = select.poll()
    _poll.register(s, select.POLLIN)
    while True:
        while _fill - _pos < 3 or _fill - _pos < 3 + (_rx[_pos + 1] | _rx[_pos + 2] << 8):
            _recv(-1)
        t = _rx[_pos]
        m = _take()
        if t == _M_READY:
            _addr = (m[0], bytes(m[1:7]))
            return


def _gone():
    # The companion closed the link: the simulator is gone, and with it this device's power.
    sys.exit(0)


def _recv(ms):
    # Reads what the companion sent, waiting up to ms (-1: forever). False: nothing came.
    global _rx, _rmv, _pos, _fill
    if not _poll.poll(ms):
        return False
    if _pos:
        n = _fill - _pos
        _rmv[:n] = _rmv[_pos:_fill]
        _pos = 0
        _fill = n
    if _fill == len(_rx):
        b = bytearray(2 * len(_rx))  # a message larger than the buffer: grow (rare)
        b[:_fill] = _rx[:_fill]
        _rx = b
        _rmv = memoryview(b)
    try:
        n = _sock.readinto(_rmv[_fill:])
    except OSError:
        _gone()
    if n is None:
        return False
    if n == 0:
        _gone()
    _fill += n
    return True


def _take():
    # The payload of the complete message at _pos (a memoryview valid until the next read).
    global _pos
    n = _rx[_pos + 1] | _rx[_pos + 2] << 8
    s = _pos + 3
    _pos = s + n
    return _rmv[s : s + n]


_tx = bytearray(3 + 4 + _MTU_MAX)  # one message, sent with one write


def _send(t, *parts):
    global _tx
    n = 0
    for p in parts:
        n += len(p)
    if n + 3 > len(_tx):
        _tx = bytearray(n + 3)
    tx = _tx
    tx[0] = t
    tx[1] = n & 0xFF
    tx[2] = n >> 8
    o = 3
    for p in parts:
        k = len(p)
        tx[o : o + k] = p
        o += k
    _write(memoryview(tx)[:o])


def _write(b):
    mv = memoryview(b)
    i = 0
    while i < len(mv):
        k = _sock.write(mv[i:])
        if k is None:
            p = select.poll()  # the companion reads continuously: this waits briefly
            p.register(_sock, select.POLLOUT)
            p.poll(100)
            continue
        i += k


def _one():
    # Handles one complete message, if there is one. False: none waiting.
    if _fill - _pos < 3:
        return False
    if _fill - _pos < 3 + (_rx[_pos + 1] | _rx[_pos + 2] << 8):
        return False
    t = _rx[_pos]
    m = _take()
    b = _ble
    if b is None or not b._active:
        return True
    if t == _M_CONNECT:
        conn = m[0] | m[1] << 8
        b._conns[conn] = _MTU_MIN
        b._adv_on = False  # the controller stops advertising when a central connects
        b._irq(_IRQ_CENTRAL_CONNECT, (conn, m[2], memoryview(bytes(m[3:9]))))
    elif t == _M_DISCONNECTED:
        conn = m[0] | m[1] << 8
        if conn in b._conns:
            del b._conns[conn]
            b._irq(_IRQ_CENTRAL_DISCONNECT, (conn, m[2], memoryview(bytes(m[3:9]))))
    elif t == _M_WRITE:
        conn = m[0] | m[1] << 8
        h = m[2] | m[3] << 8
        a = b._attrs.get(h)
        if a is not None and conn in b._conns:
            off = a.n if a.append else 0
            k = min(len(m) - 4, len(a.buf) - off)
            if k > 0:
                a.buf[off : off + k] = m[4 : 4 + k]
            a.n = off + max(k, 0)
            b._irq(_IRQ_GATTS_WRITE, (conn, h))
    elif t == _M_MTU:
        conn = m[0] | m[1] << 8
        if conn in b._conns:
            mtu = m[2] | m[3] << 8
            b._conns[conn] = mtu
            b._irq(_IRQ_MTU_EXCHANGED, (conn, mtu))
    return True


def _pump(ms, ready=None):
    # Delivers what the radio sent as IRQs, until ready() is true or ms have passed (0: only
    # what is there now). Called from inside an IRQ handler it returns at once.
    global _pumping
    if _pumping or _sock is None:
        return
    _pumping = True
    try:
        t0 = time.ticks_ms()
        looked = False
        while True:
            if ready is not None and ready():
                return
            if _one():
                continue
            left = ms - time.ticks_diff(time.ticks_ms(), t0)
            if left <= 0:
                if looked:
                    return
                left = 0
            looked = left == 0
            _recv(left)
    finally:
        _pumping = False


# --------------------------------------------------------------------------- the API


class BLE:
    def __new__(cls):
        global _ble
        if _ble is None:
            b = object.__new__(cls)
            b._active = False
            b._handler = None
            b._mtu = _MTU_MIN
            b._name = b"MPY SIM"
            b._attrs = {}
            b._conns = {}  # conn handle -> MTU
            b._adv = b""
            b._resp = b""
            b._adv_on = False
            _ble = b
        return _ble

    def _irq(self, event, data):
        h = self._handler
        if h is not None:
            h(event, data)

    def _check(self):
        if not self._active:
            raise OSError(_ENODEV)

    def _config_msg(self):
        _send(_M_CONFIG, _le(self._mtu, 2), self._name)

    def active(self, *a):
        if not a:
            return self._active
        on = bool(a[0])
        if on and _sock is None:
            raise OSError(_ENODEV)  # no radio: bluetooth._radio(port) first
        if on and not self._active:
            self._active = True
            self._config_msg()
        elif not on and self._active:
            self.gap_advertise(None)
            for c in list(self._conns):
                _send(_M_DISCONNECT, _le(c, 2))
            self._conns = {}
            self._attrs = {}
            self._active = False
        return self._active

    def config(self, *a, **kw):
        if a:
            if len(a) != 1 or kw:
                raise TypeError
            k = a[0]
            if k == "mac":
                return _addr
            if k == "mtu":
                return self._mtu
            if k == "gap_name":
                return self._name
            raise ValueError("unknown config param")
        for k, v in kw.items():
            if k == "mtu":
                if v < _MTU_MIN or v > _MTU_MAX:
                    raise ValueError
                self._mtu = v
            elif k == "gap_name":
                self._name = v.encode() if isinstance(v, str) else bytes(v)
            else:
                raise ValueError("unknown config param")
        if self._active:
            self._config_msg()

    def irq(self, handler):
        self._handler = handler

    def gap_advertise(self, interval_us, adv_data=None, *, resp_data=None, connectable=True):
        # None data: the previous call's is reused (as on hardware); None interval: stop.
        self._check()
        if adv_data is not None:
            self._adv = bytes(adv_data)
        if resp_data is not None:
            self._resp = bytes(resp_data)
        if len(self._adv) > _ADV_MAX or len(self._resp) > _ADV_MAX:
            raise OSError(_EINVAL)
        if interval_us is None:
            self._adv_on = False
            _send(_M_ADVERTISE, _le(0, 4), b"\x00\x00")
            return
        self._adv_on = True
        _send(_M_ADVERTISE, _le(max(int(interval_us), 1), 4),
              bytes((1 if connectable else 0, len(self._adv))), self._adv, self._resp)

    def gatts_register_services(self, defs):
        # Registering replaces what was registered before (NimBLE resets its GATT server).
        self._check()
        self._attrs = {}
        h = 1  # the next free handle
        out = []
        msgs = []
        for svc in defs:
            su = svc[0]
            h += 1  # the service declaration
            hs = []
            parts = [su._be128()]
            for ch in svc[1]:
                cu, flags = ch[0], ch[1]
                v = h + 1  # the characteristic declaration, then its value
                h = v + 1
                self._attrs[v] = _Attr()
                hs.append(v)
                if flags & (FLAG_NOTIFY | FLAG_INDICATE):
                    h += 1  # CCCD
                for d in ch[2] if len(ch) > 2 else ():
                    self._attrs[h] = _Attr()  # descriptors: local only, not proxied
                    hs.append(h)
                    h += 1
                parts.append(_le(v, 2) + cu._be128() + _le(flags, 2))
            out.append(tuple(hs))
            msgs.append(parts)
        for parts in msgs:
            _send(_M_REGISTER, *parts)
        return tuple(out)

    def _attr(self, h):
        a = self._attrs.get(h)
        if a is None:
            raise OSError(_EINVAL)
        return a

    def gatts_read(self, h):
        self._check()
        a = self._attr(h)
        r = bytes(memoryview(a.buf)[: a.n])
        if a.append:
            a.n = 0
        return r

    def gatts_write(self, h, data, send_update=False):
        self._check()
        a = self._attr(h)
        n = len(data)
        if n > len(a.buf):
            a.buf = bytearray(n)  # a local write grows the buffer
        a.buf[:n] = data
        a.n = n
        _send(_M_VALUE, _le(h, 2), data)
        if send_update:
            for c in self._conns:
                self.gatts_notify(c, h, data)

    def gatts_notify(self, conn, h, data=None):
        global _fail_notify
        self._check()
        a = self._attr(h)
        mtu = self._conns.get(conn)
        if mtu is None:
            raise OSError(_ENOTCONN)
        if _fail_notify > 0:
            _fail_notify -= 1
            raise OSError(_ENOMEM)
        mv = memoryview(a.buf)[: a.n] if data is None else memoryview(data)
        if len(mv) > mtu - 3:
            mv = mv[: mtu - 3]  # the ATT PDU is truncated to the MTU
        _send(_M_NOTIFY, _le(conn, 2), _le(h, 2), mv)

    def gatts_set_buffer(self, h, n, append=False):
        self._check()
        a = self._attr(h)
        a.buf = bytearray(n)
        a.n = 0
        a.append = bool(append)

    def gap_disconnect(self, conn):
        # True if that connection was up; its CENTRAL_DISCONNECT IRQ follows when the companion
        # reports the link down.
        self._check()
        if conn not in self._conns:
            return False
        _send(_M_DISCONNECT, _le(conn, 2))
        return True
