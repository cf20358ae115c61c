# The boot decision for two image pairs (issue 19: the app and stage 1) on a NOR flash file,
# case by case: micropython -m dev_stages FLASH
#
# Images are stand-ins: each Slots' check() answers from a table (slot -> verified info or an
# error), so every case is about the decision and the state record, not the verifier (which
# tests/test_slots.py and the power-cut matrix run for real); probe() and the dependency
# rules (mpboot.pairs.Pair.probe) run as on a device. Each slot also gets an image header and
# protected TLVs (version, DEPENDENCY TLVs) on flash: what a test mark reads. Each case starts
# from a state record written here, runs one boot decision (decide_all) and checks what it
# chose, the record it left and how many state records it wrote. Prints "OK name" per case,
# "DONE n".
import struct
import sys

from mpboot.ports import unix as port
from mpboot.pairs import (IMAGE1, PAIR, PAIR_APP_OK, PAIR_S1_OK, Pair, Store2, blank2, decide_all,
                          mark_pair, stage1)
from mpboot.image import ImageError
from mpboot.state import ACTIVE, FLAGS, FLOOR, NONE, OK0, TEST, TRIAL, VERSION, Store, blank

B = IMAGE1
SIZE = 64 * 1024 + 4 * 4096
path = sys.argv[1]
cases = 0


def info(n, counter=0, deps=None):
    # A verified image's info: digest byte n, version n.0.0, DEPENDENCY TLVs deps
    # ((image id, (major, minor, revision, build)), ...).
    i = {"digest": bytes([n]) * 32, "version": (n, 0, 0, 0), "security_counter": counter}
    if deps:
        i["deps"] = deps
    return i


def head(i):
    # The image header and protected TLV area of a stand-in image (no payload).
    prot = b"".join(struct.pack("<HHB3xBBHI", 0x40, 12, d[0], *d[1]) for d in i.get("deps", ()))
    prot = struct.pack("<HH", 0x6908, 4 + len(prot)) + prot if prot else b""
    return struct.pack("<IIHHIIBBHI4x", 0x96F3B83D, 0, 32, len(prot), 0, 0, *i["version"]) + prot


def device(images, s1_images, state=None, erase=True):
    # A board whose app slots hold `images` and stage-1 slots `s1_images` ({slot: info};
    # a missing slot fails with error 1), its state area holding `state` (a v2 list) if given.
    chip = port.flash(path, SIZE, 4096, 4)
    a = port.areas(chip, True, 8192)
    if erase:
        a[2].erase(0, a[2].size)
    if state is not None:
        Store2(a[2]).save(state)
    app = Pair(a[0], a[1], a[2], ())
    s1 = stage1(app, a[5], a[6])
    for sl, table in ((app, images), (s1, s1_images)):
        sl.check = _checker(table)
        for slot, i in table.items():
            if erase:
                sl.areas[slot].erase(0, 4096)
                sl.areas[slot].write(0, head(i))
    return chip, app, s1


def _checker(table):
    def check(slot, read=None, update=False):
        i = table.get(slot)
        if i is None:
            raise ImageError(1)
        return i
    return check


def record(**kw):
    # A v2 state list: app fields by name, stage 1's with a "s1_" prefix.
    # The confirmed image's version (VERSION) is the one of the okN naming the active slot.
    st = blank2()
    st[0] = 0
    names = {"active": ACTIVE, "test": TEST, "trial": TRIAL, "floor": FLOOR, "flags": FLAGS}
    for k, v in kw.items():
        base = B if k.startswith("s1_") else 0
        k = k[3:] if k.startswith("s1_") else k
        if k in ("ok0", "ok1"):
            st[base + OK0 + int(k[2])] = v["digest"][:16]
        else:
            st[base + names[k]] = v
    for base, p in ((0, ""), (B, "s1_")):
        ok = kw.get("%sok%d" % (p, st[base + ACTIVE]))
        if ok:
            st[base + VERSION] = struct.pack("<BBHI", *ok["version"])
    return st


