# Compressed upload chunks: SMP group 64 command 7, write (docs/PROTOCOL.md, "Compressed
# upload"). Loaded on first use (mpboot.smp.mpboot_mgmt). A session is opened as for a plain
# upload (image group, command 1, at `off` 0, whose `deflate: true` asks for this); each
# later chunk may then come as `{"off": N, "ulen": U, "data": D}`: D is one whole raw-deflate
# stream (window at most 1 KiB) that inflates to exactly U image bytes for offset N. The
# updater receives exactly the image bytes, so its checkpoints, resume, and the checks at the
# end are those of a plain upload.
#
# Why one whole stream per request: MicroPython's deflate cannot be fed in pieces (a source
# that runs dry mid-stream breaks the decoder), and a request is whole in RAM already. Every
# request boundary is then a restart point: resuming needs nothing beyond a plain upload's.
import io

import deflate
from micropython import const

from mpboot.smp import img_mgmt
from mpboot.update import U_RANGE, U_STATE, UpdateError

_EINVAL = const(3)
_WBITS = const(10)  # = img_mgmt._ZWBITS
# The most image bytes one request may inflate to: an honest 2 KiB stream of a blank run
# reaches ~2 MiB, whose programming would outlast a hardware watchdog; 32 KiB is one
# checkpoint step and 16 times what plain data carries.
_ZMAX = const(32768)
# The group-64 code (after the factory and trust codes) of a chunk that is not one whole raw
# deflate stream of exactly `ulen` bytes, or whose `off`/`ulen` are out of bounds.
E_BAD_STREAM = const(25)


def handle(srv, op, req, enc):
    # The handler contract of mpboot.smp.server (the command is 7: checked by the caller).
    if op != 2:
        return (8, 0, None)  # ENOTSUP: there is nothing to read
    return img_mgmt.guard(_chunk, srv, op, 7, req, enc)


def _chunk(srv, op, cmd, req, enc):
    off = req.get("off")
    n = req.get("ulen")
    data = req.get("data")
    if type(off) is not int or type(n) is not int or type(data) is not memoryview:
        return (_EINVAL, 0, None)
    if off < 1 or n < 1 or n > _ZMAX:
        # off 0 opens a session, which only a plain upload request does (its header is
        # checked before anything is written).
        return (_EINVAL, E_BAD_STREAM, "zupload:%d" % E_BAD_STREAM)
    up = srv.up
    if up.total < 0:
        d = srv.done
        if d is not None and off + n == d[1]:
            return img_mgmt._off(enc, d[1], False)  # the last chunk again: its reply was lost
        if srv.ver:
            return img_mgmt._off(enc, 0, False)  # as a plain upload (img_mgmt._upload)
        raise UpdateError(U_STATE)
    pos = up.pos
    if off != pos:
        return img_mgmt._off(enc, pos, False)  # not the expected offset: nothing inflated
    end = off + n
    if end > up.total:
        raise UpdateError(U_RANGE)  # a bomb announced: refused before inflating anything
    src = io.BytesIO(data)
    z = deflate.DeflateIO(src, deflate.RAW, _WBITS)
    mv = memoryview(srv.slots.buf)  # idle between requests: only verifying uses it
    room = len(mv)
    while pos < end:
        k = _inflate(z, mv[: min(room, end - pos)])
        if k <= 0:
            return _bad(srv)  # truncated, corrupt, or it ends before `ulen` bytes
        up.write(pos, mv[:k])
        pos += k
    # The stream must end exactly here: a byte more (a bomb with a false `ulen`) or a byte
    # of `data` after the stream's end is refused.
    if _inflate(z, mv[:1]) != 0 or src.tell() != len(data):
        return _bad(srv)
    srv.forget(up.at)
    if pos == up.total:
        return img_mgmt._finish(srv, enc, pos, 0, 0)
    return img_mgmt._off(enc, pos, False)


def _inflate(z, buf):
    # Bytes inflated into buf, or -1 for a stream that is not whole raw deflate (uzlib:
    # EOFError when it runs dry, OSError EINVAL for a bad block, code or distance).
    try:
        return z.readinto(buf)
    except (EOFError, OSError):
        return -1


def _bad(srv):
    # What this stream wrote may be wrong (raw deflate carries no checksum): the session
    # closes, so the client opens it again and resumes from the last checkpoint, and the
    # image's hash and signature are checked at the end as always.
    up = srv.up
    up.total = -1
    srv.forget(up.at)  # it wrote into the slot: a verdict kept from before is stale
    return (_EINVAL, E_BAD_STREAM, "zupload:%d" % E_BAD_STREAM)
