# A board with two stages (docs/BOOT.md "Two stages"): stage 0, the firmware's frozen mpboot
# package (this module with boot, slots, pairs, update, ...), verifies and decides, and stage
# 1, the update service (the packages mpboot.smp and mpboot.transport), is a signed image of
# kind updater in a slot pair of its own, updated and reverted like the app. start() is such
# a board's boot.start:
#
#   from mpboot import stages, trust
#   from mpboot.ports import rp2 as port
#   import mpboot_keys
#   areas = port.areas(0x100000, 0x80000, 0x200000, stage1=(0x1C0000, 0x10000))
#   stages.start(port, areas, mpboot_keys.KEYS, **trust.policy(mpboot_keys))
#   from mpboot.smp import service          # only now: stage 1's, which start() loaded
#   service.run(port, port.uart(...))
import sys

import vfs
from micropython import const

import mpboot
from mpboot import boot, image, pairs
from mpboot.boot import (BOOTED_DEADLINE, BOOTED_S1, BOOTED_S1_HOW, BOOTED_S1_INFO, BOOTED_S1_SLOT, HOW_CONFIRMED,
                         HOW_FALLBACK, HOW_TEST, WDT_MS)
from mpboot.state import ACTIVE


PROVE_MS = 300000  # a stage-1 test boot's time to prove itself, from its boot (docs/BOOT.md)


def start(port, areas, keys, entry="main", mount="/app", wdt_ms=WDT_MS, prove_ms=PROVE_MS, **policy):
    # boot.start for a board with stage-1 slots: areas are port.areas()'s seven (slot0, slot1,
    # state, factory, trust, stage-1 slot0, stage-1 slot1). Decides both pairs (one state
    # write at most), loads stage 1 from the slot chosen, before the app runs (so nothing of
    # the app can stand in for it, and a stage 1 that fails is replaced in this same boot),
    # then runs the app as boot.start does and returns what it returns. A test boot of stage
    # 1 (or of the firmware itself) is watched from before stage 1 loads, and stage 1 must
    # prove itself within prove_ms of this boot (mpboot.boot.feed stops feeding after).
    mpboot._booted = None
    app = pairs.Pair(areas[0], areas[1], areas[2], keys, mapped=port.mapped, factory=areas[3],
                     trust=areas[4], **policy)
    s1 = pairs.stage1(app, areas[5], areas[6])
    boot.no_repl(app)
    (slot, info, trial), r1 = pairs.decide_all(app, s1)
    wdt = None
    if (r1[2] or boot.firmware_trial(port)) and wdt_ms:
        wdt = port.watchdog(wdt_ms)  # before anything of stage 1 runs: its import may hang
    boot.set_booted(app, -1, None, wdt, HOW_CONFIRMED)  # (the app's fields: boot.run's)
    if r1[2]:
        import time

        mpboot._booted[BOOTED_DEADLINE] = time.ticks_add(time.ticks_ms(), prove_ms)
    _start_stage1(s1, port, r1)
    if slot >= 0 and s1.booted != r1[:2]:
        # Another stage 1 serves than the one decided (its import failed): the app must still
        # fit the one that serves (its dependencies), else it cannot run.
        r = s1.booted
        if not pairs.meets(info, r[1]["version"] if r[1] else None):
            return boot.cannot_run(app, port, slot, trial, image.E_DEPENDENCY, entry, mount, wdt_ms)
    if slot < 0:
        return boot.recovery(app)
    return boot.run(app, port, slot, info, trial, entry, mount, wdt_ms)


S1_MOUNT = "/s1"  # where stage 1's ROMFS is mounted, for as long as the board runs
E_S1_IMPORT = const(-5)  # a stage-1 slot error: its service did not import (EIO)
_S1 = ("mpboot.smp", "mpboot.transport")  # stage 1's packages (mpboot.smp.service: its entry)
# The RAM copies of stage-1 images that failed to import, kept for as long as the board runs:
# MicroPython runs .mpy code from a ROMFS in place and interns its names there, so the names
# a failed import left in the qstr pool still point into that memory. (On ports that map
# flash the slot itself is that memory: Stage1.pinned keeps the updater off it.)
_failed = []