def run(name, images, s1_images, st, want_app, want_s1, writes, check=None):
    # One boot decision; want_*: (slot, version or None, trial). writes: state records
    # appended (one state write; a floor raise appends its record twice).
    global cases
    chip, app, s1 = device(images, s1_images, st)
    before = app.state[0]
    r0, r1 = decide_all(app, s1)
    n = app.state[0] - before
    got = tuple((r[0], r[1]["version"][0] if r[1] else None, r[2]) for r in (r0, r1))
    assert got == (want_app, want_s1), (name, got)
    # The record on flash is the one in RAM.
    again = Store2(app.store.area).load()
    assert again[1:] == app.state[1:], (name, again, app.state)
    assert n == writes, (name, "writes", n)
    if check:
        check(app.state)
    cases += 1
    print("OK", name)
    return chip, app, s1, r0, r1


v1, v2, v3 = info(1), info(2), info(3)
w1, w2 = info(11, 1), info(12, 2)  # stage-1 images (counters 1, 2)

# --- each pair as Slots.decide: fresh, confirmed, fallback, none, test, bad test, revert ---
run("fresh: both pairs' newest valid image, confirmed in one record", {0: v1, 1: v2}, {0: w1},
    None, (1, 2, False), (0, 11, False), 2,
    lambda st: st[ACTIVE] == 1 and st[B + ACTIVE] == 0 and st[B + FLOOR] == 1 or 1 / 0)
confirmed = dict(active=0, ok0=v1, s1_active=1, s1_ok1=w1)
run("confirmed: active slots, no write", {0: v1, 1: v2}, {0: w2, 1: w1}, record(**confirmed),
    (0, 1, False), (1, 11, False), 0)
run("fallback: the other confirmed slot of each pair, no write", {1: v2}, {0: w2},
    record(active=0, ok0=v1, ok1=v2, s1_active=1, s1_ok1=w1, s1_ok0=w2),
    (1, 2, False), (0, 12, False), 0)
run("nothing confirmed: none of either pair (state exists), no write", {0: v1}, {0: w1},
    record(active=NONE, s1_active=NONE), (-1, None, False), (-1, None, False), 0)
run("app test: trial set, stage 1 as confirmed, one record", {0: v1, 1: v2}, {1: w1},
    record(test=1, **confirmed), (1, 2, True), (1, 11, False), 1,
    lambda st: st[TRIAL] == 1 and st[TEST] == NONE or 1 / 0)
run("stage-1 test: trial set, app as confirmed, one record", {0: v1}, {0: w2, 1: w1},
    record(s1_test=0, **confirmed), (0, 1, False), (0, 12, True), 1,
    lambda st: st[B + TRIAL] == 0 and st[B + TEST] == NONE or 1 / 0)
run("both tested on their own (no pair): both trials, one record", {0: v1, 1: v2}, {0: w2, 1: w1},
    record(test=1, s1_test=0, **confirmed), (1, 2, True), (0, 12, True), 1)
run("stage-1 test that does not verify: mark cleared, confirmed runs", {0: v1}, {1: w1},
    record(s1_test=0, **confirmed), (0, 1, False), (1, 11, False), 1,
    lambda st: st[B + TEST] == NONE and st[B + TRIAL] == NONE or 1 / 0)
run("app revert + stage-1 test in the same boot: one record", {0: v1, 1: v2}, {0: w2, 1: w1},
    record(trial=1, s1_test=0, **confirmed), (0, 1, False), (0, 12, True), 1,
    lambda st: st[TRIAL] == NONE and st[B + TRIAL] == 0 or 1 / 0)
run("stage-1 revert: the confirmed stage 1 runs", {0: v1}, {0: w2, 1: w1},
    record(s1_trial=0, **confirmed), (0, 1, False), (1, 11, False), 1,
    lambda st: st[B + TRIAL] == NONE or 1 / 0)
run("both revert (no pair): one record", {0: v1, 1: v2}, {0: w2, 1: w1},
    record(trial=1, s1_trial=0, **confirmed), (0, 1, False), (1, 11, False), 1)

# --- combined update: a pair boots, confirms and reverts together ---
pair = dict(test=1, s1_test=0, flags=PAIR, **confirmed)
run("pair mark: both trials, PAIR kept, one record", {0: v1, 1: v2}, {0: w2, 1: w1},
    record(**pair), (1, 2, True), (0, 12, True), 1,
    lambda st: st[FLAGS] == PAIR and st[TRIAL] == 1 and st[B + TRIAL] == 0 or 1 / 0)
