"""The device side of factory provisioning (docs/FACTORY.md sections 1 and 2) on MicroPython:
the factory record (firmware/mpboot/factory.py, the boot state's power-safe log), SMP group 64
commands 0-5 with their errors (v1 and v2), the effective policy it gives the board, identity
in OS info and image state, no-repl, and power cuts at every flash operation of a factory
write.

SMP requests run through `Server.handle` in one MicroPython process (tests/device/dev_smp.py,
the Session harness of test_smp_server); every response must be well formed and canonical
CBOR (byte-identical to `cbor2.dumps(..., canonical=True)`). Power cuts and no-repl run on the
simulated device (mpboot.sim: one process per power-on, nor_sim fault injection)."""

from __future__ import annotations

import hashlib
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from conftest import FIRMWARE, trusted_public_keys
from mpboot import upy
from mpboot.image import class_uuid, vendor_uuid
from mpboot.keys import SigningKey
from mpboot.pack import pack_app
from mpboot.sim import Geometry, Run, SimDevice
from simkit import boot, installed, make_app, sign_app
from smp import image_management as img
from test_smp_server import (
    IMG,
    OS,
    READ,
    SECTOR,
    SIZE,
    V1,
    V2,
    WRITE,
    A,
    B,
    Reply,
    Session,
    digest,
    image,
    images,
    manifest,
    packet,
)

G = 64  # the mpboot group
EUNKNOWN, EINVAL, EBADSTATE, ENOTSUP, EACCESSDENIED = 1, 3, 6, 8, 11
SEALED, NO_IDENTITY, SERIAL_MISMATCH, INVALID, FIXED_BY_BUILD, NO_FACTORY_AREA, FLASH = 1, 2, 3, 4, 5, 6, 7
V1_RC = {SEALED: EACCESSDENIED, NO_IDENTITY: EBADSTATE, SERIAL_MISMATCH: EBADSTATE, INVALID: EINVAL,
         FIXED_BY_BUILD: EACCESSDENIED, NO_FACTORY_AREA: ENOTSUP, FLASH: EUNKNOWN}
VENDOR = vendor_uuid("example.com")
OTHER_VENDOR = vendor_uuid("example.org")
CLASS = class_uuid("sensor", VENDOR)
UID = b"mpboot-sim"
BOOT_VERSION = re.search(r'__version__ = "([^"]+)"', (FIRMWARE / "mpboot" / "__init__.py").read_text()).group(1)
KEYHASHES = [k.keyhash() for k in trusted_public_keys()]
NO_POLICY = {"no-repl": False, "test-boot": False, "no-downgrade": False}
ALL_POLICY = {"no-repl": True, "test-boot": True, "no-downgrade": True}
LABELS = {"line": "2", "aa": "x", "b": "", "station": "st-2", "zz": "last"}


def factory_info(*, ctr: int = 1, cid: bytes | None = None, vid: bytes | None = None,
                 labels: dict[str, str] | None = None, policy: dict[str, bool] | None = None,
                 serial: str | None = None, sealed: bool = False) -> dict[str, Any]:
    """F as the device must answer it (fw is checked apart: the MicroPython version)."""
    return {"uid": UID, "boot": BOOT_VERSION, "ctr": ctr, "cid": cid, "vid": vid, "keys": KEYHASHES,
            "labels": labels or {}, "policy": policy or NO_POLICY, "serial": serial, "sealed": sealed,
            "root-version": 1, "revocation": 0}


def F(rep: Reply) -> dict[str, Any]:
    """The factory info of a reply, without fw (checked here: the device's MicroPython)."""
    body = dict(rep.body)
    assert re.fullmatch(r"\d+\.\d+\.\d+", body.pop("fw")), rep.body
    return body


def v1_err(rep: Reply) -> tuple[int, str | None]:
    body = rep.body
    assert set(body) <= {"rc", "rsn"}, body
    return body["rc"], body.get("rsn")


def v2_err(rep: Reply) -> int:
    body = rep.body
    assert set(body) == {"err"} and body["err"]["group"] == G, body
    return body["err"]["rc"]


def both(s: Session, op: int, cmd: int, body: Any = None, group: int = G) -> list[Reply]:
    return [s.send(op, group, cmd, body, version=v) for v in (V1, V2)]


def assert_factory_error(reps: list[Reply], code: int) -> None:
    v1, v2 = reps
    assert v1_err(v1) == (V1_RC[code], f"factory:{code}"), v1.body
    assert v2_err(v2) == code, v2.body
    assert v1.ops == 0 and v2.ops == 0


