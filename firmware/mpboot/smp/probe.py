# The probe (group 64 command 8, write; docs/PROTOCOL.md "Stage 1"): upload-shaped requests
# that run through the image group's upload code (mpboot.smp.img_mgmt.upload) into a Sink, a
# hash, instead of the updater: a link test, and the first half of stage 1's proof (the
# upload's end calls mpboot.smp.stage1.proved). Loaded by mpboot_mgmt on the first probe.
import hashlib
from micropython import const

_EINVAL = const(3)
_ENOTSUP = const(8)
_HASH_SIZE = const(32)
# Group-64 codes of the probe (after zupload's 25): a request out of order or of a length
# out of bounds; the bytes received do not hash to `sha`.
E_PROBE = const(26)
E_PROBE_MISMATCH = const(27)
PROBE_MIN = const(8192)  # a probe is at least max(PROBE_MIN, 2 * buf_size) bytes
_PROBE_MAX = const(1048576)


class Sink:
    # The probe's updater: mpboot.update.Updater's shapes for img_mgmt.upload, its flash a
    # SHA-256. The bounds (len, sha) are checked before it opens (probe()).
    at = 255  # no slot (img_mgmt: the slot whose cached verdict an upload makes stale)

    def __init__(self, n, sha):
        self.h = hashlib.sha256()
        self.n = n
        self.want = sha
        self.total = -1
        self.sha = None
        self.pos = 0

    def target(self):
        return 0

    def begin(self, total, data, ptlv, sha):
        self.total = total
        self.sha = sha
        self.pos = 0
        return 0

    def write(self, off, data):
        if off != self.pos:
            return self.pos  # not the next offset: nothing taken, the reply names it
        end = off + len(data)
        if end > self.total:
            self.total = -1
            raise ValueError  # past its length: refused (probe())
        self.h.update(data)
        self.pos = end
        return end

    def finish(self, mark):
        self.total = -1
        if self.h.digest() != self.want:
            raise ValueError(1)  # the bytes do not hash to sha: refused (probe())
        return 0, None

    def abort(self):
        self.total = -1


def handle(srv, op, req, enc):
    # Group 64 command 8, write: upload-shaped requests ({"off", "data"}, at off 0 also "len"
    # and "sha") that go through the image group's upload (img_mgmt.upload: offsets, the
    # session, pipelining, the end) into a Sink, a hash. Answers {"off": next} as an upload
    # does (a request not at the next offset takes nothing), after the last byte
    # {"off": len, "match": true}, which is the first half of the proof.
    from mpboot.smp import img_mgmt

    if op != 2:
        return (_ENOTSUP, 0, None)
    off = req.get("off")
    data = req.get("data")
    if type(off) is not int or off < 0 or type(data) is not memoryview:
        return (_EINVAL, 0, None)
    if off == 0:
        n = req.get("len")
        sha = req.get("sha")
        if type(n) is not int or type(sha) is not memoryview:
            return (_EINVAL, 0, None)
        srv.probe = None
        if len(sha) != _HASH_SIZE or n < max(PROBE_MIN, 2 * srv.buf_size) or n > _PROBE_MAX or len(data) < 32:
            return _err(E_PROBE)
        srv.probe = Sink(n, bytes(sha))
    p = srv.probe
    if p is None or (off and (srv.up is not p or p.total < 0)):
        return _err(E_PROBE)  # none open (or a real upload opened since)
    try:
        return img_mgmt.upload(srv, req, enc, p)
    except ValueError as e:
        srv.probe = None
        return _err(E_PROBE_MISMATCH if e.args else E_PROBE)


def _err(code):
    return (_EINVAL, code, "probe:%d" % code)


