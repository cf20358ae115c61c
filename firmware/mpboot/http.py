# A small bounded HTTP/1.1 client for mpboot.pull: one GET per connection (Connection:
# close), with a Range, over `socket` (and `tls` for https where the firmware has it).
#
# Everything from the server is bounded: the status line and each header line fit the
# caller's line buffer (at most 32 lines), only Content-Length, Content-Range, Location and
# Transfer-Encoding are read, a body needs a Content-Length (chunked is refused: static hosts
# send lengths, and `Accept-Encoding: identity` stops on-the-fly compression), a 206's
# Content-Range must start where asked and name the expected total, a 200 to a Range is taken
# only from byte 0 with the whole expected length, redirects are followed at most 3 times to
# absolute http(s) URLs (a Location of printable ASCII), every wait for the network is at most
# timeout_ms, and the whole request ends by the caller's deadline (time.ticks_ms). The body is
# read exactly to its length, never "until close". Errors: HttpError(code, detail), codes as
# mpboot.pull's PullError.
#
# The deadline: no connection is opened once it has passed; connect() waits at most
# min(timeout_ms, time left); after it the socket is non-blocking and every read and write
# (of the TLS stream for https: its handshake runs inside them, do_handshake_on_connect=False)
# waits in select.poll for at most min(timeout_ms, time left), so a peer (or a path) that
# trickles bytes cannot stretch a handshake or a record past the deadline. Not bounded by it:
# socket.getaddrinfo (the port's DNS resolver blocks with its own timeouts; a numeric host
# does no lookup), and the CPU time of one TLS step (mbedtls's key exchange, bounded by the
# certificate sizes, not by the peer's pace).
import select
import socket
import time
from micropython import const

E_NETWORK = const(1)  # connect, send or recv failed, timed out, or closed early (detail: errno)
E_HTTP = const(2)  # a status other than 200/206, or a response this client refuses (detail: status)
E_TOO_LARGE = const(3)  # a body longer than the caller allows

_MAX_LINES = const(32)
_MAX_REDIRECTS = const(3)
_ETIMEDOUT = const(110)


class HttpError(Exception):
    # raise HttpError(code, detail)
    pass


def split_url(url):
    # "http[s]://host[:port]/path" -> (tls?, host, port, path); HttpError(E_HTTP) otherwise.
    if url.startswith("http://"):
        tls, rest, port = False, url[7:], 80
    elif url.startswith("https://"):
        tls, rest, port = True, url[8:], 443
    else:
        raise HttpError(E_HTTP, 0)
    i = rest.find("/")
    host, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    i = host.rfind(":")
    if i >= 0 and "]" not in host[i:]:
        try:
            port = int(host[i + 1 :])
        except ValueError:
            raise HttpError(E_HTTP, 0)
        host = host[:i]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not 0 < port < 65536:
        raise HttpError(E_HTTP, 0)
    return tls, host, port, path


def join(base, rel):
    # The URL of `rel` (relative, no scheme: mpboot.channel.parse checked) beside `base` (the
    # folder of base's path: a query or fragment of base is not part of it, and is dropped).
    i = len(base)
    for c in "?#":
        j = base.find(c)
        if 0 <= j < i:
            i = j
    return base[: base.rfind("/", 0, i) + 1] + rel