def record(cmd: Any) -> dict[str, Any]:
    """dev_smp's `factory` line: the record a fresh Slots loads."""
    found, seq, flags, serial, vendor_id, class_id, labels = cmd.values
    h = {k: b"" if v == "-" else bytes.fromhex(v) for k, v in (("serial", serial), ("vendor_id", vendor_id),
                                                                 ("class_id", class_id), ("labels", labels))}
    return {"found": found == "1", "seq": int(seq), "flags": int(flags), **h}


@pytest.fixture
def session(device, tmp_path: Path) -> Session:
    return Session(device, tmp_path)


def provisioned_dev(s: Session, name: str, **kw: Any) -> None:
    """A board running A (slot 0, confirmed: the floor 1) with B in slot 1."""
    s.dev(name, slots=(A, B), **kw)
    s.cmd("confirm", 0)
    s.cmd("server", 0)


# --- reads and identity -----------------------------------------------------------------------


def test_factory_info_identity_and_reads(session: Session) -> None:
    s = session
    # Images of the vendor and class the identity gives the board (images without them would
    # no longer pass its policy).
    a = image("1.0.0", seed="ident-a", vendor_id=VENDOR, class_id=CLASS)
    b = image("1.1.0", seed="ident-b", vendor_id=VENDOR, class_id=CLASS)
    s.dev("ident", slots=(a, b))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    blank = both(s, READ, 1)
    os_version = s.send(READ, OS, 7, {"format": "o"})
    ident = s.send(WRITE, G, 2, {"serial": "SN-2026-000001", "vid": VENDOR, "cid": CLASS, "labels": LABELS})
    rec1 = s.cmd("factory")
    again = s.send(WRITE, G, 2, {"serial": "SN-2026-000001", "vid": VENDOR, "cid": CLASS, "labels": dict(LABELS)})
    read = both(s, READ, 1)
    dev_info = both(s, READ, 0)
    node = s.send(READ, OS, 7, {"format": "sn"})
    state = s.send(READ, IMG, 0, {"identity": True})
    state_plain = s.send(READ, IMG, 0, {})
    state_false = s.send(READ, IMG, 0, {"identity": False})
    # A new identity replaces the whole one: no vid, cid or labels now (the build's apply).
    replaced = s.send(WRITE, G, 2, {"serial": "SN-2026-000002"})
    rec2 = s.cmd("factory")
    after = s.send(READ, G, 0)
    s.run()

    fw = os_version.body["output"].split()[-1]
    for rep in blank:
        assert rep.body["fw"] == fw
        assert F(rep) == factory_info()
        assert rep.ops == 0
    want = factory_info(vid=VENDOR, cid=CLASS, labels=LABELS, serial="SN-2026-000001")
    assert F(ident) == want and ident.ops == 2  # the first record: erase, program
    # The labels are stored as their canonical encoding (the reply was checked canonical).
    r = record(rec1)
    assert r["found"] and r["seq"] == 1 and r["flags"] == 16 | 32 | 64
    assert r["serial"] == b"SN-2026-000001" and r["vendor_id"] == VENDOR and r["class_id"] == CLASS
    assert r["labels"] == cbor2.dumps(LABELS, canonical=True)
    assert F(again) == want and again.ops == 0  # identical: nothing appended
    assert all(F(rep) == want for rep in read)
    for rep in dev_info:
        assert rep.body == {"uid": UID, "vid": VENDOR, "cid": CLASS, "ctr": 1, "serial": "SN-2026-000001",
                            "no-downgrade": False, "root-version": 1, "revocation": 0, "deflate": 10}
    assert node.body == {"output": "mpboot SN-2026-000001"}
    assert list(state.body) == ["uid", "images", "serial", "splitStatus"]  # canonical order
    assert state.body["uid"] == UID and state.body["serial"] == "SN-2026-000001"
    assert state.body["images"] == state_plain.body["images"] and len(images(state_plain)) == 2
    assert set(state_plain.body) == {"images", "splitStatus"} and set(state_false.body) == {"images", "splitStatus"}
    assert F(replaced) == factory_info(serial="SN-2026-000002")
    r = record(rec2)
    assert (r["seq"], r["flags"], r["vendor_id"], r["class_id"], r["labels"]) == (2, 16, bytes(16), bytes(16), b"")
    assert after.body["vid"] is None and after.body["serial"] == "SN-2026-000002"


