"""The device's SMP server (firmware/mpboot/smp/) on MicroPython over a NOR flash file.

Each test builds request packets on the host (cbor2 and the 8-byte header), runs them through
`Server.handle` in one MicroPython process (tests/device/dev_smp.py) and checks the responses:
every response must be well formed (header echoed, length right) and encoded canonically
(byte-identical to `cbor2.dumps(..., canonical=True)`), and every response a model exists for is
parsed with the `smp` package's pydantic models (smpclient's own; they forbid extra keys), the
interop check. Flash counters and area snapshots show which requests touched flash."""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from conftest import signing_key, trusted_public_keys
from mpboot.errors import ImageRejected
from mpboot.image import ImageHeader, ImageKind, class_uuid, parse_image, vendor_uuid, verify_image
from mpboot.sim import Geometry
from simkit import FlashFile, sign_app
from smp import enumeration_management as enm
from smp import image_management as img
from smp import os_management as osm

SIZE = 64 * 1024
SECTOR = 4096
SLOT = Geometry(SIZE, SECTOR).slot_size
READ, WRITE = 0, 2
V1, V2 = 0, 1
OS, IMG = 0, 1
# MGMT_ERR
EUNKNOWN, EINVAL, ENOENT, EBADSTATE, ENOTSUP, EBUSY = 1, 3, 5, 6, 8, 10
VENDOR = vendor_uuid("example.com")
OTHER_VENDOR = vendor_uuid("example.org")
CLASS = class_uuid("sensor", VENDOR)
ZEPHYR_RSN = ("header malformed", "no slot")  # img_mgmt's verbose reasons (v1 only)
OTHER_CLASS = class_uuid("display", VENDOR)


def image(version: str, *, payload: int = 9001, counter: int | None = 1, vendor_id: bytes | None = None,
          class_id: bytes | None = None, seed: str = "", key: str = "TEST-ONLY-rsa2048.pem",
          kind: ImageKind = ImageKind.APP, depends: tuple[tuple[int, str], ...] = ()) -> bytes:
    body = random.Random(seed or version).randbytes(payload)
    return sign_app(body, signing_key(key), version, security_counter=counter, vendor_id=vendor_id, class_id=class_id,
                    kind=kind, depends=depends)


def host_code(data: bytes) -> int:
    """The host verifier's refusal code for an image (the device must agree)."""
    try:
        verify_image(data, trusted_public_keys(), SLOT)
    except ImageRejected as err:
        return int(err.code)
    raise AssertionError("image verifies")


def digest(data: bytes) -> bytes:
    return parse_image(data).digest


def manifest(data: bytes) -> bytes:
    h = ImageHeader.unpack(data)
    start = h.hdr_size + h.img_size
    return data[start : start + h.protect_tlv_size]


def with_header(data: bytes, **changes: int) -> bytes:
    h = ImageHeader.unpack(data)
    fields = {k: getattr(h, k) for k in ("load_addr", "hdr_size", "protect_tlv_size", "img_size", "flags")}
    magic = changes.pop("magic", h.magic)
    fields.update(changes)
    return ImageHeader(**fields, version=h.version, magic=magic).pack() + data[32:]


def packet(op: int, group: int, cmd: int, body: Any = None, *, version: int = V2, seq: int = 0,
           raw: bytes | None = None, length: int | None = None, flags: int = 0) -> bytes:
    payload = raw if raw is not None else cbor2.dumps({} if body is None else body)
    n = len(payload) if length is None else length
    return struct.pack(">BBHHBB", op | version << 3, flags, n, group, seq, cmd) + payload


