# MicroPython: run a port adapter (mpboot.ports.esp32, rp2 or stm32) against the fakes of its
# native modules (tests/device/fakes, on sys.path before the built-ins they stand for).
# Usage: dev_ports PORT DIR
#   PORT: esp32 | rp2 | stm32 (internal flash) | stm32-spi (SPI flash behind pyb.Flash)
#   DIR:  a directory for the flash file (a fresh one per run)
# Prints "INFO geometry AREA SIZE ERASE WRITE" lines, then "PASS NAME [DETAIL]" or
# "FAIL NAME ERROR" per check; exits 0 either way (the pytest side asserts on the lines).
import gc
import sys

import machine  # the fake

NAME = sys.argv[1]
PATH = sys.argv[2] + "/flash-" + NAME + ".bin"

if NAME == "esp32":
    import esp32 as fake
    from mpboot.ports import esp32 as port

    # (type, subtype, address, size, label, encrypted); MicroPython runs from "factory".
    TABLE = (
        (0, 0x00, 0x10000, 0x10000, "factory", False),
        (0, 0x10, 0x20000, 0x8000, "ota_0", False),
        (0, 0x11, 0x28000, 0x8000, "ota_1", False),
        (1, 0x40, 0x30000, 0x4000, "mpboot", False),  # state: sectors 0, 1; factory: 2, 3
        (1, 0x41, 0x34000, 0x2000, "secret", True),
        (1, 0x42, 0x36000, 0x2000, "tiny", False),  # no room for the factory area
        (1, 0x43, 0x38000, 0x6000, "mpboot6", False),  # state, factory and trust (sectors 4, 5)
    )
    ARGS = ()
    TRUST = (("ota_0", "ota_1", "mpboot6"), ValueError)  # 16 KiB "mpboot": no room for it
    WDT_ASK = 1500
    REFUSE = (
        ("running", ("factory", "ota_1", "mpboot"), ValueError),
        ("encrypted", ("ota_0", "ota_1", "secret"), ValueError),
        ("missing", ("ota_0", "ota_9", "mpboot"), OSError),
        ("state_app", ("ota_0", "ota_1", "ota_1"), ValueError),
        ("twice", ("ota_0", "ota_0", "mpboot"), ValueError),
        ("small", ("ota_0", "ota_1", "tiny"), ValueError),
    )

    def setup_fake():
        fake.setup(PATH, 0x3E000, TABLE, 0)

elif NAME == "rp2":
    import rp2 as fake
    from mpboot.ports import rp2 as port

    ARGS = (0, 0x2000, 0x4000)  # slots 8 KiB at 0 and 0x2000, state at 0x4000, factory 0x6000
    TRUST = ((0, 0x2000, 0x4000), None)  # trust=True: 0x8000
    WDT_ASK = 20000
    REFUSE = (
        ("unaligned", (0x800, 0x2000, 0x4000), ValueError),
        ("overlap", (0, 0x2000, 0x2000), ValueError),
        ("factory_overlap", (0x3000, 0x2000, 0), ValueError),
        ("outside", (0, 0x2000, 0x7000), ValueError),
    )

    def setup_fake():
        fake.setup(PATH, 0xA000)

elif NAME == "stm32":
    import pyb as fake
    from mpboot.ports import stm32 as port

    # Storage: sectors of 2, 2, 2, 2, 4, 4, 4, 4 KiB from 0x08004000 (the F4 pattern of small
    # then bigger sectors, scaled down to fit the heap), a RAM sector copy of 4 KiB. The state
    # and the factory area in the 2 KiB sectors, 8 KiB slots of two 4 KiB sectors. The trust
    # area's check runs on a chip of its own with four more 4 KiB sectors: 4 KiB slots, then
    # state, factory and trust in 4 KiB sectors (2 KiB sectors cannot hold a trust record:
    # the first layout with one is refused).
    BASE = 0x08004000
    SECTORS = (0x800, 0x800, 0x800, 0x800, 0x1000, 0x1000, 0x1000, 0x1000)
    ARGS = (0x2000, 0x2000, 0, 0x1000, 0x800, BASE)
    TRUST = ((0x2000, 0x1000, 0x4000, 0x1000, 0x1000, BASE), ValueError)

    def setup_trust():
        fake.setup(PATH + ".trust", SECTORS + (0x1000,) * 4, BASE, 0x1000)
    WDT_ASK = 60000
    REFUSE = (
        ("no_sectors", (0x2000, 0x2000, 0), ValueError),
        ("misaligned", (0x2800, 0x2000, 0, 0x1000, 0x800, BASE), ValueError),
        ("partial", (0x2000, 0x1800, 0, 0x1000, 0x800, BASE), ValueError),
        ("overlap", (0x2000, 0x2000, 0x800, 0x1000, 0x800, BASE), ValueError),
    )

    def setup_fake():
        fake.setup(PATH, SECTORS, BASE, 0x1000)

