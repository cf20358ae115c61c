# MicroPython: drive the NOR flash simulator (mpboot.ports.nor_sim), flash areas
# (mpboot.flash) and the state store (mpboot.state) for tests/test_flash_sim.py, which
# asserts on the lines printed here ("name value...", one per check).
# Usage: dev_flash CASE ARGS...
#   nor DIR          fresh chips DIR/nor<A>.bin (2 KiB, 256-byte sectors) for alignments A
#   nor2 DIR         the same chips in a new process: read back, erase and program more
#   ops PATH ALIGN   a fixed sequence of 5 flash operations (for cuts, tears and traces)
#   area PATH        Area checks on a 4 KiB chip of 256-byte sectors, align 4
#   st DIR OP...     state store scripts (see run_st)
#   timing PATH      timing="nor" on a clock whose every sleep overshoots 150 us: prints the
#                    microseconds slept per operation
import sys

from mpboot import state
from mpboot.flash import Area
from mpboot.ports.nor_sim import NorFlash


def out(name, *vals):
    print(name, *vals)


def res(fn, *args):
    # What a call did: "ok" (or "ok <result>"), "OSError <errno>", "ValueError".
    try:
        r = fn(*args)
    except OSError as e:
        return "OSError %d" % e.args[0]
    except ValueError:
        return "ValueError"
    return "ok" if r is None else "ok %r" % (r,)


def pat(n, seed):
    # Deterministic test data (tests/test_flash_sim.py has the same function).
    return bytes((i * 37 + seed * 11 + 5) & 0xFF for i in range(n))