def record(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack(">I", len(data)) + data


class Reply:
    """One request and, after the run, the server's answer to it."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.raw: bytes | None = None
        self.line = ""
        self.ops = self.prog = self.erase = 0
        self.chg = ""
        self.reset = False

    def fill(self, line: str) -> None:
        words = line.split()
        assert words[0] == "R", line
        self.line = line
        self.raw = None if words[1] == "-" else bytes.fromhex(words[1])
        kv = dict(w.split("=") for w in words[2:])
        self.ops, self.prog, self.erase = int(kv["ops"]), int(kv["prog"]), int(kv["erase"])
        self.chg = kv["chg"]
        self.reset = kv["reset"] == "1"

    @property
    def header(self) -> tuple[int, ...]:
        assert self.raw is not None
        return struct.unpack(">BBHHBB", self.raw[:8])

    @property
    def body(self) -> dict:
        assert self.raw is not None, f"no response to {self.request.hex()}"
        return cbor2.loads(self.raw[8:])

    def model(self, cls: type) -> Any:
        return cls.loads(self.raw)

    def rc(self) -> int:
        """The MGMT_ERR rc of a generic error ({"rc": N}, v1 or v2)."""
        body = self.body
        assert "rc" in body and "err" not in body, body
        return body["rc"]

    def v1(self) -> tuple[int, str | None]:
        """(rc, rsn) of an SMP v1 error, parsed with the smp model of its group."""
        group = self.header[3]
        cls = {OS: osm.OSManagementErrorV1, IMG: img.ImageManagementErrorV1}.get(group)
        if cls is not None:
            m = self.model(cls)
            return int(m.rc), m.rsn
        body = self.body
        return body["rc"], body.get("rsn")

    def v2(self) -> int:
        """The group rc of an SMP v2 group error, parsed with the smp model of its group."""
        group = self.header[3]
        cls = {OS: osm.OSManagementErrorV2, IMG: img.ImageManagementErrorV2}[group]
        m = self.model(cls)
        assert int(m.err.group) == group
        return int(m.err.rc)

    @property
    def ok(self) -> bool:
        body = self.body
        return "err" not in body and not ("rc" in body and body["rc"] != 0)


def check_wellformed(rep: Reply) -> None:
    """Header echoed as the protocol says, exact length, canonical CBOR map, error shapes."""
    req = rep.request
    assert rep.raw is not None, f"no response to {req.hex()}"
    op, flags, length, group, seq, cmd = rep.header
    rop, _, _, rgroup, rseq, rcmd = struct.unpack(">BBHHBB", req[:8])
    assert op & 7 == (rop & 7) + 1, rep.line
    assert op >> 3 == min((rop >> 3) & 3, 1), rep.line
    assert (flags, group, seq, cmd) == (0, rgroup, rseq, rcmd), rep.line
    payload = rep.raw[8:]
    assert length == len(payload), rep.line
    body = cbor2.loads(payload)
    assert isinstance(body, dict)
    assert cbor2.dumps(body, canonical=True) == payload, f"not canonical: {payload.hex()} {body}"
    if "err" in body:
        assert set(body) == {"err"} and set(body["err"]) == {"group", "rc"}, body
        assert op >> 3 == V2 and body["err"]["group"] == group and body["err"]["rc"] > 0
    elif "rc" in body and set(body) <= {"rc", "rsn"}:
        assert isinstance(body["rc"], int) and body["rc"] > 0
        if "rsn" in body:
            # mpboot's machine-readable reasons, or Zephyr's verbose texts where none applies
            assert op >> 3 == V1 and (body["rsn"].split(":")[0] in ("image", "update", "factory", "trust", "zupload",
                                                                     "stage1", "probe")
                                      or body["rsn"] in ZEPHYR_RSN), body
        # The generic error shape parses with the smp v1 error model (as smpclient does).
        if group in (OS, IMG):
            cls = osm.OSManagementErrorV1 if group == OS else img.ImageManagementErrorV1
            hdr = struct.pack(">BBHHBB", op, flags, length, group, seq, 0) + payload  # cmd 0 exists
            cls.loads(hdr)


@dataclass
class Cmd:
    words: tuple[str, ...]
    line: str = ""

    @property
    def values(self) -> list[str]:
        words = self.line.split()
        assert words[1] == "OK", self.line
        return words[2:]


class Session:
    """Records for one dev_smp run: commands and request packets, in order."""

    def __init__(self, device, tmp_path: Path, name: str = "smp") -> None:
        self.device = device
        self.dir = tmp_path
        self.name = name
        self.items: list[Cmd | Reply] = []
        self.seq = 0
        self.checked: list[Reply] = []

    def cmd(self, *words: object) -> Cmd:
        c = Cmd(tuple(str(w) for w in words))
        self.items.append(c)
        return c

    def dev(self, name: str, *, slots: tuple[bytes | None, bytes | None] = (None, None), size: int = SIZE,
            vendor_id: bytes | None = None, class_id: bytes | None = None, downgrade: bool = True) -> FlashFile:
        flash = FlashFile(self.dir / f"{name}.nor", SECTOR, size)
        data = bytearray(b"\xff" * size)
        for s, content in enumerate(slots):
            if content is not None:
                data[s * flash.slot : s * flash.slot + len(content)] = content
        flash.path.write_bytes(data)
        Path(str(flash.path) + ".wear").write_bytes(bytes(4 * (size // SECTOR)))
        words: list[object] = ["dev", flash.path, size, SECTOR, 1]
        if vendor_id is not None:
            words.append(f"vendor={vendor_id.hex()}")
        if class_id is not None:
            words.append(f"class={class_id.hex()}")
        if not downgrade:
            words.append("downgrade=0")
        self.cmd(*words)
        return flash

    def raw(self, pkt: bytes, check: bool = True) -> Reply:
        rep = Reply(pkt)
        self.items.append(rep)
        if check:
            self.checked.append(rep)
        return rep

    def send(self, op: int, group: int, cmd: int, body: Any = None, *, version: int = V2, **kw: Any) -> Reply:
        self.seq = (self.seq + 1) % 256
        return self.raw(packet(op, group, cmd, body, version=version, seq=self.seq, **kw))

    def state(self, version: int = V2) -> Reply:
        return self.send(READ, IMG, 0, {}, version=version)

    def upload(self, data: bytes, *, chunk: int | list[int] = 1000, sha: bool = True, start: int = 0,
               end: int | None = None, version: int = V2, first: dict | None = None) -> list[Reply]:
        """Upload requests for data[start:end] as a client sends them when all goes well."""
        sizes = chunk if isinstance(chunk, list) else [chunk]
        end = len(data) if end is None else end
        replies, off, i = [], start, 0
        while off < end:
            n = min(sizes[i % len(sizes)], end - off)
            i += 1
            body: dict[str, Any] = {"off": off, "data": data[off : off + n]}
            if off == 0:
                body["len"] = len(data)
                if sha:
                    body["sha"] = hashlib.sha256(data).digest()
                body.update(first or {})
            replies.append(self.send(WRITE, IMG, 1, body, version=version))
            off += n
        return replies

    def run(self, heapsize: str = "256k") -> None:
        path = self.dir / f"{self.name}.in"
        blob = b"".join(record(b"C", " ".join(i.words).encode()) if isinstance(i, Cmd) else record(b"P", i.request)
                        for i in self.items)
        path.write_bytes(blob)
        out = self.device.run("dev_smp", path, heapsize=heapsize).splitlines()
        assert len(out) == len(self.items), out[-5:]
        for item, line in zip(self.items, out):
            if isinstance(item, Cmd):
                assert line.split()[0] == item.words[0], (line, item.words)
                item.line = line
            else:
                item.fill(line)
        for rep in self.checked:
            check_wellformed(rep)


@pytest.fixture
def session(device, tmp_path: Path) -> Session:
    return Session(device, tmp_path)


def images(rep: Reply) -> list[img.ImageState]:
    """The images list of a state response, through the smp model (booleans all present,
    splitStatus 0 as Zephyr sends it)."""
    m = rep.model(img.ImageStatesReadResponse)
    assert rep.body["splitStatus"] == 0 and m.splitStatus == 0, rep.body
    for entry in rep.body["images"]:
        assert set(entry) == {"image", "slot", "version", "hash", "bootable", "pending", "confirmed",
                              "active", "permanent"}, entry
        assert all(isinstance(entry[k], bool) for k in ("bootable", "pending", "confirmed", "active", "permanent"))
    return list(m.images)


def flags(state: img.ImageState) -> str:
    """The five booleans as letters: b(ootable) p(ending) c(onfirmed) a(ctive) P(ermanent)."""
    return "".join(c for c, v in zip("bpcaP", (state.bootable, state.pending, state.confirmed,
                                              state.active, state.permanent)) if v)


A = image("1.0.0", seed="A")
B = image("1.1.0+7", seed="B", payload=12001)


# --- OS group ---------------------------------------------------------------------------------


def test_os_group(session: Session) -> None:
    s = session
    s.dev("os", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    echo = [s.send(WRITE, OS, 0, {"d": text}, version=v) for text in ("hello", "", "h\u00e9llo \u2713" * 20)
            for v in (V1, V2)]
    echo_read = s.send(READ, OS, 0, {"d": "r"})
    echo_bad = [s.send(WRITE, OS, 0, body) for body in ({"d": 5}, {"d": b"bytes"})]
    echo_none = s.send(WRITE, OS, 0, {})  # Zephyr echoes "" when "d" is absent
    params = s.send(READ, OS, 6)
    params_empty = s.raw(packet(READ, OS, 6, raw=b""))  # an empty payload reads as {}
    params_asked = [s.send(READ, OS, 6, {"pipeline": v}) for v in (True, 1, False)]  # mpboot's question
    params_both = s.send(READ, OS, 6, {"pipeline": True, "deflate": True})
    info = {f: s.send(READ, OS, 7, {} if f is None else {"format": f}) for f in (None, "", "s", "sv", "a", "vs")}
    info_bad = [s.send(READ, OS, 7, {"format": "sx"}, version=v) for v in (V1, V2)]
    boot = s.send(READ, OS, 8)
    boot_other = s.send(READ, OS, 8, {"other": 1})  # no "query": the bootloader's name
    mode = s.send(READ, OS, 8, {"query": "mode"})
    no_answer = [s.send(READ, OS, 8, {"query": "nope"}, version=v) for v in (V1, V2)]
    bad_query = s.send(READ, OS, 8, {"query": 1})
    reset = s.send(WRITE, OS, 5)
    reset_force = s.send(WRITE, OS, 5, {"force": 1})
    after = s.send(READ, OS, 6)
    s.cmd("dev", s.dir / "os.nor", SIZE, SECTOR, 1, "downgrade=0")
    s.cmd("server", -1)
    mode_nd = s.send(READ, OS, 8, {"query": "mode"})
    info_rec = s.send(READ, OS, 7, {"format": "v"})
    s.run()

    for rep in echo:
        sent = cbor2.loads(rep.request[8:])["d"]
        assert rep.model(osm.EchoWriteResponse).r == sent
    assert echo_read.body == {"r": "r"}
    for rep in echo_bad:
        assert rep.rc() == EINVAL
    assert echo_none.body == {"r": ""}
    for rep in (params, params_empty, after, *params_asked[1:]):
        m = rep.model(osm.MCUMgrParametersReadResponse)  # (no extra keys: smpclient's model)
        assert (m.buf_size, m.buf_count) == (2048, 4)
    assert params_asked[0].body == {"buf_size": 2048, "buf_count": 4, "pipeline": 4}  # only when asked
    assert params_both.body == {"buf_size": 2048, "buf_count": 4, "pipeline": 4, "deflate": 10}
    outputs = {f: rep.model(osm.OSApplicationInfoReadResponse).output for f, rep in info.items()}
    assert outputs[None] == outputs[""] == outputs["s"] == "mpboot"
    assert outputs["sv"] == outputs["vs"] == "mpboot 1.0.0"
    fields = outputs["a"].split(" ")
    assert fields[0] == "mpboot" and fields[1] == b"mpboot-sim".hex() and fields[3] == "1.0.0"
    assert outputs["a"].endswith(" unix MicroPython 1.29.0"), outputs["a"]
    assert info_bad[0].v1() == (EINVAL, None)
    assert info_bad[1].v2() == osm.OS_MGMT_RET_RC.INVALID_FORMAT
    # Zephyr's MCUboot answers (mcumgr-toolkit picks its update flow by the name); the mode
    # alone, "no-downgrade" only when it is true.
    assert boot.model(osm.BootloaderInformationReadResponse).bootloader == "MCUboot"
    assert boot.body == boot_other.body == {"bootloader": "MCUboot"}
    assert mode.body == {"mode": 5}
    assert bad_query.rc() == EINVAL
    assert osm.MCUbootModeQueryResponse.model_validate(mode.body).mode == osm.MCUbootMode.DIRECT_XIP_WITH_REVERT
    assert mode_nd.body == {"mode": 5, "no-downgrade": True}
    assert no_answer[0].v1() == (ENOENT, None)
    assert no_answer[1].v2() == osm.OS_MGMT_RET_RC.QUERY_YIELDS_NO_ANSWER
    for rep in (reset, reset_force):
        rep.model(osm.ResetWriteResponse)
        assert rep.body == {} and rep.reset
    assert not after.reset and not params.reset
    assert info_rec.body == {"output": "none"}
    assert all(r.ops == 0 for r in s.items if isinstance(r, Reply))


def test_mpboot_group_device_info(session: Session) -> None:
    # Group 64 command 0: identity and update policy, canonical CBOR, for fleet tools.
    s = session
    s.dev("plain", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    plain = [s.send(READ, 64, 0, version=v) for v in (V1, V2)]
    write = s.send(WRITE, 64, 0, {})
    s.dev("ids", vendor_id=b"\x11" * 16, class_id=b"\x22" * 16, downgrade=False)
    s.cmd("server", -1)
    ids = s.send(READ, 64, 0)
    s.run()
    for rep in plain:
        # ctr: the floor rose to A's security counter (1) when A was confirmed; serial: no
        # identity provisioned yet (docs/FACTORY.md)
        assert rep.body == {"uid": b"mpboot-sim", "vid": None, "cid": None, "ctr": 1, "serial": None,
                            "no-downgrade": False, "root-version": 1, "revocation": 0, "deflate": 10}
        assert rep.raw is not None and rep.raw[8:] == cbor2.dumps(rep.body, canonical=True)
    assert write.rc() == ENOTSUP
    assert ids.body == {"uid": b"mpboot-sim", "vid": b"\x11" * 16, "cid": b"\x22" * 16, "ctr": 0,
                        "serial": None, "no-downgrade": True, "root-version": 1, "revocation": 0, "deflate": 10}


# --- enumeration group ------------------------------------------------------------------------


ENUM = 10
GROUPS = [0, 1, 10, 64]  # ascending: OS, image, enumeration, mpboot


def test_enum_group(session: Session) -> None:
    """Group 10 as Zephyr's enum_mgmt answers with details, names and handler counts on."""
    s = session
    s.dev("enum", slots=(A, None))
    s.cmd("server", 0)
    count = [s.send(READ, ENUM, 0, version=v) for v in (V1, V2)]
    listing = s.send(READ, ENUM, 1)
    single = [s.send(READ, ENUM, 2, {"index": i}) for i in range(len(GROUPS))]
    first = s.send(READ, ENUM, 2)  # no index: the first group
    too_large = [s.send(READ, ENUM, 2, {"index": i}, version=v) for i in (4, 65535) for v in (V1, V2)]
    bad_index = [s.send(READ, ENUM, 2, {"index": i}) for i in (65536, -1, "0", True)]
    details = s.send(READ, ENUM, 3)
    some = s.send(READ, ENUM, 3, {"groups": [64, 0, 5]})
    none_known = s.send(READ, ENUM, 3, {"groups": [5]})
    empty = s.send(READ, ENUM, 3, {"groups": []})
    not_list = s.send(READ, ENUM, 3, {"groups": 1})  # Zephyr skips a value that is no list
    bad_ids = [s.send(READ, ENUM, 3, {"groups": g}) for g in ([-1], ["os"], [0, None])]
    writes = [s.send(WRITE, ENUM, c) for c in range(4)]
    unknown = s.send(READ, ENUM, 4)
    s.run()

    for rep in count:
        assert rep.model(enm.GroupCountResponse).count == len(GROUPS)
    assert list(listing.model(enm.ListOfGroupsResponse).groups) == GROUPS
    for i, rep in enumerate(single):
        m = rep.model(enm.GroupIdResponse)
        assert m.group == GROUPS[i] and m.end is (True if i == len(GROUPS) - 1 else None)
    assert first.body == {"group": 0}
    for i, rep in enumerate(too_large):
        if i % 2:
            assert rep.model(enm.EnumManagementErrorV2).err.rc == enm.ENUM_MGMT_ERR.ENUM_MGMT_ERR_INDEX_TOO_LARGE
        else:
            assert rep.model(enm.EnumManagementErrorV1).rc == EUNKNOWN  # Zephyr's v1 translation
    assert all(rep.rc() == EINVAL for rep in bad_index)
    want = [{"group": 0, "name": "os mgmt", "handlers": 9}, {"group": 1, "name": "img mgmt", "handlers": 7},
            {"group": 10, "name": "enum mgmt", "handlers": 4}, {"group": 64, "name": "mpboot", "handlers": 9}]
    assert [d.model_dump() for d in details.model(enm.GroupDetailsResponse).groups] == want
    assert some.body == {"groups": [want[0], want[3]]}  # in the device's order
    assert none_known.body == {"groups": []}
    assert empty.body == not_list.body == details.body
    assert all(rep.rc() == EINVAL for rep in bad_ids)
    assert all(rep.rc() == ENOTSUP for rep in writes + [unknown])
    assert all(r.ops == 0 for r in s.items if isinstance(r, Reply))


# --- image state ------------------------------------------------------------------------------


def test_state_read(session: Session) -> None:
    s = session
    c = image("1.2.3+4", seed="C")
    s.dev("fresh")
    s.cmd("server", -1)
    fresh = [s.state(V1), s.state(V2)]
    s.dev("one", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    one = s.state()
    s.dev("two", slots=(A, c))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    two = s.state()
    s.cmd("mark", 1)
    s.cmd("server", 0)
    marked = s.state()
    s.cmd("boot")  # slot 1's test boot
    trial = s.state()
    # Served in recovery: two valid images; the active slot's digest is not recorded, slot 0's
    # is, so the next power-on boots slot 0 (its fallback).
    s.dev("rec", slots=(A, c))
    s.cmd("confirm", 0)
    s.cmd("set", "active=1")
    s.cmd("server", -1)
    rec = s.state()
    s.run()

    for rep in fresh:
        assert rep.body == {"images": [], "splitStatus": 0}
        assert images(rep) == []
    (e,) = images(one)
    assert (e.image, e.slot, e.version, bytes(e.hash)) == (0, 0, "1.0.0", digest(A))
    assert flags(e) == "bca"
    e0, e1 = images(two)
    assert (e1.slot, e1.version, bytes(e1.hash), flags(e1)) == (1, "1.2.3.4", digest(c), "b")
    assert flags(e0) == "bca"
    e0, e1 = images(marked)
    assert flags(e0) == "bca" and flags(e1) == "bp"
    assert trial.body["images"][1]["active"]
    e0, e1 = images(trial)
    # On its test boot: slot 1 runs unconfirmed; slot 0 is the confirmed image a reset
    # reverts to (Zephyr flags it confirmed only).
    assert flags(e1) == "ba" and flags(e0) == "bc"
    assert [flags(x) for x in images(rec)] == ["bpP", "b"]


def run_state(states: list[img.ImageState]) -> str:
    """What mcumgr-toolkit's firmware_update makes of the flags (its image_run_state::analyze,
    0.20.0): Stable, Pending, Testing, Unknown or Inconsistent."""
    def unique(flag: str) -> list[img.ImageState] | None:
        found = [x for x in states if getattr(x, flag)]
        return None if len(found) > 1 else found

    active, confirmed, pending = unique("active"), unique("confirmed"), unique("pending")
    if active is None or confirmed is None or pending is None:
        return "Inconsistent"
    if pending:
        return "Pending"
    if active and confirmed:
        return "Stable" if active[0].slot == confirmed[0].slot else "Testing"
    return "Stable" if active or confirmed else "Unknown"


def test_state_flags_in_every_state(session: Session) -> None:
    """The flags of each slot as Zephyr's img_mgmt reports them on a direct-XIP-with-revert
    device (docs/PROTOCOL.md, the flag table), with the running image in either slot, and
    what mcumgr-toolkit's state analysis makes of them."""
    s = session
    states: dict[str, Reply] = {}
    for run in (0, 1):
        new = 1 - run
        pair = (A, B) if run == 0 else (B, A)  # A runs, B is the update
        s.dev(f"flags-{run}", slots=pair)
        s.cmd("confirm", run)
        s.cmd("server", run)
        states[f"uploaded-{run}"] = s.state()  # not marked
        states[f"marked-{run}"] = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False})
        s.cmd("boot")
        states[f"trial-{run}"] = s.state()
        states[f"confirmed-{run}"] = s.send(WRITE, IMG, 0, {"confirm": True})
        s.dev(f"revert-{run}", slots=pair)
        s.cmd("confirm", run)
        s.cmd("mark", new)
        s.cmd("boot")  # the test boot, never confirmed
        s.cmd("boot")  # reset without a confirm: back to A
        states[f"reverted-{run}"] = s.state()
        s.dev(f"perm-{run}", slots=pair)
        s.cmd("confirm", run)
        s.cmd("server", run)
        states[f"permanent-{run}"] = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": True})
        s.cmd("boot")
        states[f"after-permanent-{run}"] = s.state()
    # In recovery (nothing runs): a factory-fresh state area boots the newest valid image; a
    # test mark, a permanent mark, a test mark with a confirmed image to fall back to.
    s.dev("rec-fresh", slots=(A, B))
    s.cmd("server", -1)
    states["rec-fresh"] = s.state()
    states["rec-marked"] = s.send(WRITE, IMG, 0, {"hash": digest(A), "confirm": False})
    s.dev("rec-perm", slots=(A, B))
    s.cmd("server", -1)
    states["rec-permanent"] = s.send(WRITE, IMG, 0, {"hash": digest(A), "confirm": True})
    s.dev("rec-fallback", slots=(A, B))
    s.cmd("confirm", 0)
    s.cmd("server", -1)
    states["rec-marked-fallback"] = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False})
    s.run()

    want = {  # state: (flags of slot `run`, where A was running, of the other: B's), toolkit's view
        "uploaded": (("bca", "b"), "Stable"),
        "marked": (("bca", "bp"), "Pending"),
        "trial": (("bc", "ba"), "Testing"),
        "confirmed": (("b", "bca"), "Stable"),
        "reverted": (("bca", "b"), "Stable"),
        "permanent": (("bca", "bpP"), "Pending"),
        "after-permanent": (("b", "bca"), "Stable"),
    }
    for run in (0, 1):
        for name, ((a, b), view) in want.items():
            got = images(states[f"{name}-{run}"])
            by_slot = {e.slot: flags(e) for e in got}
            assert (by_slot[run], by_slot[1 - run]) == (a, b), (name, run)
            assert run_state(got) == view, (name, run)
    rec = {name: [flags(e) for e in images(states[name])] for name in
           ("rec-fresh", "rec-marked", "rec-permanent", "rec-marked-fallback")}
    assert rec == {"rec-fresh": ["b", "bpP"], "rec-marked": ["bp", "b"], "rec-permanent": ["bpP", "b"],
                   "rec-marked-fallback": ["bc", "bp"]}
    assert all(run_state(images(states[name])) == "Pending" for name in rec)


