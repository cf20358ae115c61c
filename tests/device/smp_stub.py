# A stand-in for mpboot.smp.server.Server, for transport tests: answers every request with the
# request itself, op + 1. Requests with sequence number 0xEE get no answer (silence); an OS
# group reset (group 0, command 5) sets reset_requested. Odd sequence numbers are answered in
# place (the response is a view of the request buffer), even ones from the stub's own buffer.
# Command 0xEE raises (a server bug): serve() must survive it.
class Stub:
    def __init__(self, buf_size=2048, buf_count=4, log=None):
        self.buf_size = buf_size
        self.buf_count = buf_count
        self.reset_requested = False
        self.out = bytearray(buf_size)
        self.log = log  # a file: each request as u16 BE length + bytes
        self.count = 0

    def handle(self, pkt):
        n = len(pkt)
        self.count += 1
        if self.log:
            self.log.write(bytes((n >> 8, n & 0xFF)))
            self.log.write(pkt)
        if n < 8 or pkt[6] == 0xEE:
            return None
        if pkt[7] == 0xEE:
            raise RuntimeError("stub: command 0xEE")
        if pkt[4] == 0 and pkt[5] == 0 and pkt[7] == 5:
            self.reset_requested = True
        if pkt[6] & 1:
            pkt[0] = (pkt[0] & 0xF8) | ((pkt[0] + 1) & 7)
            return pkt
        out = memoryview(self.out)
        out[:n] = pkt
        out[0] = (pkt[0] & 0xF8) | ((pkt[0] + 1) & 7)
        return out[:n]
