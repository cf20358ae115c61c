# MicroPython: mpboot.transport.uart against byte streams made on the host.
#   dev_uart stream IN OUT LOG SEED MAXCHUNK BUFSIZE [async]
#       serve() (or serve_async()) a stand-in server (smp_stub) over the bytes of IN, read in
#       pseudo-random pieces of 1..MAXCHUNK bytes; responses go to OUT, each request the
#       server got to LOG. Prints "DONE handled=N dropped=M" at the end of IN, or
#       "RESET handled=N" when the stub asked for a reset (serve returned).
#   dev_uart crc FILE OFF N...   CRC16 of FILE[OFF:OFF+N] per pair: "CRC native table"
#   dev_uart bench IN BUFSIZE CHUNK   decode IN (held in RAM) with a silent server:
#       "BENCH bytes=B packets=P us=T"
#   dev_uart mem IN BUFSIZE CHUNK   a Framer over IN (held in RAM, CHUNK bytes per read),
#       the stub answering into a link that discards: "MEM framer=A growth=G handled=N
#       answered=M", A the bytes Framer() allocated, G what stayed allocated after IN (gc'd;
#       the unix port's GC scans the C stack conservatively: compare with an empty IN)
import sys
import time

from mpboot.transport import uart
from smp_stub import Stub


class Done(Exception):
    pass


class FileLink:
    def __init__(self, src, dst, seed, maxchunk):
        self.src = src
        self.dst = dst
        self.x = seed or 1
        self.maxchunk = maxchunk
        self.writes = 0
        self.drains = 0

    def _rand(self):
        # xorshift32: the same pieces on every run for one seed
        x = self.x
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.x = x
        return x

    def readinto(self, buf):
        k = min(len(buf), 1 + self._rand() % self.maxchunk)
        n = self.src.readinto(memoryview(buf)[:k])
        if not n:
            raise Done()
        return n

    def write(self, buf):
        self.writes += 1
        self.dst.write(buf)

    def wait(self, ms):
        pass

    def drain(self):
        self.drains += 1


class AsyncStream:
    # The parts of asyncio's Stream serve_async uses, over a FileLink.
    def __init__(self, link):
        self.link = link

    async def readinto(self, buf):
        return self.link.readinto(buf)

    def write(self, buf):
        self.link.write(buf)

    async def drain(self):
        self.link.drain()


def stream(args):
    src = open(args[0], "rb")
    dst = open(args[1], "wb")
    log = open(args[2], "wb")
    link = FileLink(src, dst, int(args[3]), int(args[4]))
    server = Stub(int(args[5]), 4, log)
    try:
        if len(args) > 6 and args[6] == "async":
            import asyncio

            asyncio.run(uart.serve_async(AsyncStream(link), server))
        else:
            uart.serve(link, server)
        print("RESET handled=%d drains=%d" % (server.count, link.drains))
    except Done:
        print("DONE handled=%d" % server.count)
    dst.close()
    log.close()


def crc(args):
    with open(args[0], "rb") as f:
        data = f.read()
    print("NATIVE %d" % uart.NATIVE)
    for i in range(1, len(args), 2):
        off, n = int(args[i]), int(args[i + 1])
        print("CRC %d %d" % (uart.crc16(data, off, n), uart.crc16_py(data, off, n)))


class Silent:
    def __init__(self, buf_size):
        self.buf_size = buf_size
        self.buf_count = 4
        self.reset_requested = False
        self.count = 0

    def handle(self, pkt):
        self.count += 1
        return None


class MemLink:
    def __init__(self, data, chunk):
        self.mv = memoryview(data)
        self.pos = 0
        self.chunk = chunk

    def readinto(self, buf):
        k = min(len(buf), self.chunk, len(self.mv) - self.pos)
        if k <= 0:
            raise Done()
        buf[:k] = self.mv[self.pos : self.pos + k]
        self.pos += k
        return k

    def write(self, buf):
        pass

    def wait(self, ms):
        pass


def bench(args):
    with open(args[0], "rb") as f:
        data = f.read()
    server = Silent(int(args[1]))
    link = MemLink(data, int(args[2]))
    t = time.ticks_us()
    try:
        uart.serve(link, server)
    except Done:
        pass
    us = time.ticks_diff(time.ticks_us(), t)
    print("BENCH bytes=%d packets=%d us=%d native=%d" % (len(data), server.count, us, uart.NATIVE))


def mem(args):
    import gc

    with open(args[0], "rb") as f:
        data = f.read()
    buf_size = int(args[1])
    server = Stub(buf_size, 4)
    link = MemLink(data, int(args[2]))
    answered = 0
    gc.collect()
    a0 = gc.mem_alloc()
    f = uart.Framer(buf_size)
    gc.collect()
    a1 = gc.mem_alloc()
    try:
        while True:
            p = f.next()
            if p is None:
                f.got(link.readinto(f.space()))
                continue
            r = server.handle(p)
            p = None
            if r is not None:
                f.send(link, f.kind, r)
                answered += 1
            r = None
    except Done:
        pass
    gc.collect()
    print("MEM framer=%d growth=%d handled=%d answered=%d" % (a1 - a0, gc.mem_alloc() - a1, server.count,
                                                              answered))


{"stream": stream, "crc": crc, "bench": bench, "mem": mem}[sys.argv[1]](sys.argv[2:])