def test_upload_then_test_boot_and_confirm(session: Session) -> None:
    s = session
    flash = s.dev("up", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    before = s.state()
    ups = s.upload(B, chunk=[509, 1000, 7, 1900, 64])
    listed = s.state()
    mark = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False})
    s.cmd("boot")
    trial = s.state()
    conf = s.send(WRITE, IMG, 0, {"confirm": True})
    again = s.send(WRITE, IMG, 0, {"confirm": True, "hash": digest(B)})
    state = s.cmd("state")
    s.cmd("boot")
    final = s.state()
    s.run()

    slot0 = flash.slot_bytes(0)
    assert slot0[: len(A)] == A
    assert [flags(e) for e in images(before)] == ["bca"]
    offsets = [u.model(img.ImageUploadWriteResponse) for u in ups]
    assert [o.off for o in offsets] == [cbor2.loads(u.request[8:])["off"] + len(cbor2.loads(u.request[8:])["data"])
                                        for u in ups]
    assert offsets[-1].off == len(B) and offsets[-1].match is True
    assert all(o.match is None for o in offsets[:-1])
    assert all(u.chg[0] == "0" for u in ups), "the running slot was written"
    assert ups[0].chg == "010" and ups[-1].ops >= 1  # (no state write: sessions persist at checkpoints)
    assert flash.slot_bytes(1)[: len(B)] == B
    _, e1 = images(listed)
    assert (e1.slot, bytes(e1.hash), e1.version, flags(e1)) == (1, digest(B), "1.1.0.7", "b")
    assert [flags(e) for e in images(mark)] == ["bca", "bp"]
    assert [flags(e) for e in images(trial)] == ["bc", "ba"]
    assert [flags(e) for e in images(conf)] == ["b", "bca"]
    assert [flags(e) for e in images(again)] == ["b", "bca"] and again.ops == 0
    assert state.values[:3] == ["1", "255", "255"]
    assert [flags(e) for e in images(final)] == ["b", "bca"]


