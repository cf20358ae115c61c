"""Stage 1 over SMP (issue 19; docs/PROTOCOL.md "Stage 1", docs/BOOT.md "Stage 1's proof"):
image numbers 2/3, the four-entry state list, state writes across both pairs, erase and slot
info, the probe (group 64 command 8) and the proof rule, packet by packet on MicroPython
(tests/device/dev_smp.py with stage-1 slots), every reply checked as test_smp_server checks
them (well formed, canonical, smpclient's models)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from mpboot.image import ImageKind
from smp import image_management as img
from test_smp_server import (
    EBADSTATE,
    EBUSY,
    EINVAL,
    ENOTSUP,
    IMG,
    READ,
    SECTOR,
    V1,
    V2,
    WRITE,
    Reply,
    Session,
    digest,
    manifest,
    flags,
    image,
    images,
)

EACCESSDENIED = 11
MPBOOT = 64
PROBE = 8
SIZE1 = 128 * 1024  # 32 sectors: app slots of 9 sectors, stage-1 slots of 4
S1 = 4 * SECTOR
APP_SLOT = (SIZE1 // SECTOR - 6 - 2 * (S1 // SECTOR)) // 2 * SECTOR
E_PROBE, E_PROBE_MISMATCH = 26, 27

A = image("1.0.0", seed="A")
A2 = image("2.0.0", seed="A2")
S1A = image("1.0.0", seed="s1a", kind=ImageKind.UPDATER)
S1B = image("1.1.0", seed="s1b", kind=ImageKind.UPDATER)
S1OLD = image("0.9.0", seed="s1old", kind=ImageKind.UPDATER)


class Session1(Session):
    def dev1(self, name: str, app: tuple[bytes | None, bytes | None] = (A, None),
             s1: tuple[bytes | None, bytes | None] = (S1A, None), *extra: str) -> Path:
        """A board with stage-1 slots: app slots 0/1, stage-1 slots 2/3 (absolute)."""
        path = self.dir / f"{name}.nor"
        data = bytearray(b"\xff" * SIZE1)
        starts = (0, APP_SLOT, 2 * APP_SLOT, 2 * APP_SLOT + S1)
        for start, content in zip(starts, app + s1):
            if content is not None:
                data[start : start + len(content)] = content
        path.write_bytes(data)
        Path(str(path) + ".wear").write_bytes(bytes(4 * (SIZE1 // SECTOR)))
        self.cmd("dev", path, SIZE1, SECTOR, 1, f"s1={S1}", *extra)
        return path

    def probe(self, n: int, *, version: int = V2, chunk: int = 1500, wrong: bool = False,
              first: dict | None = None) -> list[Reply]:
        data = random.Random(n).randbytes(n)
        sha = hashlib.sha256(data + b"x" if wrong else data).digest()
        out = []
        for off in range(0, n, chunk):
            body: dict = {"off": off, "data": data[off : off + chunk]}
            if off == 0:
                body.update(len=n, sha=sha, **(first or {}))
            out.append(self.send(WRITE, MPBOOT, PROBE, body, version=version))
        return out


@pytest.fixture
def s(device, tmp_path: Path) -> Session1:
    return Session1(device, tmp_path, "stage1")


def entries(rep: Reply) -> list[tuple[int, int, str, str]]:
    """(image, slot, version, flags) of each state entry, through smpclient's models."""
    return [(e.image, e.slot, e.version, flags(e)) for e in images(rep)]


def v(rep: Reply) -> tuple:
    """A refusal as (v1 rc, rsn) or the v2 group rc."""
    if rep.header[0] >> 3 == V1:
        return rep.v1()
    body = rep.body
    return body["err"]["rc"] if "err" in body else ("rc", body["rc"])