class Response:
    # A response's body: readinto() gives its bytes (at most `length` in all), close() ends
    # the connection. status: 200 or 206; start: the offset of its first byte in the file;
    # length: its byte count.
    def __init__(self, s, raw, buf, lo, hi, deadline, timeout_ms):
        self.s = s  # the stream (a TLS one over raw for https), non-blocking
        self.raw = raw  # the socket
        self.poll = select.poll()
        self.poll.register(s, select.POLLIN)
        self.buf = buf
        self.lo = lo  # unread bytes already received with the headers: buf[lo:hi]
        self.hi = hi
        self.deadline = deadline
        self.timeout_ms = timeout_ms
        self.status = 0
        self.start = 0
        self.length = 0
        self.left = 0

    def _io(self, mv, out=False):
        # One read into mv (0 at close), or write of mv (out True: the count written), on the
        # non-blocking stream, waiting for it in poll: each wait at most timeout_ms, all of
        # them ending by the deadline. Errors: HttpError(E_NETWORK, errno; mbedtls's negative
        # codes; 0 for a certificate that does not verify).
        while True:
            left = time.ticks_diff(self.deadline, time.ticks_ms())
            if left <= 0:
                raise HttpError(E_NETWORK, _ETIMEDOUT)
            try:
                n = self.s.write(mv) if out else self.s.readinto(mv)
                if n is not None:
                    return n
                # Nothing yet (TLS: the handshake or a record needs more bytes, or room).
                p = self.poll
                p.modify(self.s, select.POLLOUT if out else select.POLLIN)
                for _ in p.ipoll(min(left, self.timeout_ms)):  # (ipoll: no list per wait)
                    break
                else:
                    raise HttpError(E_NETWORK, _ETIMEDOUT)
            except (OSError, ValueError) as e:  # (ValueError: mbedtls, a certificate refused)
                a = e.args
                raise HttpError(E_NETWORK, a[0] if a and type(a[0]) is int else 0)

    def _line(self):
        # The next header line (without CRLF) as a memoryview into buf.
        buf = self.buf
        while True:
            i = buf.find(b"\r\n", self.lo, self.hi)
            if i >= 0:
                mv = memoryview(buf)[self.lo : i]
                self.lo = i + 2
                return mv
            if self.lo:
                n = self.hi - self.lo
                buf[:n] = buf[self.lo : self.hi]
                self.lo, self.hi = 0, n
            if self.hi == len(buf):
                raise HttpError(E_HTTP, 0)  # a line longer than the buffer
            n = self._io(memoryview(buf)[self.hi :])
            if not n:
                raise HttpError(E_NETWORK, 0)
            self.hi += n

    def readinto(self, mv):
        # Body bytes into mv (at most len(mv)); 0 once `length` bytes were given. A connection
        # that closes early: HttpError(E_NETWORK).
        n = min(len(mv), self.left)
        if not n:
            return 0
        k = self.hi - self.lo
        if k:
            k = min(k, n)
            mv[:k] = memoryview(self.buf)[self.lo : self.lo + k]
            self.lo += k
        else:
            k = self._io(memoryview(mv)[:n])
            if not k:
                raise HttpError(E_NETWORK, 0)
        self.left -= k
        return k

    def close(self):
        for s in (self.s, self.raw):
            try:
                s.close()
            except OSError:
                pass


def _int(v):
    try:
        n = int(bytes(v).strip())
    except ValueError:
        raise HttpError(E_HTTP, 0)
    if n < 0:
        raise HttpError(E_HTTP, 0)
    return n


def _connect(url, deadline, timeout_ms, cadata):
    tls, host, port, path = split_url(url)
    left = time.ticks_diff(deadline, time.ticks_ms())
    if left <= 0:
        raise HttpError(E_NETWORK, _ETIMEDOUT)  # no connection opened after the deadline
    try:
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], socket.SOCK_STREAM)
    except OSError as e:
        raise HttpError(E_NETWORK, e.args[0] if e.args else 0)
    raw = s
    try:
        s.settimeout(min(left, timeout_ms) / 1000)
        s.connect(ai[-1])
        s.setblocking(False)
        if tls:
            try:
                import tls as _tls
            except ImportError:
                import ssl as _tls
            ctx = _tls.SSLContext(_tls.PROTOCOL_TLS_CLIENT)
            if cadata is not None:
                ctx.verify_mode = _tls.CERT_REQUIRED
                ctx.load_verify_locations(cadata)  # (MicroPython: positional; DER or PEM)
            else:
                ctx.verify_mode = _tls.CERT_NONE  # unauthenticated: the records are what count
            # The handshake runs in the first write and reads (Response._io), within the deadline.
            s = ctx.wrap_socket(s, server_hostname=host, do_handshake_on_connect=False)
    except (OSError, ValueError) as e:  # (ValueError: a cadata mbedtls cannot parse)
        raw.close()
        raise HttpError(E_NETWORK, e.args[0] if e.args and type(e.args[0]) is int else 0)
    except ImportError:
        raw.close()
        raise HttpError(E_HTTP, 0)  # https on a firmware without tls
    return s, raw, host, port, path


