"""Delivering trust records and reading trust state (docs/KEYS.md section 5, docs/PROTOCOL.md
group 64 command 6): the device's handler on MicroPython (firmware/mpboot/smp/trust_mgmt.py,
through `Server.handle` in tests/device/dev_smp.py, the Session harness of test_smp_server:
every reply well formed and canonical CBOR), the host client and `mpboot trust push|show`
against `mpboot sim`, and power cuts during a push on the simulated device.

Records are built and signed with the host's trust library (mpboot.trust). The device's
frozen roots are conftest's trusted keys (TEST-ONLY-rsa2048 and -rsa3072, root set version 1,
thresholds 1); rotations move it to TEST-ONLY-root-a (version 2), then root-b (version 3)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import KEYS_DIR, signing_key, trusted_public_keys
from mpboot.errors import ImageErrorCode, TrustErrorCode, TrustRefused
from mpboot.keys import SignatureScheme, SigningKey
from mpboot.sim import SimDevice
from mpboot.smp import Group, Op, SMPClient
from mpboot.transport.serial import SerialTransport
from mpboot.trust import Certificate, RevocationRecord, RootRecord, sign_envelope
from simkit import make_app, sign_app
from clikit import assert_error, assert_ok, run
from simserve import SimProcess, ok
from test_smp_server import READ, SECTOR, SIZE, V1, V2, WRITE, A, Reply, Session, image, packet

G = 64  # the mpboot group
CMD = 6  # trust state / trust record
EUNKNOWN, EINVAL, EBADSTATE, ENOTSUP, EACCESSDENIED = 1, 3, 6, 8, 11
T = TrustErrorCode
V1_RC = {T.NO_TRUST_AREA: ENOTSUP, T.MALFORMED: EINVAL, T.SIGNATURES: EACCESSDENIED,
         T.NEW_SIGNATURES: EACCESSDENIED, T.STALE: EBADSTATE, T.REVOKED_ROOT: EACCESSDENIED,
         T.FLASH: EUNKNOWN, T.TOO_LARGE: EINVAL, T.CHUNK: EINVAL}
PSS = SignatureScheme.PSS
OLD = signing_key("TEST-ONLY-rsa2048.pem")  # a frozen root (version 1)
ROOT_A = signing_key("TEST-ONLY-root-a.pem")
ROOT_B = signing_key("TEST-ONLY-root-b.pem")
ROOT_C = signing_key("TEST-ONLY-root-c.pem")
FROZEN = [k.keyhash() for k in trusted_public_keys()]


def envelope(body: Any, *signers: SigningKey) -> bytes:
    return sign_envelope(body, list(signers), PSS)


def rotation(version: int, new: SigningKey, *signers: SigningKey) -> bytes:
    """Root set `version`: the one root `new`, thresholds 1."""
    return envelope(RootRecord(version, (new.public(),), 1, 1), *signers)


ROT2 = rotation(2, ROOT_A, OLD, ROOT_A)  # v1 -> v2: signed by a current root and the new one
ROT3 = rotation(3, ROOT_B, ROOT_A, ROOT_B)  # v2 -> v3
REVOKED_KEY = bytes(range(32))
# Revocations signed by root-a and root-b: a root threshold at version 2 and at version 3 (a
# signature by a key that is no current root is skipped).
REV1 = envelope(RevocationRecord(1, (REVOKED_KEY, ROOT_C.public().keyhash()), (7, 9)), ROOT_A, ROOT_B)
REV2 = envelope(RevocationRecord(2, (), (11,)), ROOT_A, ROOT_B)


def state(root_version: int = 1, roots: list[bytes] | None = None, revocation: int = 0,
          revoked_keys: list[bytes] | None = None, revoked_serials: list[int] | None = None) -> dict[str, Any]:
    """A trust state read as the device must answer it."""
    return {"root-version": root_version, "threshold": 1, "image-threshold": 1,
            "roots": FROZEN if roots is None else roots, "revocation": revocation,
            "revoked-keys": revoked_keys or [], "revoked-serials": revoked_serials or []}


V2_STATE = state(2, [ROOT_A.public().keyhash()])
REV1_STATE = {**V2_STATE, "revocation": 1, "revoked-keys": [REVOKED_KEY, ROOT_C.public().keyhash()],
              "revoked-serials": [7, 9]}


# --- the device's handler ---------------------------------------------------------------------


@pytest.fixture
def session(device, tmp_path: Path) -> Session:
    return Session(device, tmp_path)


def push(s: Session, record: bytes, *, chunk: int = 700, version: int = V2) -> list[Reply]:
    """A record's write requests as a client sends them when all goes well."""
    replies, off = [], 0
    while True:
        body: dict[str, Any] = {"off": off, "data": record[off : off + chunk]}
        if off == 0:
            body["len"] = len(record)
        replies.append(s.send(WRITE, G, CMD, body, version=version))
        off += chunk
        if off >= len(record):
            return replies


