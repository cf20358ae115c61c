# The simulated device, one power-on per process: micropython -m sim_device CONFIG COMMAND...
#
# CONFIG is a text file: "flash=PATH size=N sector=N align=N [vendor=HEX] [class=HEX]
# [downgrade=0] [heap=...]"; the keys come from the mpboot_keys module on sys.path.
# Commands (one output line each that the host parses):
#   boot                      boot: run the app, or say RECOVERY
#   install IMAGE MODE CHUNK [manifest] [sha] [ckpt=N] [image=1]
#                             boot without running the app, then take IMAGE through the
#                             updater in CHUNK-byte writes; MODE: none | test | permanent;
#                             "manifest": send the protected TLVs with begin(); "sha": name
#                             the session by the image's SHA-256 (persisted, resumable: an
#                             install after a cut continues from the last checkpoint, every
#                             N bytes); image=1: into stage 1's free slot
#   pairmark                  boot without running the app, then mark the free slot of each
#                             pair for one combined test boot (slots.mark_pair): MARKED
#                             app=N s1=N, or REFUSED image N (a slot that does not verify)
#
# On a chip with stage-1 slots (s1=BYTES in CONFIG) both pairs are decided (decide_all);
# boot prints "mpboot: stage 1 slot N version V[ test boot]" (or "mpboot: stage 1 none")
# before the app runs, and after it a stand-in for stage 1's proof: a stage-1 trial whose
# ROMFS holds a file "prove" confirms itself (S1CONFIRM True|False). status adds a STATE1
# line and S1SLOT lines.
#   status                    the state record and each slot's verdict
#   layout                    AREAS START:SIZE of slot 0, slot 1, state, factory[, trust]
#                             (chip byte offsets), then TRUST version=N threshold=N
#                             image=N roots=N revocation=N found=0|1
#   age N                     rewrite the state record N times (moves the state log on)
#   factory                   the factory record (docs/FACTORY.md): FACTORY found=0|1 seq=N
#                             pos=N record=N flags=N serial=HEX vendor_id=HEX class_id=HEX
#                             labels=HEX
#                             ("-" for empty bytes)
#   fage N                    rewrite the factory record N times (moves the factory log on)
#   smp HEX...                boot without running the app, then give each SMP request packet
#                             (hex) to the update service's server: one line RSP HEX|- each
#   zsmp FILE [ckpt=N]        boot without running the app, then a client's compressed upload
#                             through the server: FILE holds records (kind byte, u32 BE length,
#                             bytes): "O" the opening request, then for each offset the opening
#                             may answer (0 and each checkpoint) an "S" record (u32 BE offset)
#                             followed by its "P" requests (compressed chunks from there), and
#                             last "M" requests (the mark). The requests of the offset the
#                             device answered are sent: one line RSP HEX|- each, then ZDONE
#                             off=N (the offset the last chunk's reply named, match=0|1)
import hashlib
import struct
import sys
from binascii import hexlify, unhexlify

import mpboot_keys
import sim_config
from mpboot import boot
from mpboot.image import ImageError
from mpboot.ports import unix as port
from mpboot.pairs import IMAGE1, Pair, decide_all, mark_pair, stage1
from mpboot.slots import Slots
from mpboot.state import ACTIVE, FLAGS, FLOOR, SEQ, TEST, TRIAL
from mpboot.trust import IMAGE_THRESHOLD, REVOCATION, ROOT_VERSION, ROOTS, THRESHOLD
from mpboot.update import UpdateError, Updater


def _slot_lines(word, pair):
    # One status line per slot of a pair: its verified image, or why it was refused (the
    # image and the policy: an app's dependency on stage 1 is the boot decision's).
    for s in (0, 1):
        info = Slots.probe(pair, s)
        if info:
            v = info["version"]
            print("%s %d ok version=%d.%d.%d+%d counter=%d confirmed=%d" % (
                word, s, v[0], v[1], v[2], v[3], info["security_counter"] or 0, pair.confirmed(s, info)))
        else:
            print("%s %d error=%d" % (word, s, pair.errors[s]))


