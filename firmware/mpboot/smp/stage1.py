# Stage 1 over SMP (docs/PROTOCOL.md, "Stage 1"; docs/BOOT.md, "Stage 1's proof"): the proof
# a stage-1 test image gives before it may be confirmed, the confirm itself, and the probe
# (group 64 command 8, write). Loaded by mpboot.smp.server on boards with stage-1 slots, and
# by mpboot_mgmt on the first probe (any board may answer one: it tests the link).
#
# The proof: on stage 1's test boot, before the deadline, over the link this server serves,
# (a) an upload completes (finish verified) or a probe completes (`match: true`), then (b) a
# state write confirms the running stage 1 by its hash. A confirm before (a) is refused,
# nothing written; at the deadline without the confirm the service's tick resets (late()),
# and the next boot reverts the trial.
import hashlib
import time
from micropython import const

import mpboot
from mpboot.pairs import IMAGE1, PAIR, PAIR_S1_OK
from mpboot.state import ACTIVE, FLAGS, NONE, TRIAL

_EINVAL = const(3)
_ENOENT = const(5)
_EBADSTATE = const(6)
_ENOTSUP = const(8)
_EACCESSDENIED = const(11)
_NO_IMAGE = const(3)  # IMG_MGMT_ERR_NO_IMAGE
_CONFIRMATION_DENIED = const(32)  # IMG_MGMT_ERR_IMAGE_CONFIRMATION_DENIED
_HASH_SIZE = const(32)
# Group-64 codes of the probe (after zupload's 25): a request out of order or of a length
# out of bounds; the bytes received do not hash to `sha`.
E_PROBE = const(26)
E_PROBE_MISMATCH = const(27)
PROBE_MIN = const(8192)  # a probe is at least max(PROBE_MIN, 2 * buf_size) bytes
_PROBE_MAX = const(1048576)


def init(srv, slot, info, deadline):
    # Server(..., s1=, s1_slot=, s1_info=, deadline=): the stage-1 side of a new server.
    if slot >= 0 and info is not None:
        srv.cache[2 + slot] = srv.keep[2 + slot] = info
    srv.deadline = deadline
    srv.proven = False  # (a) of the proof happened on this server, in time
    srv.probe = None  # the probe open (a Sink), or None
    st = srv.s1.state
    f = st[FLAGS]
    srv.s1_trial = (slot >= 0 and info is not None and st[IMAGE1 + TRIAL] == slot
                    and not (f & PAIR and f & PAIR_S1_OK))


def late(srv):
    # The deadline passed (a test boot of stage 1 still unconfirmed: the service resets).
    d = srv.deadline
    return d is not None and time.ticks_diff(time.ticks_ms(), d) >= 0


def proved(srv):
    # (a): an upload or a probe completed on this server.
    if not late(srv):
        srv.proven = True


def confirm(srv):
    # (b): a state write confirms the running stage 1 by its hash. On its test boot (alone,
    # or its half of a pair trial: mpboot.pairs) only after (a); a fallback becomes the
    # confirmed one (as the app's, img_mgmt._confirm_running); else nothing to do.
    sl = srv.s1
    run = srv.ups[1].running
    info = srv.image(2 + run)
    if info is None:
        return (_ENOENT, _NO_IMAGE, None)  # it no longer verifies
    st = sl.state
    if st[IMAGE1 + TRIAL] == run:
        if srv.s1_trial and (not srv.proven or late(srv)):
            return (_EACCESSDENIED, _CONFIRMATION_DENIED, "stage1:unproven")
        sl.confirm(run, info)
    else:
        a = st[IMAGE1 + ACTIVE]
        if a != run:
            o = srv.image(2 + a) if a != NONE else None
            if o is None or not sl.confirmed(a, o):
                sl.confirm(run, info)
    srv.s1_trial = False
    b = mpboot._booted
    if b is not None:
        # The boot record (mpboot.boot set it, so importing the field names loads nothing):
        # stage 1 confirmed, its deadline gone.
        from mpboot.boot import BOOTED_DEADLINE, BOOTED_S1, BOOTED_S1_HOW, BOOTED_S1_SLOT, HOW_CONFIRMED

        if len(b) > BOOTED_DEADLINE and b[BOOTED_S1] is sl and b[BOOTED_S1_SLOT] == run:
            b[BOOTED_S1_HOW] = HOW_CONFIRMED
            b[BOOTED_DEADLINE] = None
    return None


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


def probe(srv, op, req, enc):
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