def test_identity_limits(session: Session) -> None:
    s = session
    provisioned_dev(s, "limits")
    ok_max = {"serial": "!" + "A" * 30 + "~", "labels": {f"k{i}": "v" * 12 for i in range(8)}}
    good = s.send(WRITE, G, 2, ok_max)
    invalid = {
        "empty serial": {"serial": ""},
        "serial 33 bytes": {"serial": "S" * 33},
        "serial with space": {"serial": "SN 1"},
        "serial with tab": {"serial": "SN\t1"},
        "serial not ascii": {"serial": "SN-\u00e9"},
        "serial with DEL": {"serial": "SN\x7f"},
        "9 labels": {"serial": "SN-1", "labels": {f"k{i}": "v" for i in range(9)}},
        "labels over 192 bytes": {"serial": "SN-1", "labels": {f"key{i}": "v" * 24 for i in range(7)}},
        "empty label key": {"serial": "SN-1", "labels": {"": "v"}},
        "label key 17 bytes": {"serial": "SN-1", "labels": {"k" * 17: "v"}},
        "label value 65 bytes": {"serial": "SN-1", "labels": {"k": "v" * 65}},
        "vid 15 bytes": {"serial": "SN-1", "vid": bytes(15)},
        "vid 17 bytes": {"serial": "SN-1", "vid": bytes(17)},
        "cid 15 bytes": {"serial": "SN-1", "cid": bytes(15)},
    }
    refused = {label: both(s, WRITE, 2, body) for label, body in invalid.items()}
    mistyped = [s.send(WRITE, G, 2, body, version=v) for v in (V1, V2) for body in (
        {}, {"serial": 5}, {"serial": b"SN-1"}, {"serial": "SN-1", "vid": "text"}, {"serial": "SN-1", "cid": 1},
        {"serial": "SN-1", "labels": ["a"]}, {"serial": "SN-1", "labels": {"a": 1}},
        {"serial": "SN-1", "labels": {1: "a"}})]
    rec = s.cmd("factory")
    s.run()
    assert F(good) == factory_info(serial=ok_max["serial"], labels=ok_max["labels"])
    assert len(cbor2.dumps(ok_max["labels"])) <= 192
    assert len(cbor2.dumps(invalid["labels over 192 bytes"]["labels"])) > 192
    for label, reps in refused.items():
        try:
            assert_factory_error(reps, INVALID)
        except AssertionError as err:
            raise AssertionError(label) from err
    for rep in mistyped:
        assert rep.rc() == EINVAL and "rsn" not in rep.body and rep.ops == 0, rep.body
    assert record(rec)["seq"] == 1  # only the good write


def test_identity_text_must_be_utf8(session: Session) -> None:
    """A label (or serial) that is not strict UTF-8 (overlong, a UTF-16 surrogate, above
    U+10FFFF: all of which MicroPython's str() takes) is malformed CBOR: EINVAL, nothing
    stored, and the factory info stays readable by strict decoders (every reply is decoded
    with cbor2 here)."""
    s = session
    provisioned_dev(s, "utf8")
    good = {"serial": "SN-1", "labels": {"line": "XX"}}
    body = cbor2.dumps(good)
    bad = {
        "label value overlong": body.replace(b"\x62XX", b"\x62\xc0\x80"),
        "label value surrogate": body.replace(b"\x62XX", b"\x63\xed\xa0\x80"),
        "label value above U+10FFFF": body.replace(b"\x62XX", b"\x64\xf4\x90\x80\x80"),
        "label key overlong": body.replace(b"\x64line", b"\x64li\xc1\xbf"),
        "serial overlong": body.replace(b"\x64SN-1", b"\x64SN\xc0\xae"),
    }
    for label, raw in bad.items():
        assert raw != body, label
    refused = {label: [s.raw(packet(WRITE, G, 2, raw=raw, version=v)) for v in (V1, V2)]
               for label, raw in bad.items()}
    rec = s.cmd("factory")
    read = s.send(READ, G, 1)
    stored = s.send(WRITE, G, 2, good)
    s.run()
    for label, reps in refused.items():
        for rep in reps:
            assert rep.rc() == EINVAL and "rsn" not in rep.body and rep.ops == 0, (label, rep.body)
    assert not record(rec)["found"]
    assert F(read) == factory_info()
    assert F(stored) == factory_info(serial="SN-1", labels={"line": "XX"})


def test_ids_fixed_by_build(session: Session) -> None:
    s = session
    a = image("1.0.0", seed="fixed", vendor_id=VENDOR, class_id=CLASS)
    s.dev("fixed", slots=(a, None), vendor_id=VENDOR)
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    other = both(s, WRITE, 2, {"serial": "SN-1", "vid": OTHER_VENDOR})
    same = s.send(WRITE, G, 2, {"serial": "SN-1", "vid": VENDOR, "cid": CLASS})
    s.run()
    assert_factory_error(other, FIXED_BY_BUILD)
    assert F(same) == factory_info(vid=VENDOR, cid=CLASS, serial="SN-1")