def test_state_read_slot_info_and_app_only_unchanged(s: Session1) -> None:
    s.dev1("two", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("server", 0, "s1=0")
    state = [s.state(version=ver) for ver in (V1, V2)]
    info = s.send(READ, IMG, 6)
    mark = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": False})
    after = s.cmd("state")
    s.dev1("none", (A, None), (None, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0, "s1=-1")
    empty = s.state()
    s.run()
    for rep in state:
        assert entries(rep) == [(0, 0, "1.0.0", "bca"), (1, 0, "1.0.0", "bca"), (1, 1, "1.1.0", "b")]
    assert info.body == {"images": [
        {"image": 0, "slots": [{"slot": 0, "size": APP_SLOT}, {"slot": 1, "size": APP_SLOT}], "max_image_size": APP_SLOT},
        {"image": 1, "slots": [{"slot": 0, "size": S1}, {"slot": 1, "size": S1}], "max_image_size": S1}]}
    # A test mark by hash names stage 1's slot 1 (the hash says which image).
    assert entries(mark) == [(0, 0, "1.0.0", "bca"), (1, 0, "1.0.0", "bca"), (1, 1, "1.1.0", "bp")]
    assert mark.chg == "00100"
    assert after.values[:4] == ["0", "255", "255", "1"] and after.values[6:9] == ["0", "1", "255"]
    assert entries(empty) == [(0, 0, "1.0.0", "bca")]


def test_upload_image_numbers(s: Session1) -> None:
    s.dev1("up", (A, None), (S1A, None))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("server", 0, "s1=0")
    up2 = s.upload(S1B, first={"image": 2})
    listed = s.state()
    up3 = s.upload(S1B, first={"image": 3}, end=1000)  # again, named 3: finished already (its free slot too)
    app = s.upload(A2, first={"image": 1})
    listed2 = s.state()
    further = [s.send(WRITE, IMG, 1, {"off": 0, "data": A[:64], "len": len(A), "image": n}, version=ver)
               for n in (4, 5, 1000) for ver in (V1, V2)]
    # Kinds keep the pairs apart: an app into stage 1's slot, stage 1 into the app's.
    wrong_kind = [s.upload(data, first={"image": n, "ptlv": manifest(data)}, end=1000, version=ver)[0]
                  for data, n in ((A2, 2), (S1B, 0)) for ver in (V1, V2)]
    s.dev1("plain-upload", (A, None), (None, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0, "s1=-1")
    to_s1 = s.upload(S1B, first={"image": 2})
    listed3 = s.state()
    s.run()
    assert up2[-1].body == {"off": len(S1B), "match": True} and up2[-1].chg[3:] == "01"
    assert entries(listed) == [(0, 0, "1.0.0", "bca"), (1, 0, "1.0.0", "bca"), (1, 1, "1.1.0", "b")]
    assert up3[0].body == {"off": len(S1B), "match": True} and up3[0].ops == 0
    assert app[-1].body == {"off": len(A2), "match": True} and app[-1].chg[:2] == "01"
    assert [e[:2] for e in entries(listed2)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rep in further:
        assert v(rep) in ((EBADSTATE, "no slot"), img.IMG_MGMT_ERR.NO_FREE_SLOT), rep.body
        assert rep.ops == 0
    for rep in wrong_kind:
        assert v(rep) in ((EINVAL, "image:26"), img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER) and rep.ops == 0
    # With no stage-1 image the slots are still there: both free.
    assert to_s1[-1].body == {"off": len(S1B), "match": True}
    assert entries(listed3) == [(0, 0, "1.0.0", "bca"), (1, 0, "1.1.0", "b")]


def test_app_only_board_has_no_image_2(device, tmp_path: Path) -> None:
    s = Session(device, tmp_path)
    s.dev("plain", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    up = [s.send(WRITE, IMG, 1, {"off": 0, "data": S1B[:64], "len": len(S1B), "image": n}, version=ver)
          for n in (2, 3) for ver in (V1, V2)]
    erase = [s.send(WRITE, IMG, 5, {"slot": n}) for n in (2, 3)]
    probe = s.send(WRITE, MPBOOT, PROBE, {"off": 0, "data": b"", "len": 8192, "sha": bytes(32)})
    info = s.send(READ, IMG, 6)
    s.run()
    for rep in up:
        assert v(rep) in ((EBADSTATE, "no slot"), img.IMG_MGMT_ERR.NO_FREE_SLOT)
    assert all(v(r) == img.IMG_MGMT_ERR.INVALID_SLOT for r in erase)
    assert probe.rc() == ENOTSUP
    assert len(info.body["images"]) == 1


def test_erase_slots_and_busy(s: Session1) -> None:
    s.dev1("erase", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("server", 0, "s1=0")
    bad = [s.send(WRITE, IMG, 5, {"slot": n}, version=ver) for n in (4, 7) for ver in (V1, V2)]
    running = [s.send(WRITE, IMG, 5, {"slot": 2}, version=ver) for ver in (V1, V2)]
    other = s.send(WRITE, IMG, 5, {"slot": 3})
    listed = s.state()
    # Stage 1 on its test boot: both its slots are busy; the app's free slot is not.
    s.dev1("erase-trial", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("mark", 3)
    s.cmd("boot")
    trial = [s.send(WRITE, IMG, 5, {"slot": n}) for n in (2, 3)]
    up = s.upload(S1A, first={"image": 2}, end=1000)
    app_free = s.send(WRITE, IMG, 5, {"slot": 1})
    s.run()
    for rep in bad:
        assert v(rep) in ((EINVAL, None), img.IMG_MGMT_ERR.INVALID_SLOT) and rep.ops == 0
    assert running[0].v1() == (EBUSY, "update:1") and running[1].v2() == img.IMG_MGMT_ERR.NO_FREE_SLOT
    assert other.body == {} and other.chg == "00001"
    assert entries(listed) == [(0, 0, "1.0.0", "bca"), (1, 0, "1.0.0", "bca")]
    assert s.items[s.items.index(trial[0]) - 1].values == ["0", "0", "1", "1"]  # boot: s1 slot 1 on trial
    assert all(v(r) == img.IMG_MGMT_ERR.NO_FREE_SLOT and r.ops == 0 for r in trial)
    assert v(up[0]) == img.IMG_MGMT_ERR.NO_FREE_SLOT and up[0].ops == 0
    assert app_free.body == {}


def test_state_write_confirm_rules(s: Session1) -> None:
    s.dev1("confirm", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("server", 0, "s1=0")
    # A confirm by hash of a stage-1 slot not running: refused, nothing written.
    other = [s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True}, version=ver) for ver in (V1, V2)]
    # The running stage 1, confirmed already: nothing to do.
    again = s.send(WRITE, IMG, 0, {"hash": digest(S1A), "confirm": True})
    test_running = s.send(WRITE, IMG, 0, {"hash": digest(S1A), "confirm": False})
    s.run()
    assert other[0].v1() == (EACCESSDENIED, "stage1:test")
    assert other[1].v2() == img.IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED
    assert all(r.ops == 0 for r in other)
    assert again.ok and again.ops == 0
    assert test_running.ok and test_running.ops == 0


def test_proof_probe_then_confirm(s: Session1) -> None:
    s.dev1("proof", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("mark", 3)
    s.cmd("boot")
    s.cmd("booted", 0, 1)
    trial = s.state()
    early = [s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True}, version=ver) for ver in (V1, V2)]
    short = s.probe(8191)
    small = s.probe(4096)  # below max(8 KiB, 2 * buf_size)
    mismatch = s.probe(8192, wrong=True)
    after_bad = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True})
    stray = s.send(WRITE, MPBOOT, PROBE, {"off": 1500, "data": b"x" * 10})  # nothing open
    bad_types = [s.send(WRITE, MPBOOT, PROBE, body) for body in
                 ({"off": 0, "data": b"", "len": "x", "sha": bytes(32)}, {"off": -1, "data": b""},
                  {"off": 0, "data": b"", "len": 8192}, {"off": 0, "len": 8192, "sha": bytes(32)})]
    read = s.send(READ, MPBOOT, PROBE)
    good = s.probe(8192 + 100, first={"pipeline": True})
    late = s.cmd("late")
    confirm = [s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True}, version=ver) for ver in (V1, V2)]
    done = s.cmd("late")
    state = s.cmd("state")
    s.run()
    assert entries(trial) == [(0, 0, "1.0.0", "bca"), (1, 0, "1.0.0", "bc"), (1, 1, "1.1.0", "ba")]
    assert early[0].v1() == (EACCESSDENIED, "stage1:unproven")
    assert early[1].v2() == img.IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED
    assert all(r.ops == 0 for r in early)
    assert v(short[0]) == E_PROBE and v(small[0]) == E_PROBE
    assert mismatch[0].body == {"off": 1500}
    assert v(mismatch[-1]) == E_PROBE_MISMATCH
    assert v(after_bad) == img.IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED and after_bad.ops == 0
    assert v(stray) == E_PROBE
    assert all(r.rc() == EINVAL for r in bad_types)
    assert read.rc() == ENOTSUP
    assert good[0].body == {"off": 1500, "pipeline": 4}
    assert good[-1].body == {"off": 8292, "match": True}
    assert all(r.ops == 0 for r in good)  # a null sink: nothing reaches flash
    assert late.values[:2] == ["1", "0"]  # on trial, no deadline
    assert entries(confirm[0]) == [(0, 0, "1.0.0", "bca"), (1, 0, "1.0.0", "b"), (1, 1, "1.1.0", "bca")]
    assert confirm[0].chg == "00100" and confirm[1].ops == 0
    # The boot record: stage 1 confirmed (HOW_CONFIRMED 0), its deadline gone.
    assert done.values == ["0", "0", "0", "1"]
    assert state.values[6:9] == ["1", "255", "255"]


def test_proof_by_upload_and_deadline(s: Session1) -> None:
    s.dev1("upload-proof", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("mark", 3)
    s.cmd("boot")
    s.cmd("server", 0, "s1=1", "deadline=600000")
    up = s.upload(A2)  # the next app: a completed upload is the proof
    confirm = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True})
    # Deadline passed: a probe no longer proves; the tick resets.
    s.dev1("late", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("mark", 3)
    s.cmd("boot")
    s.cmd("server", 0, "s1=1", "deadline=-1")
    late = s.cmd("late")
    probe = s.probe(8192)
    refused = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True})
    # A failed upload does not prove.
    s.dev1("failed", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("mark", 3)
    s.cmd("boot")
    bad = s.upload(A2[:-1] + bytes([A2[-1] ^ 1]))
    refused2 = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True})
    s.run()
    assert up[-1].body == {"off": len(A2), "match": True}
    assert confirm.ok and entries(confirm)[-1] == (1, 1, "1.1.0", "bca")
    assert late.values == ["1", "1"]
    assert probe[-1].body == {"off": 8192, "match": True}
    assert v(refused) == img.IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED and refused.ops == 0
    assert "err" in bad[-1].body
    assert v(refused2) == img.IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED


