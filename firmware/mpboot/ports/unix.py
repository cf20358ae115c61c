# The unix port as a simulated device: flash is a NorFlash file (mpboot.ports.nor_sim), laid
# out as slot 0 | slot 1 | state | trust | factory (two sectors each but the slots; devices
# made before the trust area: slot 0 | slot 1 | state | factory; with stage-1 slots, issue
# 19: slot 0 | slot 1 | stage 1's two slots | state | ...). The unix port has no
# machine.WDT and cannot map flash: the watchdog is a fake that records what was asked of it, and mapped() returns
# None so the boot copies the image to RAM and verifies that copy (hardware maps flash).
# uart(path) is a pty the simulator (host/mpboot/sim/serve.py) relays to the user's pty.
# ble(name, port) is the simulator's radio: the bluetooth shim (host/mpboot/upy_scripts/
# bluetooth.py, docs/BLE.md section 2) talking to its companion on 127.0.0.1:port.
# udp(port) is SMP over UDP on 127.0.0.1:port (the host's own network stack).
import sys
from micropython import const

from mpboot.flash import Area
from mpboot.ports import BleLink
from mpboot.ports.nor_sim import NorFlash

_TRUST_RECORD = const(2304)  # mpboot.trust's record: a trust area's sector holds one


def flash(path, size, sector=4096, align=1, timing=None):
    # timing: None, or "nor" for typical SPI NOR erase/program times (mpboot.ports.nor_sim)
    return NorFlash(path, size, sector, align, timing)


def areas(chip, trust=True, s1=0):
    # slot 0 | slot 1 | state (2 sectors) | trust (2 sectors) | factory (the last 2 sectors;
    # one unused sector before it when the chip has an odd number of sectors). trust=False:
    # the layout of simulated devices made before the trust area (no trust area, four
    # areas; host/mpboot/sim keeps which in the device's config). A chip whose sectors are
    # too small for a trust record (1 and 2 KiB) has none either.
    # s1: the size of each of stage 1's two slots (a multiple of the sector; 0: none, the
    # layout above). With them: slot 0 | slot 1 | stage 1's slot 0 | its slot 1 | state ...,
    # and seven areas: the five above (None for a missing trust area), then stage 1's slots.
    sec = chip.sector
    trust = trust and sec >= _TRUST_RECORD
    if s1 % sec or s1 < 0:
        raise ValueError("s1")
    slot = (chip.size // sec - (6 if trust else 4) - 2 * (s1 // sec)) // 2 * sec
    if slot <= 0:
        raise ValueError("chip")
    a = chip.align
    st = 2 * slot + 2 * s1
    areas = (Area(chip, 0, slot, a), Area(chip, slot, slot, a), Area(chip, st, 2 * sec, a),
             Area(chip, chip.size - 2 * sec, 2 * sec, a))
    t = Area(chip, st + 2 * sec, 2 * sec, a) if trust else None
    if s1:
        return areas + (t, Area(chip, 2 * slot, s1, a), Area(chip, 2 * slot + s1, s1, a))
    return areas + (t,) if trust else areas


def mapped(area):
    return None


class _Watchdog:
    # machine.WDT stand-in: armed with a timeout, fed by the app; nothing resets the process.
    def __init__(self, timeout_ms):
        self.timeout_ms = timeout_ms
        self.feeds = 0

    def feed(self):
        self.feeds += 1


def watchdog(timeout_ms):
    return _Watchdog(timeout_ms)


def reset():
    sys.exit(0)  # a new process is the next power-on


def unique_id():
    return b"mpboot-sim"


_VTIME = const(5)  # termios c_cc indices on Linux
_VMIN = const(6)


class _Pty:
    # A pty slave as the UART: raw, VMIN=0/VTIME=0 so a read returns what is there at once
    # (MicroPython's readinto otherwise blocks until the buffer is full), select.poll to wait.
    # A hangup (the other end, the simulator, is gone) is the power going off.
    def __init__(self, path):
        import select
        import termios

        self.f = open(path, "r+b")
        fd = self.f.fileno()
        termios.setraw(fd)
        a = termios.tcgetattr(fd)
        a[6][_VMIN] = 0
        a[6][_VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, a)
        self.p = select.poll()
        self.p.register(self.f, select.POLLIN)
        self.hup = select.POLLHUP | select.POLLERR

    def readinto(self, buf):
        return self.f.readinto(buf)

    def write(self, buf):
        self.f.write(buf)

    def wait(self, ms):
        for _, ev in self.p.ipoll(ms):
            if ev & self.hup:
                sys.exit(0)
            break

    def drain(self):
        pass  # writes to a pty are in the other side's buffer once write() returns


def uart(path):
    # The simulated device's UART: a pty slave device path (the simulator relays its master).
    return _Pty(path)


class _SimBle(BleLink):
    # The shim's IRQs arrive only while it pumps its socket: waiting is pumping.
    def __init__(self, name, port):
        import bluetooth

        bluetooth._radio(port)  # connects, and waits for the companion's READY
        BleLink.__init__(self, bluetooth.BLE(), name)
        self._pump = bluetooth._pump

    def wait(self, ms, ready=None):
        self._pump(ms, ready)


def ble(name, port):
    # The simulated device's radio: the companion listening on 127.0.0.1:port.
    return _SimBle(name, port)


def udp(port, host="127.0.0.1", allow=None):
    # SMP over UDP (mpboot.transport.udp) on host:port; allow: the peers' IP addresses served
    # (default any).
    from mpboot.transport.udp import UdpLink

    return UdpLink(host, port, allow)