# --- seal, floor, policy ----------------------------------------------------------------------


def test_seal_and_the_sealed_board(session: Session) -> None:
    s = session
    provisioned_dev(s, "seal")
    no_identity = both(s, WRITE, 5, {"serial": "SN-1"})
    s.send(WRITE, G, 2, {"serial": "SN-1", "labels": {"line": "1"}})
    s.send(WRITE, G, 4, ALL_POLICY)
    s.send(WRITE, G, 3, {"ctr": 3})
    mismatch = both(s, WRITE, 5, {"serial": "SN-2"})
    seal = s.send(WRITE, G, 5, {"serial": "SN-1"})
    sealed_rec = s.cmd("factory")
    reseal = s.send(WRITE, G, 5, {"serial": "SN-1"})
    other = both(s, WRITE, 5, {"serial": "SN-2"})
    identity = both(s, WRITE, 2, {"serial": "SN-1", "labels": {"line": "1"}})  # even the same one
    floor = both(s, WRITE, 3, {"ctr": 9})
    floor_same = both(s, WRITE, 3, {"ctr": 3})
    policy = both(s, WRITE, 4, NO_POLICY)
    malformed = s.send(WRITE, G, 5, {})
    # Reads still answered, updates still taken (under the sealed policy: test boot only).
    reads = [s.send(READ, G, 0), s.send(READ, G, 1), s.send(READ, OS, 7, {"format": "n"}),
             s.send(READ, IMG, 0, {"identity": True})]
    new = image("1.2.0", seed="sealed-update", counter=4)
    ups = s.upload(new, chunk=1900)
    mark = s.send(WRITE, IMG, 0, {"hash": digest(new), "confirm": False})
    s.cmd("boot")
    s.cmd("booted", 1)
    conf = s.send(WRITE, IMG, 0, {"confirm": True})
    after = s.send(READ, G, 1)
    final = s.cmd("factory")
    s.run()

    assert_factory_error(no_identity, NO_IDENTITY)
    assert_factory_error(mismatch, SERIAL_MISMATCH)
    want = factory_info(ctr=3, labels={"line": "1"}, policy=ALL_POLICY, serial="SN-1", sealed=True)
    assert F(seal) == want and seal.ops == 1
    assert record(sealed_rec)["flags"] == 1 | 2 | 4 | 8 | 16
    assert F(reseal) == want and reseal.ops == 0
    for reps in (other, identity, floor, floor_same, policy):
        assert_factory_error(reps, SEALED)
    assert malformed.rc() == EINVAL
    assert reads[0].body["serial"] == "SN-1" and F(reads[1]) == want
    assert reads[2].body == {"output": "SN-1"} and reads[3].body["serial"] == "SN-1"
    assert ups[-1].body == {"off": len(new), "match": True}
    assert [flags for flags in (e["pending"] for e in mark.body["images"])] == [False, True]
    assert [e.slot for e in images(conf) if e.confirmed] == [1]
    # The floor rose with the confirmed image (anti-rollback works as before), sealed or not.
    assert F(after) == {**want, "ctr": 4}
    assert record(final) == record(sealed_rec)


def test_floor_never_goes_down(session: Session) -> None:
    s = session
    provisioned_dev(s, "floor")
    up = s.send(WRITE, G, 3, {"ctr": 5})
    down = s.send(WRITE, G, 3, {"ctr": 2})
    same = s.send(WRITE, G, 3, {"ctr": 5})
    top = s.send(WRITE, G, 3, {"ctr": 2**32 - 1})
    over = both(s, WRITE, 3, {"ctr": 2**32})
    negative = both(s, WRITE, 3, {"ctr": -1})
    mistyped = [s.send(WRITE, G, 3, body) for body in ({}, {"ctr": "5"}, {"ctr": True}, {"ctr": b"\x05"})]
    state = s.cmd("state")
    listed = s.state()  # B (counter 1) is below the floor now
    s.run()
    assert F(up)["ctr"] == 5 and up.chg == "001"
    assert F(down)["ctr"] == 5 and down.ops == 0
    assert F(same)["ctr"] == 5 and same.ops == 0
    assert F(top)["ctr"] == 2**32 - 1
    assert_factory_error(over, INVALID)
    assert_factory_error(negative, INVALID)
    for rep in mistyped:
        assert rep.rc() == EINVAL and rep.ops == 0
    assert state.values[3] == str(2**32 - 1)
    assert [e.slot for e in images(listed)] == [0]  # the running image stays listed


