# The boot entry: choose the slot, verify the exact bytes the app will run from, mount the
# image's ROMFS payload at /app, put it first on sys.path and run the app's entry module.
#
#   # boot.py (or a frozen _boot) on a board:
#   from mpboot import boot, trust
#   from mpboot.ports import rp2 as port
#   import mpboot_keys
#   boot.start(port, port.areas(0x100000, 0x80000, 0x200000), mpboot_keys.KEYS,
#              **trust.policy(mpboot_keys))
import sys


def _pin():
    # MicroPython lets a file on sys.path (time.py in the filesystem's root or /lib, which
    # nothing signs) stand in for an "extensible" builtin module. Before stage 0 (the modules
    # below) and stage 1 import one, the builtins mpboot uses are imported with an empty
    # sys.path and pinned in sys.modules, so such a file can replace them neither for mpboot
    # nor for the app (docs/THREAT_MODEL.md). A board's boot.py imports mpboot.boot (or
    # mpboot.stages, which imports it) before any other mpboot module.
    path = sys.path[:]
    sys.path[:] = []
    for n in ("array", "binascii", "bluetooth", "deflate", "hashlib", "io", "machine", "os", "select", "struct",
              "time"):
        m = sys.modules.pop(n, None)
        try:
            sys.modules[n] = __import__(n)
        except ImportError:  # not a builtin of this firmware: whatever stood there stays
            if m is not None:
                sys.modules[n] = m
    sys.path[:] = path


_pin()
del _pin
import os  # (after the pin)
import vfs
from micropython import const

import mpboot
from mpboot import image
from mpboot.reader import bytes_reader
from mpboot.slots import Slots
from mpboot.state import ACTIVE, NONE, OK0

# The boot record, mpboot._booted: what boot.run (or boot.recovery) started, for
# mpboot.confirm(), feed(), the update service and the SMP state write. A list (cheaper than a
# class) read by these indices; set only by set_booted().
BOOTED_SLOTS = const(0)  # the mpboot.slots.Slots the boot decision used
BOOTED_SLOT = const(1)  # the slot running (-1: recovery)
BOOTED_INFO = const(2)  # its verified image info (None in recovery)
BOOTED_WATCHDOG = const(3)  # the watchdog armed for a test boot, or None
BOOTED_HOW = const(4)  # how it booted (HOW_*); HOW_CONFIRMED once mpboot.confirm() kept it
BOOTED_CONFIRMED = const(5)  # the confirmed image at boot: (active slot, digest prefix)
# Stage 1 (the update service as a signed image, docs/BOOT.md "Two stages"), on boards with
# stage-1 slots; None/-1 on others and until boot.start() has decided stage 1:
BOOTED_S1 = const(6)  # stage 1's mpboot.pairs.Stage1 (its slot pair), or None
BOOTED_S1_SLOT = const(7)  # stage 1's slot running (-1: none, the rescue serves)
BOOTED_S1_INFO = const(8)  # its verified image info
BOOTED_S1_HOW = const(9)  # how it booted (HOW_*); HOW_CONFIRMED once proven and confirmed
BOOTED_DEADLINE = const(10)  # a stage-1 trial's proof deadline (time.ticks_ms), or None
# How the running image booted:
HOW_CONFIRMED = const(0)  # the confirmed (active) image itself
HOW_TEST = const(1)  # its one test boot
HOW_FALLBACK = const(2)  # the other slot's earlier-confirmed image, because the active one failed

# Slot errors (Slots.errors) of images that verify but cannot run; image codes are positive.
E_NO_ROMFS = const(-19)  # the payload does not mount as a ROMFS
E_NO_ENTRY = const(-2)  # the ROMFS has no entry module (main.py / main.mpy)
E_NO_RAM = const(-12)  # the port cannot map flash and the image does not fit in RAM


def _confirmed_now(slots):
    # Which image is the confirmed one: its slot and digest prefix. A permanent install
    # changes it (even into the same slot); a test mark does not.
    a = slots.state[ACTIVE]
    return (a, None if a == NONE else slots.state[OK0 + a])


