# A small bounded HTTP/1.1 client for mpboot.pull: one GET per connection (Connection:
# close), with a Range, over `socket` (and `tls` for https where the firmware has it).
#
# Everything from the server is bounded: the status line and each header line fit the
# caller's line buffer (at most 32 lines), only Content-Length, Content-Range, Location and
# Transfer-Encoding are read, a body needs a Content-Length (chunked is refused: static hosts
# send lengths, and `Accept-Encoding: identity` stops on-the-fly compression), a 206's
# Content-Range must start where asked and name the expected total, a 200 to a Range is taken
# only from byte 0 with the whole expected length, redirects are followed at most 3 times to
# absolute http(s) URLs, every recv waits at most timeout_ms, and the whole request ends by
# the caller's deadline (time.ticks_ms). The body is read exactly to its length, never
# "until close". Errors: HttpError(code, detail), codes as mpboot.pull's PullError.
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
    # The URL of `rel` (relative, no scheme: mpboot.channel.parse checked) beside `base`.
    return base[: base.rfind("/") + 1] + rel


class Response:
    # A response's body: readinto() gives its bytes (at most `length` in all), close() ends
    # the connection. status: 200 or 206; start: the offset of its first byte in the file;
    # length: its byte count.
    def __init__(self, s, raw, buf, lo, hi, deadline, timeout_ms):
        self.s = s  # the stream (a TLS one over raw for https)
        self.raw = raw  # the socket: its timeout bounds the TLS stream's reads too
        self.buf = buf
        self.lo = lo  # unread bytes already received with the headers: buf[lo:hi]
        self.hi = hi
        self.deadline = deadline
        self.timeout_ms = timeout_ms
        self.status = 0
        self.start = 0
        self.length = 0
        self.left = 0

    def _recv(self, mv):
        # One recv into mv, bounded by the per-recv timeout and the deadline; 0 at close.
        left = time.ticks_diff(self.deadline, time.ticks_ms())
        if left <= 0:
            raise HttpError(E_NETWORK, _ETIMEDOUT)
        try:
            self.raw.settimeout(min(left, self.timeout_ms) / 1000)
            n = self.s.readinto(mv)
        except OSError as e:
            raise HttpError(E_NETWORK, e.args[0] if e.args and type(e.args[0]) is int else _ETIMEDOUT)
        if n is None:  # (a non-blocking stream with nothing yet: a timeout)
            raise HttpError(E_NETWORK, _ETIMEDOUT)
        return n

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
            n = self._recv(memoryview(buf)[self.hi :])
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
            k = self._recv(memoryview(mv)[:n])
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


def _connect(url, timeout_ms, cadata):
    tls, host, port, path = split_url(url)
    try:
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], socket.SOCK_STREAM)
    except OSError as e:
        raise HttpError(E_NETWORK, e.args[0] if e.args else 0)
    raw = s
    try:
        s.settimeout(timeout_ms / 1000)
        s.connect(ai[-1])
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
            s = ctx.wrap_socket(s, server_hostname=host)
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
        s, raw, host, port, path = _connect(url, timeout_ms, cadata)
        r = Response(s, raw, buf, 0, 0, deadline, timeout_ms)
        try:
            req = "GET %s HTTP/1.1\r\nHost: %s%s\r\n" % (path, host, "" if port in (80, 443) else ":%d" % port)
            if total >= 0:
                req += "Range: bytes=%d-%d\r\n" % (start, total - 1)
            req += "Accept-Encoding: identity\r\nConnection: close\r\nUser-Agent: mpboot\r\n\r\n"
            try:
                s.write(req.encode())
            except OSError as e:
                raise HttpError(E_NETWORK, e.args[0] if e.args and type(e.args[0]) is int else 0)
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
                    loc = bytes(v).strip().decode()
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