run("pair mark, stage-1 half does not verify: neither starts", {0: v1, 1: v2}, {1: w1},
    record(**pair), (0, 1, False), (1, 11, False), 1,
    lambda st: st[FLAGS] == 0 and st[TRIAL] == NONE and st[TEST] == NONE or 1 / 0)
run("pair mark, app half does not verify: neither starts", {0: v1}, {0: w2, 1: w1},
    record(**pair), (0, 1, False), (1, 11, False), 1,
    lambda st: st[FLAGS] == 0 and st[B + TRIAL] == NONE and st[B + TEST] == NONE or 1 / 0)
trial = dict(trial=1, s1_trial=0, flags=PAIR, **confirmed)
run("pair trial reset: both revert", {0: v1, 1: v2}, {0: w2, 1: w1}, record(**trial),
    (0, 1, False), (1, 11, False), 1,
    lambda st: st[FLAGS] == 0 and st[TRIAL] == NONE and st[B + TRIAL] == NONE or 1 / 0)
trial["flags"] = PAIR | PAIR_APP_OK
run("pair trial reset after the app's half confirmed: both revert", {0: v1, 1: v2}, {0: w2, 1: w1},
    record(**trial), (0, 1, False), (1, 11, False), 1,
    lambda st: st[FLAGS] == 0 and st[ACTIVE] == 0 and st[B + ACTIVE] == 1 or 1 / 0)
run("stale PAIR flag without marks: cleared", {0: v1}, {1: w1}, record(flags=PAIR, **confirmed),
    (0, 1, False), (1, 11, False), 1, lambda st: st[FLAGS] == 0 or 1 / 0)
run("PAIR with one mark left (an upload, an erase or a permanent install took the other): neither starts",
    {0: v1, 1: v2}, {1: w1}, record(test=1, flags=PAIR, **confirmed), (0, 1, False), (1, 11, False), 1,
    lambda st: st[FLAGS] == 0 and st[TRIAL] == NONE and st[TEST] == NONE or 1 / 0)


def pair_confirm(name, order):
    # A pair trial, then each half confirms in `order`: only the second writes the confirms.
    global cases
    chip, app, s1, r0, r1 = run(name + " (trial)", {0: v1, 1: v2}, {0: w2, 1: w1}, record(**pair),
                                (1, 2, True), (0, 12, True), 1)
    halves = {"app": (app, r0), "s1": (s1, r1)}
    first, second = halves[order[0]], halves[order[1]]
    before = app.state[0]
    assert first[0].confirm(first[1][0], first[1][1]) is True
    assert first[0].confirm(first[1][0], first[1][1]) is False  # once
    st = app.state
    assert st[ACTIVE] == 0 and st[B + ACTIVE] == 1 and st[FLAGS] & PAIR, st
    assert st[FLAGS] & (PAIR_APP_OK if order[0] == "app" else PAIR_S1_OK), st
    assert app.state[0] - before == 1
    before = app.state[0]
    assert second[0].confirm(second[1][0], second[1][1]) is True
    # Both confirmed, in one record (written twice: stage 1's floor rose to 2).
    assert st[ACTIVE] == 1 and st[B + ACTIVE] == 0 and st[FLAGS] == 0, st
    assert st[TRIAL] == NONE and st[B + TRIAL] == NONE and st[B + FLOOR] == 2, st
    assert app.state[0] - before == 2, app.state[0] - before
    # The next boot: the new pair, confirmed, no write.
    _, app, s1 = device({0: v1, 1: v2}, {0: w2, 1: w1}, erase=False)
    r0, r1 = decide_all(app, s1)
    assert (r0[0], r0[2], r1[0], r1[2]) == (1, False, 0, False), (r0, r1)
    cases += 1
    print("OK", name)


pair_confirm("pair confirm, app first", ("app", "s1"))
pair_confirm("pair confirm, stage 1 first", ("s1", "app"))