def test_effective_policy(session: Session) -> None:
    s = session
    older = image("0.9.0", seed="older")
    provisioned_dev(s, "policy")
    policy = s.send(WRITE, G, 4, ALL_POLICY)
    same = s.send(WRITE, G, 4, dict(ALL_POLICY))
    missing = [s.send(WRITE, G, 4, body) for body in (
        {"no-downgrade": True, "test-boot": True}, {**ALL_POLICY, "no-repl": 1}, {**ALL_POLICY, "test-boot": None})]
    info = s.send(READ, G, 0)
    mode = s.send(READ, OS, 8, {"query": "mode"})
    # no-downgrade: an older image is refused at its first chunk.
    down = [s.send(WRITE, IMG, 1, {"off": 0, "data": older[:1024], "len": len(older),
                                   "sha": hashlib.sha256(older).digest()}, version=v) for v in (V1, V2)]
    # test-boot: another slot's image made permanent is refused; a test mark is fine.
    permanent = [s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": True}, version=v) for v in (V1, V2)]
    state_after = s.cmd("state")
    test = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False})
    # The test boot confirms through the running image's confirm (allowed).
    s.cmd("boot")
    s.cmd("booted", 1)
    conf = s.send(WRITE, IMG, 0, {"confirm": True})
    # Policy off again: permanent allowed.
    off = s.send(WRITE, G, 4, NO_POLICY)
    perm_ok = s.send(WRITE, IMG, 0, {"hash": digest(A), "confirm": True})
    s.run()
    assert F(policy)["policy"] == ALL_POLICY and policy.ops == 2  # the first record: erase, program
    assert same.ops == 0
    for rep in missing:
        assert rep.rc() == EINVAL
    assert info.body["no-downgrade"] is True and mode.body == {"mode": 5, "no-downgrade": True}
    assert down[0].v1() == (EINVAL, "image:19")
    assert down[1].v2() == img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER
    assert all(r.ops == 0 for r in down)
    assert v1_err(permanent[0]) == (EACCESSDENIED, "factory:8")
    assert permanent[1].v2() == img.IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED  # Zephyr's refusal
    assert all(r.ops == 0 for r in permanent)
    assert state_after.values[:3] == ["0", "255", "255"]
    assert [e["pending"] for e in test.body["images"]] == [False, True]
    assert [e.slot for e in images(conf) if e.confirmed] == [1]
    assert F(off)["policy"] == NO_POLICY
    assert perm_ok.ok and [e.slot for e in images(perm_ok) if e.permanent] == [0]


