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
#   dev PATH SIZE SECTOR ALIGN [vendor=HEX] [class=HEX] [downgrade=0] [factory=0]
#                         open (or create) a NorFlash file, its unix-port areas and Slots
#                         (factory=0: without the factory area)
#   confirm SLOT | mark SLOT | set FIELD=N...   state changes, as in dev_update
#   server RUNNING [buf=N] [info=0]
#                         a new Server(slots, RUNNING, port, buf_size=N, info=the running
#                         slot's verified info unless info=0)
#   boot                  a power-on: fresh Slots, decide(), a Server for the slot it runs
#                         -> OK slot trial
#   booted HOW            set mpboot._booted as mpboot.boot.run does (HOW: mpboot.boot.HOW_*,
#                         0 confirmed, 1 test boot, 2 fallback), so state writes go through
#                         mpboot.confirm
#   state                 the state record as a fresh Slots loads it
#                         -> OK active test trial floor ok0 ok1 found
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
from binascii import hexlify

import devkit
import mpboot
from mpboot.image import ImageError
from mpboot.ports import unix as port
from mpboot.smp.server import Server
from mpboot.state import ACTIVE, FLOOR, OK0, OK1, TEST, TRIAL
from mpboot.update import UpdateError

FIELDS = {"active": ACTIVE, "test": TEST, "trial": TRIAL, "floor": FLOOR}

chip = None
areas = None
policy = None
slots = None
srv = None
snaps = True



def _fail(*args):
    raise OSError(5)


def _fail_ioctl(op, arg):
    if op == 6:
        raise OSError(5)
    return type(chip).ioctl(chip, op, arg)


def snap():
    return [devkit.area_digest(a) for a in areas[:3]] if areas and snaps else None


def counters():
    return devkit.counters(chip)


def new_slots():
    return devkit.new_slots(areas, policy)


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
        s = int(words[1])
        slots.confirm(s, slots.check(s))
        return []
    if cmd == "mark":
        slots.mark_test(int(words[1]))
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
        for w in words[2:]:
            k, _, v = w.partition("=")
            if k == "buf":
                buf = int(v)
            elif k == "info":
                info = v == "1" and running >= 0
        srv = None
        gc.collect()
        srv = Server(slots, running, port, buf_size=buf, info=slots.check(running) if info else None)
        return []
    if cmd == "boot":
        srv = None
        mpboot._booted = None
        slots = new_slots()
        s, info, trial = slots.decide()
        srv = Server(slots, s, port, info=info)
        return [s, int(trial)]
    if cmd == "booted":
        from mpboot import boot

        boot.set_booted(slots, srv.running, srv.image(srv.running), None, int(words[1]))
        return []
    if cmd == "state":
        st = new_slots().state
        return [st[ACTIVE], st[TEST], st[TRIAL], st[FLOOR], hexlify(st[OK0]).decode(),
                hexlify(st[OK1]).decode()]
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
