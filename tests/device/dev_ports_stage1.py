# MicroPython: a port adapter's stage-1 slots (areas(..., stage1=...), docs/BOOT.md "Two
# stages") against the fakes of its native module (tests/device/fakes).
# Usage: dev_ports_stage1 PORT DIR [IMAGE]
#   PORT:  esp32 | rp2 | stm32 (internal flash) | stm32-spi (SPI flash behind pyb.Flash)
#   DIR:   a directory for the flash file (a fresh one per run)
#   IMAGE: a signed stage-1 image (kind updater). Without it: the seven areas and the
#          layouts refused. With it: the boot decision for both pairs (mpboot.pairs) over
#          those areas, the image in the app's slot 0 and in stage 1's slot 1, twice (a
#          power cycle between).
# Prints, without IMAGE: "AREA i START SIZE ERASE WRITE" (START: the offset in the port's
# storage, chip for esp32; "AREA i none" for a missing area), "PLAIN n" (without stage1: n
# areas, the first n of the seven), "ACCEPTED label n", "REFUSED label TYPE MESSAGE". With
# IMAGE: "DECIDE APP_SLOT APP_ERR0 S1_SLOT VERSION TRIAL S1_ERR0 FOUND SEQ" per boot (FOUND:
# a state record was there before the decision; SEQ: the newest record's after it), then
# "MAPPED LEN" (stage 1's slot 1 as mapped() gives it, starting with the image's magic; -1:
# the port does not map). Then "DONE". A failed expectation raises.
import gc
import sys

import machine  # the fake

NAME = sys.argv[1]
PATH = sys.argv[2] + "/s1-" + NAME + ".bin"
IMAGE = sys.argv[3] if len(sys.argv) > 3 else None
KW = {}  # keyword arguments of the layout beside stage1 (trust=True, ...)

if NAME == "esp32":
    import esp32 as fake
    from mpboot.ports import esp32 as port

    # (type, subtype, address, size, label, encrypted); MicroPython runs from "factory".
    TABLE = (
        (0, 0x00, 0x10000, 0x10000, "factory", False),
        (0, 0x10, 0x20000, 0x8000, "ota_0", False),
        (1, 0x40, 0x28000, 0x9000, "mpb_slot0", False),
        (1, 0x41, 0x31000, 0x9000, "mpb_slot1", False),
        (1, 0x42, 0x3A000, 0x6000, "mpboot", False),  # state, factory, trust
        (1, 0x43, 0x40000, 0x10000, "mpb1_0", False),
        (1, 0x44, 0x50000, 0x10000, "mpb1_1", False),
        (1, 0x45, 0x60000, 0x2000, "secret", True),
    )
    ARGS = ("mpb_slot0", "mpb_slot1", "mpboot")
    KW = {"trust": True}
    S1 = ("mpb1_0", "mpb1_1")
    ACCEPT = ()
    REFUSE = (
        ("running", {"stage1": ("factory", "mpb1_1")}),
        ("twice", {"stage1": ("mpb1_0", "mpb1_0")}),
        ("app_slot", {"stage1": ("mpb_slot1", "mpb1_1")}),
        ("state", {"stage1": ("mpb1_0", "mpboot")}),
        ("app_partition", {"stage1": ("ota_0", "mpb1_1")}),
        ("encrypted", {"stage1": ("secret", "mpb1_1")}),
        ("missing", {"stage1": ("mpb1_0", "mpb1_9")}),
    )

    def setup_fake():
        fake.setup(PATH, 0x62000, TABLE, 0)

    def start(a):
        return a.bdev.info()[2] + a.start

elif NAME in ("rp2", "stm32-spi"):
    # Storage 0x2A000: app slots of 0x9000 at 0 and 0x9000, state 0x12000, factory 0x14000
    # (trust, when asked for, 0x16000), stage 1's slots of 0x9000 at 0x16000 and 0x1F000
    # (36 KiB slots: stage 1 as it ships is about 28 KB and growing).
    if NAME == "rp2":
        import rp2 as fake
        from mpboot.ports import rp2 as port

        def setup_fake():
            fake.setup(PATH, 0x2A000)

        def start(a):
            return a.bdev._start + a.start

        port._map = fake.xip  # stands for memoryview(rp2.Flash(...))
        E_SIZE = "stage1"
    else:
        import pyb as fake
        from mpboot.ports import stm32 as port

        def setup_fake():
            fake.setup(PATH, mode="spi", size=0x2A000)

        def start(a):
            return a.bdev.start + a.start

        E_SIZE = "stage1 size"
    ARGS = (0, 0x9000, 0x12000)
    S1 = (0x16000, 0x9000)
    ACCEPT = (
        ("no_factory", {"factory": False, "stage1": (0x14000, 0x1000)}),  # the factory's sectors are free
        ("trust", {"trust": True, "stage1": (0x18000, 0x9000)}),
    )
    REFUSE = (
        ("app_slots", {"stage1": (0x8000, 0x9000)}),
        ("state", {"stage1": (0x12000, 0x1000)}),
        ("factory", {"stage1": (0x14000, 0x1000)}),
        ("trust", {"trust": True, "stage1": S1}),
        ("unaligned", {"stage1": (0x16800, 0x9000)}),
        ("partial", {"stage1": (0x16000, 0x8800)}),
        ("empty", {"stage1": (0x16000, 0)}),
        ("negative", {"stage1": (-0x1000, 0x1000)}),
        ("outside", {"stage1": (0x22000, 0x9000)}),
    )

