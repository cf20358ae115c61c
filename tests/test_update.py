"""The updater (firmware/mpboot/update.py) driven directly on MicroPython over a NOR flash file:
chunking and write alignment, the target slot, the write/finish protocol, refusals before any
flash operation, policy refusals at finish, the test-boot guard, and how finish() marks.

Each test writes a plan for tests/device/dev_update.py, runs it in one MicroPython process and
checks the result lines, the flash file and its wear counters."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import signing_key
from mpboot.image import ImageHeader, class_uuid, parse_image, vendor_uuid
from mpboot.sim import Geometry
from simkit import FlashFile, sign_app

SIZE = 72 * 1024  # two 24 KiB slots with 4 KiB sectors: room for BIG below
SECTOR = 4096
NONE = 0xFF
U_BUSY, U_STATE, U_RANGE, U_LENGTH = 1, 2, 3, 4
E_BAD_MAGIC, E_TOO_LARGE, E_TRUNCATED, E_BAD_TLV, E_HASH_MISMATCH = 1, 3, 4, 5, 10
E_VENDOR_MISMATCH, E_CLASS_MISMATCH, E_COUNTER_BELOW_FLOOR, E_DOWNGRADE = 16, 17, 18, 19
MARK_NONE, MARK_TEST, MARK_PERMANENT = 0, 1, 2

VENDOR = vendor_uuid("example.com")
OTHER_VENDOR = vendor_uuid("example.org")
CLASS = class_uuid("sensor", VENDOR)
OTHER_CLASS = class_uuid("display", VENDOR)


def slot_size(sector: int = SECTOR) -> int:
    return Geometry(SIZE, sector).slot_size


def image(version: str, *, payload: int = 9001, counter: int | None = 1, vendor_id: bytes | None = None,
          class_id: bytes | None = None, seed: str = "") -> bytes:
    body = random.Random(seed or version).randbytes(payload)
    return sign_app(body, signing_key("TEST-ONLY-rsa2048.pem"), version, security_counter=counter,
                    vendor_id=vendor_id, class_id=class_id)


def digest(img: bytes) -> bytes:
    return parse_image(img).digest


def roundup(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass
class Step:
    """One plan command and, after the run, its result line."""

    words: tuple[str, ...]
    line: str = ""
    ok: bool = False
    values: list[str] = field(default_factory=list)
    kind: str = ""  # "image" or "update" for a refusal
    code: int = 0
    ops: int = 0
    prog: int = 0
    erase: int = 0
    chg: str = ""

    def fill(self, line: str) -> None:
        self.line = line
        words = line.split()
        assert words[0] == self.words[0], (line, self.words)
        counters = dict(w.split("=") for w in words if "=" in w and w.split("=")[0] in
                        ("ops", "prog", "erase", "chg"))
        rest = [w for w in words[2:] if w.split("=")[0] not in counters]
        self.ok = words[1] == "OK"
        if self.ok:
            self.values = rest
        else:
            self.kind, self.code = rest[0], int(rest[1])
        self.ops, self.prog, self.erase = (int(counters[k]) for k in ("ops", "prog", "erase"))
        self.chg = counters["chg"]

    def refused(self) -> tuple[str, int]:
        assert not self.ok, self.line
        return self.kind, self.code

    def value(self, i: int = 0) -> int:
        assert self.ok, f"{' '.join(self.words)} -> {self.line}"
        return int(self.values[i])


class Plan:
    def __init__(self, device, tmp_path: Path) -> None:
        self.device = device
        self.dir = tmp_path
        self.steps: list[Step] = []
        self.must: list[Step] = []  # steps that must succeed (setup)
        self.files = 0

    def add(self, *words: object) -> Step:
        step = Step(tuple(str(w) for w in words))
        self.steps.append(step)
        return step

    def file(self, data: bytes) -> Path:
        self.files += 1
        path = self.dir / f"f{self.files}.bin"
        path.write_bytes(data)
        return path

    def dev(self, name: str, *, sector: int = SECTOR, align: int = 1, slots: tuple[bytes | None, bytes | None] = (None, None),
            vendor_id: bytes | None = None, class_id: bytes | None = None, downgrade: bool = True) -> FlashFile:
        """A fresh flash file holding `slots` (erased elsewhere, wear counters at zero), opened."""
        flash = FlashFile(self.dir / f"{name}.nor", sector, SIZE)
        data = bytearray(b"\xff" * SIZE)
        for s, content in enumerate(slots):
            if content is not None:
                data[s * flash.slot : s * flash.slot + len(content)] = content
        flash.path.write_bytes(data)
        Path(str(flash.path) + ".wear").write_bytes(bytes(4 * (SIZE // sector)))
        words: list[object] = ["dev", flash.path, SIZE, sector, align]
        if vendor_id is not None:
            words.append(f"vendor={vendor_id.hex()}")
        if class_id is not None:
            words.append(f"class={class_id.hex()}")
        if not downgrade:
            words.append("downgrade=0")
        self.add(*words)
        return flash

    def image(self, data: bytes) -> Step:
        return self.add("image", self.file(data))

    def begin(self, hdr: int = 32, total: int | str = "-", manifest: str | bytes = "-",
              sha: str | None = None) -> Step:
        if isinstance(manifest, bytes):
            manifest = str(self.file(manifest))
        return self.add("begin", hdr, total, manifest, *([sha] if sha else []))

    def install(self, running: int, img: bytes, mark: int, *, chunks: str = "509", manifest: str = "-") -> Step:
        """updater, image, begin, send, finish: returns the finish step (the others must be OK)."""
        for step in (self.add("updater", running), self.image(img), self.begin(manifest=manifest),
                     self.add("send", chunks)):
            self.must.append(step)
        return self.add("finish", mark)

    def run(self) -> list[Step]:
        plan = self.dir / "plan.txt"
        plan.write_text("".join(" ".join(s.words) + "\n" for s in self.steps))
        out = self.device.run("dev_update", plan).splitlines()
        assert len(out) == len(self.steps), out
        for step, line in zip(self.steps, out):
            step.fill(line)
        for step in self.must:
            assert step.ok, f"{' '.join(step.words)} -> {step.line}"
        return self.steps


@pytest.fixture
def plan(device, tmp_path: Path) -> Plan:
    return Plan(device, tmp_path)


# An image whose length is not a multiple of any write unit: the last unit is padded.
ODD = image("1.0.0", payload=9001)
PATTERNS = {"1": "1", "3": "3", "7": "7", "13": "13", "509": "509", "mixed": "1,509,3,13,7,2048,5,16,4,1000"}


def test_odd_chunks_at_every_alignment_land_byte_exact(plan: Plan) -> None:
    assert len(ODD) % 4 and len(ODD) % 16 not in (0, 8)
    cases = []
    for sector in (SECTOR, 1024):
        for align in (1, 4, 8, 16):
            for name, chunks in PATTERNS.items():
                if sector != SECTOR and name not in ("7", "mixed"):
                    continue
                # The target slot holds an old image's bytes (random): the updater must erase
                # exactly the sectors the new image needs and leave the others alone.
                old = random.Random(f"{sector}{align}{name}").randbytes(slot_size(sector))
                flash = plan.dev(f"a{align}-s{sector}-{name}", sector=sector, align=align, slots=(old, None))
                before = flash.path.read_bytes()
                steps = (plan.add("updater", -1), plan.image(ODD), plan.begin(),
                         plan.add("send", chunks), plan.add("finish", MARK_NONE), plan.add("state"))
                cases.append((sector, align, name, flash, before, old, steps))
    plan.run()
    for sector, align, name, flash, before, old, (upd, _, begin, send, finish, state) in cases:
        label = f"sector {sector} align {align} chunks {name}"
        assert upd.value() == 0 and begin.value() == 0, label
        assert send.value() == len(ODD), label
        assert finish.ok and finish.values[:2] == ["0", "1.0.0+0"], (label, finish.line)
        assert state.values[-1] == "0", label  # MARK_NONE: no state record written
        # Programmed bytes: the image rounded up to the write unit, nothing more.
        written = roundup(len(ODD), align)
        assert begin.prog + send.prog + finish.prog == written, label
        assert begin.ops == 0 and begin.erase == 0, label
        used = roundup(len(ODD), sector) // sector
        assert begin.erase + send.erase + finish.erase == used, label
        # Each sector the image needs erased exactly once; the others (and slot 1, state) never.
        wear = flash.wear()
        n = flash.slot // sector
        assert wear[:n] == [1] * used + [0] * (n - used), label
        assert wear[n:] == [0] * (len(wear) - n), label
        # Byte-exact: the image, erased bytes to the end of its last sector, the old bytes after.
        expected = bytearray(before)
        expected[: used * sector] = ODD + b"\xff" * (used * sector - len(ODD))
        assert flash.bytes() == bytes(expected), label
        assert flash.slot_bytes(0)[used * sector :] == old[used * sector :], label


def test_target_slot_and_running_slot_untouched(plan: Plan) -> None:
    a = image("1.0.0", seed="A")
    b = image("1.1.0", seed="B", payload=12345)
    junk = random.Random("junk").randbytes(slot_size())
    # (name, slot contents, confirmed slot or None, running, expected target)
    scenarios = [
        ("run0", (a, None), 0, 0, 1),
        ("run1", (None, a), 1, 1, 0),
        ("run1-slot0-junk", (junk, a), 1, 1, 0),
        ("recovery-active1", (None, a), 1, -1, 0),
        ("recovery-active0", (a, junk), 0, -1, 1),
        ("recovery-blank", (None, a), None, -1, 0),
    ]
    cases = []
    for name, contents, confirmed, running, target in scenarios:
        flash = plan.dev(name, slots=contents)
        if confirmed is not None:
            plan.add("confirm", confirmed)
        before = plan.add("state")
        steps = (plan.add("updater", running), plan.image(b), plan.begin(hdr=512),
                 plan.add("send", "1000,7"), plan.add("finish", MARK_NONE), plan.add("state"))
        cases.append((name, flash, contents, running, target, before, steps))
    plan.run()
    for name, flash, contents, running, target, before, (upd, _, begin, send, finish, after) in cases:
        assert upd.value() == target, name
        assert begin.value() == target and finish.value() == target, name
        assert flash.slot_bytes(target)[: len(b)] == b, name
        other = flash.slot_bytes(target ^ 1)
        old = contents[target ^ 1] or b""
        assert other == old + b"\xff" * (flash.slot - len(old)), f"{name}: slot {target ^ 1} touched"
        assert flash.slot_wear(target ^ 1) == [0] * (flash.slot // SECTOR), name
        # Only the target slot changed during the update; the state record did not.
        assert begin.chg == "000" and begin.ops == 0, (name, begin.line)
        for step in (send, finish):
            assert step.chg[target ^ 1] == "0" and step.chg[2] == "0", (name, step.line)
        assert send.chg[target] == "1"
        assert after.values == before.values, name


def test_write_protocol_errors(plan: Plan) -> None:
    b = image("1.0.0", seed="proto", payload=5000)
    n = len(b)
    flash = plan.dev("proto", align=8)
    early = [plan.add("updater", -1), plan.image(b),
             plan.add("write", 0, 10), plan.add("finish", MARK_TEST)]
    begin = plan.begin()
    part = plan.add("send", 13, 101)  # 101 bytes: 96 programmed, 5 waiting for their unit
    wrong = [plan.add("write", off, 10) for off in (50, 200, 0, 102, 100)]
    replay = plan.add("write", 0, 101)
    premature = plan.add("finish", MARK_TEST)
    after_premature = plan.add("send", 509, n - 10)
    past = plan.add("write", n - 10, 11)
    wrong2 = plan.add("write", n - 9, 9)
    last = plan.add("write", n - 10, 10)
    beyond = plan.add("write", n, 1)
    finish = plan.add("finish", MARK_NONE)
    late = [plan.add("write", n, 1), plan.add("write", 0, 1), plan.add("finish", MARK_NONE)]
    state = plan.add("state")
    # abort closes a session too
    plan.dev("proto-abort", align=8)
    plan.add("updater", -1)
    plan.image(b)
    again = [plan.begin(), plan.add("send", 64, 100), plan.add("abort"), plan.add("write", 100, 1),
             plan.add("finish", MARK_NONE)]
    plan.run()
    assert early[0].value() == 0
    assert early[2].refused() == ("update", U_STATE) and early[2].ops == 0
    assert early[3].refused() == ("update", U_STATE) and early[3].ops == 0
    assert begin.value() == 0
    assert part.value() == 101 and part.prog == 96
    for step in wrong + [replay]:
        assert step.value() == 101, step.line  # the expected offset, unchanged
        assert (step.ops, step.chg) == (0, "000"), step.line
    assert premature.refused() == ("update", U_STATE)
    assert (premature.ops, premature.chg) == (0, "000")
    assert after_premature.value() == n - 10  # the session survived the early finish
    assert past.refused() == ("update", U_RANGE) and (past.ops, past.chg) == (0, "000")
    assert wrong2.value() == n - 10 and wrong2.ops == 0
    assert last.value() == n
    assert beyond.refused() == ("update", U_RANGE) and beyond.ops == 0
    assert finish.ok and finish.values[:2] == ["0", "1.0.0+0"], finish.line
    for step in late:
        assert step.refused() == ("update", U_STATE) and step.ops == 0, step.line
    assert again[0].value() == 0 and again[1].value() == 100
    assert again[3].refused() == ("update", U_STATE) and again[4].refused() == ("update", U_STATE)
    assert state.values[-1] == "0"  # no state record: nothing was marked
    # The refused and misplaced writes left no trace: the image is byte-exact, padded with
    # erased bytes to the end of its last sector, and exactly its write units were programmed.
    session = plan.steps[plan.steps.index(begin) : plan.steps.index(finish) + 1]
    assert sum(s.prog for s in session) == roundup(n, 8)
    assert sum(s.erase for s in session) == 0  # the slot was blank: nothing to erase
    assert flash.slot_bytes(0)[: roundup(n, SECTOR)] == b + b"\xff" * (roundup(n, SECTOR) - n)


def _with_header(img: bytes, **changes: int) -> bytes:
    h = ImageHeader.unpack(img)
    fields = {k: getattr(h, k) for k in ("load_addr", "hdr_size", "protect_tlv_size", "img_size", "flags")}
    magic = changes.pop("magic", h.magic)
    fields.update(changes)
    return ImageHeader(**fields, version=h.version, magic=magic).pack() + img[32:]


def _manifest(img: bytes) -> bytes:
    h = ImageHeader.unpack(img)
    start = h.hdr_size + h.img_size
    return img[start : start + h.protect_tlv_size]


def test_begin_refusals_happen_before_any_flash_operation(plan: Plan) -> None:
    a = image("2.1.3+7", counter=5, vendor_id=VENDOR, class_id=CLASS, seed="A")
    good = image("2.1.4", counter=5, vendor_id=VENDOR, class_id=CLASS, seed="good")
    h = ImageHeader.unpack(good)
    slot = slot_size()
    need = h.hdr_size + h.img_size + h.protect_tlv_size + 4
    over = slot - h.hdr_size - h.protect_tlv_size - 3  # img_size one byte over the slot
    refusals = [
        # (label, image, header bytes, total, manifest, expected)
        ("short header", good, 31, "-", "-", ("image", E_TRUNCATED)),
        ("bad magic", _with_header(good, magic=0x96F3B83C), 32, "-", "-", ("image", E_BAD_MAGIC)),
        ("img_size over slot", _with_header(good, img_size=over), 32, slot, "-", ("image", E_TOO_LARGE)),
        ("hdr_size over slot", _with_header(good, hdr_size=slot), 32, slot, "-", ("image", E_TOO_LARGE)),
        ("total short", good, 32, need - 1, "-", ("update", U_LENGTH)),
        ("total zero", good, 32, 0, "-", ("update", U_LENGTH)),
        ("total over slot", good, 32, slot + 1, "-", ("update", U_LENGTH)),
        ("fits, total short", _with_header(good, img_size=over - 1), 32, len(good), "-", ("update", U_LENGTH)),
        ("manifest short", good, 32, "-", _manifest(good)[:-1], ("image", E_BAD_TLV)),
        ("manifest long", good, 32, "-", _manifest(good) + b"\0", ("image", E_BAD_TLV)),
        ("manifest missing", good, 32, "-", b"", ("image", E_BAD_TLV)),
        ("manifest bad magic", good, 32, "-", b"\x07" + _manifest(good)[1:], ("image", E_BAD_TLV)),
        ("other vendor", image("2.1.4", counter=5, vendor_id=OTHER_VENDOR, class_id=CLASS), 32, "-", "auto", ("image", E_VENDOR_MISMATCH)),
        ("other class", image("2.1.4", counter=5, vendor_id=VENDOR, class_id=OTHER_CLASS), 32, "-", "auto", ("image", E_CLASS_MISMATCH)),
        ("no vendor TLV", image("2.1.4", counter=5), 32, "-", "auto", ("image", E_VENDOR_MISMATCH)),
        ("no protected TLVs", image("2.1.4", counter=None), 32, "-", "auto", ("image", E_VENDOR_MISMATCH)),
        ("counter below floor", image("2.1.4", counter=4, vendor_id=VENDOR, class_id=CLASS), 32, "-", "auto", ("image", E_COUNTER_BELOW_FLOOR)),
        ("no counter, floor 5", image("2.1.4", counter=None, vendor_id=VENDOR, class_id=CLASS), 32, "-", "auto", ("image", E_COUNTER_BELOW_FLOOR)),
        ("downgrade, higher build", image("2.1.2+99", counter=5, vendor_id=VENDOR, class_id=CLASS), 32, "-", "-", ("image", E_DOWNGRADE)),
        ("downgrade minor", image("2.0.9", counter=5, vendor_id=VENDOR, class_id=CLASS), 32, "-", "auto", ("image", E_DOWNGRADE)),
        ("downgrade major", image("1.255.65535+4294967295", counter=5, vendor_id=VENDOR, class_id=CLASS), 32, "-", "-", ("image", E_DOWNGRADE)),
    ]
    plan.dev("refuse", slots=(a, None), vendor_id=VENDOR, class_id=CLASS, downgrade=False)
    plan.add("confirm", 0)  # floor 5, version 2.1.3+7
    plan.add("mark", 1)  # a pending unmark: an accepted begin writes state, a refused one must not
    plan.add("updater", 0)
    before = plan.add("state")
    steps = []
    for label, img, hdr, total, manifest, expected in refusals:
        plan.image(img)
        steps.append((label, expected, plan.begin(hdr, total, manifest)))
        # a refused begin leaves no session open
        steps.append((label + ": then write", ("update", U_STATE), plan.add("write", 0, 1)))
    after = plan.add("state")
    # Accepted: same major.minor.revision with a lower build (not a downgrade), the exact
    # minimum total and the whole slot as total, a newer version (no manifest, then manifest).
    same = image("2.1.3+0", counter=5, vendor_id=VENDOR, class_id=CLASS, seed="same")
    accepted = []
    for img, total, manifest in ((same, "-", "auto"), (good, need, "-"), (good, slot, "auto"), (good, "-", "-")):
        plan.image(img)
        accepted.append(plan.begin(32, total, manifest))
        plan.add("abort")
    unmarked = plan.add("state")

    # The same downgrades on a device that allows them: accepted, and installed.
    plan.dev("allow", slots=(a, None), vendor_id=VENDOR, class_id=CLASS, downgrade=True)
    plan.add("confirm", 0)
    allowed = []
    for v in ("2.1.2+99", "2.0.9", "1.0.0"):
        allowed.append(plan.install(0, image(v, counter=5, vendor_id=VENDOR, class_id=CLASS), MARK_NONE, manifest="auto"))
    plan.run()

    for label, expected, step in steps:
        assert step.refused() == expected, f"{label}: {step.line}"
        assert (step.ops, step.prog, step.erase, step.chg) == (0, 0, 0, "000"), f"{label}: {step.line}"
    assert after.values == before.values and before.values[1] == "1"  # still marked for test
    assert before.values[3] == "5"
    for step in accepted:
        assert step.value() == 1, step.line
    # Only the first accepted begin wrote: the unmark of slot 1 (one state record, no erase).
    assert (accepted[0].ops, accepted[0].erase, accepted[0].chg) == (1, 0, "001"), accepted[0].line
    assert all(s.ops == 0 for s in accepted[1:])
    assert unmarked.values[1] == str(NONE)
    for step in allowed:
        assert step.ok and step.value() == 1, step.line


def test_refusals_before_flash_leave_the_file_unchanged(plan: Plan) -> None:
    """The flash file (and wear file) after a run of refused begins is byte-identical."""
    a = image("2.1.3", counter=5, vendor_id=VENDOR, class_id=CLASS, seed="A")
    flash = plan.dev("unchanged", slots=(a, None), vendor_id=VENDOR, class_id=CLASS, downgrade=False)
    plan.add("confirm", 0)
    plan.add("mark", 1)
    plan.add("updater", 0)
    first = plan.run()
    snapshot, wear = flash.bytes(), flash.wear()
    assert all(s.ok for s in first)

    plan2 = Plan(plan.device, plan.dir / "second")
    plan2.dir.mkdir()
    plan2.add("dev", flash.path, SIZE, SECTOR, 1, f"vendor={VENDOR.hex()}", f"class={CLASS.hex()}", "downgrade=0")
    plan2.add("updater", 0)
    good = image("2.2.0", counter=5, vendor_id=VENDOR, class_id=CLASS)
    refused = []
    for img, hdr, manifest in ((good, 31, "-"), (_with_header(good, magic=1), 32, "-"),
                               (image("2.2.0", counter=4, vendor_id=VENDOR, class_id=CLASS), 32, "auto"),
                               (image("2.2.0", counter=5, vendor_id=OTHER_VENDOR, class_id=CLASS), 32, "auto"),
                               (image("2.1.2+1000", counter=5, vendor_id=VENDOR, class_id=CLASS), 32, "-")):
        plan2.image(img)
        refused.append(plan2.begin(hdr, "-", manifest))
    plan2.run()
    assert all(not s.ok for s in refused), [s.line for s in refused]
    assert flash.bytes() == snapshot and flash.wear() == wear


def test_policy_refusals_without_manifest_come_at_finish(plan: Plan) -> None:
    a = image("2.0.0", counter=5, vendor_id=VENDOR, class_id=CLASS, seed="A")
    flash = plan.dev("finish-policy", slots=(a, None), vendor_id=VENDOR, class_id=CLASS)
    plan.add("confirm", 0)
    before = plan.add("state")
    bad = [
        ("other vendor", image("2.0.1", counter=5, vendor_id=OTHER_VENDOR, class_id=CLASS, seed="v"), E_VENDOR_MISMATCH, MARK_TEST),
        ("other class", image("2.0.1", counter=5, vendor_id=VENDOR, class_id=OTHER_CLASS, seed="c"), E_CLASS_MISMATCH, MARK_PERMANENT),
        ("no vendor TLV", image("2.0.1", counter=5, seed="n"), E_VENDOR_MISMATCH, MARK_PERMANENT),
        ("counter below floor", image("2.0.1", counter=3, vendor_id=VENDOR, class_id=CLASS, seed="f"), E_COUNTER_BELOW_FLOOR, MARK_TEST),
        ("no counter", image("2.0.1", counter=None, vendor_id=VENDOR, class_id=CLASS, seed="z"), E_COUNTER_BELOW_FLOOR, MARK_PERMANENT),
    ]
    cases = []
    for label, img, code, mark in bad:
        steps = (plan.add("updater", 0), plan.image(img), plan.begin(), plan.add("send", "509"),
                 plan.add("finish", mark), plan.add("write", len(img), 1), plan.add("state"))
        cases.append((label, img, code, steps))
    # The slot bytes of the last refused image, then a fresh power-on: the old image runs.
    boot = plan.add("boot")
    plan.run()
    for label, img, code, (upd, _, begin, send, finish, write, state) in cases:
        assert begin.value() == 1 and send.value() == len(img), label
        assert finish.refused() == ("image", code), f"{label}: {finish.line}"
        assert finish.chg[2] == "0", label  # no state record
        assert write.refused() == ("update", U_STATE), label  # the session is over
        assert state.values == before.values, label  # TEST stays NONE, nothing confirmed
        assert state.values[1] == str(NONE)
    last = cases[-1][1]
    assert flash.slot_bytes(1)[: len(last)] == last  # the data was written
    assert boot.values == ["0", "0"], boot.line


def test_good_image_without_manifest_is_accepted_at_finish(plan: Plan) -> None:
    """Control for the refusals above: a good image on the same device installs and test-boots."""
    a = image("2.0.0", counter=5, vendor_id=VENDOR, class_id=CLASS, seed="A")
    plan.dev("finish-good", slots=(a, None), vendor_id=VENDOR, class_id=CLASS)
    plan.add("confirm", 0)
    finish = plan.install(0, image("2.0.1", counter=5, vendor_id=VENDOR, class_id=CLASS), MARK_TEST)
    boot = plan.add("boot")
    plan.run()
    assert finish.values[:3] == ["1", "2.0.1+0", "5"], finish.line
    assert boot.values == ["1", "1"], boot.line


def test_begin_refused_while_running_image_is_on_its_test_boot(plan: Plan) -> None:
    a = image("1.0.0", seed="A")
    b = image("1.1.0", seed="B")
    c = image("1.2.0", seed="C")
    plan.dev("busy", slots=(a, None))
    plan.add("confirm", 0)
    plan.install(0, b, MARK_TEST)
    boot = plan.add("boot")  # B starts on its one test boot: TRIAL = 1
    trial = plan.add("state")
    upd = plan.add("updater", 1)
    plan.image(c)
    busy = [plan.begin(), plan.begin(manifest="auto")]
    write = plan.add("write", 0, 1)
    plan.add("confirm", 1)  # the app confirms itself
    upd2 = plan.add("updater", 1)
    ok = plan.begin()
    # Another way in: the state record says slot 0 is on trial while slot 0 runs.
    plan.dev("busy2", slots=(a, None))
    plan.add("confirm", 0)
    plan.add("set", "trial=0")
    plan.add("updater", 0)
    plan.image(c)
    busy2 = plan.begin()
    plan.add("updater", -1)  # recovery is never "busy"
    recovery = plan.begin()
    plan.run()
    assert boot.values == ["1", "1"], boot.line
    assert trial.values[2] == "1"
    assert upd.value() == 0
    for step in busy + [busy2]:
        assert step.refused() == ("update", U_BUSY), step.line
        assert (step.ops, step.chg) == (0, "000"), step.line
    assert write.refused() == ("update", U_STATE)
    assert upd2.value() == 0 and ok.value() == 0
    assert recovery.value() == 1  # ACTIVE = 0: recovery writes slot 1


def test_begin_unmarks_a_test_marked_target_before_erasing(plan: Plan, tmp_path: Path) -> None:
    a = image("1.0.0", seed="A")
    b = image("1.1.0", seed="B")
    c = image("1.2.0", seed="C", payload=7000)
    flash = plan.dev("unmark", slots=(a, None))
    plan.add("confirm", 0)
    plan.install(0, b, MARK_TEST)
    marked = plan.add("state")
    plan.add("updater", 0)
    plan.image(_with_header(c, magic=0))
    refused = plan.begin()
    still = plan.add("state")
    trace = tmp_path / "trace.txt"
    plan.add("trace", trace)
    plan.image(c)
    begin = plan.begin()
    unmarked = plan.add("state")
    send = plan.add("send", "509")
    plan.add("trace", "-")
    finish = plan.add("finish", MARK_NONE)
    after = plan.add("state")
    boot = plan.add("boot")
    plan.run()
    assert marked.values[1] == "1"
    assert refused.refused() == ("image", E_BAD_MAGIC) and still.values == marked.values
    assert begin.value() == 1
    assert (begin.ops, begin.erase, begin.chg) == (1, 0, "001"), begin.line  # one state record only
    assert unmarked.values[1] == str(NONE)
    assert [v for i, v in enumerate(unmarked.values) if i != 1] == [v for i, v in enumerate(marked.values) if i != 1]
    ops = [line.split() for line in trace.read_text().splitlines()]
    state = flash.state_range()
    first = ops[0]
    assert first[0] == "W" and int(first[1]) in state, ops[:3]
    erases = [int(o[1]) for o in ops if o[0] == "E"]
    assert erases == [flash.slot + i * SECTOR for i in range(roundup(len(c), SECTOR) // SECTOR)]
    assert all(int(o[1]) not in state for o in ops[1:])
    assert send.value() == len(c)
    assert finish.values[:2] == ["1", "1.2.0+0"] and after.values == unmarked.values
    assert boot.values == ["0", "0"]


def test_finish_marks(plan: Plan) -> None:
    a = image("1.0.0", counter=2, seed="A")
    b1 = image("1.1.0+3", counter=2, seed="B1")
    b2 = image("1.2.0", counter=3, seed="B2")
    b3 = image("1.3.5+9", counter=7, seed="B3")
    flash = plan.dev("marks", slots=(a, None))
    plan.add("confirm", 0)
    s0 = plan.add("state")
    f1 = plan.install(0, b1, MARK_NONE)
    s1 = plan.add("state")
    f2 = plan.install(0, b2, MARK_TEST)
    s2 = plan.add("state")
    f3 = plan.install(0, b3, MARK_PERMANENT)
    s3 = plan.add("state")
    boot = plan.add("boot")
    plan.run()

    def state(step: Step) -> dict[str, object]:
        v = step.values
        return {"active": int(v[0]), "test": int(v[1]), "trial": int(v[2]), "floor": int(v[3]),
                "version": bytes.fromhex(v[4]), "ok0": bytes.fromhex(v[5]), "ok1": bytes.fromhex(v[6])}

    st0 = state(s0)
    assert st0 == {"active": 0, "test": NONE, "trial": NONE, "floor": 2,
                   "version": struct.pack("<BBHI", 1, 0, 0, 0), "ok0": digest(a)[:16], "ok1": bytes(16)}
    # (align 1: no tail to program, so finish itself writes only state records)
    assert f1.values == ["1", "1.1.0+3", "2"] and (f1.ops, f1.chg) == (0, "000")
    assert s1.values == s0.values  # MARK_NONE: state unchanged
    assert f2.values == ["1", "1.2.0+0", "3"] and f2.chg == "001"
    assert state(s2) == {**st0, "test": 1}
    assert f3.values == ["1", "1.3.5+9", "7"] and f3.chg == "001"
    assert state(s3) == {"active": 1, "test": NONE, "trial": NONE, "floor": 7,
                         "version": struct.pack("<BBHI", 1, 3, 5, 9), "ok0": digest(a)[:16],
                         "ok1": digest(b3)[:16]}
    assert boot.values == ["1", "0"]  # confirmed: no test boot
    assert flash.slot_bytes(1)[: len(b3)] == b3


def test_tampered_image_is_refused_at_finish_and_not_marked(plan: Plan) -> None:
    a = image("1.0.0", seed="A")
    good = image("1.1.0", seed="T")
    h = ImageHeader.unpack(good)
    cases = []
    flash = plan.dev("tamper", slots=(a, None))
    plan.add("confirm", 0)
    before = plan.add("state")
    for off, mark in ((h.hdr_size, MARK_TEST), (h.hdr_size + h.img_size - 1, MARK_PERMANENT),
                      (h.hdr_size + 4321, MARK_NONE)):
        bad = bytearray(good)
        bad[off] ^= 0x01
        finish = plan.install(0, bytes(bad), mark, manifest="auto")
        cases.append((off, finish, plan.add("state")))
    boot = plan.add("boot")
    plan.run()
    for off, finish, state in cases:
        assert finish.refused() == ("image", E_HASH_MISMATCH), (off, finish.line)
        assert finish.chg[2] == "0" and state.values == before.values, off
    assert boot.values == ["0", "0"]
    assert flash.slot_bytes(1)[h.hdr_size + 4321] == good[h.hdr_size + 4321] ^ 1


def test_finish_checks_the_bytes_written_not_what_begin_was_told(plan: Plan) -> None:
    """begin() sees only what the client claims (a header, a manifest); finish() applies the
    whole policy, downgrade included, to the image actually in flash."""
    a = image("2.0.0", counter=5, vendor_id=VENDOR, seed="A")
    newer = image("2.1.0", counter=5, vendor_id=VENDOR, seed="N")
    older = image("1.9.0", counter=5, vendor_id=VENDOR, seed="O")
    foreign = image("2.1.0", counter=5, vendor_id=OTHER_VENDOR, seed="F")
    low = image("2.1.0", counter=4, vendor_id=VENDOR, seed="L")
    assert len({len(newer), len(older), len(foreign), len(low)}) == 1
    flash = plan.dev("claims", slots=(a, None), vendor_id=VENDOR, downgrade=False)
    plan.add("confirm", 0)
    before = plan.add("state")
    cases = []
    for sent, code, mark in ((older, E_DOWNGRADE, MARK_PERMANENT), (foreign, E_VENDOR_MISMATCH, MARK_TEST),
                             (low, E_COUNTER_BELOW_FLOOR, MARK_PERMANENT)):
        plan.add("updater", 0)
        plan.image(newer)
        begin = plan.begin(manifest="auto")  # header and manifest of the good image...
        plan.image(sent)
        send = plan.add("send", "509")  # ...then another image's bytes
        cases.append((code, begin, send, plan.add("finish", mark), plan.add("state")))
    boot = plan.add("boot")
    plan.run()
    for code, begin, send, finish, state in cases:
        assert begin.value() == 1 and send.value() == len(newer)
        assert finish.refused() == ("image", code), finish.line
        assert state.values == before.values
    assert flash.slot_bytes(1)[: len(low)] == low
    assert boot.values == ["0", "0"]


def test_finish_refuses_an_image_longer_than_what_was_sent(plan: Plan) -> None:
    """An announced total that stops inside the image: the rest of the image may still be in
    the slot from an earlier transfer (in a sector the erase-ahead never reached), so it would
    verify; finish() refuses it (E_TOO_LARGE) because those bytes were not sent. Bytes sent past
    the image's end are harmless and accepted."""
    # Hashed part (header + payload + protected TLVs) + the 4-byte unprotected info header
    # end exactly at the end of sector 1: the TLV entries lie in sector 2.
    b = image("1.0.0", seed="P", payload=2 * SECTOR - 0x200 - 12 - 4)
    h = ImageHeader.unpack(b)
    short = h.hdr_size + h.img_size + h.protect_tlv_size + 4
    assert short == 2 * SECTOR and len(b) > short
    flash = plan.dev("stale")
    plan.add("updater", -1)
    plan.image(b + b"junk" * 25)  # the image and 100 bytes after it
    padded = [plan.begin(), plan.add("send", "509"), plan.add("finish", MARK_NONE)]
    before = plan.add("state")
    plan.image(b)
    stale = [plan.begin(32, short), plan.add("send", "509", short), plan.add("finish", MARK_TEST)]
    after = plan.add("state")
    boot = plan.add("boot")
    # The same with only the signature's last byte left from before.
    c = image("1.0.0", seed="Q", payload=2 * SECTOR + 1 - 0x200 - 12 - 336)
    assert len(c) == 2 * SECTOR + 1
    plan.dev("stale1")
    plan.add("updater", -1)
    plan.image(c)
    plan.begin()
    plan.add("send", "509")
    full = plan.add("finish", MARK_NONE)
    plan.begin(32, 2 * SECTOR)
    plan.add("send", "509", 2 * SECTOR)
    one = plan.add("finish", MARK_TEST)
    plan.run()
    assert full.value() == 0
    assert one.refused() == ("image", E_TOO_LARGE), one.line
    assert padded[2].values[:2] == ["0", "1.0.0+0"], padded[2].line
    assert stale[0].value() == 0 and stale[1].value() == short
    assert stale[1].erase == 2  # sector 2, holding the TLV entries from before, not erased
    assert flash.slot_bytes(0)[: len(b)] == b  # so the slot holds the whole image...
    assert stale[2].refused() == ("image", E_TOO_LARGE), stale[2].line  # ...but it was not all sent
    assert after.values == before.values and after.values[1] == str(NONE)
    assert boot.values == ["0", "0"]  # blank state: the factory-fresh rule boots the valid slot


