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