def _has(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False

WDT_MS = const(60000)  # watchdog timeout armed for a test boot


def cannot_run(slots, port, slot, trial, code, entry, mount, wdt_ms):
    # The chosen image verified but cannot run here (no ROMFS, no entry module, its RAM copy
    # differs). A test boot resets at once: the next boot reverts it. Otherwise the other
    # slot's earlier-confirmed image runs if it verifies; else recovery.
    slots.errors[slot] = code
    print("mpboot: slot %d cannot run (error %d)" % (slot, code))
    if trial:
        port.reset()
    o = slot ^ 1
    if slots.errors[o] == 0:
        info = slots.probe(o)
        if info and slots.confirmed(o, info):
            return run(slots, port, o, info, False, entry, mount, wdt_ms)
    return recovery(slots)


def image_bytes(slots, port, slot, info):
    # The bytes a verified image runs from: its flash mapped in place, or a RAM copy verified
    # again, so the bytes that run are the bytes that verified. An int instead: the slot error
    # why it cannot run.
    area = slots.areas[slot]
    mem = port.mapped(area)
    if mem is not None:
        return mem
    try:
        mem = bytearray(info["total_size"])
    except MemoryError:
        return E_NO_RAM
    area.read(0, mem)
    try:
        ok = slots.check(slot, bytes_reader(mem))["digest"] == info["digest"]
    except image.ImageError:
        ok = False
    # Otherwise the flash read back differently from a moment ago.
    return mem if ok else image.E_HASH_MISMATCH


def mount_image(mem, info, mount):
    # Mounts the image's ROMFS payload at `mount`; OSError if it is not one.
    rom = getattr(vfs, "VfsRom", None)  # None: a firmware built without ROMFS support
    if rom is None:
        print("mpboot: this firmware has no vfs.VfsRom (docs/PORTING.md)")
        raise OSError(19)
    start = info["hdr_size"]
    vfs.mount(rom(memoryview(mem)[start : start + info["img_size"]]), mount)


def run(slots, port, slot, info, trial, entry="main", mount="/app", wdt_ms=WDT_MS):
    # Mounts and runs the image `slots.decide()` chose. Returns True once the app's entry
    # module returns, False in recovery.
    mem = image_bytes(slots, port, slot, info)
    if type(mem) is int:
        return cannot_run(slots, port, slot, trial, mem, entry, mount, wdt_ms)
    try:
        mount_image(mem, info, mount)
    except OSError:
        # Signed, but its payload is not a ROMFS (or nothing here mounts one).
        return cannot_run(slots, port, slot, trial, E_NO_ROMFS, entry, mount, wdt_ms)
    if not _has(mount + "/" + entry + ".mpy") and not _has(mount + "/" + entry + ".py"):
        # Importing it anyway would find an unverified module elsewhere on sys.path.
        vfs.umount(mount)
        return cannot_run(slots, port, slot, trial, E_NO_ENTRY, entry, mount, wdt_ms)
    sys.path.insert(0, mount)
    global _fw
    _fw = firmware_trial(port)
    # A test boot of the app, or of the MicroPython firmware itself (esp32), is watched; a
    # watchdog armed already (mpboot.stages, for a test boot of stage 1 or of the firmware,
    # before stage 1 loads) stays the one.
    b = mpboot._booted
    wdt = b[BOOTED_WATCHDOG] if b is not None else None
    if wdt is None and (trial or _fw) and wdt_ms:
        wdt = port.watchdog(wdt_ms)
    # How it booted decides what mpboot.confirm() may do.
    how = HOW_TEST if trial else HOW_FALLBACK if slot != slots.state[ACTIVE] else HOW_CONFIRMED
    set_booted(slots, slot, info, wdt, how)
    v = info["version"]
    print("mpboot: slot %d version %d.%d.%d+%d%s%s" % (
        slot, v[0], v[1], v[2], v[3], " test boot" if trial else "",
        " watchdog %d ms" % getattr(wdt, "timeout_ms", wdt_ms) if wdt else ""))
    if not slots.no_repl:
        __import__(entry)
        return True
    try:
        __import__(entry)
    except BaseException as e:  # no-repl: whatever the app raises, boot.py goes on (service)
        sys.print_exception(e)
    return True


_fw = None  # mpboot.espota while the MicroPython firmware runs its test boot (run()), else None


def firmware_trial(port):
    # The esp32 firmware update's module (mpboot.espota, on a port whose FIRMWARE says it has
    # one, in builds that froze it) when the running firmware is on its ESP-IDF test boot,
    # else None.
    if not getattr(port, "FIRMWARE", False):
        return None
    try:
        from mpboot import espota
    except ImportError:
        return None
    return espota if espota.trial() else None


def confirm():
    # mpboot.confirm(): keep the running image after the next reset (a test image is
    # otherwise reverted) and raise the anti-rollback floor to its counter. Also makes a
    # fallback image (run because the confirmed one failed) the confirmed one. Returns True
    # if this changed the state, False if there was nothing to confirm: the image already
    # was the confirmed one (and a permanent update it took since stays so).
    # A MicroPython firmware on its test boot (esp32) is kept on the same evidence: ESP-IDF
    # otherwise rolls it back at the next reset.
    global _fw
    b = mpboot._booted
    if b is None or b[BOOTED_SLOT] < 0:
        raise OSError(19)  # ENODEV: not started by mpboot.boot
    fw = _fw is not None and _fw.confirm_running()
    _fw = None
    slots = b[BOOTED_SLOTS]
    if b[BOOTED_HOW] == HOW_CONFIRMED or _confirmed_now(slots) != b[BOOTED_CONFIRMED]:
        # The confirmed image itself, or an update made another image the confirmed one
        # since this boot (permanent install): keep it.
        return fw
    # Raises if the state write fails: retry is possible.
    changed = slots.confirm(b[BOOTED_SLOT], b[BOOTED_INFO])
    b[BOOTED_HOW] = HOW_CONFIRMED
    return changed or fw


def feed():
    # Feeds the watchdog a test boot armed (no-op otherwise). Hardware watchdogs cannot be
    # stopped once armed, so an app that confirms after a test boot keeps feeding it. Not
    # once a stage-1 test boot's proof deadline has passed unproven (the service clears the
    # deadline when it confirms): whatever stage 1 does then, the watchdog resets the board
    # and the next boot reverts it (docs/BOOT.md "Stage 1's proof").
    b = mpboot._booted
    if b is not None and b[BOOTED_WATCHDOG] is not None:
        d = b[BOOTED_DEADLINE]
        if d is not None and b[BOOTED_S1_HOW] == HOW_TEST:
            import time

            if time.ticks_diff(time.ticks_ms(), d) >= 0:
                return
        b[BOOTED_WATCHDOG].feed()


def recovery(slots):
    # Nothing bootable: say why, per slot, and return to whoever waits for an update (the
    # update service, or the REPL where `mpboot.update` can be driven by hand).
    set_booted(slots, -1, None, None, HOW_CONFIRMED)
    print("mpboot: recovery: no bootable image (slot 0: error %d, slot 1: error %d)" % (
        slots.errors[0], slots.errors[1]))
    return False


def pull(url, **kw):
    # mpboot.pull(url, ...): fetch a channel record and the image it names (mpboot.puller,
    # README "Device pull"). That module loads at the first call, not at boot. (It is not
    # named mpboot.pull: importing a submodule sets the package's attribute of that name.)
    from mpboot.puller import pull

    return pull(url, **kw)


def set_booted(slots, slot, info, wdt, how):
    # Records what runs (mpboot._booted, the BOOTED_* fields) and puts mpboot.confirm in place.
    # Used by run() and recovery(); device test drivers use it to play a boot. A watchdog
    # armed earlier in this boot stays in the record (wdt None): a hardware one cannot be
    # stopped, and whoever serves must go on feeding it.
    b = mpboot._booted
    s1 = b[BOOTED_S1:] if b else [None, -1, None, HOW_CONFIRMED, None]
    if wdt is None and b:
        wdt = b[BOOTED_WATCHDOG]
    mpboot._booted = [slots, slot, info, wdt, how, _confirmed_now(slots)] + s1
    mpboot.confirm = confirm
    mpboot.pull = pull


def start(port, areas, keys, entry="main", mount="/app", wdt_ms=WDT_MS, **policy):
    # areas: (slot0, slot1, state, factory, trust) from port.areas(); without the fourth (or
    # with None there) the board has no factory state, without the fifth no trust area (it
    # keeps its frozen root set). policy: vendor_id, class_id, downgrade (the build's; the
    # factory record tightens it) and threshold, image_threshold (root set version 1's:
    # mpboot_keys' THRESHOLD and IMAGE_THRESHOLD, mpboot.trust.policy). Returns False in
    # recovery; otherwise runs the app (its import) and returns True. Under the no-repl
    # policy Ctrl-C is off from here on and whatever the app raises returns here (True)
    # instead of ending boot.py. A board with stage-1 slots starts with mpboot.stages.start.
    mpboot._booted = None  # this boot's record: run() or recovery() sets it
    slots = Slots(areas[0], areas[1], areas[2], keys, mapped=port.mapped,
                  factory=areas[3] if len(areas) > 3 else None,
                  trust=areas[4] if len(areas) > 4 else None, **policy)
    no_repl(slots)
    slot, info, trial = slots.decide()
    if slot < 0:
        return recovery(slots)
    return run(slots, port, slot, info, trial, entry, mount, wdt_ms)


def no_repl(slots):
    # Under the factory no-repl policy Ctrl-C is off from the boot on.
    if slots.no_repl:
        import micropython

        micropython.kbd_intr(-1)