elif NAME == "stm32":
    import pyb as fake
    from mpboot.ports import stm32 as port

    # Storage: four 2 KiB sectors (state, factory: one unit at the start of each), then 36 of
    # 4 KiB from 0x08004000; a RAM sector copy of 4 KiB. App slots of 0x9000 (9 sectors) at
    # 0x2000 and 0xB000, stage 1's of 0x9000 at 0x14000 and 0x1D000.
    BASE = 0x08004000
    SECTORS = (0x800,) * 4 + (0x1000,) * 36
    ARGS = (0x2000, 0x9000, 0, 0x1000, 0x800, BASE)
    S1 = (0x14000, 0x9000)
    ACCEPT = ()
    REFUSE = (
        ("app_slots", {"stage1": (0x13000, 0x9000)}),
        ("state", {"stage1": (0, 0x1000)}),
        ("misaligned", {"stage1": (0x14800, 0x9000)}),
        ("partial", {"stage1": (0x14000, 0x8800)}),
        ("empty", {"stage1": (0x14000, 0)}),
        ("outside", {"stage1": (0x16000, 0x9000)}),
    )

    def setup_fake():
        fake.setup(PATH, SECTORS, BASE, 0x1000)

    def start(a):
        return a.bdev.start + a.start

    port._map = fake.mem  # stands for uctypes.bytearray_at(addr, n)

else:
    raise SystemExit("unknown port " + NAME)

machine.setup("stm32" if NAME[:5] == "stm32" else NAME)
if NAME == "stm32-spi":
    port._map = fake.mem  # (not used: SPI flash is not mapped, base 0)


def need(cond, what):
    if not cond:
        raise AssertionError(what)


def areas():
    return port.areas(*ARGS, stage1=S1, **KW)


def c_areas():
    a = areas()
    need(len(a) == 7, "seven areas")
    for i in range(7):
        if a[i] is None:
            print("AREA %d none" % i)
        else:
            print("AREA %d %d %d %d %d" % (i, start(a[i]), a[i].size, a[i].erase_size, a[i].write_size))
    plain = port.areas(*ARGS, **KW)
    need(len(plain) < 7, "stage 1's slots without stage1")
    for i in range(len(plain)):
        need((plain[i] is None) == (a[i] is None), "area %d" % i)
        if plain[i] is not None:
            need((start(plain[i]), plain[i].size) == (start(a[i]), a[i].size), "area %d" % i)
    print("PLAIN %d" % len(plain))
    for label, kw in ACCEPT:
        a = port.areas(*ARGS, **kw)
        need(len(a) == 7 and a[5].size == kw["stage1"][1], label)
        print("ACCEPTED %s %d" % (label, len(a)))
    for label, kw in REFUSE:
        try:
            port.areas(*ARGS, **kw)
        except (ValueError, OSError) as e:
            print("REFUSED %s %s %s" % (label, type(e).__name__, e.args[0] if e.args else "-"))
            continue
        raise AssertionError("accepted " + label)
    need(len(areas()) == 7, "the good layout after the refusals")


def write_image(area, path):
    # The image at the start of area (erased first), in 4 KiB pieces padded with 0xff to
    # the write unit.
    area.erase(0, area.size)
    buf = bytearray(4096)
    off = 0
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            w = area.write_size
            m = (n + w - 1) // w * w
            for i in range(n, m):
                buf[i] = 0xFF
            area.write(off, memoryview(buf)[:m])
            off += n
    area.sync()


def decide():
    import mpboot_keys
    from mpboot import trust
    from mpboot.pairs import IMAGE1, Pair, decide_all, stage1
    from mpboot.state import ACTIVE, SEQ

    a = areas()
    app = Pair(a[0], a[1], a[2], mpboot_keys.KEYS, mapped=port.mapped, factory=a[3], trust=a[4],
               **trust.policy(mpboot_keys))
    found = app.store.found
    s1 = stage1(app, a[5], a[6])
    (slot, info, trial), r1 = decide_all(app, s1)
    v = r1[1]["version"] if r1[1] else None
    print("DECIDE %d %d %d %s %d %d %d %d" % (slot, app.errors[0], r1[0], "%d.%d.%d" % v[:3] if v else "-",
                                              int(r1[2]), s1.errors[0], int(found), app.state[SEQ]))
    need(app.state[IMAGE1 + ACTIVE] == r1[0], "stage 1's confirmed slot in the state")


setup_fake()
if IMAGE:
    a = areas()
    for i in (0, 1, 2, 5, 6):
        a[i].erase(0, a[i].size)
    write_image(a[0], IMAGE)  # an updater in the app's slot: refused there (kind)
    write_image(a[6], IMAGE)
    a = None
    gc.collect()
    decide()
    gc.collect()
    setup_fake()  # power cycle
    decide()
    gc.collect()
    m = port.mapped(areas()[6])  # what the boot verifies and mounts stage 1 from, where the port maps
    need(m is None or bytes(m[:4]) == b"\x3d\xb8\xf3\x96", "mapped: not the image's magic")
    print("MAPPED %d" % (-1 if m is None else len(m)))
else:
    c_areas()
print("DONE")
