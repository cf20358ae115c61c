# The updater (mpboot.update) driven directly on MicroPython: micropython -m dev_update PLAN
#
# PLAN is a text file of commands, one per line; each prints one result line
#   NAME OK [values...] ops=N prog=N erase=N chg=XYZ
#   NAME ERR image|update CODE ops=N prog=N erase=N chg=XYZ
# where ops/prog/erase are what the NorFlash counted during the command (operations, bytes
# programmed, sector erases) and chg has one digit per area (slot 0, slot 1, state): 1 if
# that area's bytes changed during the command. Other exceptions end the run (a failure).
#
# Commands:
#   dev PATH SIZE SECTOR ALIGN [vendor=HEX] [class=HEX] [downgrade=0]
#                         open (or create) a NorFlash file, its unix-port areas and Slots
#                         -> OK slot_size
#   confirm SLOT          verify SLOT and confirm it (state: ACTIVE, ok digest, floor)
#   mark SLOT             mark SLOT for a test boot
#   set FIELD=N...        set state fields (active, test, trial, floor) and save the record
#   boot                  a fresh Slots (a power-on) decides; it becomes the Slots in use
#                         -> OK slot trial
#   updater RUNNING [CKPT] a new Updater(slots, RUNNING) (persisted progress every CKPT
#                         bytes) -> OK target
#   session               the upload session in the state record on flash
#                         -> OK slot len off sha16
#   erase SLOT            up.erase(SLOT) -> OK 1 if the whole slot reads erased
#   image PATH            the image the next begin/send/write take their bytes from
#   begin HDRLEN TOTAL MANIFEST [SHA]
#                         begin(TOTAL, image[:HDRLEN], manifest, sha); "-" for TOTAL is the
#                         image length; MANIFEST: "-" none, "auto" the image's protected TLV
#                         area, else a file holding it; SHA: "auto" the image's SHA-256, else
#                         hex (none when absent) -> OK slot start
#   send CHUNKS [END]     write image[next:END] in chunks of the comma-separated sizes (cycled);
#                         each write must return its end -> OK next (or BAD ...)
#   write OFF LEN         one write(OFF, image[OFF:OFF+LEN] zero-padded) -> OK returned
#   finish MARK           finish(MARK) -> OK slot major.minor.revision+build counter
#   abort
#   state                 the state record as a fresh Slots loads it
#                         -> OK active test trial floor version ok0 ok1 found (hex for bytes)
#   trace PATH|-          log flash operations to PATH (NorFlash's "W addr len"/"E addr len")
import hashlib
import struct
import sys
from binascii import hexlify, unhexlify

import devkit
from mpboot.image import ImageError
from mpboot.state import ACTIVE, FLOOR, OK0, OK1, SLEN, SOFF, SSHA, SSLOT, TEST, TRIAL, VERSION
from mpboot.update import UpdateError, Updater

FIELDS = {"active": ACTIVE, "test": TEST, "trial": TRIAL, "floor": FLOOR}

chip = None
areas = None
policy = None
slots = None
up = None
img = b""
nxt = 0


def load(path):
    with open(path, "rb") as f:
        return f.read()


def hx(b):
    return hexlify(b).decode()



def snap():
    return [devkit.area_digest(a) for a in areas[:3]] if areas else []


def new_slots():
    return devkit.new_slots(areas, policy)


def counters():
    return devkit.counters(chip)


def do(words):
    global chip, areas, policy, slots, up, img, nxt
    cmd = words[0]
    if cmd == "dev":
        if chip:
            chip.close()
        chip, areas, policy = devkit.open_dev(words[1:])
        slots = new_slots()
        up = None
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
    if cmd == "boot":
        slots = new_slots()
        s, info, trial = slots.decide()
        return [s, int(trial)]
    if cmd == "updater":
        up = Updater(slots, int(words[1]))
        if len(words) > 2:
            up.checkpoint = int(words[2])
        return [up.target()]
    if cmd == "session":
        st = slots.store.load()
        return [st[SSLOT], st[SLEN], st[SOFF], hexlify(st[SSHA]).decode()]
    if cmd == "erase":
        up.erase(int(words[1]))
        return [int(slots.areas[int(words[1])].is_erased(0, slots.areas[0].size))]
    if cmd == "image":
        img = load(words[1])
        return [len(img)]
    if cmd == "begin":
        hdr = img[: int(words[1])]
        total = len(img) if words[2] == "-" else int(words[2])
        m = words[3]
        if m == "-":
            manifest = None
        elif m == "auto":
            hdr_size, prot = struct.unpack_from("<HH", img, 8)
            start = hdr_size + struct.unpack_from("<I", img, 12)[0]
            manifest = img[start : start + prot]
        else:
            manifest = load(m)
        sha = None
        if len(words) > 4:
            sha = hashlib.sha256(img).digest() if words[4] == "auto" else unhexlify(words[4])
        nxt = up.begin(total, hdr, manifest, sha)
        return [up.slot, nxt]
    if cmd == "send":
        sizes = [int(x) for x in words[1].split(",")]
        end = len(img) if len(words) < 3 else int(words[2])
        mv = memoryview(img)
        i = 0
        while nxt < end:
            n = min(sizes[i % len(sizes)], end - nxt)
            i += 1
            r = up.write(nxt, mv[nxt : nxt + n])
            if r != nxt + n:
                return ["BAD", nxt, n, r]
            nxt = r
        return [nxt]
    if cmd == "write":
        off = int(words[1])
        n = int(words[2])
        data = bytearray(n)
        part = img[off : off + n] if 0 <= off < len(img) else b""
        data[: len(part)] = part
        r = up.write(off, data)
        nxt = r
        return [r]
    if cmd == "finish":
        s, info = up.finish(int(words[1]))
        v = info["version"]
        c = info["security_counter"]
        return [s, "%d.%d.%d+%d" % v, -1 if c is None else c]
    if cmd == "abort":
        up.abort()
        return []
    if cmd == "state":
        fresh = new_slots()
        st = fresh.state
        return [st[ACTIVE], st[TEST], st[TRIAL], st[FLOOR], hx(st[VERSION]), hx(st[OK0]),
                hx(st[OK1]), int(fresh.store.found)]
    if cmd == "trace":
        if chip.trace:
            chip.trace.close()
        chip.trace = None if words[1] == "-" else open(words[1], "a")
        return []
    raise ValueError("unknown command " + cmd)


def main():
    with open(sys.argv[1]) as f:
        plan = [line.split() for line in f.read().splitlines()]
    for words in plan:
        if not words or words[0].startswith("#"):
            continue
        before = snap()
        c0 = counters()
        try:
            out = "OK " + " ".join(str(x) for x in do(words))
        except ImageError as e:
            out = "ERR image %d" % e.args[0]
        except UpdateError as e:
            out = "ERR update %d" % e.args[0]
        c1 = counters()
        after = snap()
        chg = "".join("1" if a != b else "0" for a, b in zip(before, after)) if before and after else "-"
        if words[0] == "dev":
            c1 = c0 = counters()
            chg = "-"
        print("%s %s ops=%d prog=%d erase=%d chg=%s" % (
            words[0], out.strip(), c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2], chg))
    if chip:
        chip.close()


main()