def test_vendor_id_from_identity(session: Session) -> None:
    """The identity's vendor id becomes the device's: another vendor's image is refused."""
    s = session
    a = image("1.0.0", seed="vid-a", vendor_id=VENDOR)
    ours = image("1.1.0", seed="vid-ours", vendor_id=VENDOR)
    theirs = image("1.1.0", seed="vid-theirs", vendor_id=OTHER_VENDOR)
    s.dev("vid", slots=(a, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    before = s.send(WRITE, IMG, 1, {"off": 0, "data": theirs[:1024], "len": len(theirs),
                                    "sha": hashlib.sha256(theirs).digest(), "ptlv": manifest(theirs)})
    s.send(WRITE, IMG, 5, {"slot": 1})
    ident = s.send(WRITE, G, 2, {"serial": "SN-V", "vid": VENDOR})
    refused = [s.send(WRITE, IMG, 1, {"off": 0, "data": theirs[:1024], "len": len(theirs),
                                      "sha": hashlib.sha256(theirs).digest(), "ptlv": manifest(theirs)}, version=v)
               for v in (V1, V2)]
    ups = s.upload(ours, chunk=1900, first={"ptlv": manifest(ours)})
    s.run()
    assert before.body == {"off": 1024}  # the build checks no vendor
    assert F(ident)["vid"] == VENDOR
    assert refused[0].v1() == (EINVAL, "image:16")
    assert refused[1].v2() == img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER
    assert ups[-1].body == {"off": len(ours), "match": True}


# --- errors -----------------------------------------------------------------------------------


def test_board_without_factory_area(session: Session) -> None:
    s = session
    s.dev("nofactory", slots=(A, None))
    s.cmd("dev", s.dir / "nofactory.nor", SIZE, SECTOR, 1, "factory=0")
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    refused = [both(s, op, cmd, body) for op, cmd, body in (
        (READ, 1, None), (WRITE, 2, {"serial": "SN-1"}), (WRITE, 3, {"ctr": 1}), (WRITE, 4, ALL_POLICY),
        (WRITE, 5, {"serial": "SN-1"}))]
    info = s.send(READ, G, 0)
    node = s.send(READ, OS, 7, {"format": "n"})
    state = s.send(READ, IMG, 0, {"identity": True})
    rec = s.cmd("factory")
    s.run()
    for reps in refused:
        assert_factory_error(reps, NO_FACTORY_AREA)
    assert info.body == {"uid": UID, "vid": None, "cid": None, "ctr": 1, "serial": None, "no-downgrade": False,
                         "root-version": 1, "revocation": 0, "deflate": 10}
    assert node.body == {"output": UID.hex()}
    assert state.body["serial"] is None and state.body["uid"] == UID
    assert rec.values == ["none"]


def test_unknown_commands_and_ops(session: Session) -> None:
    s = session
    provisioned_dev(s, "unknown")
    reps = [s.send(op, G, cmd, version=v) for v in (V1, V2) for op, cmd in (
        (WRITE, 0), (WRITE, 1), (READ, 2), (READ, 3), (READ, 4), (READ, 5), (READ, 7), (READ, 8), (WRITE, 8), (WRITE, 255))]
    s.run()
    for rep in reps:
        assert rep.body == {"rc": ENOTSUP} and rep.ops == 0


def test_flash_error_changes_nothing(session: Session) -> None:
    s = session
    provisioned_dev(s, "wfail")
    s.send(WRITE, G, 2, {"serial": "SN-1"})
    before = s.cmd("factory")
    s.cmd("wfail", 1)
    ident = both(s, WRITE, 2, {"serial": "SN-2"})
    floor = both(s, WRITE, 3, {"ctr": 7})
    policy = both(s, WRITE, 4, ALL_POLICY)
    read = s.send(READ, G, 1)
    s.cmd("wfail", 0)
    after = s.cmd("factory")
    state = s.cmd("state")
    retry = s.send(WRITE, G, 2, {"serial": "SN-2"})
    s.run()
    for reps in (ident, floor, policy):
        v1, v2 = reps
        assert v1_err(v1) == (EUNKNOWN, "factory:7") and v2_err(v2) == FLASH
    assert F(read) == factory_info(serial="SN-1")  # RAM is what flash holds
    assert after.values == before.values and state.values[3] == "1"
    assert F(retry)["serial"] == "SN-2"


def test_provisioning_in_the_service_heap(session: Session) -> None:
    """The whole provisioning sequence (largest identity, policy, floor, seal, reads) in the
    heap the fuzz tests hold the SMP server to (test_smp_fuzz.HEAP)."""
    from test_smp_fuzz import HEAP

    s = session
    provisioned_dev(s, "heap")
    s.cmd("snap", 0)
    labels = {f"key-{i}": "v" * 14 for i in range(8)}
    reps = [s.send(READ, G, 1),
            s.send(WRITE, G, 2, {"serial": "S" * 32, "vid": VENDOR, "cid": CLASS, "labels": labels}),
            s.send(WRITE, G, 3, {"ctr": 4}), s.send(WRITE, G, 4, ALL_POLICY), s.send(WRITE, G, 5, {"serial": "S" * 32}),
            s.send(READ, IMG, 0, {"identity": True}), s.send(READ, OS, 7, {"format": "a"}), s.send(READ, G, 0)]
    ups = s.upload(image("1.3.0", seed="heap", counter=4, vendor_id=VENDOR, class_id=CLASS), chunk=1900)
    s.run(heapsize=HEAP)
    assert all(r.ok for r in reps + ups)
    assert F(reps[4]) == factory_info(ctr=4, vid=VENDOR, cid=CLASS, labels=labels, policy=ALL_POLICY,
                                      serial="S" * 32, sealed=True)


# --- on the simulated device: no-repl, power cuts ------------------------------------------------


def smp_hex(op: int, cmd: int, body: Any = None, group: int = G, seq: int = 1) -> str:
    return packet(op, group, cmd, body, version=V1, seq=seq).hex()


def smp(dev: SimDevice, *pkts: str, **kw: Any) -> Run:
    return dev.run("smp", *pkts, **kw)


def replies(run: Run) -> list[dict[str, Any]]:
    out = []
    for line in run.stdout.splitlines():
        if line.startswith("RSP "):
            raw = bytes.fromhex(line.split()[1])
            assert cbor2.dumps(cbor2.loads(raw[8:]), canonical=True) == raw[8:]
            out.append(cbor2.loads(raw[8:]))
    return out


@dataclass(frozen=True)
class FRecord:
    found: bool
    seq: int
    pos: int
    flags: int
    serial: str
    vendor_id: str
    class_id: str
    labels: str

    @classmethod
    def read(cls, dev: SimDevice) -> FRecord:
        line = dev.run("factory").line("FACTORY")
        assert line, "no FACTORY line"
        f = dict(re.findall(r"(\w+)=(\S+)", line))
        return cls(f["found"] == "1", int(f["seq"]), int(f["pos"]), int(f["flags"]), f["serial"],
                   f["vendor_id"], f["class_id"], f["labels"])

    def content(self) -> tuple[object, ...]:
        return (self.found, self.seq, self.flags, self.serial, self.vendor_id, self.class_id, self.labels)


GEOMETRY = Geometry(64 * 1024, 4096, 16)
PER_SECTOR = 4096 // 272


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, sim_lib: Path, rsa2048: SigningKey) -> SimDevice:
    """A simulated board running a confirmed app (v1.0.0, of VENDOR and CLASS), factory area
    blank."""
    work = tmp_path_factory.mktemp("factory-sim")
    dev = SimDevice(work / "base", sim_lib, GEOMETRY)
    path = work / "v1.bin"
    path.write_bytes(sign_app(make_app(work / "app", "1.0.0", confirm=True), rsa2048, "1.0.0",
                              vendor_id=VENDOR, class_id=CLASS))
    installed(dev.install(path, "permanent"))
    assert boot(dev).version == "1.0.0"
    dev.snapshot(work / "snap")
    return dev


def fresh(running: SimDevice, where: Path) -> SimDevice:
    dev = SimDevice(where, running.lib, running.geometry, heapsize=running.heapsize)
    dev.restore(running.workdir.parent / "snap")
    return dev


IDENT_A = smp_hex(WRITE, 2, {"serial": "SN-A", "labels": {"line": "1"}})
IDENT_B = smp_hex(WRITE, 2, {"serial": "SN-B", "vid": VENDOR, "cid": CLASS, "labels": {"line": "2", "st": "9"}})
POLICY = smp_hex(WRITE, 4, ALL_POLICY)
SEAL_A = smp_hex(WRITE, 5, {"serial": "SN-A"})
# name: (writes before, the write cut)
WRITES = {
    "identity": ((IDENT_A,), IDENT_B),
    "policy": ((IDENT_A,), POLICY),
    "seal": ((IDENT_A, POLICY), SEAL_A),
}
# Where the write lands in the factory log: mid-sector; first record of sector 1 (sector 0
# full: erase sector 1, then write); first record of sector 0 again (erases old records).
PLACES = {"mid": 0, "switch": 1, "switch-back": 2}
TEARS = {"W": ("", "half", "word", "prefix:8"), "E": ("", "erase-half")}


def prepare(running: SimDevice, work: Path, name: str, place: str) -> tuple[SimDevice, Path, list[str], FRecord, FRecord]:
    """The board just before the write (snapshot), the write's flash operations, and the
    factory record before and after it."""
    before, write = WRITES[name]
    dev = fresh(running, work / f"{name}-{place}")
    assert all("rc" not in r for r in replies(smp(dev, *before)))
    n = FRecord.read(dev).seq
    switches = PLACES[place]
    if switches:
        dev.run("fage", switches * PER_SECTOR - n)
        assert FRecord.read(dev).pos == -1  # the next record switches sectors
    old = FRecord.read(dev)
    snap = work / f"{name}-{place}-snap"
    dev.snapshot(snap)
    trace = work / f"{name}-{place}-trace.txt"
    trace.unlink(missing_ok=True)
    ref = smp(dev, write, trace=trace)
    assert "rc" not in replies(ref)[0], replies(ref)
    ops = [line.split()[0] for line in trace.read_text().splitlines()]
    new = FRecord.read(dev)
    assert new.content() != old.content() and new.seq == old.seq + 1
    assert ops == (["E", "W"] if switches else ["W"]), ops
    return dev, snap, ops, old, new


def cut_points(ops: list[str]) -> list[tuple[int, str]]:
    return [(i, t) for i, kind in enumerate(ops) for t in TEARS[kind]]


def check_cut(dev: SimDevice, snap: Path, write: str, op: int, tear: str, old: FRecord, new: FRecord) -> str:
    dev.restore(snap)
    fault = f"cut={op}" + (f",tear={tear}" if tear else "")
    if not smp(dev, write, fault=fault).cut:
        return "did not cut"
    got = FRecord.read(dev)
    if got.content() not in (old.content(), new.content()):
        return f"read {got}, neither old {old} nor new {new}"
    st = dev.status()
    if not (st.found and st.active in (0, 1) and st.slots[st.active].confirmed):
        return f"boot state {st}"
    again = replies(smp(dev, write))
    if "rc" in again[0]:
        return f"re-run refused: {again}"
    done = FRecord.read(dev)
    if done.content()[2:] != new.content()[2:]:
        return f"re-run left {done}, expected {new}"
    if boot(dev).version != "1.0.0":
        return "does not boot"
    return "safe"


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", WRITES)
def test_power_cut_during_a_factory_write(running: SimDevice, tmp_path: Path, name: str, place: str,
                                          record_property) -> None:  # type: ignore[no-untyped-def]
    dev, snap, ops, old, new = prepare(running, tmp_path, name, place)
    points = cut_points(ops)

    def one(args: tuple[int, tuple[int, str]]) -> str:
        n, (op, tear) = args
        d = SimDevice(tmp_path / f"p{n}", dev.lib, dev.geometry, heapsize=dev.heapsize)
        try:
            return check_cut(d, snap, WRITES[name][1], op, tear, old, new)
        finally:
            shutil.rmtree(d.workdir, ignore_errors=True)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, enumerate(points)))
    bad = [f"cut={op},tear={tear}: {r}" for (op, tear), r in zip(points, results) if r != "safe"]
    assert not bad, "\n".join(bad)
    record_property("summary", f"factory power-cut ({name}, {place}): {len(points)} points, all safe")