def both(s: Session, body: Any) -> list[Reply]:
    return [s.send(WRITE, G, CMD, body, version=v) for v in (V1, V2)]


def assert_trust_error(reps: list[Reply], code: TrustErrorCode) -> None:
    """The refusal in SMP v1 (rc + rsn "trust:R") and v2 (group 64 rc R): no flash touched."""
    for rep in reps:
        body = rep.body
        if rep.header[0] >> 3 == V1:
            assert body == {"rc": V1_RC[code], "rsn": f"trust:{int(code)}"}, body
        else:
            assert body == {"err": {"group": G, "rc": int(code)}}, body
        assert rep.ops == 0


def refusal(reps: list[Reply]) -> list[Reply]:
    """The last request of a push (where a record is refused) in both SMP versions."""
    return [reps[-1]]


def pushed(reps: list[Reply], record: bytes, root_version: int, revocation: int) -> None:
    *first, last = reps
    for rep, off in zip(first, range(700, len(record), 700), strict=True):
        assert rep.body == {"off": off} and rep.ops == 0
    assert last.body == {"off": len(record), "revocation": revocation, "root-version": root_version}
    assert last.ops > 0  # the trust area written


def test_trust_records_on_the_device(session: Session) -> None:
    s = session
    s.dev("trust", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    before = s.send(READ, G, CMD)
    info0 = s.send(READ, G, 0)
    # Refused before anything was taken: the state stays version 1.
    orphan = both(s, {"off": 10, "data": b"x"})  # no record open
    too_large = both(s, {"off": 0, "len": 4097, "data": b"x"})
    largest = s.send(WRITE, G, CMD, {"off": 0, "len": 4096, "data": b"\0" * 100})  # taken: 4096 is the limit
    garbage = both(s, {"off": 0, "len": 10, "data": b"\xa0" * 10})
    cert = push(s, envelope(Certificate(5, ROOT_A.public()), OLD))
    no_current = push(s, rotation(2, ROOT_A, ROOT_A))  # not signed by a current root
    no_new = push(s, rotation(2, ROOT_A, OLD))  # not signed by the new root
    skipped = push(s, ROT3)  # version 3 on a device at 1
    # A chunk off the expected byte ends the record; data past `len` too.
    first = s.send(WRITE, G, CMD, {"off": 0, "len": len(ROT2), "data": ROT2[:100]})
    gap = s.send(WRITE, G, CMD, {"off": 200, "data": ROT2[200:300]})
    ended = s.send(WRITE, G, CMD, {"off": 100, "data": ROT2[100:200]})
    overrun = both(s, {"off": 0, "len": 10, "data": b"x" * 11})
    mistyped = [s.send(WRITE, G, CMD, body) for body in (
        {}, {"off": "0", "len": 5, "data": b"x"}, {"off": 0, "data": b"x"}, {"off": 0, "len": 5, "data": "text"},
        {"off": -1, "data": b"x"}, {"off": 0, "len": -5}, {"off": 0, "len": True, "data": b"x"})]
    after_refusals = s.send(READ, G, CMD)
    # The rotation in three chunks (a chain: v2 then v3 below), then a replay.
    rot2 = push(s, ROT2)
    after_rot2 = s.send(READ, G, CMD)
    replay_rot2 = push(s, ROT2)
    # Images: the old root's no longer verify, the new root's do.
    old_app = s.upload(image("1.2.0", seed="old"))[-1]
    new_app_image = image("1.1.0", seed="new", key="TEST-ONLY-root-a.pem")
    new_app = s.upload(new_app_image)
    # A revocation, its replay, and a rotation naming a key it revoked.
    rev1 = push(s, REV1, version=V1)
    replay_rev1 = both(s, {"off": 0, "len": len(REV1), "data": REV1})
    revoked_root = push(s, rotation(3, ROOT_C, ROOT_A, ROOT_C))
    info1 = s.send(READ, G, 0)
    factory1 = s.send(READ, G, 1)
    after_rev1 = s.send(READ, G, CMD)
    # The trust area fails to write: FLASH, and the state stays (in RAM and in flash).
    s.cmd("wfail", 1)
    rev2_fail = push(s, REV2)
    after_fail = s.send(READ, G, CMD)
    s.cmd("wfail", 0)
    s.cmd("boot")
    persisted = s.send(READ, G, CMD)
    rot3 = push(s, ROT3)
    rev2 = push(s, REV2)
    s.cmd("boot")
    final = s.send(READ, G, CMD)
    final_info = s.send(READ, G, 0)
    # A board without a trust area: reads show its frozen roots, writes are NO_TRUST_AREA.
    s.cmd("dev", s.dir / "trust.nor", SIZE, SECTOR, 1, "trust=0")
    s.cmd("server", -1)
    frozen = s.send(READ, G, CMD)
    no_area = both(s, {"off": 0, "len": len(ROT2), "data": ROT2[:100]})
    s.run()

    assert before.body == state() and after_refusals.body == state()
    assert info0.body["root-version"] == 1 and info0.body["revocation"] == 0
    for reps, code in ((orphan, T.CHUNK), (too_large, T.TOO_LARGE), (garbage, T.MALFORMED),
                       (refusal(cert), T.MALFORMED), (refusal(no_current), T.SIGNATURES),
                       (refusal(no_new), T.NEW_SIGNATURES), (refusal(skipped), T.STALE),
                       ([gap, ended], T.CHUNK), (overrun, T.TOO_LARGE), (refusal(replay_rot2), T.STALE),
                       (replay_rev1, T.STALE), (refusal(revoked_root), T.REVOKED_ROOT),
                       (no_area, T.NO_TRUST_AREA)):
        assert_trust_error(reps, code)
    assert largest.body == {"off": 100}
    assert first.body == {"off": 100}
    for rep in mistyped:
        assert rep.rc() == EINVAL and rep.ops == 0
    pushed(rot2, ROT2, 2, 0)
    assert after_rot2.body == V2_STATE
    assert old_app.v2() == 1  # image group UNKNOWN: the mpboot reason is v1's rsn (UNKNOWN_KEY)
    assert all(r.ok for r in new_app) and new_app[-1].body["off"] == len(new_app_image)
    pushed(rev1, REV1, 2, 1)
    assert info1.body["root-version"] == 2 and info1.body["revocation"] == 1
    assert factory1.body["root-version"] == 2 and factory1.body["revocation"] == 1
    assert after_rev1.body == REV1_STATE
    assert refusal(rev2_fail)[0].body == {"err": {"group": G, "rc": T.FLASH}}
    assert after_fail.body == persisted.body == REV1_STATE
    pushed(rot3, ROT3, 3, 1)
    pushed(rev2, REV2, 3, 2)
    assert final.body == state(3, [ROOT_B.public().keyhash()], 2, [], [11])
    assert final_info.body["root-version"] == 3 and final_info.body["revocation"] == 2
    assert frozen.body == state()


def test_old_root_image_refused_after_rotation_v1(session: Session) -> None:
    """The v1 refusal of an image by a rotated-out root names the reason (image:12)."""
    s = session
    s.dev("rotated", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    push(s, ROT2)
    old = s.upload(image("1.2.0", seed="old"), version=V1)[-1]
    s.run()
    assert old.v1() == (EINVAL, f"image:{int(ImageErrorCode.UNKNOWN_KEY)}")


# --- the host: client and CLI against `mpboot sim` --------------------------------------------


KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"


def pub(name: str) -> Path:
    return KEYS_DIR / f"TEST-ONLY-{name}.pub.pem"


def priv(name: str) -> Path:
    return KEYS_DIR / f"TEST-ONLY-{name}.pem"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Records as a release manager makes them (`mpboot key rotate-root`, `key revoke`, the
    same records as ROT2, ROT3, REV1 and REV2), a certificate, garbage, and signed apps."""
    out = tmp_path_factory.mktemp("trust-files")
    made = {name: out / f"{name}.rec" for name in ("rot2", "rot3", "rev1", "rev2", "cert", "garbage")}
    assert_ok(run("key", "rotate-root", "--version", 2, "--root", pub("root-a"), "--threshold", 1,
                  "--image-threshold", 1, "-k", priv("rsa2048"), "-k", priv("root-a"), "-o", made["rot2"]))
    assert_ok(run("key", "rotate-root", "--version", 3, "--root", pub("root-b"), "--threshold", 1,
                  "--image-threshold", 1, "-k", priv("root-a"), "-k", priv("root-b"), "-o", made["rot3"]))
    assert_ok(run("key", "revoke", "--number", 1, "--pubkey", pub("root-c"), "--key-hash", REVOKED_KEY.hex(),
                  "--serial", 7, "--serial", 9, "-k", priv("root-a"), "-k", priv("root-b"), "-o", made["rev1"]))
    made["rev2"].write_bytes(REV2)
    made["cert"].write_bytes(envelope(Certificate(5, ROOT_A.public()), OLD))
    made["garbage"].write_bytes(b"\xa1\x01\x02")
    app = make_app(out / "app", "app", confirm=True)
    for name, version, key in (("old", "1.0.0", OLD), ("old2", "2.0.0", OLD), ("new", "2.0.0", ROOT_B)):
        made[name] = out / f"{name}.bin"
        made[name].write_bytes(sign_app(app, key, version))
    return made


def trust_json(port: list[str]) -> dict[str, Any]:
    return json.loads(ok("trust", "show", *port, "--json"))


def test_trust_push_and_show_through_the_cli(tmp_path: Path, files: dict[str, Path]) -> None:
    sim = SimProcess(tmp_path / "dev", [KEY])
    try:
        sim.wait_for(r"serving SMP")
        port = ["--port", sim.path]
        frozen = trust_json(port)
        assert frozen == {"root_version": 1, "threshold": 1, "image_threshold": 1,
                          "roots": [OLD.public().keyhash().hex()], "revocation": 0, "revoked_keys": [],
                          "revoked_serials": []}
        st = json.loads(ok("state", *port, "--json"))
        assert (st["root_version"], st["revocation"]) == (1, 0)
        assert "root set version 1" in ok("trust", "show", *port) and "none taken" in ok("trust", "show", *port)
        assert "not marked" in ok("flash", files["old"], *port)  # the frozen root's image: taken

        # A chain of rotations in one push, in order.
        out = ok("trust", "push", files["rot2"], files["rot3"], *port)
        assert f"pushed {files['rot2']} (root record version 2)" in out
        assert "root set version 3, revocation 0" in out
        after = trust_json(port)
        assert after["root_version"] == 3 and after["roots"] == [ROOT_B.public().keyhash().hex()]
        # The old root's image is refused on update, the new root's taken.
        assert_error(run("flash", files["old2"], *port), 1, "not trusted")
        ok("flash", files["new"], *port)

        out = ok("trust", "push", files["rev1"], *port)
        assert "root set version 3, revocation 1" in out
        held = trust_json(port)
        assert held["revocation"] == 1 and held["revoked_serials"] == [7, 9]
        shown = ok("trust", "show", *port)
        assert "revocation 1: 2 keys and 2 certificate serials revoked" in shown and "serial 9" in shown

        # Replays: STALE, one line, exit 1, nothing changed.
        for name in ("rot2", "rot3", "rev1"):
            r = run("trust", "push", files[name], *port)
            assert_error(r, 1, "stale", "trust error 20 STALE", str(files[name]))
            assert r.stdout == ""
        assert trust_json(port) == held
        # Files that are no record: refused on the host before the port opens.
        for name, words in (("cert", "a certificate"), ("garbage", "does not parse")):
            assert_error(run("trust", "push", files[name], *port), 1, words)
        assert_error(run("trust", "push", tmp_path / "missing.rec", *port), 2, "no such file")
        # A chain stopped at its first refusal: the records before it stay applied.
        r = run("trust", "push", files["rev2"], files["rev1"], *port)
        assert_error(r, 1, "stale")
        assert "revocation 2" in r.stdout
        st = json.loads(ok("state", *port, "--json"))
        assert (st["root_version"], st["revocation"]) == (3, 2)
        assert "root set version 3, revocation 2" in ok("state", *port)

        # The device's own refusals over the link, mapped once to TrustRefused.
        async def client_checks() -> list[TrustRefused]:
            refusals = []
            async with SMPClient(SerialTransport(sim.path)) as client:
                for attempt in (client.trust_push(b"\xa1\x01\x02"), client.trust_push(bytes(5000)),
                                client.request(Group.MPBOOT, CMD, Op.WRITE, {"off": 7, "data": b"x"}),
                                client.trust_push(REV1)):
                    with pytest.raises(TrustRefused) as err:
                        await attempt
                    refusals.append(err.value)
                info = await client.trust_show()
                assert (info.root_version, info.revocation, info.revoked_serials) == (3, 2, (11,))
            return refusals

        got = asyncio.run(client_checks())
        assert [e.code for e in got] == [T.MALFORMED, T.TOO_LARGE, T.CHUNK, T.STALE]
        assert all(e.rsn == f"trust:{int(e.code)}" and e.rc is not None for e in got)
        assert "refused by the device" in str(got[0])
    finally:
        sim.stop()


def test_trust_commands_usage(files: dict[str, Path]) -> None:
    assert_error(run("trust", "push", files["rot2"]), 2, "which device?")
    r = run("trust", "push", "--port", "/dev/null")
    assert r.exit_code == 2 and "RECORD" in r.stderr  # click's usage error
    for args in (("trust", "--help"), ("trust", "push", "--help"), ("trust", "show", "--help")):
        assert_ok(run(*args))


def test_cli_records_are_the_library_records(files: dict[str, Path]) -> None:
    """`mpboot key` writes what mpboot.trust builds (the device tests use the library's)."""
    from mpboot.trust import decode_signed

    for name, record in (("rot2", ROT2), ("rot3", ROT3), ("rev1", REV1)):
        assert decode_signed(files[name].read_bytes()).body == decode_signed(record).body


# --- power cuts -------------------------------------------------------------------------------


def push_packets(record: bytes, chunk: int = 80) -> list[str]:
    """The push's request packets in hex, for sim_device's `smp` command: each argument under
    256 characters (the MicroPython unix port aborts on a longer command-line argument)."""
    out, off, seq = [], 0, 0
    while off < len(record):
        body: dict[str, Any] = {"off": off, "data": record[off : off + chunk]}
        if off == 0:
            body["len"] = len(record)
        seq += 1
        out.append(packet(WRITE, G, CMD, body, seq=seq).hex())
        off += chunk
    return out


def trust_line(dev: SimDevice) -> str:
    run = dev.run("layout")
    line = run.line("TRUST")
    assert line is not None, run.stdout
    return line


def test_power_cut_during_a_push(tmp_path: Path) -> None:
    """Cut at every flash operation of a rotation's push (torn too): the next power-on holds
    version 1 or 2, never anything else, and a push again completes (or is STALE: taken)."""
    dev = SimDevice.create(tmp_path / "dev", trusted_public_keys())
    pkts = push_packets(ROT2)
    base = tmp_path / "base"
    dev.snapshot(base)
    trace = tmp_path / "trace"
    ref = dev.run("smp", *pkts, trace=trace)
    assert ref.stdout.splitlines()[-1].startswith("RSP "), ref.stdout
    ops = trace.read_text().split("\n")
    ops = [o for o in ops if o]
    assert ops and "version=2" in trust_line(dev)
    points = [(i, tear) for i, op in enumerate(ops) for tear in ({"W": ("", "half", "word"), "E": ("", "erase-half")}
                                                                  [op.split()[0]])]
    seen = set()
    for i, tear in points:
        dev.restore(base)
        run = dev.run("smp", *pkts, fault=f"cut={i}" + (f",tear={tear}" if tear else ""))
        assert run.cut, (i, tear, run.stdout)
        line = trust_line(dev)
        version = 2 if "version=2" in line else 1
        assert f"version={version} " in line and "revocation=0" in line, (i, tear, line)
        seen.add(version)
        again = dev.run("smp", *pkts).stdout.splitlines()[-1]
        assert again.startswith("RSP "), again
        assert "version=2" in trust_line(dev), (i, tear)
    assert 1 in seen  # cut before the record was whole: the old state


def test_private_trust_indices_match_mpboot_trust() -> None:
    """The SMP modules name the trust state's indices as private consts (no RAM); they must be
    mpboot.trust's."""
    import re

    from conftest import FIRMWARE

    def consts(path: Path, prefix: str) -> dict[str, int]:
        found = re.findall(rf"^{prefix}([A-Z_]+) = const\((\d+)\)", path.read_text(), re.M)
        return {name: int(v) for name, v in found}

    public = consts(FIRMWARE / "mpboot" / "trust.py", "")
    for module in ("trust_mgmt", "mpboot_mgmt", "factory_mgmt"):
        private = consts(FIRMWARE / "mpboot" / "smp" / f"{module}.py", "_")
        shared = {name: v for name, v in private.items() if name in public}
        assert {"ROOT_VERSION", "REVOCATION"} <= set(shared), module
        assert shared == {name: public[name] for name in shared}, module


def test_push_in_the_service_heap(session: Session) -> None:
    """A rotation and a near-largest revocation (16 keys, 16 serials, 8 signatures: 3.3 KB)
    pushed, read back, and an upload after them, in the heap the fuzz tests hold the SMP
    server to (test_smp_fuzz.HEAP; a push loads mpboot.records and smp/trust_mgmt, 8 and 2 KiB
    of bytecode in RAM on the unix port, frozen in flash on a board)."""
    from test_smp_fuzz import HEAP

    signers = [signing_key(f"TEST-ONLY-{n}.pem") for n in ("root-a", "root-b", "root-c", "root-d", "ci", "team",
                                                            "rsa2048", "rsa3072")]
    big = envelope(RevocationRecord(1, tuple(bytes([i]) * 32 for i in range(16)), tuple(range(1, 17))), *signers)
    assert 3000 < len(big) <= 4096
    s = session
    s.dev("heap", slots=(A, None))
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    s.cmd("snap", 0)
    reps = push(s, ROT2, chunk=1900) + push(s, big, chunk=1900) + [s.send(READ, G, CMD), s.send(READ, G, 0)]
    ups = s.upload(image("1.3.0", seed="heap", key="TEST-ONLY-root-a.pem"), chunk=1900)
    s.run(heapsize=HEAP)
    assert all(r.ok for r in reps + ups), [(i, r.body) for i, r in enumerate(reps + ups) if not r.ok]
    assert reps[-2].body["revocation"] == 1 and reps[-2].body["revoked-serials"] == list(range(1, 17))
