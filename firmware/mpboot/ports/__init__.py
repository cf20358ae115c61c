# Port adapters: one small module per MicroPython port, so the rest of the firmware never
# imports a port's native module (esp32, rp2, pyb, machine). Each module gives:
#
#   areas(...)            -> (slot0, slot1, state, factory): mpboot.flash.Area objects
#                            whose block size is the erase unit and whose write_size is the
#                            port's program alignment (state and factory: two erase units
#                            each, docs/FACTORY.md); arguments are the port's way to name
#                            flash regions (partition labels, byte offsets)
#   mapped(area)          -> a read-only memoryview of the area's bytes in memory-mapped
#                            flash (what a ROMFS is mounted from in place), or None when the
#                            port cannot map it (the boot then copies the image to RAM)
#   watchdog(timeout_ms)  -> an object with feed(), armed now; None if the port has none
#   reset()               -> hard reset
#   unique_id()           -> bytes identifying this board
#   uart(...)             -> a link for mpboot.transport.uart.serve (SMP over that UART):
#                            esp32, rp2, stm32: uart(id, baudrate, rxbuf, **pins) over
#                            machine.UART; unix: uart(path) over a pty; qemu: uart() on
#                            the REPL's UART
#   ble(name)             -> a BleLink for mpboot.transport.ble.serve (SMP over BLE, advertised
#                            as name), where the port has the bluetooth module (esp32, rp2 on
#                            Pico W boards, stm32 on boards with a radio); unix: ble(name,
#                            port) over the simulator's radio (the bluetooth shim)
#   udp(port, host, allow) -> a UdpLink for mpboot.transport.udp.serve (SMP over UDP), where
#                            the port has a network stack (esp32, rp2 on Pico W boards, unix);
#                            the app brings the network up first

from micropython import const

_DRAIN_MS = const(250)  # before a reset: UdpLink.drain


class UartLink:
    # A machine.UART opened with timeout=0 as a transport link: readinto() returns None at
    # once when nothing waits, wait(ms) polls, drain() waits for the transmitter (UART.flush).
    def __init__(self, u):
        import select

        self.u = u
        self.p = select.poll()
        self.p.register(u, select.POLLIN)

    def readinto(self, buf):
        return self.u.readinto(buf)

    def write(self, buf):
        mv = memoryview(buf)
        i = 0
        while i < len(mv):
            i += self.u.write(mv[i:]) or 0

    def wait(self, ms):
        for _ in self.p.ipoll(ms):
            break

    def drain(self):
        f = getattr(self.u, "flush", None)
        if f:
            f()


class BleLink:
    # A bluetooth.BLE as a transport link: .ble, .name (advertised), wait(ms, ready) sleeps in
    # 1 ms steps, during which the stack's IRQs run, until ready() is true or ms passed.
    def __init__(self, ble, name):
        self.ble = ble
        self.name = name

    def wait(self, ms, ready=None):
        import time

        t0 = time.ticks_ms()
        while not (ready and ready()) and time.ticks_diff(time.ticks_ms(), t0) < ms:
            time.sleep_ms(1)


class UdpLink:
    # A bound, non-blocking UDP socket as a transport link (mpboot.transport.udp): recvfrom(n)
    # returns None at once when no datagram waits, wait(ms) polls, drain() gives the last
    # datagrams time to leave before a reset (see there). host: the address to bind
    # ("0.0.0.0": every interface; an interface's own address: that one only; an IPv6
    # address binds IPv6). allow: None (any sender is served), or the peers' IP addresses
    # (strings, as "192.168.1.20") whose datagrams are served; the rest are dropped
    # unanswered. SMP has no authentication: docs/THREAT_MODEL.md, "SMP over UDP".
    def __init__(self, host, port, allow=None):
        import select
        import socket

        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
        s = socket.socket(ai[0], socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(ai[-1])
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.s = s
        self.p = select.poll()
        self.p.register(s, select.POLLIN)
        self.peers = None
        if allow is not None:
            # Each allowed address as recvfrom gives a sender's: a sockaddr (unix) or an
            # (ip, port) tuple (lwIP ports); compared by IP only, any source port.
            self.peers = [socket.getaddrinfo(a, 0, 0, socket.SOCK_DGRAM)[0][-1] for a in allow]
            self.allow = self._allowed

    def _allowed(self, addr):
        for a in self.peers:
            if isinstance(addr, tuple):
                if isinstance(a, tuple) and a[0] == addr[0]:
                    return True
            elif len(a) == len(addr) and _ip(a) == _ip(addr):
                return True
        return False

    def recvfrom(self, n):
        for _ in self.p.ipoll(0):
            try:
                return self.s.recvfrom(n)
            except OSError:  # EAGAIN (taken meanwhile), ECONNREFUSED (an ICMP error queued)
                return None
        return None

    def sendto(self, buf, addr):
        self.s.sendto(buf, addr)

    def wait(self, ms):
        for _ in self.p.ipoll(ms):
            break

    def drain(self):
        # sendto only queues a datagram (lwIP; the WiFi driver sends it later), and no port
        # tells when its queue is empty: wait _DRAIN_MS (Zephyr's CONFIG_MCUMGR_GRP_OS_RESET_MS)
        # before the reset. sleep_ms runs the port's event hook meanwhile (esp32: yields to the
        # WiFi task; rp2: polls cyw43/lwIP); datagrams arriving stay unread.
        import time

        time.sleep_ms(_DRAIN_MS)

    def close(self):
        self.s.close()


def _ip(sa):
    # The IP address bytes of a sockaddr (sockaddr_in: 4 bytes at 4; sockaddr_in6: 16 at 8).
    return bytes(sa[4:8]) if len(sa) == 16 else bytes(sa[8:24])