def test_state_write_permanent_and_errors(session: Session) -> None:
    s = session
    s.dev("perm", slots=(A, B))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    running_test = [s.send(WRITE, IMG, 0, {"hash": digest(A), "confirm": False}, version=v) for v in (V1, V2)]
    unknown = [s.send(WRITE, IMG, 0, {"hash": bytes(32), "confirm": True}, version=v) for v in (V1, V2)]
    no_hash = [s.send(WRITE, IMG, 0, {"confirm": False}, version=v) for v in (V1, V2)]
    short_hash = [s.send(WRITE, IMG, 0, {"hash": digest(B)[:31], "confirm": c}) for c in (False, True)]
    bad_types = [s.send(WRITE, IMG, 0, body) for body in ({"hash": "text"}, {"confirm": 1}, {"hash": 5, "confirm": True})]
    confirm_running = s.send(WRITE, IMG, 0, {"confirm": True})  # already confirmed: no write
    perm = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": True})
    s.cmd("boot")
    booted = s.state()
    s.dev("rec", slots=(None, B))
    s.cmd("server", -1)
    rec_confirm = [s.send(WRITE, IMG, 0, {"confirm": True}, version=v) for v in (V1, V2)]
    s.run()

    for rep in running_test:  # a test mark of the confirmed running image: nothing to do
        assert rep.ok and [flags(e) for e in images(rep)] == ["bca", "b"], rep.body
    assert unknown[0].v1() == (ENOENT, None)
    assert unknown[1].v2() == img.IMG_MGMT_ERR.HASH_NOT_FOUND
    # A test mark without hash, or a hash that is not 32 bytes: Zephyr's INVALID_HASH.
    assert no_hash[0].v1() == (EINVAL, None) and no_hash[1].v2() == img.IMG_MGMT_ERR.INVALID_HASH
    assert all(r.v2() == img.IMG_MGMT_ERR.INVALID_HASH for r in short_hash)
    assert all(r.rc() == EINVAL for r in bad_types)
    assert confirm_running.ops == 0 and [flags(e) for e in images(confirm_running)] == ["bca", "b"]
    # Slot 1 boots next and stays (pending, permanent); slot 0 runs until then, confirmed.
    assert [flags(e) for e in images(perm)] == ["bca", "bpP"] and perm.chg == "001"
    assert [flags(e) for e in images(booted)] == ["b", "bca"]
    assert rec_confirm[0].v1() == (ENOENT, None)
    assert rec_confirm[1].v2() == img.IMG_MGMT_ERR.NO_IMAGE
    for rep in running_test + unknown + rec_confirm:
        assert rep.ops == 0