def main():
    cfg, chip, policy = sim_config.load(sys.argv[1])
    cmd = sys.argv[2]
    areas = sim_config.areas(cfg, chip)
    two = len(areas) > 5
    slots = (Pair if two else Slots)(areas[0], areas[1], areas[2], mpboot_keys.KEYS, mapped=port.mapped,
                                     factory=areas[3], trust=areas[4] if len(areas) > 4 else None, **policy)
    s1 = stage1(slots, areas[5], areas[6]) if two else None
    if cmd == "status":
        st = slots.state
        store = slots.store
        print("STATE seq=%d active=%d test=%d trial=%d floor=%d found=%d pos=%d record=%d" % (
            st[SEQ], st[ACTIVE], st[TEST], st[TRIAL], st[FLOOR], store.found, store.pos, store.rec))
        _slot_lines("SLOT", slots)
        if s1:
            b = IMAGE1
            print("STATE1 active=%d test=%d trial=%d floor=%d flags=%d" % (
                st[b + ACTIVE], st[b + TEST], st[b + TRIAL], st[b + FLOOR], st[FLAGS]))
            _slot_lines("S1SLOT", s1)
        return
    if cmd == "layout":
        print("AREAS " + " ".join("%d:%d" % (a.start, a.size) for a in areas))
        t = slots.trust
        print("TRUST version=%d threshold=%d image=%d roots=%d revocation=%d found=%d" % (
            t[ROOT_VERSION], t[THRESHOLD], t[IMAGE_THRESHOLD], len(t[ROOTS]), t[REVOCATION],
            slots.trust_store is not None and slots.trust_store.found))
        return
    if cmd == "age":
        for _ in range(int(sys.argv[3])):
            slots.store.save(slots.state)
        print("AGED seq=%d" % slots.state[SEQ])
        return
    f = slots.factory
    if cmd == "factory":
        h = [hexlify(b).decode() or "-" for b in (f.serial, f.vendor_id, f.class_id, f.labels)]
        print("FACTORY found=%d seq=%d pos=%d record=%d flags=%d serial=%s vendor_id=%s class_id=%s labels=%s" % (
            f.found, f.seq, f.pos, f.rec, f.flags, h[0], h[1], h[2], h[3]))
        return
    if cmd == "fage":
        if f.found:
            rec = bytes(f.buf)  # the newest record, as find() or the last append left it
            for _ in range(int(sys.argv[3])):
                f.begin()[:] = rec
                f.append()
        print("FAGED seq=%d" % f.seq)
        return
    if s1:
        (slot, info, trial), r1 = decide_all(slots, s1)
        if r1[0] < 0:
            print("mpboot: stage 1 none")
        else:
            v = r1[1]["version"]
            print("mpboot: stage 1 slot %d version %d.%d.%d+%d%s" % (
                r1[0], v[0], v[1], v[2], v[3], " test boot" if r1[2] else ""))
    else:
        slot, info, trial = slots.decide()
    if cmd == "pairmark":
        t0 = Updater(slots, slot).target()
        t1 = Updater(s1, r1[0]).target()
        try:
            slots.check(t0)
            s1.check(t1)
            mark_pair(slots, t0, s1, t1)
        except ImageError as e:
            print("REFUSED image %d" % e.args[0])
            return
        print("MARKED app=%d s1=%d" % (t0, t1))
        return
    if cmd == "smp":
        from mpboot.smp.server import Server

        srv = Server(slots, slot, port, info=info, **_s1_args(s1, r1 if s1 else None))
        for h in sys.argv[3:]:
            rsp = srv.handle(unhexlify(h))
            print("RSP " + ("-" if rsp is None else hexlify(rsp).decode()))
        return
    if cmd == "zsmp":
        _zsmp(slots, slot, info, _s1_args(s1, r1 if s1 else None))
        return
    if cmd == "boot":
        if slot < 0:
            boot.recovery(slots)
            print("RECOVERY %d %d" % (slots.errors[0], slots.errors[1]))
        elif not boot.run(slots, port, slot, info, trial):
            print("RECOVERY %d %d" % (slots.errors[0], slots.errors[1]))
        if s1 and r1[2] and _proves(s1, r1):
            print("S1CONFIRM", s1.confirm(r1[0], r1[1]))
        return
    if cmd == "install":
        mode = {"none": 0, "test": 1, "permanent": 2}[sys.argv[4]]
        chunk = int(sys.argv[5])
        opts = sys.argv[6:]
        up = Updater(s1, r1[0]) if "image=1" in opts else Updater(slots, slot)
        for o in opts:
            if o.startswith("ckpt="):
                up.checkpoint = int(o[5:])
        finishing = False
        try:
            with open(sys.argv[3], "rb") as f:
                f.seek(0, 2)
                total = f.tell()
                f.seek(0)
                buf = bytearray(chunk)
                n = f.readinto(buf)
                manifest = None
                sha = None
                if "sha" in opts:
                    h = hashlib.sha256()
                    while n:
                        h.update(memoryview(buf)[:n])
                        n = f.readinto(buf)
                    sha = h.digest()
                    f.seek(0)
                    n = f.readinto(buf)
                if "manifest" in opts:
                    # Send the protected TLV area ahead, as the mpboot host client does.
                    hdr_size, prot = struct.unpack_from("<HH", buf, 8)
                    manifest = bytearray(prot)
                    f.seek(hdr_size + struct.unpack_from("<I", buf, 12)[0])
                    f.readinto(manifest)
                    f.seek(n)
                off = up.begin(total, memoryview(buf)[:n], manifest, sha)
                if off:
                    print("RESUMED at %d" % off)
                    f.seek(off)
                    n = f.readinto(buf)
                while n:
                    off = up.write(off, memoryview(buf)[:n])
                    n = f.readinto(buf)
                finishing = True
                target, info = up.finish(mode)
        except ImageError as e:
            # "finish": the image arrived whole and failed verification (the host's
            # VerificationFailed, as over SMP); otherwise it was refused as offered.
            print("REFUSED image %d%s" % (e.args[0], " finish" if finishing else ""))
            return
        except UpdateError as e:
            print("REFUSED update %d" % e.args[0])
            return
        v = info["version"]
        print("INSTALLED slot=%d version=%d.%d.%d+%d" % (target, v[0], v[1], v[2], v[3]))
        return
    raise SystemExit("unknown command " + cmd)