# mark_pair: one record; a later single mark splits it into two marks of their own.
chip, app, s1 = device({0: v1, 1: v2}, {0: w2, 1: w1}, record(**confirmed))
before = app.state[0]
mark_pair(app, 1, s1, 0)
assert app.state[0] - before == 1 and app.state[FLAGS] == PAIR
assert app.state[TEST] == 1 and app.state[B + TEST] == 0
app.mark_test(1)
assert app.state[FLAGS] == 0 and app.state[B + TEST] == 0
cases += 1
print("OK mark_pair, then a single mark")

# --- dependencies (DEPENDENCY TLVs): an app on stage 1 (image 1) ---
need12 = info(2, deps=((1, (12, 0, 0, 0)),))  # app 2.0.0, needs stage 1 >= 12.0.0
need13 = info(3, deps=((1, (13, 0, 0, 0)),))
ok12 = dict(active=0, ok0=need12, ok1=v1, s1_active=0, s1_ok0=w2)  # both apps confirmed


def dep_run(name, images, s1_images, st, want_app, want_s1, writes, app_errors=None, check=None):
    chip, app, s1, r0, r1 = run(name, images, s1_images, st, want_app, want_s1, writes, check)
    if app_errors:
        for slot, code in app_errors.items():
            assert app.errors[slot] == code, (name, app.errors)
    return chip, app, s1, r0, r1


dep_run("dependency held: the app needing stage 1 >= 12 runs with stage 1 12", {0: need12, 1: v1}, {0: w2},
        record(**ok12), (0, 2, False), (0, 12, False), 0)
dep_run("the build number is not compared (MCUboot): >= 12.0.0+9 holds with 12.0.0+0",
        {0: info(2, deps=((1, (12, 0, 0, 9)),))}, {0: w2}, record(active=0, ok0=need12, s1_active=0, s1_ok0=w2),
        (0, 2, False), (0, 12, False), 0)
dep_run("dependency unmet: the other confirmed app runs, slot error 27, no write",
        {0: need12, 1: v1}, {1: w1}, record(active=0, ok0=need12, ok1=v1, s1_active=1, s1_ok1=w1),
        (1, 1, False), (1, 11, False), 0, {0: 27})
dep_run("no app candidate holds: recovery with E_DEPENDENCY, stage 1 still runs",
        {0: need12}, {1: w1}, record(active=0, ok0=need12, s1_active=1, s1_ok1=w1),
        (-1, None, False), (1, 11, False), 0, {0: 27})
dep_run("no stage 1 runs: an app that depends on stage 1 does not",
        {0: need12, 1: v1}, {}, record(active=0, ok0=need12, ok1=v1),
        (1, 1, False), (-1, None, False), 0, {0: 27})
dep_run("app test whose dependency fails: not started, mark cleared, one record",
        {0: v1, 1: need12}, {1: w1}, record(test=1, **confirmed), (0, 1, False), (1, 11, False), 1, {1: 27},
        lambda st: st[TEST] == NONE and st[TRIAL] == NONE or 1 / 0)
dep_run("app test and stage-1 test on their own: the app's dependency holds against the stage-1 trial",
        {0: v1, 1: need12}, {0: w2, 1: w1}, record(test=1, s1_test=0, **confirmed), (1, 2, True), (0, 12, True), 1)
dep_run("stage 1 is never held back by the app: its test below the app's dependency starts, the app falls back",
        {0: need12, 1: v1}, {0: w2, 1: w1}, record(s1_test=1, **ok12), (1, 1, False), (1, 11, True), 1, {0: 27})
dep_run("fresh board: the newest app whose dependency holds (not the newest app)",
        {0: v1, 1: need12}, {0: w1}, None, (0, 1, False), (0, 11, False), 2, {1: 27})
dep_run("pair mark, app needs the new stage 1: both start", {0: v1, 1: need12}, {0: w2, 1: w1},
        record(**pair), (1, 2, True), (0, 12, True), 1,
        check=lambda st: st[FLAGS] == PAIR or 1 / 0)
dep_run("pair mark, the new stage 1 is below the app's dependency: neither starts, both marks cleared",
        {0: v1, 1: need13}, {0: w2, 1: w1}, record(**pair), (0, 1, False), (1, 11, False), 1, {1: 27},
        lambda st: st[FLAGS] == 0 and NONE == st[TEST] == st[TRIAL] == st[B + TEST] == st[B + TRIAL] or 1 / 0)