def test_state_write_checks_the_update_policy(session: Session) -> None:
    """Marking the other slot's image is an update: no downgrade where refused, the floor."""
    s = session
    old = image("1.0.0", seed="old", counter=2)
    low = image("1.0.0", seed="low", counter=1)
    new = image("1.1.0", seed="new", counter=2)
    s.dev("policy", slots=(new, old), downgrade=False)
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    down = [s.send(WRITE, IMG, 0, {"hash": digest(old), "confirm": c}, version=v)
            for c in (False, True) for v in (V1, V2)]
    state = s.cmd("state")
    s.dev("policy-allowed", slots=(new, low))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    listed = s.state()  # the floor (2) hides the old image (counter 1)
    floor = s.send(WRITE, IMG, 0, {"hash": digest(low), "confirm": False})
    allowed = s.send(WRITE, IMG, 0, {"hash": digest(new), "confirm": True})
    s.run()
    for rep in down:
        if rep.header[0] >> 3 == V1:
            assert rep.v1() == (EINVAL, "image:19")
        else:
            assert rep.v2() == img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER
        assert rep.ops == 0
    assert state.values[1] == "255"
    assert [e.slot for e in images(listed)] == [0]
    assert floor.v2() == img.IMG_MGMT_ERR.HASH_NOT_FOUND
    assert allowed.ok and allowed.ops == 0


def test_state_write_when_both_slots_hold_the_running_image(session: Session) -> None:
    """A flash of the image that runs puts it into the other slot too: both slots hold one
    hash. A test mark of it is a no-op success while the running copy is the confirmed image
    or on its test boot (it already is what the mark asks for); a confirm by it confirms the
    running copy. The reply lists the running copy as what it is, and no mark lands on the
    other copy."""
    s = session
    h = digest(B)
    confirmed = {}
    for run in (0, 1):  # the running copy is the confirmed image
        s.dev(f"same-{run}", slots=(B, B))
        s.cmd("confirm", run)
        s.cmd("server", run)
        test = [s.send(WRITE, IMG, 0, {"hash": h, "confirm": False}, version=v) for v in (V1, V2)]
        state = s.cmd("state")
        conf = s.send(WRITE, IMG, 0, {"hash": h, "confirm": True})
        confirmed[run] = (test, state, conf)
    # The running copy (slot 1) is on its test boot; slot 0's copy is the confirmed image.
    s.dev("same-trial", slots=(B, B))
    s.cmd("confirm", 0)
    s.cmd("mark", 1)
    s.cmd("boot")
    s.cmd("booted", 1)
    trial_test = [s.send(WRITE, IMG, 0, {"hash": h, "confirm": False}, version=v) for v in (V1, V2)]
    trial_state = s.cmd("state")
    trial_conf = s.send(WRITE, IMG, 0, {"hash": h, "confirm": True})
    conf_state = s.cmd("state")
    boot = s.cmd("boot")
    s.run()

    for run, (test, state, conf) in confirmed.items():
        want = ["bca", "b"] if run == 0 else ["b", "bca"]
        for rep in test + [conf]:
            assert rep.ok and rep.ops == 0, (run, rep.body)
            assert [flags(e) for e in images(rep)] == want, run
        assert state.values[:3] == [str(run), "255", "255"]  # active, no test mark, no trial
    for rep in trial_test:
        assert rep.ok and rep.ops == 0, rep.body
        assert [flags(e) for e in images(rep)] == ["bc", "ba"]
    assert trial_state.values[:3] == ["0", "255", "1"]  # still on its test boot, nothing marked
    assert [flags(e) for e in images(trial_conf)] == ["b", "bca"] and trial_conf.chg == "001"
    assert conf_state.values[:3] == ["1", "255", "255"]
    assert boot.values == ["1", "0"]  # the confirmed running copy boots, no test boot


def test_reflash_of_the_image_a_cut_test_flash_left_running(session: Session) -> None:
    """The field case: `mpboot flash --test` was cut after its test mark reached flash; the
    device test-booted the image from slot 1 and the app confirmed it. The same flash again
    uploads the image into slot 0 and marks it for test: that succeeds and writes nothing,
    the reply shows slot 1 running confirmed, and the next boot runs slot 1 as before."""
    s = session
    flash = s.dev("reflash", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    s.upload(B)
    s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False})  # the cut came after this
    s.cmd("boot")  # the test boot of slot 1
    s.cmd("booted", 1)
    s.send(WRITE, IMG, 0, {"confirm": True})  # the app's mpboot.confirm()
    again = s.upload(B)  # the same flash again: into slot 0, the slot not running
    mark = [s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False}, version=v) for v in (V1, V2)]
    state = s.cmd("state")
    boot = s.cmd("boot")
    s.run()

    assert again[-1].body == {"off": len(B), "match": True}
    assert flash.slot_bytes(0)[: len(B)] == B and flash.slot_bytes(1)[: len(B)] == B
    for rep in mark:
        assert rep.ok and rep.ops == 0, rep.body
        assert [flags(e) for e in images(rep)] == ["b", "bca"]
    assert state.values[:3] == ["1", "255", "255"]
    assert boot.values == ["1", "0"]


def test_test_mark_of_a_running_fallback(session: Session) -> None:
    """Where IMAGE_SETTING_TEST_TO_ACTIVE_DENIED still applies: the running image is neither
    the confirmed one nor on its test boot (it runs as a fallback) and no other slot holds its
    hash. When the other slot holds the same image, the mark goes to that copy (the reply
    lists it pending); in recovery, to the lower slot holding it."""
    s = session
    s.dev("fallback", slots=(A, B))
    s.cmd("confirm", 0)
    s.cmd("confirm", 1)  # slot 1 holds the confirmed image; slot 0 runs as its fallback
    s.cmd("server", 0)
    denied = [s.send(WRITE, IMG, 0, {"hash": digest(A), "confirm": False}, version=v) for v in (V1, V2)]
    s.dev("fallback-same", slots=(B, B))
    s.cmd("confirm", 1)
    s.cmd("server", 0)
    other = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False})
    other_state = s.cmd("state")
    s.dev("recovery-same", slots=(B, B))
    s.cmd("server", -1)
    rec = s.send(WRITE, IMG, 0, {"hash": digest(B), "confirm": False})
    rec_state = s.cmd("state")
    s.run()

    assert denied[0].v1() == (EINVAL, None)
    assert denied[1].v2() == img.IMG_MGMT_ERR.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED
    assert all(rep.ops == 0 for rep in denied)
    assert other.ok and other.chg == "001"
    assert [flags(e) for e in images(other)] == ["bca", "bpP"]
    assert other_state.values[:3] == ["1", "1", "255"]  # the test mark is on slot 1
    assert rec.ok and [flags(e) for e in images(rec)] == ["bp", "b"]
    assert rec_state.values[:3] == ["255", "0", "255"]


def test_confirm_through_mpboot_confirm_when_booted(session: Session) -> None:
    s = session
    s.dev("booted", slots=(A, B))
    s.cmd("confirm", 0)
    s.cmd("mark", 1)
    s.cmd("boot")
    s.cmd("booted", 1)  # as mpboot.boot.run sets it for a test boot
    conf = s.send(WRITE, IMG, 0, {"confirm": True})
    again = s.send(WRITE, IMG, 0, {"confirm": True})
    state = s.cmd("state")
    s.run()
    assert [flags(e) for e in images(conf)] == ["b", "bca"] and conf.chg == "001"
    assert again.ops == 0
    assert state.values[:3] == ["1", "255", "255"]


