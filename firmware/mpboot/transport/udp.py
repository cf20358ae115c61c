# SMP over UDP (docs/PROTOCOL.md, "SMP over UDP"), as Zephyr's smp_udp.c: one datagram in,
# processed whole; each SMP packet in it (several may follow each other, each header's length
# field says where the next starts) is handled in turn and its response goes back in a
# datagram of its own to the datagram's sender. No sessions, no reassembly across datagrams,
# no reliability: loss, duplication and reordering are the client's to handle (the sequence
# number, and the upload's offsets).
#
# - A datagram longer than buf_size is detected by reading buf_size + 1 bytes (recvfrom
#   truncates silently): its first packet's header gets an EMSGSIZE response, the rest is
#   dropped.
# - A packet whose header's length runs past the end of the datagram is passed to the server
#   as it is: the server answers EINVAL (length mismatch) and the datagram's rest is dropped.
# - Fewer than 8 bytes left (no whole header): no response can be addressed (no sequence
#   number), they are dropped and counted.
# - Responses, errors and requests of another op (a response sent to us) are never answered.
#
# A link is any object with
#   recvfrom(n) -> (bytes, addr)  the next datagram (at most n bytes of it) and its sender, or
#                                 None at once when none is waiting (no blocking)
#   sendto(buf, addr)             sends buf as one datagram to addr (an address recvfrom gave)
#   wait(ms)                      returns when a datagram may be waiting, or after ms
#   allow(addr) (optional)        False: a datagram from addr is dropped unanswered
#   drain() (optional)            returns once what sendto queued has likely left (before a
#                                 reset: UdpLink waits about 250 ms, as Zephyr's
#                                 CONFIG_MCUMGR_GRP_OS_RESET_MS)
# UdpLink below is one (a bound socket; the ports' udp(...) make it: mpboot.ports.<port>.udp).
# It lives here, in stage 1, not in mpboot.ports (stage 0, loaded at every boot): a board
# that never serves UDP loads none of it, and a fix to it ships as a stage-1 update. serve()
# itself imports no network module. serve(link, server) runs an mpboot.smp.server.Server.
#
# Memory: a 13-byte error response allocated once; each datagram is the bytes recvfrom
# allocates (up to buf_size + 1: the port's API has no recvfrom_into), plus a memoryview per
# packet.
from micropython import const
from time import ticks_add, ticks_diff, ticks_ms

_HDR = const(8)
_IDLE_MS = const(1000)  # longest wait without calling tick()
_DRAIN_MS = const(250)  # before a reset: UdpLink.drain
_EMSGSIZE = const(7)
_OP_READ = const(0)  # SMP ops: a response's op is its request's + 1
_OP_WRITE = const(2)


def _report(e):
    import sys

    sys.print_exception(e)


class Stats:
    # What serve() dropped, for tests and an app's diagnostics.
    def __init__(self):
        self.datagrams = 0  # received (allowed ones)
        self.oversize = 0  # longer than buf_size: answered EMSGSIZE
        self.short = 0  # trailing bytes shorter than a header: dropped
        self.refused = 0  # from a sender allow() refused


def _too_big(d, err):
    # The EMSGSIZE response to the packet whose header starts d, or None (not a request).
    op = d[0] & 7
    if op != _OP_READ and op != _OP_WRITE:
        return None
    err[0] = (op + 1) | min((d[0] >> 3) & 3, 1) << 3
    err[4] = d[4]
    err[5] = d[5]
    err[6] = d[6]
    err[7] = d[7]
    return err


def _send(link, r, addr):
    try:
        link.sendto(r, addr)
    except OSError as e:  # the network refused it (no route, buffers full): as a lost datagram
        _report(e)


def serve(link, server, tick=None, stats=None):
    # Serves SMP datagrams from link, strictly in arrival order, until the server asks for a
    # reset: then returns with that response sent and drained (the caller resets; datagrams
    # behind it stay unread). tick() (e.g. a watchdog feed) runs after each request, while
    # idle, and at least once a second whatever arrives (a flood of datagrams it drops, from
    # a sender allow() refuses, say, never starves it). stats: a Stats to count into
    # (optional).
    n = server.buf_size
    st = stats if stats is not None else Stats()
    allow = getattr(link, "allow", None)
    # EMSGSIZE response: the request's header (op + 1, length 5) then {"rc": 7}
    err = bytearray(b"\x00\x00\x00\x05\x00\x00\x00\x00\xa1\x62rc\x07")
    due = ticks_add(ticks_ms(), _IDLE_MS)
    while True:
        if tick and ticks_diff(ticks_ms(), due) >= 0:
            tick()
            due = ticks_add(ticks_ms(), _IDLE_MS)
        got = link.recvfrom(n + 1)
        if got is None:
            if tick:
                tick()
            link.wait(_IDLE_MS)
            continue
        d, addr = got
        if allow is not None and not allow(addr):
            st.refused += 1
            continue
        st.datagrams += 1
        end = len(d)
        if end > n:
            st.oversize += 1
            r = _too_big(d, err)
            if r is not None:
                _send(link, r, addr)
            continue
        mv = memoryview(d)
        i = 0
        while i < end:
            if end - i < _HDR:
                st.short += 1
                break
            e = i + _HDR + (d[i + 2] << 8 | d[i + 3])
            if e > end:
                e = end  # the server answers EINVAL: the header's length is not what came
            try:
                r = server.handle(mv[i:e])
            except Exception as x:  # a server bug: this request gets no answer, the service lives
                _report(x)
                r = None
            if r is not None:
                _send(link, r, addr)
            if tick:
                tick()
            if server.reset_requested:
                d = getattr(link, "drain", None)
                if d:
                    d()
                return
            i = e


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