# --------------------------------------------------------------- persisted upload sessions
BIG = image("2.0.0", payload=20000, seed="big")  # about 21 KiB: crosses two 8 KiB checkpoints
CKPT = 8192


def sha_hex(img: bytes) -> str:
    import hashlib

    return hashlib.sha256(img).hexdigest()


def test_session_resumes_from_its_last_checkpoint_after_a_power_on(plan: Plan) -> None:
    """An upload named by its sha is checkpointed every CKPT bytes; a new power-on (fresh
    Slots and Updater) given the same image continues from the last checkpoint, rewriting
    (after erasing again) only the sector the cut interrupted; the result is byte-exact."""
    a = image("1.0.0")
    flash = plan.dev("resume", slots=(a, None))
    setup = [plan.add("confirm", 0), plan.add("updater", 0, CKPT), plan.image(BIG)]
    begin = plan.begin(hdr=512, sha="auto")
    part = plan.add("send", "509", 13000)  # past the first checkpoint, short of the second
    during = plan.add("session")
    again = [plan.add("boot"), plan.add("updater", 0, CKPT), plan.image(BIG)]
    resumed = plan.begin(hdr=512, sha="auto")
    rest = plan.add("send", "509")
    finish = plan.add("finish", MARK_TEST)
    after = plan.add("session")
    plan.run()
    assert all(s.ok for s in setup + again), [s.line for s in setup + again]
    assert begin.values == ["1", "0"]
    assert part.value() == 13000
    assert during.values == ["1", str(len(BIG)), str(CKPT), sha_hex(BIG)[:32]]
    assert resumed.values == ["1", str(CKPT)], resumed.line
    assert rest.value() == len(BIG)
    assert finish.ok and finish.values[:2] == ["1", "2.0.0+0"], finish.line
    assert after.values == ["255", "0", "0", "00" * 16]  # finishing ended the session
    assert flash.slot_bytes(1)[: len(BIG)] == BIG
    # Sectors 2 and 3 (bytes 8192..13000) were programmed after the checkpoint, before the
    # reset: erased once each on resume. The others were blank and never erased; the slot 0
    # image was never touched.
    assert flash.slot_wear(1)[:6] == [0, 0, 1, 1, 0, 0]
    assert flash.slot_bytes(0)[: len(a)] == a and flash.slot_wear(0) == [0] * len(flash.slot_wear(0))