def _forget_stage1():
    # Drops every module stage 1 loaded (a failed import can leave some), so that the next
    # slot's, or the rescue's, load from their own place.
    for k in list(sys.modules):
        for m in _S1:
            if k == m or k.startswith(m + "."):
                del sys.modules[k]
    for m in _S1:
        try:
            delattr(mpboot, m[7:])
        except (AttributeError, KeyError):
            pass


def _load_stage1(s1, port, slot, info):
    # Mounts stage 1's verified image at /s1 and imports the service from it. Stage 1 is two
    # packages, mpboot.smp and mpboot.transport: they are imported while the mpboot package's
    # path points at /s1/mpboot (their __init__ modules import nothing), so their own paths
    # are in /s1; every module of theirs, now (mpboot.smp.service, the entry) or later, is
    # found there and never on sys.path (an app's ROMFS, the filesystem), while the stage-0
    # modules they import keep coming from the firmware. Returns 0, or the slot error why
    # stage 1 from this slot cannot run.
    mem = boot.image_bytes(s1, port, slot, info)
    if type(mem) is int:
        return mem
    try:
        boot.mount_image(mem, info, S1_MOUNT)
    except OSError:
        return boot.E_NO_ROMFS
    _forget_stage1()  # (a copy imported before start(): the rescue's, not this slot's)
    err = E_S1_IMPORT
    path = mpboot.__path__
    try:
        mpboot.__path__ = S1_MOUNT + "/mpboot"
        for m in _S1:
            __import__(m)
        mpboot.__path__ = path
        __import__("mpboot.smp.service")
        n = 0
        for m in _S1 + ("mpboot.smp.service",):
            n += sys.modules[m].__file__.startswith(S1_MOUNT + "/")  # (AttributeError: no __file__)
        if n == 3:
            err = 0
    except BaseException as e:  # a stage 1 that fails to import (however): the next choice serves
        sys.print_exception(e)
    finally:
        mpboot.__path__ = path
    if err:
        _forget_stage1()
        vfs.umount(S1_MOUNT)
        if type(mem) is bytearray:
            _failed.append(mem)
        else:
            s1.pinned = slot  # mapped flash: the updater leaves this slot alone until a reset
    return err


def _start_stage1(s1, port, r1):
    # Loads the stage 1 decide_all chose; if it cannot run, the other slot's confirmed stage 1
    # in this same boot (a trial that failed is reverted by the next boot); if neither, the
    # rescue: the service frozen in the firmware (firmware/manifest.py), imported by the
    # board's boot.py after start() returns, as on a board without stage-1 slots.
    slot, info, trial = r1
    how = HOW_TEST if trial else HOW_FALLBACK if slot != s1.state[s1.b + ACTIVE] else HOW_CONFIRMED
    while slot >= 0:
        err = _load_stage1(s1, port, slot, info)
        if not err:
            s1.booted = (slot, info)  # what serves: the app's dependencies are checked against it
            set_stage1(s1, slot, info, how)
            return
        s1.errors[slot] = err
        print("mpboot: stage 1 slot %d cannot run (error %d)" % (slot, err))
        o = slot ^ 1
        slot = -1
        if s1.errors[o] == 0:
            info = s1.probe(o)
            if info and s1.confirmed(o, info):
                slot, how = o, HOW_FALLBACK
    s1.booted = (-1, None)
    set_stage1(s1, -1, None, HOW_CONFIRMED)
    print("mpboot: stage 1 none: the rescue service")


def set_stage1(s1, slot, info, how):
    # Records the stage 1 that serves (the BOOTED_S1* fields; slot -1: the rescue).
    b = mpboot._booted
    if b is None:
        boot.set_booted(s1, -1, None, None, HOW_CONFIRMED)  # the app's fields: start() sets them next
        b = mpboot._booted
    b[BOOTED_S1] = s1
    b[BOOTED_S1_SLOT] = slot
    b[BOOTED_S1_INFO] = info
    b[BOOTED_S1_HOW] = how
    if slot >= 0:
        v = info["version"]
        print("mpboot: stage 1 slot %d version %d.%d.%d+%d%s" % (
            slot, v[0], v[1], v[2], v[3], " test boot" if how == HOW_TEST else ""))
