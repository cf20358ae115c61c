# The SMP server (mpboot.smp.server) driven directly on MicroPython: micropython -m dev_smp IN
#
# IN is a sequence of records: one kind byte, a u32 BE length, then that many bytes.
#   b"P": an SMP request packet, given to Server.handle. Prints one line
#         R HEX|- ops=N prog=N erase=N chg=XYZ reset=0|1
#         HEX: the response packet, "-": handle returned None. ops/prog/erase: what the NorFlash
#         counted during the call; chg: one digit per area (slot 0, slot 1, state), 1 if its
#         bytes changed (only while snapshots are on, else "-"); reset: reset_requested.
#   b"C": a text command (words). Prints one line NAME OK [values...] (ERR image|update CODE).
#
# Commands:
#   dev PATH SIZE SECTOR ALIGN [vendor=HEX] [class=HEX] [downgrade=0] [factory=0] [s1=BYTES]
#                         open (or create) a NorFlash file, its unix-port areas and Slots
#                         (factory=0: without the factory area; s1: with stage-1 slots of
#                         BYTES each, the app's mpboot.pairs.Pair and stage 1's pair)
#   confirm SLOT | mark SLOT | set FIELD=N...   state changes, as in dev_update (SLOT 2, 3:
#                         stage 1's slots; FIELD s1_active... stage 1's, flags the pair bits)
#   pairmark T0 T1        mpboot.pairs.mark_pair of app slot T0 and stage-1 slot T1
#   server RUNNING [buf=N] [info=0] [s1=SLOT] [deadline=MS]
#                         a new Server(slots, RUNNING, port, buf_size=N, info=the running
#                         slot's verified info unless info=0); with stage-1 slots also s1=
#                         the pair, s1_slot=SLOT (default -1), s1_info=its info, deadline=
#                         MS from now (absent: None)
#   boot                  a power-on: fresh Slots, decide() (decide_all with stage 1), a
#                         Server for the slots it runs -> OK slot trial [s1slot s1trial]
#   booted HOW [S1HOW]    set mpboot._booted as mpboot.boot.run does (HOW: mpboot.boot.HOW_*,
#                         0 confirmed, 1 test boot, 2 fallback), so state writes go through
#                         mpboot.confirm; with stage 1, its fields from the server's
#   late                  -> OK s1_trial late [s1_how no_deadline] (the service tick's reset
#                         test, 0|1 each; the boot record's stage-1 how and deadline is None)
#   state                 the state record as a fresh Slots loads it
#                         -> OK active test trial floor ok0 ok1 [s1_active s1_test s1_trial
#                         s1_floor flags]
#   snap 0|1              area snapshots per packet off/on (on by default)
#   mem                   -> OK free alloc (after gc.collect())
#   factory               the factory record as a fresh Slots loads it (docs/FACTORY.md)
#                         -> OK found seq flags serial vendor_id class_id labels (hex; "-"
#                         when empty),
#                         or OK none without a factory area
#   wfail 0|1             flash programs and erases fail (OSError(EIO)) from now on / again work
import gc
import struct
import sys
import time
from binascii import hexlify

import devkit
import mpboot
from mpboot.image import ImageError
from mpboot.ports import unix as port
from mpboot.smp.server import Server
from mpboot.state import ACTIVE, FLAGS, FLOOR, OK0, OK1, TEST, TRIAL
from mpboot.update import UpdateError

FIELDS = {"active": ACTIVE, "test": TEST, "trial": TRIAL, "floor": FLOOR, "flags": FLAGS,
          "s1_active": 12 + ACTIVE, "s1_test": 12 + TEST, "s1_trial": 12 + TRIAL, "s1_floor": 12 + FLOOR}

chip = None
areas = None
policy = None
slots = None
s1 = None
srv = None
snaps = True



def _fail(*args):
    raise OSError(5)


def _fail_ioctl(op, arg):
    if op == 6:
        raise OSError(5)
    return type(chip).ioctl(chip, op, arg)


def snap():
    if not areas or not snaps:
        return None
    return [devkit.area_digest(a) for a in areas[:3] + areas[5:]]


def counters():
    return devkit.counters(chip)


def new_slots():
    global s1
    sl = devkit.new_slots(areas, policy)
    s1 = devkit.new_stage1(areas, sl)
    return sl


def pair(s):
    return (slots, s) if s < 2 else (s1, s - 2)


def s1_args(slot, deadline=None):
    if s1 is None:
        return {}
    return {"s1": s1, "s1_slot": slot, "s1_info": s1.check(slot) if slot >= 0 else None, "deadline": deadline}