elif NAME == "stm32-spi":
    import pyb as fake
    from mpboot.ports import stm32 as port

    ARGS = (0, 0x2000, 0x4000)
    TRUST = ((0, 0x2000, 0x4000), None)  # trust=True: 0x8000
    WDT_ASK = 60000
    REFUSE = (
        ("unaligned", (0x800, 0x2000, 0x4000), ValueError),
        ("overlap", (0, 0x2000, 0x2000), ValueError),
    )

    def setup_fake():
        fake.setup(PATH, mode="spi", size=0xA000)

else:
    raise SystemExit("unknown port " + NAME)
if NAME != "stm32":
    setup_trust = None  # the trust area's check runs on the chip of the other checks

machine.setup("stm32" if NAME[:5] == "stm32" else NAME)
if NAME == "rp2":
    port._map = fake.xip  # stands for memoryview(rp2.Flash(...))
elif NAME[:5] == "stm32":
    port._map = fake.mem  # stands for uctypes.bytearray_at(addr, n)


def power_cycle():
    # Reopen the chip from its file (RAM state of the fakes is lost) and rebuild the areas.
    gc.collect()
    setup_fake()
    return port.areas(*ARGS)


def need(cond, what):
    if not cond:
        raise AssertionError(what)


def expect(kind, fn, *args):
    try:
        fn(*args)
    except kind as e:
        return e
    raise AssertionError("no " + kind.__name__)