# A pair trial reset after the app's half confirmed reverts both: the old app runs with the
# old stage 1 even though the new app's dependency named the new one.
dep_run("pair trial reset: both revert, the old app with the old stage 1",
        {0: v1, 1: need12}, {0: w2, 1: w1}, record(trial=1, s1_trial=0, flags=PAIR | PAIR_APP_OK, **confirmed),
        (0, 1, False), (1, 11, False), 1)

# Boot's fallback (boot.run, an image that cannot run) probes through the same rule.
_, app, s1, r0, r1 = run("probe after the decision keeps the rule", {0: need12, 1: v1}, {1: w1},
                         record(active=1, ok0=need12, ok1=v1, s1_active=1, s1_ok1=w1), (1, 1, False),
                         (1, 11, False), 0)
assert app.probe(0) is None and app.errors[0] == 27 and app.probe(1) is v1


def refused(fn, *args):
    try:
        fn(*args)
    except ImageError as e:
        return e.args[0]
    return 0


# Test marks: an app whose dependency the confirmed stage 1 (or, with mark_pair, the stage 1
# marked with it) does not meet is refused with 27, nothing written.
chip, app, s1 = device({0: v1, 1: need12}, {0: w2, 1: w1}, record(**confirmed))  # stage 1 11 confirmed
before = app.state[0]
assert refused(app.mark_test, 1) == 27 and app.state[0] == before and app.state[TEST] == NONE
assert refused(mark_pair, app, 1, s1, 1) == 27 and app.state[0] == before  # with stage 1 11
assert refused(mark_pair, app, 1, s1, 0) == 0 and app.state[0] == before + 1  # with stage 1 12
assert app.state[FLAGS] == PAIR and app.state[TEST] == 1 and app.state[B + TEST] == 0
assert refused(s1.mark_test, 1) == 0  # stage 1 is never refused for the app's sake
chip, app, s1 = device({0: v1, 1: need12}, {0: w2, 1: w1}, record(**confirmed))
before = app.state[0]
assert refused(app.confirm, 1, need12) == 27 and app.state[0] == before  # a permanent install, too
chip, app, s1 = device({0: v1, 1: need12}, {0: w2}, record(active=0, ok0=v1, s1_active=0, s1_ok0=w2))
assert refused(app.mark_test, 1) == 0 and app.state[TEST] == 1  # stage 1 12 confirmed
assert refused(app.confirm, 1, need12) == 0 and app.state[ACTIVE] == 1
chip, app, s1 = device({0: v1, 1: need12}, {0: w2}, record(active=0, ok0=v1))  # no stage 1 confirmed
assert refused(app.mark_test, 1) == 27
assert refused(app.mark_test, 0) == 0  # no dependency: marked
cases += 1
print("OK test marks: refused (27) unless the confirmed or pair-marked stage 1 meets the dependency")

# The policy (Slots.policy, every board): the firmware's stage-0 ABI (image 255) is 1.0: the
# same major and a minor at most 0. A dependency on stage 1 cannot be met on an app-only board.
from mpboot.slots import Slots  # noqa: E402

chip = port.flash(path, SIZE, 4096, 4)
a = port.areas(chip, True)
plain = Slots(a[0], a[1], a[2], ())
_, app, s1 = device({}, {})


def policy(sl, *deps):
    i = {"security_counter": 0, "vendor_id": None, "class_id": None, "version": (1, 0, 0, 0), "deps": deps,
         "kind": sl.kind}
    return refused(sl.policy, i, True)


for v, want in (((1, 0, 0, 0), 0), ((1, 0, 9, 9), 0), ((1, 1, 0, 0), 27), ((2, 0, 0, 0), 27),
                ((0, 0, 0, 0), 27), ((0, 9, 0, 0), 27)):
    for sl in (plain, app, s1):
        assert policy(sl, (255, v)) == want, (v, want)
assert policy(plain, (1, (1, 0, 0, 0))) == 27  # app-only board: no stage 1 to meet it
assert policy(app, (1, (99, 0, 0, 0))) == 0  # two pairs: checked at the mark and the boot
assert policy(app, (1, (1, 0, 0, 0)), (255, (1, 1, 0, 0))) == 27
cases += 1
print("OK policy: firmware ABI 1.0 (same major, minor at most), stage 1 on an app-only board refused")