def rd(chip, addr, n):
    buf = bytearray(n)
    chip.readblocks(addr // chip.sector, buf, addr % chip.sector)
    return buf


def values(b):
    # The distinct byte values of b, as sorted hex ("00", "00ff", ...).
    seen = bytearray(256)
    for x in b:
        seen[x] = 1
    return "".join("%02x" % i for i in range(256) if seen[i])


# ---- NOR simulator --------------------------------------------------------------------


def case_nor(d):
    for al in (1, 4, 8, 16):
        c = NorFlash("%s/nor%d.bin" % (d, al), 2048, 256, al)
        p = "a%d." % al
        out(p + "fresh", values(rd(c, 0, 2048)))
        out(p + "ioctl", c.ioctl(4, 0), c.ioctl(5, 0), c.ioctl(1, 0), c.ioctl(2, 0), c.ioctl(3, 0))
        out(p + "ioctl_unknown", c.ioctl(99, 0))
        ops = c.ops
        # Programming clears bits only.
        out(p + "prog_f0", res(c.writeblocks, 0, b"\xf0" * 16, 0))
        out(p + "prog_0f_over_f0", res(c.writeblocks, 0, b"\x0f" * 16, 0))
        out(p + "after_0f", rd(c, 0, 16).hex())
        out(p + "errors1", c.errors)
        out(p + "prog_same", res(c.writeblocks, 0, b"\xf0" * 16, 0))
        out(p + "prog_subset", res(c.writeblocks, 0, b"\x30" * 16, 0))
        out(p + "after_subset", rd(c, 0, 16).hex())
        out(p + "prog_00", res(c.writeblocks, 0, bytes(16), 16))
        out(p + "after_00", rd(c, 16, 16).hex())
        out(p + "errors2", c.errors)
        out(p + "ops_progs", c.ops - ops)  # 4: the refused program is not an operation
        # One 1 over a 0 deep inside a long program (second 256-byte chunk): all refused.
        c.writeblocks(1, b"\xaa" * 512, 0)
        data = bytearray(b"\x88" * 512)
        data[300] = 0xAB
        out(p + "prog_long_one_bad", res(c.writeblocks, 1, data, 0))
        out(p + "long_after", values(rd(c, 256, 512)))
        out(p + "errors3", c.errors)
        data[300] = 0x88
        out(p + "prog_long_ok", res(c.writeblocks, 1, data, 0))
        out(p + "long_ok_after", values(rd(c, 256, 512)))
        # Alignment: address and length must be multiples of the write unit.
        ops = c.ops
        e = c.errors
        out(p + "mis_addr", res(c.writeblocks, 6, bytes(al), al // 2 or 1))
        out(p + "mis_len", res(c.writeblocks, 6, bytes(al + (al // 2 or 1)), 64))
        out(p + "mis_len_short", res(c.writeblocks, 6, bytes(al // 2 or 1), 128))
        out(p + "aligned", res(c.writeblocks, 6, bytes(al), 192 + al))
        out(p + "mis_counts", c.ops - ops, c.errors - e)
        out(p + "sector6", rd(c, 1536, 256).hex())
        # Bounds.
        out(p + "prog_past_end", res(c.writeblocks, 7, bytes(32), 240))
        out(p + "prog_neg", res(c.writeblocks, 0, bytes(16), -16))
        out(p + "read_past_end", res(c.readblocks, 7, bytearray(32), 240))
        out(p + "read_block8", res(c.readblocks, 8, bytearray(1)))
        out(p + "read_last", res(c.readblocks, 7, bytearray(16), 240))
        # Erase granularity: sector 4 only.
        c.writeblocks(3, bytes(768), 0)  # sectors 3, 4, 5 all zeros, one program
        out(p + "erase4", res(c.ioctl, 6, 4))
        out(p + "sectors345", values(rd(c, 768, 256)), values(rd(c, 1024, 256)), values(rd(c, 1280, 256)))
        out(p + "edges", rd(c, 1022, 4).hex(), rd(c, 1278, 4).hex())
        out(p + "erase8", res(c.ioctl, 6, 8))
        out(p + "erase_neg", res(c.ioctl, 6, -1))
        # Basic protocol: writeblocks without an offset erases, then programs.
        out(p + "basic1", res(c.writeblocks, 3, pat(256, 1)))
        out(p + "basic1_read", int(rd(c, 768, 256) == pat(256, 1)), values(rd(c, 1024, 256)))
        out(p + "basic2", res(c.writeblocks, 1, pat(512, 2)))  # sectors 1, 2 (0xaa/0x88)
        out(p + "basic2_read", int(rd(c, 256, 512) == pat(512, 2)))
        # Reads are not operations.
        ops = c.ops
        for i in range(50):
            rd(c, (i * 40) % 2000, 40)
        out(p + "reads_ops", c.ops - ops)
        out(p + "counters", c.ops, c.erases, c.errors, c.programmed)
        c.close()


def case_nor2(d):
    for al in (1, 4, 8, 16):
        c = NorFlash("%s/nor%d.bin" % (d, al), 2048, 256, al)
        p = "a%d." % al
        out(p + "counters", c.ops, c.erases, c.errors, c.programmed)
        out(p + "first", rd(c, 0, 32).hex())
        out(p + "basic", int(rd(c, 768, 256) == pat(256, 1)), int(rd(c, 256, 512) == pat(512, 2)))
        out(p + "sector4", values(rd(c, 1024, 256)))
        out(p + "erase3", res(c.ioctl, 6, 3))
        out(p + "prog7", res(c.writeblocks, 7, pat(64, 7), 64))
        # No close(): what was written must be in the file anyway (unbuffered, like flash).


# ---- Fault injection: a fixed sequence of operations -----------------------------------


def case_ops(path, al):
    c = NorFlash(path, 2048, 256, al)
    for i in range(5):
        rd(c, 0, 2048)  # reads never count
        if i == 0:
            c.writeblocks(0, pat(32, 0), 0)
        elif i == 1:
            c.ioctl(6, 1)
        elif i == 2:
            c.writeblocks(2, pat(64, 2), 0)
        elif i == 3:
            c.ioctl(6, 3)
        else:
            c.writeblocks(4, pat(48, 4), 16)
        out("done", i)
    out("end", c.ops, c.erases, c.programmed)


# ---- Area -----------------------------------------------------------------------------


def case_area(path):
    c = NorFlash(path, 4096, 256, 4)
    for name, start, size, ws in (
        ("whole", 0, 0, 1),
        ("rest", 1024, 0, 4),
        ("exact", 3840, 256, 256),
        ("start_mis", 100, 256, 1),
        ("start_mis_rest", 128, 0, 1),
        ("size_mis", 256, 100, 1),
        ("size_half_block", 0, 128, 1),
        ("past_end", 3840, 512, 1),
        ("too_big", 0, 4352, 1),
        ("at_end", 4096, 0, 1),
        ("start_past", 4352, 256, 1),
        ("neg_size", 256, -256, 1),
        ("neg_start", -256, 256, 1),
        ("ws3", 0, 256, 3),
        ("ws0", 0, 256, 0),
        ("ws_neg", 0, 256, -4),
        ("ws512", 0, 256, 512),
        ("ws96", 0, 256, 96),
        ("ws16", 0, 256, 16),
    ):
        try:
            a = Area(c, start, size, ws)
            out("ctor." + name, "ok", a.start, a.size, a.erase_size, a.write_size)
        except ValueError:
            out("ctor." + name, "ValueError")
    lo = Area(c, 0, 1024, 4)  # chip bytes 0..1023 are 0xa5 (set by the test)
    a = Area(c, 1024, 1024, 4)  # chip bytes 1024..2047, erased
    # read(): short at the end, ValueError beyond.
    buf = bytearray(b"\x11" * 16)
    out("read.short", res(lo.read, 1020, buf), buf.hex())
    buf = bytearray(b"\x11" * 16)
    out("read.full", res(a.read, 0, buf), buf.hex())
    buf = bytearray(b"\x11" * 16)
    out("read.end", res(a.read, 1024, buf), buf.hex())
    out("read.beyond", res(a.read, 1025, bytearray(16)))
    out("read.neg", res(a.read, -1, bytearray(16)))
    # write(): alignment and bounds.
    out("write.mis_off", res(a.write, 2, b"\x00" * 4))
    out("write.mis_len", res(a.write, 0, b"\x00" * 3))
    out("write.mis_both", res(a.write, 1, b"\x00" * 5))
    out("write.past_end", res(a.write, 1020, b"\x00" * 8))
    out("write.neg", res(a.write, -4, b"\x00" * 4))
    out("write.first", res(a.write, 0, b"\x01\x02\x03\x04"))
    out("write.again_same", res(a.write, 0, b"\x01\x02\x03\x04"))
    out("write.again_ff", res(a.write, 0, b"\xff\xff\xff\xff"))
    out("write.next", res(a.write, 4, pat(8, 3)))
    out("write.last", res(a.write, 1020, b"\x05\x06\x07\x08"))
    out("write.chip_errors", c.errors)
    # One byte not 0xff in an otherwise erased target, at offset q of a write of n bytes at
    # area offset 256 + s (area block 1: chip sector 5).
    erases = 0
    for n, s, q in (
        (256, 0, 0), (256, 0, 1), (256, 0, 62), (256, 0, 63), (256, 0, 64), (256, 0, 65),
        (256, 0, 127), (256, 0, 128), (256, 0, 191), (256, 0, 200), (256, 0, 254), (256, 0, 255),
        (4, 0, 0), (4, 0, 1), (4, 0, 2), (4, 0, 3), (12, 4, 5), (12, 4, 11), (60, 0, 59),
        (68, 0, 66), (68, 0, 64), (132, 8, 130), (132, 8, 3), (192, 0, 190),
        # The odd byte just outside the range: the write goes ahead.
        (64, 0, 64), (12, 4, 12), (8, 4, -1), (60, 128, -4), (252, 4, -3),
    ):
        a.erase(256, 256)
        erases += 1
        at = 256 + s + q
        word = bytearray(b"\xff" * 4)
        word[at % 4] = 0x7F
        a.write(at - at % 4, word)
        r = res(a.write, 256 + s, b"\x00" * n)
        got = bytearray(256)
        a.read(256, got)
        out("mid.%d.%d.%d" % (n, s, q), r, values(got), got.count(b"\x00"), c.errors)
    out("mid.erases", erases)
    # erase(): whole blocks inside the area only.
    out("erase.mis_off", res(a.erase, 128, 256))
    out("erase.mis_len", res(a.erase, 0, 100))
    out("erase.past_end", res(a.erase, 768, 512))
    out("erase.neg", res(a.erase, -256, 256))
    a.write(512, bytes(508))  # area blocks 2, 3 (chip sectors 6, 7) up to write.last
    out("erase.block2", res(a.erase, 512, 256))
    out("erase.none", res(a.erase, 1024, 0))
    got = bytearray(512)
    a.read(512, got)
    out("erase.after", values(got[:256]), values(got[256:]))
    hi = Area(c, 3072, 0, 4)  # chip sectors 12..15 (0xa5): erased whole
    out("erase.hi", res(hi.erase, 0, hi.size))
    out("erase.hi_size", hi.size)
    c.close()


# ---- State store ----------------------------------------------------------------------


def fmt(rec):
    return " ".join(x.hex() if isinstance(x, bytes) else str(x) for x in rec)


def run_st(d, ops):
    # Ops, in order:
    #   chip:NAME:SIZE:SECTOR:ALIGN:START:ASIZE:WS   open DIR/NAME.bin, Area(START, ASIZE, WS)
    #   new | load | save | saven:N | check | errors | blank | set:I=V | raw:OFF:HEX
    c = area = store = None
    rec = state.blank()
    for op in ops:
        k, _, v = op.partition(":")
        if k == "chip":
            if c:
                c.close()
            name, size, sec, al, start, asize, ws = v.split(":")
            c = NorFlash("%s/%s.bin" % (d, name), int(size), int(sec), int(al))
            area = Area(c, int(start), int(asize), int(ws))
            store = None
            rec = state.blank()
            out("chip", name)
        elif k == "new":
            try:
                store = state.Store(area)
                out("new", "ok", store.rec, store.per)
            except ValueError:
                out("new", "ValueError")
        elif k == "load":
            rec = store.load()
            out("load", int(store.found), fmt(rec))
        elif k == "save":
            store.save(rec)
            out("save", rec[state.SEQ])
        elif k == "saven":
            seqs = []
            for _ in range(int(v)):
                rec[state.SOFF] = rec[state.SEQ] + 1  # each record names its own seq (not
                # in the floor: a raise is two records)
                rec[state.VERSION] = pat(8, rec[state.SEQ] + 1)
                store.save(rec)
                seqs.append(str(rec[state.SEQ]))
            out("saven", " ".join(seqs))
        elif k == "check":
            # What a fresh load in this process sees.
            s = state.Store(area)
            r = s.load()
            out("check", int(s.found), fmt(r))
        elif k == "errors":
            out("errors", c.errors)
        elif k == "blank":
            out("blank", fmt(state.blank()))
        elif k == "set":
            i, _, x = v.partition("=")
            rec[int(i)] = bytes.fromhex(x[2:]) if x[:2] == "h:" else int(x)
        elif k == "raw":
            # Program bytes by hand through the chip (the NOR rules still apply).
            off, _, h = v.partition(":")
            a = area.start + int(off)
            out("raw", res(c.writeblocks, a // c.sector, bytes.fromhex(h), a % c.sector))
        else:
            raise ValueError(op)
    if c:
        c.close()


def case_timing(path):
    # The clock: sleeping n microseconds takes n + 150 (a loaded host's overshoot).
    from mpboot.ports import nor_sim

    class Clock:
        now = 0
        slept = []

        def sleep_us(self, n):
            self.slept.append(n)
            self.now += n + 150

        def ticks_us(self):
            return self.now

        def ticks_diff(self, a, b):
            return a - b

    clock = Clock()
    real = nor_sim.time
    nor_sim.time = clock
    try:
        c = NorFlash(path, 16384, 4096, 1, timing="nor")
        c.ioctl(6, 0)  # erase sector 0: 45000 us
        for i in range(8):
            c.writeblocks(0, b"\x00" * 256, 256 * i)  # a page each: 700 us
        c.writeblocks(0, b"\x00" * 16, 4096 - 16)  # 71 us: less than the overshoot owed
        c.writeblocks(0, b"\x00" * 16, 4096 - 32)
        c.close()
    finally:
        nor_sim.time = real
    out("slept", *clock.slept)
    out("busy", clock.now)


def main():
    case = sys.argv[1]
    args = sys.argv[2:]
    if case == "nor":
        case_nor(args[0])
    elif case == "nor2":
        case_nor2(args[0])
    elif case == "ops":
        case_ops(args[0], int(args[1]))
    elif case == "area":
        case_area(args[0])
    elif case == "st":
        run_st(args[0], args[1:])
    elif case == "timing":
        case_timing(args[0])
    else:
        raise ValueError(case)


main()