def test_power_cut_during_a_floor_write(running: SimDevice, tmp_path: Path) -> None:
    """The floor lives in the boot state record, a raise written twice: a cut leaves the old
    or the new floor (the new one once the first copy is whole)."""
    dev = fresh(running, tmp_path / "floor")
    write = smp_hex(WRITE, 3, {"ctr": 7})
    snap = tmp_path / "floor-snap"
    dev.snapshot(snap)
    trace = tmp_path / "floor-trace.txt"
    assert replies(smp(dev, write, trace=trace))[0]["ctr"] == 7
    ops = [line.split()[0] for line in trace.read_text().splitlines()]
    assert ops == ["W", "W"]
    for op, tear in cut_points(ops):
        dev.restore(snap)
        assert smp(dev, write, fault=f"cut={op}" + (f",tear={tear}" if tear else "")).cut
        assert dev.status().floor == (1 if op == 0 else 7)
        assert replies(smp(dev, write))[0]["ctr"] == 7 and dev.status().floor == 7


# no-repl: boot.start returns whatever the app raises; the service resets instead of raising.
_NO_REPL = """
import sys
import mpboot_keys
import sim_config
from mpboot import boot
from mpboot.smp import service
from mpboot.ports import unix as port

cfg, chip, policy = sim_config.load(sys.argv[1])
r = boot.start(port, sim_config.areas(cfg, chip), mpboot_keys.KEYS, **policy)
print("RETURNED", r)


class Broken:
    def readinto(self, buf):
        raise RuntimeError("link died")

    def write(self, b):
        pass

    def wait(self, ms):
        pass


def reset():
    print("RESET")
    sys.exit(0)


port.reset = reset
service.run(port, Broken())
"""