def test_another_image_or_no_sha_starts_a_new_session(plan: Plan) -> None:
    other = image("2.0.1", payload=20000, seed="other")
    plan.dev("other", slots=(image("1.0.0"), None))
    plan.must += [plan.add("confirm", 0), plan.add("updater", 0, CKPT), plan.image(BIG)]
    plan.must.append(plan.begin(hdr=512, sha="auto"))
    plan.must.append(plan.add("send", "509", 13000))
    plan.must += [plan.add("boot"), plan.add("updater", 0, CKPT), plan.image(other)]
    fresh = plan.begin(hdr=512, sha="auto")  # another sha: from 0; the stale session ends
    sess = plan.add("session")
    plan.must += [plan.add("boot"), plan.add("updater", 0, CKPT), plan.image(other)]
    nosha = plan.begin(hdr=512)  # no sha: not resumable, and the stale session is dropped
    sess2 = plan.add("session")
    plan.run()
    assert fresh.values == ["1", "0"]
    # (the new session is written at its first checkpoint: opening one costs no state write)
    assert sess.values == ["255", "0", "0", "00" * 16]
    assert nosha.values == ["1", "0"]
    assert sess2.values == ["255", "0", "0", "00" * 16]


def test_a_dirty_slot_is_erased_once_per_sector_and_a_blank_one_not_at_all(plan: Plan) -> None:
    junk = random.Random(7).randbytes(slot_size())
    dirty = plan.dev("dirty", slots=(image("1.0.0"), junk))
    plan.must.append(plan.add("confirm", 0))
    fin = plan.install(0, BIG, MARK_NONE)
    plan.run()
    assert fin.ok, fin.line
    used = roundup(len(BIG), SECTOR) // SECTOR
    assert dirty.slot_wear(1) == [1] * used + [0] * (slot_size() // SECTOR - used)


def test_finish_refuses_an_image_whose_sha_is_not_the_clients(plan: Plan) -> None:
    flash = plan.dev("sha", slots=(image("1.0.0"), None))
    plan.must += [plan.add("confirm", 0), plan.add("updater", 0, CKPT), plan.image(BIG)]
    plan.must.append(plan.begin(hdr=512, sha="00" * 32))
    plan.must.append(plan.add("send", "2048"))
    fin = plan.add("finish", MARK_TEST)
    state = plan.add("state")
    sess = plan.add("session")
    plan.run()
    assert fin.refused() == ("image", E_HASH_MISMATCH)
    assert state.values[1] == "255"  # not marked for a test boot
    assert sess.values[0] == "255"  # the session ended
    assert flash.slot_bytes(0)[:4] == struct.pack("<I", 0x96F3B83D)  # running image untouched


def test_erase_refuses_the_running_slot_and_clears_the_other(plan: Plan) -> None:
    b = image("2.0.0")
    flash = plan.dev("erase", slots=(image("1.0.0"), None))
    plan.must.append(plan.add("confirm", 0))
    plan.must.append(plan.install(0, b, MARK_TEST))
    marked = plan.add("state")
    running = plan.add("erase", 0)
    other = plan.add("erase", 1)
    state = plan.add("state")
    plan.run()
    assert marked.values[1] == "1"
    assert running.refused() == ("update", U_BUSY) and running.ops == 0
    assert other.values == ["1"] and state.values[1] == "255"  # unmarked, then erased
    assert flash.slot_bytes(1) == b"\xff" * slot_size()
    assert flash.slot_bytes(0)[:4] == struct.pack("<I", 0x96F3B83D)


def test_an_image_made_permanent_is_kept_until_the_reset_that_runs_it(plan: Plan) -> None:
    """Running v1 in slot 0, v2 installed into slot 1 and made permanent (the floor rises to
    its counter): before the reset that boots it, neither a new upload nor an erase may
    touch slot 1, or the next boot would find nothing at or above the floor."""
    a = image("1.0.0", counter=1)
    b = image("2.0.0", counter=2)
    flash = plan.dev("perm", slots=(a, None))
    plan.must.append(plan.add("confirm", 0))
    plan.must.append(plan.install(0, b, MARK_PERMANENT))
    again = [plan.add("updater", 0), plan.image(image("3.0.0", counter=2))]
    upload = plan.begin()
    erase = plan.add("erase", 1)
    booted = plan.add("boot")
    plan.run()
    assert all(s.ok for s in again)
    assert upload.refused() == ("update", U_BUSY) and upload.ops == 0
    assert erase.refused() == ("update", U_BUSY) and erase.ops == 0
    assert booted.values == ["1", "0"]  # v2 runs, confirmed
    assert flash.slot_bytes(1)[: len(b)] == b