def outcome(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return str(e.args[0])
    return "ok"


def pattern(n, seed):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def readback(area, off, n):
    buf = bytearray(n)
    need(area.read(off, buf) == n, "short read")
    return bytes(buf)


def check(name, fn):
    gc.collect()  # the fakes copy whole regions (mapped flash): keep the heap unfragmented
    try:
        r = fn()
    except Exception as e:  # report and go on: one line per check
        print("FAIL " + name + " " + repr(e))
        return
    print("PASS " + name + ("" if r is None else " " + r))


s0, s1, st, fy = power_cycle()
ES = s0.erase_size
WS = s0.write_size
N = 2 * WS if WS > 1 else 100  # bytes per test write
OFF = WS if WS > 1 else 3  # an aligned, non-zero offset
DATA = pattern(N, 1)
for label, a in (("slot0", s0), ("slot1", s1), ("state", st), ("factory", fy)):
    print("INFO geometry %s %d %d %d" % (label, a.size, a.erase_size, a.write_size))


def c_write_read():
    s0.erase(0, 2 * ES)
    need(s0.is_erased(0, 2 * ES), "not erased")
    s0.write(OFF, DATA)
    need(readback(s0, OFF, N) == DATA, "read back")
    return "n=%d off=%d" % (N, OFF)


def c_refuse_misaligned():
    expect(ValueError, s0.erase, 1, ES)
    expect(ValueError, s0.erase, 0, ES + 1)
    if WS > 1:
        expect(ValueError, s0.write, OFF + WS // 2, DATA[:WS])
        expect(ValueError, s0.write, 2 * N, DATA[: WS // 2])
    expect(ValueError, s0.write, s0.size - WS, DATA[: 2 * WS])
    return "ws=%d" % WS


def c_refuse_unerased():
    other = bytes(~b & 0xFF for b in DATA)
    e = expect(OSError, s0.write, OFF, other)
    need(e.args[0] == 5, "errno")
    need(readback(s0, OFF, N) == DATA, "data changed")


def c_raw():
    # The native device under the area, without Area's checks: what the port itself does.
    s1.erase(0, 2 * ES)
    d = s1.bdev
    n = max(WS, 16)
    a = pattern(n, 2)
    d.writeblocks(0, a, 0)
    b = bytes(~x & 0xFF for x in a)
    over = outcome(d.writeblocks, 0, b, 0)
    if over == "ok":
        over = "rewritten" if readback(s1, 0, n) == b else "garbled"
    mis = outcome(d.writeblocks, 1, bytes(16), 8)
    end = outcome(d.readblocks, d.ioctl(4, 0), bytearray(1), 0)
    return "overwrite=%s misaligned=%s past_end=%s" % (over, mis, end)


def c_erase_slot():
    mark = pattern(N, 3)
    s0.write(ES, mark)
    s0.erase(0, ES)
    need(s0.is_erased(0, ES), "unit 0 not erased")
    need(readback(s0, ES, N) == mark, "unit 1 changed")
    s0.write(OFF, DATA)
    need(readback(s0, OFF, N) == DATA, "rewrite")


def c_state_cycle():
    es = st.erase_size
    ws = st.write_size
    n = (64 + ws - 1) // ws * ws
    r1, r2, r3 = pattern(n, 4), pattern(n, 5), pattern(n, 6)
    need(st.size == 2 * es, "state is not two erase units")
    st.erase(0, st.size)
    st.write(0, r1)
    st.write(es, r2)
    st.erase(0, es)
    need(st.is_erased(0, es), "unit 0 not erased")
    need(readback(st, es, n) == r2, "unit 1 changed")
    st.write(0, r3)
    need(readback(st, 0, n) == r3, "rewrite")
    need(readback(st, es, n) == r2, "unit 1 after rewrite")
    return "record=%d" % n


SAVED_SEQ = [0]  # the state record's sequence number after c_state_store


def c_state_store():
    from mpboot.state import ACTIVE, SEQ, Store

    st.erase(0, st.size)
    s = Store(st)
    rec = s.load()
    need(not s.found, "fresh store has a record")
    for i in range(2 * s.per + 1):  # fills both sectors, switches at least twice
        rec[ACTIVE] = i & 1
        s.save(rec)
    SAVED_SEQ[0] = rec[SEQ]
    again = Store(st).load()
    need(again[SEQ] == rec[SEQ] and again[ACTIVE] == rec[ACTIVE], "load after save")
    return "per_sector=%d saves=%d" % (s.per, rec[SEQ])


def c_factory_store():
    # The factory record in its own area: written, sealed, read back after a power cycle;
    # the state area next to it untouched.
    global s0, s1, st, fy
    from mpboot.factory import IDENTITY, NO_DOWNGRADE, NO_REPL, SEALED, TEST_BOOT, Factory
    from mpboot.state import SEQ, Store

    need(fy.size == st.size and fy.erase_size == st.erase_size, "factory is not like the state")
    fy.erase(0, fy.size)
    f = Factory(fy)
    need(not f.found, "fresh factory area has a record")
    policy = IDENTITY | NO_DOWNGRADE | TEST_BOOT | NO_REPL
    f.write(IDENTITY, b"SN-000001", None, None, b"")
    f.write(policy, b"SN-000001", None, None, b"")
    f.write(policy | SEALED, b"SN-000001", None, None, b"")
    per = f.per
    s0, s1, st, fy = power_cycle()
    f = Factory(fy)
    need(f.sealed() and f.serial_text() == "SN-000001" and f.seq == 3, "factory record")
    need(Store(st).load()[SEQ] == SAVED_SEQ[0], "state changed")
    return "per_sector=%d" % per


UNSYNCED = pattern(N, 7)


def c_unsynced_then_cut():
    # A slot erase and write, then power off with nothing in between (no sync, no reset).
    global s0, s1, st, fy
    before = readback(s1, ES, N)
    need(before != UNSYNCED, "test data")
    s1.erase(ES, ES)
    s1.write(ES, UNSYNCED)
    s0, s1, st, fy = power_cycle()
    got = readback(s1, ES, N)
    if got == UNSYNCED:
        return "lost=0"
    need(got == before, "neither kept nor the old bytes")
    return "lost=1"


def c_persists():
    need(readback(s0, OFF, N) == DATA, "slot data")
    from mpboot.state import SEQ, Store

    rec = Store(st).load()
    need(rec[SEQ] == SAVED_SEQ[0], "state seq %d != %d" % (rec[SEQ], SAVED_SEQ[0]))


def c_mapped():
    w = pattern(N, 8)
    s0.erase(ES, ES)
    s0.write(ES, w)
    m = port.mapped(s0)
    if m is None:
        return "none"
    need(len(m) == s0.size, "length")
    need(bytes(m[ES : ES + N]) == w == readback(s0, ES, N), "mapped != read")
    need(bytes(m[OFF : OFF + N]) == DATA, "mapped old data")
    return "size=%d" % len(m)


V = pattern(N, 9)


def c_reset_persists():
    global s0, s1, st, fy
    s1.erase(0, ES)
    s1.write(0, V)
    expect(machine.Reset, port.reset)
    need(machine.resets == 1, "resets")
    s0, s1, st, fy = power_cycle()
    need(readback(s1, 0, N) == V, "write lost over reset")


def c_watchdog():
    w = port.watchdog(WDT_ASK)
    w.feed()
    w.feed()
    need(machine.feeds == 2, "feeds")
    return "asked=%d armed=%d" % (WDT_ASK, machine.armed)


def c_unique_id():
    u = port.unique_id()
    need(isinstance(u, bytes), "not bytes")
    return "len=%d" % len(u)


def c_trust_store():
    # trust=True: a fifth area, two erase units like the state's (on internal flash, a
    # 2560-byte unit at the start of two state-sized sectors), holding the trust state over a
    # power cycle; the state and factory areas untouched (their records are the ones saved
    # above in the first layout, whose areas these must not overlap). The first layout with
    # trust=True is refused where it has no room (TRUST[1]); four areas without it.
    global s0, s1, st, fy
    from mpboot import trust
    from mpboot.factory import Factory
    from mpboot.state import SEQ, Store
    from mpboot.trust import TrustStore

    args, first = TRUST
    need(len(port.areas(*ARGS)) == 4, "four areas by default")
    if first is None:
        need(len(port.areas(*ARGS, trust=True)) == 5, "first layout with trust")
    else:
        expect(first, lambda: port.areas(*ARGS, trust=True))
    if setup_trust:
        setup_trust()
    a = port.areas(*args, trust=True)
    need(len(a) == 5 and a[3] is not None, "five areas")
    ta = a[4]
    need(ta.size == 2 * ta.erase_size, "trust is not two erase units")
    ta.erase(0, ta.size)
    ts = TrustStore(ta)
    keys = ((bytes(32), 2048, bytes(256)),)
    need(ts.load(keys) == trust.initial(keys), "blank trust area")
    new = [2, 2, 1, [(bytes(range(32)), 3072, b"\x07" * 384), (b"\x01" * 32, 2048, b"\x09" * 256)], 3,
           [b"\x05" * 32], [7, 8]]
    ts.save(new)
    per = ts.per
    gc.collect()
    (setup_trust or setup_fake)()
    a = port.areas(*args, trust=True)
    need(TrustStore(a[4]).load(keys) == new, "trust state after a power cycle")
    s0, s1, st, fy = power_cycle()
    need(Store(st).load()[SEQ] == SAVED_SEQ[0], "state changed")
    need(Factory(fy).sealed(), "factory record changed")
    return "per_sector=%d erase=%d write=%d" % (per, ta.erase_size, ta.write_size)


def c_refuse_layouts():
    out = []
    for label, args, kind in REFUSE:
        expect(kind, port.areas, *args)
        out.append(label)
    port.areas(*ARGS)  # the good layout still works after the refusals
    return ",".join(out)


check("write_read", c_write_read)
check("refuse_misaligned", c_refuse_misaligned)
check("refuse_unerased", c_refuse_unerased)
check("raw", c_raw)
check("erase_slot", c_erase_slot)
check("state_cycle", c_state_cycle)
check("state_store", c_state_store)
check("unsynced_then_cut", c_unsynced_then_cut)
check("persists", c_persists)
check("mapped", c_mapped)
check("reset_persists", c_reset_persists)
check("watchdog", c_watchdog)
check("unique_id", c_unique_id)
check("refuse_layouts", c_refuse_layouts)
check("factory_store", c_factory_store)  # late: it loads more modules into the small heap
check("trust_store", c_trust_store)  # (after factory_store: the sealed record must stay)