@pytest.mark.parametrize("raises", ["SystemExit(7)", "KeyboardInterrupt", "ValueError('app')"])
def test_no_repl(running: SimDevice, tmp_path: Path, rsa2048: SigningKey, raises: str) -> None:
    dev = fresh(running, tmp_path / "norepl")
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text(f"import mpboot\nmpboot.confirm()\nprint('APP up')\nraise {raises}\n")
    path = tmp_path / "raising.bin"
    path.write_bytes(sign_app(pack_app(app), rsa2048, "2.0.0"))
    installed(dev.install(path, "permanent"))
    script = tmp_path / "norepl.py"
    script.write_text(_NO_REPL)

    def power_on() -> Any:
        return upy.run([script, dev.config], path=[dev.lib], heapsize="4m")

    # Without the policy the exception ends boot.py (SystemExit: the process exits with it).
    plain = power_on()
    assert "APP up" in plain.stdout and "RETURNED" not in plain.stdout
    if raises.startswith("SystemExit"):
        assert plain.returncode == 7
    else:
        assert plain.returncode != 0 and raises.split("(")[0] in plain.stderr + plain.stdout
    assert all("rc" not in r for r in replies(smp(dev, smp_hex(WRITE, 4, {**NO_POLICY, "no-repl": True}))))
    run = power_on()
    assert run.returncode == 0, run.stderr
    assert "APP up" in run.stdout and "RETURNED True" in run.stdout
    assert raises.split("(")[0] in run.stdout  # printed, not raised
    # The service loop failed: the board resets instead of raising.
    assert "link died" in run.stdout and run.stdout.rstrip().endswith("RESET")