# --- upload -----------------------------------------------------------------------------------


def test_wrong_offsets_and_overrun(session: Session) -> None:
    s = session
    flash = s.dev("off", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    no_session = [s.send(WRITE, IMG, 1, {"off": 100, "data": b"x"}, version=v) for v in (V1, V2)]
    first = s.upload(B, chunk=509, end=509)
    wrong = [s.send(WRITE, IMG, 1, {"off": off, "data": B[off : off + 100]}) for off in (100, 1000, 508, 510, 10**12)]
    rest = s.upload(B, chunk=1500, start=509, end=len(B) - 10)
    overrun = [s.send(WRITE, IMG, 1, {"off": len(B) - 10, "data": B[-10:] + b"\0"}, version=v) for v in (V1, V2)]
    last = s.send(WRITE, IMG, 1, {"off": len(B) - 10, "data": B[-10:]})
    closed = [s.send(WRITE, IMG, 1, {"off": len(B), "data": b"x"}, version=v) for v in (V1, V2)]
    missing = [s.send(WRITE, IMG, 1, body) for body in ({"off": 0}, {"data": b"x"}, {"off": -1, "data": b"x"},
                                                        {"off": "0", "data": b"x"}, {"off": 1, "data": "text"})]
    no_len = [s.send(WRITE, IMG, 1, {"off": 0, "data": B[:512]}, version=v) for v in (V1, V2)]
    bad_sha = [s.send(WRITE, IMG, 1, {"off": 0, "data": B[:512], "len": len(B), "sha": b"short"}, version=v)
               for v in (V1, V2)]
    image2 = [s.send(WRITE, IMG, 1, {"off": 0, "data": B[:512], "len": len(B), "image": n}, version=v)
              for n in (2, 7) for v in (V1, V2)]
    image_bad = [s.send(WRITE, IMG, 1, {"off": 0, "data": B[:512], "len": len(B), "image": n}) for n in (-1, "1")]
    read_upload = s.send(READ, IMG, 1, {"off": 0, "data": b""})
    s.run()

    assert no_session[0].v1() == (EBADSTATE, "update:2")
    assert no_session[1].body == {"off": 0}  # v2: Zephyr answers the offset it expects
    assert first[0].body == {"off": 509}
    for rep in wrong:
        assert rep.model(img.ImageUploadWriteResponse).off == 509
        assert (rep.ops, rep.chg) == (0, "000")
    assert rest[-1].body == {"off": len(B) - 10}
    assert overrun[0].v1() == (EINVAL, "update:3")
    assert overrun[1].v2() == img.IMG_MGMT_ERR.INVALID_IMAGE_DATA_OVERRUN
    assert all(r.ops == 0 for r in overrun)
    assert last.body == {"off": len(B), "match": True}
    assert closed[0].v1() == (EBADSTATE, "update:2") and closed[1].body == {"off": 0}
    # No data at off 0: no header (Zephyr's INVALID_IMAGE_HEADER); no off: INVALID_OFFSET.
    assert missing[0].v2() == img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER
    assert missing[1].v2() == img.IMG_MGMT_ERR.INVALID_OFFSET
    for rep in missing[2:]:
        assert rep.rc() == EINVAL, rep.body
    assert no_len[0].v1() == (EINVAL, "header malformed") and no_len[1].v2() == img.IMG_MGMT_ERR.INVALID_LENGTH
    assert bad_sha[0].v1() == (EINVAL, None) and bad_sha[1].v2() == img.IMG_MGMT_ERR.INVALID_HASH
    # Images past the first (Zephyr numbers the update slot 0 or 1 on a one-image device).
    for i, rep in enumerate(image2):
        if i % 2:
            assert rep.v2() == img.IMG_MGMT_ERR.NO_FREE_SLOT
        else:
            assert rep.v1() == (EBADSTATE, "no slot")
    assert all(rep.rc() == EINVAL for rep in image_bad)
    assert read_upload.rc() == ENOTSUP
    for rep in no_len + bad_sha + image2 + image_bad + [read_upload] + missing + closed:
        assert rep.ops == 0
    assert flash.slot_bytes(1)[: len(B)] == B


def test_upload_image_number(session: Session) -> None:
    """`image` 0 and 1 both name the update slot (Zephyr on a one-image device: smpclient's
    upload(data, 1), smpmgr --slot 1, mcumgr-client slot=1, mcumgr-toolkit image=1): the
    slot not running, whichever that is; the running slot is never written."""
    s = session
    flashes = {}
    for run in (0, 1):
        for n in (0, 1):
            for v in (V1, V2):
                name = f"image{n}-run{run}-v{v}"
                flashes[name] = s.dev(name, slots=(A, None) if run == 0 else (None, A))
                s.cmd("confirm", run)
                s.cmd("server", run)
                ups = s.upload(B, chunk=1900, version=v, first={"image": n})
                flashes[name] = (flashes[name], run, ups, s.state())
    s.dev("image1-recovery", slots=(None, None))
    s.cmd("server", -1)
    rec = s.upload(B, chunk=1900, first={"image": 1})
    rec_state = s.state()
    s.run()
    for name, (flash, run, ups, state) in flashes.items():
        assert ups[-1].body == {"off": len(B), "match": True}, name
        assert all(u.chg[run] == "0" for u in ups), name  # the running slot: untouched
        assert flash.slot_bytes(1 - run)[: len(B)] == B and flash.slot_bytes(run)[: len(A)] == A
        assert {e.slot: e.version for e in images(state)} == {run: "1.0.0", 1 - run: "1.1.0.7"}
    assert rec[-1].body == {"off": len(B), "match": True}
    assert [e.slot for e in images(rec_state)] == [0]


def test_in_ram_resume(session: Session) -> None:
    s = session
    s.dev("resume", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    part = s.upload(B, chunk=1000, end=3000)
    again = s.upload(B, chunk=1000, end=1000)  # off 0, same sha and len: resumes
    rest = s.upload(B, chunk=1000, start=3000)
    # The same image again after it finished (its last reply lost, say): already done, and
    # nothing is opened (a new session would erase the verified image); the last chunk again
    # gets the same answer.
    done = s.upload(B, chunk=1000, end=1000)
    last = s.send(WRITE, IMG, 1, {"off": len(B) - 500, "data": B[-500:]})
    s.send(WRITE, IMG, 5, {"slot": 1})  # erased: what was done is gone
    # A new session replaces an open one when sha or len differ, or without sha.
    part2 = s.upload(B, chunk=1000, end=2000)
    other_len = s.send(WRITE, IMG, 1, {"off": 0, "data": B[:1000], "len": len(B) + 1,
                                       "sha": hashlib.sha256(B).digest()})
    other_sha = s.upload(B, chunk=1000, end=1000, first={"sha": bytes(32)})
    no_sha = s.upload(B, chunk=1000, end=1000, sha=False)
    s.run()
    assert part[-1].body == {"off": 3000}
    assert again[0].body == {"off": 3000} and (again[0].ops, again[0].chg) == (0, "000")
    assert rest[-1].body == {"off": len(B), "match": True}
    assert done[0].body == {"off": len(B), "match": True} and (done[0].ops, done[0].chg) == (0, "000")
    assert last.body == {"off": len(B)} and (last.ops, last.chg) == (0, "000")
    assert part2[-1].body == {"off": 2000}
    assert other_len.body == {"off": 1000}
    assert other_sha[0].body == {"off": 1000} and no_sha[0].body == {"off": 1000}


def test_pipeline_is_answered_only_when_asked(session: Session) -> None:
    """`pipeline: true` in an opening request gets the number of requests the device takes in
    flight (its buf_count) in the reply, whatever the opening leads to (a new session, a
    resumed one, an upload done already); nothing else carries it, so a stock client, which
    never asks, never sees a key it does not know (smpclient refuses unknown reply keys)."""
    s = session
    s.dev("pipeline", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    ask = {"pipeline": True}
    opened = s.upload(B, chunk=1000, end=2000, first=ask)
    resumed = s.upload(B, chunk=1000, start=0, end=1000, first=ask)
    later = s.send(WRITE, IMG, 1, {"off": 2000, "data": B[2000:3000], "pipeline": True})
    rest = s.upload(B, chunk=1000, start=3000)
    done = s.upload(B, chunk=1000, end=1000, first=ask)
    not_asked = s.upload(B, chunk=1000, end=1000, first={"sha": bytes(32)})
    s.run()
    assert [r.body for r in opened] == [{"off": 1000, "pipeline": 4}, {"off": 2000}]
    assert resumed[0].body == {"off": 2000, "pipeline": 4}
    assert later.body == {"off": 3000}
    assert rest[-1].body == {"off": len(B), "match": True}
    assert done[0].body == {"off": len(B), "match": True, "pipeline": 4}
    assert not_asked[0].body == {"off": 1000}


def test_persisted_resume_after_reset(session: Session) -> None:
    s = session
    size = 512 * 1024
    big = image("2.0.0", seed="big", payload=100_000)
    flash = s.dev("persist", slots=(A, None), size=size)
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    part = s.upload(big, chunk=1900, end=1900 * 22)  # past the first 32 KiB checkpoint
    s.cmd("boot")  # a reset: the session survives in the state record
    resumed = s.upload(big, chunk=1900, end=1900)
    rest = s.upload(big, chunk=1900, start=32768)
    listed = s.state()
    s.run()
    assert part[-1].body == {"off": 1900 * 22}
    assert resumed[0].body == {"off": 32768} and resumed[0].prog == 0
    assert rest[-1].body == {"off": len(big), "match": True}
    assert flash.slot_bytes(1)[: len(big)] == big
    assert [e.version for e in images(listed)] == ["1.0.0", "2.0.0"]


def test_refusals_at_offset_zero_write_nothing(session: Session, device, tmp_path: Path) -> None:
    a = image("2.1.3", counter=5, vendor_id=VENDOR, class_id=CLASS, seed="A")
    s = session
    flash = s.dev("refuse", slots=(a, None), vendor_id=VENDOR, class_id=CLASS, downgrade=False)
    s.cmd("confirm", 0)
    s.run()
    snapshot, wear = flash.bytes(), flash.wear()

    s2 = Session(device, tmp_path, "refuse2")
    s2.cmd("dev", flash.path, SIZE, SECTOR, 1, f"vendor={VENDOR.hex()}", f"class={CLASS.hex()}", "downgrade=0")
    s2.cmd("server", 0)
    good = image("2.2.0", counter=5, vendor_id=VENDOR, class_id=CLASS)
    over = SLOT - 0x200 - ImageHeader.unpack(good).protect_tlv_size - 3
    other = image("2.2.0", counter=5, vendor_id=OTHER_VENDOR, class_id=CLASS)
    other2 = image("2.2.0", counter=5, vendor_id=VENDOR, class_id=OTHER_CLASS)
    low = image("2.2.0", counter=4, vendor_id=VENDOR, class_id=CLASS)
    updater = image("2.2.0", counter=5, vendor_id=VENDOR, class_id=CLASS, kind=ImageKind.UPDATER)
    abi11 = image("2.2.0", counter=5, vendor_id=VENDOR, class_id=CLASS, depends=((255, "1.1.0"),))
    on_s1 = image("2.2.0", counter=5, vendor_id=VENDOR, class_id=CLASS, depends=((1, "1.0.0"),))
    cases = {
        # label: (image, extra fields at off 0, v1 rsn, v2 rc)
        "bad magic": (with_header(good, magic=0x96F3B83C), {}, "image:1", img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER_MAGIC),
        "short header": (good[:20], {"len": len(good)}, "image:4", img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER),
        "img_size over slot": (with_header(good, img_size=over), {}, "image:3", img.IMG_MGMT_ERR.INVALID_IMAGE_TOO_LARGE),
        "len over slot": (good, {"len": SLOT + 1}, "update:4", img.IMG_MGMT_ERR.INVALID_IMAGE_TOO_LARGE),
        "len short": (good, {"len": 600}, "update:4", img.IMG_MGMT_ERR.INVALID_LENGTH),
        "other vendor": (other, {"ptlv": manifest(other)}, "image:16", img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER),
        "other class": (other2, {"ptlv": manifest(other2)}, "image:17", img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER),
        "counter below floor": (low, {"ptlv": manifest(low)}, "image:18", img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER),
        "updater in the app's slots": (updater, {"ptlv": manifest(updater)}, "image:26",
                                       img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER),
        "needs firmware ABI 1.1": (abi11, {"ptlv": manifest(abi11)}, "image:27", img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER),
        "needs stage 1 (no stage-1 slots)": (on_s1, {"ptlv": manifest(on_s1)}, "image:27",
                                             img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER),
        "ptlv wrong size": (good, {"ptlv": manifest(good)[:-1]}, "image:5", img.IMG_MGMT_ERR.INVALID_TLV),
        "downgrade": (image("2.1.2+99", counter=5, vendor_id=VENDOR, class_id=CLASS), {}, "image:19",
                      img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER),
        "upgrade, same version": (image("2.1.3+1", counter=5, vendor_id=VENDOR, class_id=CLASS), {"upgrade": True},
                                  "image:19", img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER),
    }
    replies = {}
    for label, (data, extra, _, _) in cases.items():
        body = {"off": 0, "data": data[:1024], "len": len(data), "sha": hashlib.sha256(data).digest(), **extra}
        replies[label] = [s2.send(WRITE, IMG, 1, body, version=v) for v in (V1, V2)]
    state = s2.cmd("state")
    s2.run()
    for label, (_, _, rsn, rc) in cases.items():
        v1, v2 = replies[label]
        assert v1.v1() == (EINVAL, rsn), label
        assert v2.v2() == rc, label
        assert (v1.ops, v1.chg, v2.ops, v2.chg) == (0, "000", 0, "000"), label
    assert state.values[1] == "255"
    assert flash.bytes() == snapshot and flash.wear() == wear


def test_upgrade_flag_accepts_newer(session: Session) -> None:
    s = session
    s.dev("upgrade", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    ups = s.upload(B, chunk=1900, first={"upgrade": True})
    s.run()
    assert ups[-1].body == {"off": len(B), "match": True}


def test_verification_failure_at_the_end(session: Session) -> None:
    s = session
    flash = s.dev("fail", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    before = s.cmd("state")
    untrusted = image("1.1.0", seed="U", key="TEST-ONLY-rsa2048-untrusted.pem")
    corrupt = bytearray(image("1.1.0", seed="X"))
    corrupt[3000] ^= 1
    code = host_code(untrusted)
    assert code in range(11, 16)
    cases = [(untrusted, f"image:{code}", img.IMG_MGMT_ERR.UNKNOWN, True),
             (bytes(corrupt), "image:10", img.IMG_MGMT_ERR.INVALID_HASH, True),
             # an updater image, its protected TLVs not sent ahead: refused once it is whole
             (image("1.1.0", seed="K", kind=ImageKind.UPDATER), "image:26", img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER,
              True),
             (B, "image:10", img.IMG_MGMT_ERR.INVALID_HASH, False)]  # the sha sent is not B's
    runs = []
    for data, _, _, sha in cases:
        for v in (V1, V2):
            first = {} if sha else {"sha": hashlib.sha256(b"other").digest()}
            ups = s.upload(data, chunk=1900, version=v, first=first)
            after = s.send(WRITE, IMG, 1, {"off": len(data), "data": b"x"}, version=v)
            runs.append((ups, after))
    listed = s.state()
    after_state = s.cmd("state")
    s.cmd("boot")
    s.run()
    i = 0
    for data, rsn, rc, _ in cases:
        for v in (V1, V2):
            ups, after = runs[i]
            i += 1
            assert all(u.ok for u in ups[:-1])
            if v == V1:
                assert ups[-1].v1() == (EINVAL, rsn)
            else:
                assert ups[-1].v2() == rc
            # The session closed: v1 update:2, v2 the offset to start again from (Zephyr)
            if v == V1:
                assert after.v1() == (EBADSTATE, "update:2")
            else:
                assert after.body == {"off": 0}
            assert all(u.chg[0] == "0" for u in ups)
    assert flash.slot_bytes(0)[: len(A)] == A
    assert flash.wear()[: SLOT // SECTOR] == [0] * (SLOT // SECTOR)
    assert [flags(e) for e in images(listed)] == ["bca", "b"]  # B verifies; it was never marked
    assert after_state.values[:4] == before.values[:4]


def test_erase(session: Session) -> None:
    s = session
    flash = s.dev("erase", slots=(A, B))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    running = [s.send(WRITE, IMG, 5, {"slot": 0}, version=v) for v in (V1, V2)]
    bad = [s.send(WRITE, IMG, 5, {"slot": slot}, version=v) for slot in (2, -1, "1") for v in (V1, V2)]
    listed = s.state()
    erase = s.send(WRITE, IMG, 5)
    after = s.state()
    again = s.send(WRITE, IMG, 5, {"slot": 1})
    # On its test boot, nothing is erased (the other slot holds the image a reset reverts to).
    s.dev("erase-trial", slots=(A, B))
    s.cmd("confirm", 0)
    s.cmd("mark", 1)
    s.cmd("boot")
    trial = [s.send(WRITE, IMG, 5, {"slot": 0}, version=v) for v in (V1, V2)]
    s.run()
    # A slot in use: v1 mpboot's BUSY, v2 Zephyr's NO_FREE_SLOT.
    assert running[0].v1() == (EBUSY, "update:1") and running[1].v2() == img.IMG_MGMT_ERR.NO_FREE_SLOT
    # Slot 2: INVALID_SLOT (v1 EINVAL); -1 and "1" are no slot number at all (EINVAL).
    assert bad[0].v1() == (EINVAL, None) and bad[1].v2() == img.IMG_MGMT_ERR.INVALID_SLOT
    assert all(rep.rc() == EINVAL for rep in bad[2:])
    assert len(images(listed)) == 2
    erase.model(img.ImageEraseResponse)
    assert erase.body == {} and erase.chg == "010"
    assert [e.slot for e in images(after)] == [0]
    assert again.body == {} and again.ops == 0  # already erased: no erase operations
    assert trial[0].v1() == (EBUSY, "update:1") and trial[1].v2() == img.IMG_MGMT_ERR.NO_FREE_SLOT
    assert all(r.ops == 0 for r in running + bad + trial)
    assert flash.slot_bytes(0)[: len(A)] == A


def test_slot_info(session: Session) -> None:
    s = session
    s.dev("slots", slots=(A, None))
    s.cmd("server", -1)
    info = s.send(READ, IMG, 6)
    s.run()
    assert info.body == {"images": [{"image": 0, "slots": [{"slot": 0, "size": SLOT}, {"slot": 1, "size": SLOT}],
                                     "max_image_size": SLOT}]}


# --- packets and errors -----------------------------------------------------------------------


BAD_CBOR = {
    "truncated": bytes.fromhex("a16164"),  # {"d": ...} cut short
    "indefinite map": bytes.fromhex("bf6164616aff"),
    "indefinite text": bytes.fromhex("a161647f6161ff"),
    "tag": bytes.fromhex("c1a0"),
    "float": bytes.fromhex("a16164f93c00"),
    "undefined": bytes.fromhex("a16164f7"),
    "trailing": bytes.fromhex("a000"),
    "array at top": bytes.fromhex("80"),
    "int at top": bytes.fromhex("01"),
    "too deep": cbor2.dumps({"a": [[[[1]]]]}),
    "too many items": cbor2.dumps({"d": list(range(17))}),
    "too many keys": cbor2.dumps({str(i): i for i in range(17)}),
    # 16 arrays of 4 items each: every container within bounds, 81 items in all
    "too many items in all": cbor2.dumps({"a": [[0, 1, 2, 3]] * 16}),
    "repeated key": bytes.fromhex("a2616401616402"),
    "bytes key": bytes.fromhex("a141610a"),
    "array key": bytes.fromhex("a1800a"),
    "string past end": bytes.fromhex("a161647818616263"),
    "bad utf-8": bytes.fromhex("a1616462ffff"),
    # Text MicroPython's str() takes but strict decoders refuse (tests/test_cbor_text.py has them all)
    "overlong utf-8": bytes.fromhex("a1616462c080"),
    "utf-16 surrogate": bytes.fromhex("a1616463eda080"),
    "above U+10FFFF": bytes.fromhex("a1616464f4908080"),
    "truncated utf-8": bytes.fromhex("a161646241e2"),
    "overlong utf-8 key": bytes.fromhex("a162c0806164"),
    "reserved ai": bytes.fromhex("a161641c"),
    "huge length": bytes.fromhex("a161645bffffffffffffffff"),
}


def test_packet_and_cbor_errors(session: Session) -> None:
    s = session
    s.dev("errors", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    unknown = [s.send(READ, 9, 0, version=v) for v in (V1, V2)]
    unknown += [s.send(READ, OS, 2), s.send(READ, IMG, 3), s.send(WRITE, OS, 6), s.send(READ, OS, 5),
                s.send(WRITE, IMG, 6), s.send(READ, 64, 7), s.send(WRITE, 64, 1), s.send(READ, 64, 2)]
    bad = {label: [s.raw(packet(WRITE, OS, 0, raw=raw, version=v, seq=i)) for v in (V1, V2)]
           for i, (label, raw) in enumerate(BAD_CBOR.items())}
    ok_nested = s.send(WRITE, OS, 0, {"d": "x", "extra": [[[1]]], "n": -(2**64), "u": 2**64 - 1, "z": None})
    body = cbor2.dumps({"d": "abc"})
    longer = s.raw(packet(WRITE, OS, 0, raw=body, length=len(body) + 1))
    shorter = s.raw(packet(WRITE, OS, 0, raw=body, length=len(body) - 1))
    responses = [s.raw(packet(op, OS, 0, {"d": "x"}), check=False) for op in (1, 3, 4, 7)]
    short = [s.raw(bytes(n), check=False) for n in (0, 1, 7)]
    too_new = s.raw(packet(READ, OS, 6, version=2, seq=77))
    flagged = s.raw(packet(READ, OS, 6, flags=0x80))
    s.run()
    for rep in unknown:
        assert rep.rc() == ENOTSUP
        assert rep.ops == 0
    for label, reps in bad.items():
        for rep in reps:
            assert rep.rc() == EINVAL, (label, rep.body)
    assert ok_nested.body == {"r": "x"}
    assert longer.rc() == EINVAL and shorter.rc() == EINVAL
    for rep in responses + short:
        assert rep.raw is None, rep.line
    assert too_new.header[0] == 1 | V2 << 3 and too_new.header[4] == 77 and too_new.rc() == 13
    assert flagged.body["buf_size"] == 2048


def test_large_echo_is_bounded(session: Session) -> None:
    s = session
    s.dev("echo", slots=(None, None))
    s.cmd("server", -1, "buf=256")
    fits = s.send(WRITE, OS, 0, {"d": "x" * 200})
    too_big = s.send(WRITE, OS, 0, {"d": "x" * 300})
    s.run()
    assert fits.body == {"r": "x" * 200}
    assert too_big.rc() == 7  # EMSGSIZE