def test_pair_trial_upgrade_and_sessions(s: Session1) -> None:
    s.dev1("pair", (A, A2), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("pairmark", 1, 1)
    boot = s.cmd("boot")
    busy = [s.upload(data, first={"image": n}, end=1000)[0] for data, n in ((A, 0), (S1A, 2))]
    early = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True})
    probe = s.probe(8192)
    s1_half = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True})
    half = s.cmd("state")
    app_half = s.send(WRITE, IMG, 0, {"confirm": True})
    both = s.cmd("state")
    # upgrade: true compares with the running image of the same image.
    s.dev1("upgrade", (A2, None), (S1A, None))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("server", 0, "s1=0")
    newer = s.upload(S1B, first={"image": 2, "upgrade": True})
    older = [s.send(WRITE, IMG, 1, {"off": 0, "data": S1OLD[:1000], "len": len(S1OLD), "image": 2,
                                    "upgrade": True}, version=ver) for ver in (V1, V2)]
    # One upload at a time: opening image 2 ends the app's session; chunks go to the open one.
    app_open = s.upload(A, first={"image": 0}, end=1000)
    s1_open = s.upload(S1B, first={"image": 2}, end=1000, sha=False)
    s1_next = s.upload(S1B, start=1000, sha=False)
    listed = s.state()
    s.run()
    assert boot.values == ["1", "1", "1", "1"]
    assert all(v(r) == img.IMG_MGMT_ERR.NO_FREE_SLOT for r in busy)
    assert v(early) == img.IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED
    assert probe[-1].body["match"] is True
    assert s1_half.ok
    assert half.values[2] == "1" and half.values[8] == "1" and half.values[10] == "5"  # PAIR | PAIR_S1_OK
    assert app_half.ok
    assert both.values[:3] == ["1", "255", "255"] and both.values[6:] == ["1", "255", "255", "1", "0"]
    assert newer[-1].body == {"off": len(S1B), "match": True}
    assert older[0].v1() == (EINVAL, "image:19")
    assert older[1].v2() == img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER
    assert app_open[0].body == {"off": 1000} and s1_open[0].body == {"off": 1000}
    assert s1_next[-1].body == {"off": len(S1B)}
    assert entries(listed) == [(0, 0, "2.0.0", "bca"), (1, 0, "1.0.0", "bca"), (1, 1, "1.1.0", "b")]