def command(words):
    global chip, areas, policy, slots, srv, snaps
    cmd = words[0]
    if cmd == "dev":
        if chip:
            chip.close()
        chip, areas, policy = devkit.open_dev(words[1:])
        slots = new_slots()
        srv = None
        mpboot._booted = None
        return [areas[0].size]
    if cmd == "confirm":
        sl, s = pair(int(words[1]))
        sl.confirm(s, sl.check(s))
        return []
    if cmd == "mark":
        sl, s = pair(int(words[1]))
        sl.mark_test(s)
        return []
    if cmd == "pairmark":
        from mpboot.pairs import mark_pair

        mark_pair(slots, int(words[1]), s1, int(words[2]))
        return []
    if cmd == "set":
        for w in words[1:]:
            k, _, v = w.partition("=")
            slots.state[FIELDS[k]] = int(v)
        slots.store.save(slots.state)
        return []
    if cmd == "server":
        running = int(words[1])
        buf = 2048
        info = running >= 0
        r1 = -1
        deadline = None
        for w in words[2:]:
            k, _, v = w.partition("=")
            if k == "buf":
                buf = int(v)
            elif k == "info":
                info = v == "1" and running >= 0
            elif k == "s1":
                r1 = int(v)
            elif k == "deadline":
                deadline = time.ticks_add(time.ticks_ms(), int(v))
        srv = None
        gc.collect()
        srv = Server(slots, running, port, buf_size=buf, info=slots.check(running) if info else None,
                     **s1_args(r1, deadline))
        return []
    if cmd == "boot":
        srv = None
        mpboot._booted = None
        slots = new_slots()
        if s1 is None:
            s, info, trial = slots.decide()
            srv = Server(slots, s, port, info=info)
            return [s, int(trial)]
        from mpboot.pairs import decide_all

        (s, info, trial), r1 = decide_all(slots, s1)
        srv = Server(slots, s, port, info=info, s1=s1, s1_slot=r1[0], s1_info=r1[1])
        return [s, int(trial), r1[0], int(r1[2])]
    if cmd == "booted":
        from mpboot import boot

        boot.set_booted(slots, srv.running, srv.image(srv.running), None, int(words[1]))
        if s1 is not None and len(words) > 2:
            r = srv.ups[1].running
            mpboot._booted[6:] = [s1, r, srv.image(2 + r) if r >= 0 else None, int(words[2]), srv.deadline]
        return []
    if cmd == "late":
        from mpboot.smp import stage1

        b = mpboot._booted
        more = [b[9], int(b[10] is None)] if b is not None and b[6] is not None else []
        return [int(srv.s1_trial), int(stage1.late(srv))] + more
    if cmd == "state":
        st = devkit.new_slots(areas, policy).state
        out = [st[ACTIVE], st[TEST], st[TRIAL], st[FLOOR], hexlify(st[OK0]).decode(), hexlify(st[OK1]).decode()]
        if s1 is not None:
            out += [st[12 + ACTIVE], st[12 + TEST], st[12 + TRIAL], st[12 + FLOOR], st[FLAGS]]
        return out
    if cmd == "snap":
        snaps = words[1] == "1"
        return []
    if cmd == "mem":
        gc.collect()
        return [gc.mem_free(), gc.mem_alloc()]
    if cmd == "factory":
        f = new_slots().factory
        if f is None:
            return ["none"]
        return [int(f.found), f.seq, f.flags] + [hexlify(b).decode() or "-" for b in
                                                 (f.serial, f.vendor_id, f.class_id, f.labels)]
    if cmd == "wfail":
        if words[1] == "1":
            chip.writeblocks = _fail
            chip.ioctl = _fail_ioctl
        else:
            del chip.writeblocks
            del chip.ioctl
        return []
    raise ValueError("unknown command " + cmd)


def main():
    pbuf = bytearray(2048 + 256)
    pmv = memoryview(pbuf)
    hdr = bytearray(5)
    out = sys.stdout
    with open(sys.argv[1], "rb") as f:
        while True:
            if f.readinto(hdr) != 5:
                break
            kind = hdr[0]
            n = struct.unpack_from(">I", hdr, 1)[0]
            if kind == 0x43:  # "C"
                words = f.read(n).decode().split()
                try:
                    line = "OK " + " ".join(str(x) for x in command(words))
                except ImageError as e:
                    line = "ERR image %d" % e.args[0]
                except UpdateError as e:
                    line = "ERR update %d" % e.args[0]
                out.write("%s %s\n" % (words[0], line.strip()))
                continue
            if n > len(pbuf):
                raise ValueError("packet too long")
            if n:
                f.readinto(pmv[:n])
            before = snap()
            c0 = counters()
            rsp = srv.handle(pmv[:n])
            c1 = counters()
            after = snap()
            chg = "".join("1" if a != b else "0" for a, b in zip(before, after)) if before else "-"
            out.write("R ")
            out.write("-" if rsp is None else hexlify(rsp))
            out.write(" ops=%d prog=%d erase=%d chg=%s reset=%d\n" % (
                c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2], chg, int(srv.reset_requested)))
            srv.reset_requested = False
    if chip:
        chip.close()


main()