def _s1_args(s1, r1):
    # The stage-1 keyword arguments of mpboot.smp.server.Server (none without stage-1 slots):
    # the pair and what decide_all chose for it.
    return {"s1": s1, "s1_slot": r1[0], "s1_info": r1[1]} if s1 else {}


def _proves(s1, r1):
    # The stand-in for stage 1's proof (issue 19): its ROMFS holds a file "prove".
    import os
    import vfs

    slot, info = r1[0], r1[1]
    mem = bytearray(info["total_size"])
    s1.areas[slot].read(0, mem)
    start = info["hdr_size"]
    vfs.mount(vfs.VfsRom(memoryview(mem)[start : start + info["img_size"]]), "/s1")
    try:
        os.stat("/s1/prove")
        return True
    except OSError:
        return False
    finally:
        vfs.umount("/s1")


def _records(f):
    hdr = bytearray(5)
    while f.readinto(hdr) == 5:
        yield hdr[0], f.read(struct.unpack_from(">I", hdr, 1)[0])


def _reply(rsp):
    # The response's map (None: no response).
    if rsp is None:
        print("RSP -")
        return None
    print("RSP " + hexlify(rsp).decode())
    from mpboot.cbor import Decoder

    return Decoder().decode(memoryview(bytes(rsp))[8:])


def _zsmp(slots, slot, info, s1_args):
    from mpboot.smp.server import Server

    srv = Server(slots, slot, port, info=info, **s1_args)
    for o in sys.argv[4:]:
        if o.startswith("ckpt="):
            srv.up.checkpoint = int(o[5:])
    at = -1  # the offset the device expects
    chosen = False  # inside the requests of that offset
    last = None
    with open(sys.argv[3], "rb") as f:
        for kind, rec in _records(f):
            if kind == 0x4F:  # "O"
                at = _reply(srv.handle(rec)).get("off", -1)
            elif kind == 0x53:  # "S"
                chosen = struct.unpack(">I", rec)[0] == at
            elif kind == 0x50 and chosen:  # "P"
                last = _reply(srv.handle(rec))
            elif kind == 0x4D:  # "M"
                _reply(srv.handle(rec))
    if last is not None:
        print("ZDONE off=%d match=%d" % (last.get("off", -1), last.get("match", False) is True))


main()
