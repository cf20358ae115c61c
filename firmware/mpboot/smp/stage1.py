# Stage 1 over SMP (docs/PROTOCOL.md, "Stage 1"; docs/BOOT.md, "Stage 1's proof"): the proof
# a stage-1 test image gives before it may be confirmed, and the confirm itself (the probe,
# group 64 command 8, is mpboot.smp.probe). Loaded by mpboot.smp.server on boards with
# stage-1 slots.
#
# The proof: on stage 1's test boot, before the deadline, over the link this server serves,
# (a) an upload completes (finish verified) or a probe completes (`match: true`), then (b) a
# state write confirms the running stage 1 by its hash. A confirm before (a) is refused,
# nothing written; at the deadline without the confirm the service's tick resets (late()),
# and the next boot reverts the trial.
import time
from micropython import const

import mpboot
from mpboot import pairs
from mpboot.pairs import IMAGE1, PAIR, PAIR_S1_OK
from mpboot.state import ACTIVE, FLAGS, NONE, TRIAL

_EINVAL = const(3)
_ENOENT = const(5)
_EACCESSDENIED = const(11)
_HASH_NOT_FOUND = const(8)  # IMG_MGMT_ERR_HASH_NOT_FOUND
_HASH_SIZE = const(32)
_NO_IMAGE = const(3)  # IMG_MGMT_ERR_NO_IMAGE
_CONFIRMATION_DENIED = const(32)  # IMG_MGMT_ERR_IMAGE_CONFIRMATION_DENIED


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


def mark_pair(srv, h, w, confirm):
    # mpboot's combined update (docs/PROTOCOL.md "Stage 1"): {"hash": the app image, "with":
    # the stage-1 image, "confirm": false} marks both for one test boot together, in one state
    # record (mpboot.pairs.mark_pair): they start, confirm and revert as a pair, and the app's
    # dependencies must hold against that stage 1. Each must sit in its pair's free slot.
    if confirm or type(w) is not memoryview or len(w) != _HASH_SIZE:
        return (_EINVAL, 0, None)
    t = [-1, -1]
    for p, x in ((0, h), (1, bytes(w))):
        run = srv.ups[p].running
        for i in ((run ^ 1,) if run >= 0 else (0, 1)):
            info = srv.image(2 * p + i)
            if info is not None and info["digest"] == x:
                t[p] = i
                break
        if t[p] < 0:
            return (_ENOENT, _HASH_NOT_FOUND, None)
    for p in (0, 1):
        srv.pair(2 * p).policy(srv.image(2 * p + t[p]), True)
    srv.forget()
    pairs.mark_pair(srv.slots, t[0], srv.s1, t[1])
    return None