def test_stage1_upload_probe_and_confirm_in_small_heap(s: Session1) -> None:
    """A stage-1 upload in full-size packets, a probe and the proven confirm in 124 KiB, 8 KiB
    over the app-only upload's heap (test_smp_fuzz.HEAP). It passed in 116k until the
    dependency checks grew pairs.py (.mpy, loaded into this heap; frozen on a board); since,
    118k and 124k pass and 120k fails: where the 2 KiB verify buffer finds a piece among the
    modules' blocks, not what the service holds, decides it."""
    s.dev1("heap", (A, None), (S1A, S1B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 2)
    s.cmd("mark", 3)
    s.cmd("boot")
    s.cmd("snap", 0)
    before = s.cmd("mem")
    up = s.upload(A2, chunk=1900)
    probe = s.probe(8192, chunk=1900)
    confirm = s.send(WRITE, IMG, 0, {"hash": digest(S1B), "confirm": True})
    state = s.state()
    info = s.send(READ, IMG, 6)
    after = s.cmd("mem")
    s.run(heapsize="124k")
    assert up[-1].body == {"off": len(A2), "match": True}
    assert probe[-1].body == {"off": 8192, "match": True}
    assert confirm.ok and len(state.body["images"]) == 4 and len(info.body["images"]) == 2
    print("heap (two pairs): free/alloc before", before.values, "after", after.values)
