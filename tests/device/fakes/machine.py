# Fake of the parts of MicroPython's machine module the port adapters use, for the unix port
# (whose machine has no WDT, reset or unique_id). On sys.path it shadows the built-in module.
#
#   import machine
#   machine.setup("rp2")   # which port's limits and unique_id length to copy
#
# WDT(id=0, timeout=5000) checks the timeout as the port does and records it:
#   esp32: machine_wdt.c (older firmware) passes timeout // 1000 seconds, ValueError if 0;
#   rp2:   machine_wdt.c, ValueError above 8388 ms (RP2040);
#   stm32: wdt.c, IWDG prescaler and 12-bit reload: ValueError below 1 or above 32767 ms.
# unique_id(): 6 bytes (esp32 base MAC), 8 (rp2 flash/chip id), 12 (stm32 UID).
# reset() raises Reset (the port never returns from it).
# UART(id, baudrate=, rxbuf=, timeout=, ...) records how it was opened (UART.last); feed(data)
# stands for bytes arriving on the line: the driver buffers up to rxbuf of them and drops the
# rest (counted in .lost), as the ports' interrupt-driven receive buffers do. readinto() with
# timeout=0 returns None when nothing waits; write() collects into .sent; flush() counts drains.
import io

port = "esp32"
armed = -1  # timeout (ms) the watchdog runs with, -1: not armed
feeds = 0
resets = 0

_UID = {"esp32": 6, "rp2": 8, "stm32": 12}


class Reset(Exception):
    pass


def setup(name):
    global port, armed, feeds, resets
    port = name
    armed = -1
    feeds = 0
    resets = 0


class WDT:
    def __init__(self, id=0, timeout=5000):
        global armed
        if id != 0:
            raise ValueError("WDT(%d) doesn't exist" % id)
        if port == "esp32":
            if timeout // 1000 <= 0:
                raise ValueError("WDT timeout too short")
            timeout = timeout // 1000 * 1000
        elif port == "rp2":
            if timeout > 8388:
                raise ValueError("timeout exceeds 8388")
        elif port == "stm32":
            t = timeout
            p = 0
            while p < 6 and t >= 512:
                p += 1
                t //= 2
            if t * 8 <= 0:
                raise ValueError("WDT timeout too short")
            if t * 8 > 0xFFF:
                raise ValueError("WDT timeout too long")
        armed = timeout

    def feed(self):
        global feeds
        feeds += 1


def unique_id():
    n = _UID[port]
    return bytes(range(0x10, 0x10 + n))


def reset():
    global resets
    resets += 1
    raise Reset()


_UART_IDS = {"esp32": (0, 1, 2), "rp2": (0, 1), "stm32": (1, 2, 3, 4, 5, 6)}


class UART(io.IOBase):
    last = None

    def __init__(self, id, baudrate=9600, *, rxbuf=256, timeout=0, **kw):
        if id not in _UART_IDS[port]:
            raise ValueError("UART(%d) doesn't exist" % id)
        if port == "esp32" and rxbuf <= 128:
            raise ValueError("rxbuf too small")  # must exceed the 128-byte hardware FIFO
        self.id = id
        self.baudrate = baudrate
        self.rxbuf = rxbuf
        self.timeout = timeout
        self.kw = kw
        self.rx = bytearray()
        self.sent = bytearray()
        self.lost = 0
        self.flushes = 0
        UART.last = self

    def feed(self, data):
        room = self.rxbuf - len(self.rx)
        self.rx.extend(data[:room])
        self.lost += max(0, len(data) - room)

    def any(self):
        return len(self.rx)

    def readinto(self, buf, n=-1):
        if not self.rx:
            return None
        k = min(len(buf) if n < 0 else n, len(self.rx))
        buf[:k] = self.rx[:k]
        self.rx = self.rx[k:]
        return k

    def write(self, buf):
        self.sent.extend(buf)
        return len(buf)

    def flush(self):
        self.flushes += 1

    def ioctl(self, req, arg):
        if req == 3:  # MP_STREAM_POLL
            return arg & 1 if self.rx else 0
        return 0