# The format rules (image.walk_protected), on crafted protected areas.
from mpboot.image import walk_protected  # noqa: E402


def area(*tlvs):
    body = b"".join(struct.pack("<HH", t, len(v)) + v for t, v in tlvs)
    return bytearray(struct.pack("<HH", 0x6908, 4 + len(body)) + body)


def dep(i, v=(1, 0, 0, 0), pad=b"\0\0\0"):
    return (0x40, bytes([i]) + pad + struct.pack("<BBHI", *v))


kind2 = (0xA1, struct.pack("<I", 2))


def walk(*tlvs):
    return refused(walk_protected, area(*tlvs), {})


assert walk(dep(1), dep(255)) == 0 and walk(kind2, dep(255)) == 0 and walk(dep(255), kind2) == 0
assert walk(dep(1, pad=b"\0\1\0")) == 5  # non-zero pad bytes: fail closed
assert walk(dep(1, pad=b"\x80\0\0")) == 5
assert walk(dep(0)) == 5  # an app on itself
assert walk(dep(7)) == 5 and walk(dep(254)) == 5 and walk(kind2, dep(1)) == 5  # unknown, or stage 1 on itself
assert walk(kind2, dep(0)) == 27 and walk(dep(0), kind2) == 27  # stage 1 never depends on the app
assert walk(dep(1), dep(255), dep(1), dep(255)) == 0 and walk(*[dep(1)] * 5) == 5  # at most 4
assert walk((0x40, bytes(11))) == 5 and walk((0x40, bytes(13))) == 5  # wrong length
got = {}
walk_protected(area(dep(1, (1, 2, 3, 4)), dep(255, (1, 0, 0, 0))), got)
assert got["deps"] == ((1, (1, 2, 3, 4)), (255, (1, 0, 0, 0))), got
cases += 1
print("OK format: pads zero, ids 1/255 (app) and 255 (stage 1), 0 in stage 1 is 27, at most 4, 12 bytes")

# --- migration: a v1 state area read by a board with stage-1 slots ---
chip = port.flash(path, SIZE, 4096, 4)
a = port.areas(chip, True, 8192)
a[2].erase(0, a[2].size)
old = Store(a[2])
st1 = blank()
st1[ACTIVE] = 0
st1[OK0] = v1["digest"][:16]
st1[FLOOR] = 3
for _ in range(50):  # past a sector switch: the newest v1 record is in sector 1
    old.save(st1)
v1_sector = old._last // 4096
image_v1 = bytearray(4096)
a[2].read(v1_sector * 4096, image_v1)
_, app, s1 = device({0: v1}, {0: w1, 1: w2}, erase=False)
st = app.state
assert app.store.found and app.store.v1 and st[ACTIVE] == 0 and st[FLOOR] == 3, st
assert st[B + ACTIVE] == NONE and st[FLAGS] == 0
r0, r1 = decide_all(app, s1)
# Stage 1's pair is fresh at the first boot after the migration: its newest valid image.
assert (r0[0], r1[0], r1[1]["version"][0]) == (0, 1, 12), (r0, r1)
check = bytearray(4096)
a[2].read(v1_sector * 4096, check)
assert check == image_v1  # the sector with the newest v1 record is untouched
_, app, s1 = device({0: v1}, {0: w1, 1: w2}, erase=False)
st = app.state
assert not app.store.v1 and st[B + ACTIVE] == 1 and st[FLOOR] == 3 and st[B + FLOOR] == 2, st
r0, r1 = decide_all(app, s1)
assert (r0[0], r1[0]) == (0, 1)
cases += 1
print("OK migration: v1 record read, stage 1 fresh once, v1 sector kept until the switch")

# After the migration the stage-1 pair is no longer fresh: a reverted stage 1 with nothing
# else confirmed leaves none (as the app's pair).
_, app, s1 = device({0: v1}, {0: w2}, record(active=0, ok0=v1, s1_trial=0))
r0, r1 = decide_all(app, s1)
assert r1[0] == -1, r1
cases += 1
print("OK no confirmed stage 1 after a revert: none (not fresh)")
print("DONE", cases)