def get(url, start, total, most, buf, deadline, timeout_ms=10000, cadata=None):
    # GET url from byte `start`. total: the file's expected length (-1: unknown, then no
    # Range is sent and the whole body must be at most `most` bytes). buf: the line buffer
    # (a bytearray, 512 bytes will do). deadline: time.ticks_ms() by which it all ends.
    # Returns a Response whose body is bytes [start, total) of the file (or the whole file
    # when total is -1); the caller closes it.
    for hop in range(_MAX_REDIRECTS + 1):
        s, raw, host, port, path = _connect(url, deadline, timeout_ms, cadata)
        r = Response(s, raw, buf, 0, 0, deadline, timeout_ms)
        try:
            if ":" in host:
                host = "[" + host + "]"  # an IPv6 literal (RFC 7230: as in the URL)
            req = "GET %s HTTP/1.1\r\nHost: %s%s\r\n" % (path, host, "" if port in (80, 443) else ":%d" % port)
            if total >= 0:
                req += "Range: bytes=%d-%d\r\n" % (start, total - 1)
            req += "Accept-Encoding: identity\r\nConnection: close\r\nUser-Agent: mpboot\r\n\r\n"
            mv = memoryview(req.encode())
            while len(mv):
                mv = mv[r._io(mv, True) :]
            line = r._line()
            if len(line) < 12 or bytes(line[:7]) != b"HTTP/1." or line[8] != 0x20:
                raise HttpError(E_HTTP, 0)
            status = _int(line[9:12])
            length = rng = loc = None
            for i in range(_MAX_LINES):
                line = r._line()
                if not len(line):
                    break
                j = bytes(line).find(b":")
                if j < 0:
                    raise HttpError(E_HTTP, status)
                k = bytes(line[:j]).lower()
                v = line[j + 1 :]
                if k == b"content-length":
                    if length is not None:
                        raise HttpError(E_HTTP, status)
                    length = _int(v)
                elif k == b"content-range":
                    rng = bytes(v).strip()
                elif k == b"location":
                    loc = bytes(v).strip()
                    for c in loc:
                        if not 0x20 < c < 0x7F:
                            raise HttpError(E_HTTP, status)  # not a URL this client follows
                    loc = loc.decode()
                elif k == b"transfer-encoding":
                    raise HttpError(E_HTTP, status)  # chunked (or anything): refused
            else:
                raise HttpError(E_HTTP, status)  # too many header lines
            if status in (301, 302, 303, 307, 308) and loc:
                if hop == _MAX_REDIRECTS or not (loc.startswith("http://") or loc.startswith("https://")):
                    raise HttpError(E_HTTP, status)  # one redirect too many, or a relative one
                r.close()
                url = loc
                continue
            if length is None:
                raise HttpError(E_HTTP, status)
            if status == 206 and total >= 0:
                # "bytes a-b/total": a is where we asked, total the expected length.
                if not rng or not rng.startswith(b"bytes "):
                    raise HttpError(E_HTTP, status)
                a, _, rest = rng[6:].partition(b"-")
                b, _, t = rest.partition(b"/")
                if _int(a) != start or _int(t) != total or _int(b) != total - 1 or length != total - start:
                    raise HttpError(E_HTTP, status)
            elif status == 200:
                # Range ignored (or none sent): only the whole file, from byte 0, will do.
                if total >= 0 and (start or length != total):
                    raise HttpError(E_TOO_LARGE if length > total else E_HTTP, status)
                if total < 0 and length > most:
                    raise HttpError(E_TOO_LARGE, status)
            else:
                raise HttpError(E_HTTP, status)
            r.status = status
            r.start = start if status == 206 else 0
            r.length = r.left = length
            return r
        except BaseException:
            r.close()
            raise
