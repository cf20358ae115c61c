"""`mpboot sync --repo URL`: images from a TUF repository (mpboot.tufsource), against real
HTTP servers on 127.0.0.1, and every attack of /work/notes/issue20-tuf.md section 4: each one
is refused (or ends within a bound), and nothing reaches a device's upload."""

from __future__ import annotations

import asyncio
import struct
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest

from clikit import assert_error, assert_ok, run
from mpboot.errors import (
    RepositoryErrorCode,
    RepositoryRefused,
    RepositoryUnavailable,
    UsageError,
)
from mpboot.keys import load_signing_key
from mpboot.smp import Group, ImageCmd, MgmtErrorCode, Op, OsCmd
from mpboot.smp.header import MpbootCmd
from mpboot.smp.messages import DeviceInfo, SlotState
from mpboot.sync import Found, NothingFor, Syncer, SyncOptions, SyncResult, plan
from mpboot.tufsource import TufSource, target_prefix
from simkit import make_app, sign_app
from tufkit import NOW, ROOT_SIGNERS, Mirror, TufRepo, dead_url, signer
from tuf.api.metadata import MetaFile

V = bytes.fromhex("1b4e28ba2fa111d2883f0016d3cca427")
C = bytes.fromhex("6fa459eaee8a3ca4894edb77e160355e")
V2 = bytes.fromhex("a1" * 16)
ROLE = "acme-thermo"
BOUND_S = 8.0  # generous: the timeouts below are 0.5-1.5 s


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    key = load_signing_key(Path(__file__).parent / "keys" / "TEST-ONLY-rsa2048.pem")
    app = make_app(tmp_path_factory.mktemp("app"), "tuf", confirm=True)
    return {v: sign_app(app, key, v, security_counter=1, vendor_id=V, class_id=C) for v in ("1.0.0", "1.2.0", "1.3.0")}


@pytest.fixture
def repo(tmp_path: Path, apps: dict[str, bytes]) -> TufRepo:
    """Root v1; targets delegating ROLE for V/C; 1.0.0 and 1.2.0 in ROLE; published."""
    r = TufRepo(tmp_path / "repo")
    r.delegate(ROLE, V, C)
    r.add(ROLE, "app-1.0.0.img", apps["1.0.0"])
    r.add(ROLE, "app-1.2.0.img", apps["1.2.0"])
    r.publish()
    return r


@pytest.fixture
def mirrors():
    made: list[Mirror] = []

    def make(folder: Path | None, mode: str = "serve") -> Mirror:
        m = Mirror(folder)
        m.mode = mode
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def open_source(tmp_path: Path):
    made: list[TufSource] = []

    def make(urls: list[str], root: bytes, *, cache: Path | None = None, timeout_s: float = 1.0,
             deadline_s: float = 1.5, warnings: list[str] | None = None) -> TufSource:
        s = TufSource(urls, root, cache or tmp_path / "cache", timeout_s=timeout_s, deadline_s=deadline_s,
                      warn=(warnings.append if warnings is not None else None))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def info(vendor_id: bytes | None = V, class_id: bytes | None = C, floor: int = 0) -> DeviceInfo:
    return DeviceInfo(b"\x01" * 8, vendor_id, class_id, floor, False)


def running(version: str = "1.0.0", h: bytes = b"\xee" * 32) -> SlotState:
    return SlotState(0, 0, version, h, True, False, True, True, False)


def refused(code: RepositoryErrorCode, fn: Any, *fragments: str) -> RepositoryRefused:
    with pytest.raises(RepositoryRefused) as exc:
        fn()
    assert exc.value.code is code, exc.value
    for f in fragments:
        assert f in str(exc.value), exc.value
    assert "\n" not in str(exc.value)
    return exc.value


# --- the happy path and the cache ----------------------------------------------------------------


def test_a_device_on_1_0_0_is_offered_1_2_0_downloaded_verified_and_checked(repo, mirrors, open_source, apps) -> None:
    m = mirrors(repo.dir)
    src = open_source([m.url], repo.root_bytes)
    assert src.refresh() == m.url
    offered = src.candidates(info())
    assert sorted((o.name, o.version, o.counter) for o in offered) == [("app-1.0.0.img", "1.0.0", 1),
                                                                      ("app-1.2.0.img", "1.2.0", 1)]
    assert not any(p.startswith("/targets/") for p in m.requests)  # planning needs no image bytes
    p = plan(offered, info(), running("1.0.0"))
    assert p.result is None and p.image is not None and p.image.name == "app-1.2.0.img"
    img = src.load(p.image)
    assert img.data == apps["1.2.0"] and img.hash == p.image.hash
    assert [r for r in m.requests if r.startswith("/targets/")] == [
        f"/targets/{target_prefix(V, C)}{p.image.target.hashes['sha256']}.app-1.2.0.img"]
    # another vendor/class: nothing; a device that reports no ids: nothing, by rule
    assert src.candidates(info(V2, C)) == []
    with pytest.raises(NothingFor, match="reports no vendor/class id"):
        src.candidates(info(None, None))


def test_a_second_run_takes_the_image_from_the_cache(repo, mirrors, open_source, apps) -> None:
    m = mirrors(repo.dir)
    first = open_source([m.url], repo.root_bytes)
    first.refresh()
    newest = max(first.candidates(info()), key=lambda o: o.key)
    first.load(newest)
    first.close()
    m.requests.clear()
    again = open_source([m.url], repo.root_bytes)
    again.refresh()
    img = again.load(max(again.candidates(info()), key=lambda o: o.key))
    assert img.data == apps["1.2.0"]
    assert not any(r.startswith("/targets/") for r in m.requests)
    assert "/metadata/timestamp.json" in m.requests  # (the metadata is refreshed every time)


def test_one_cache_one_process(repo, open_source, tmp_path) -> None:
    open_source(["http://127.0.0.1:9"], repo.root_bytes, cache=tmp_path / "c")
    with pytest.raises(UsageError, match="in use by another mpboot sync"):
        open_source(["http://127.0.0.1:9"], repo.root_bytes, cache=tmp_path / "c")
    with pytest.raises(UsageError, match="--root: not a TUF root.json"):
        open_source(["http://127.0.0.1:9"], repo.history[("timestamp", 1)], cache=tmp_path / "d")


# --- freshness and rollback ------------------------------------------------------------------------


def test_an_expired_timestamp_is_refused(repo, mirrors, open_source) -> None:
    repo.md["timestamp"].signed.expires = NOW - timedelta(hours=1)
    repo.write("timestamp")
    m = mirrors(repo.dir)
    refused(RepositoryErrorCode.EXPIRED, open_source([m.url], repo.root_bytes).refresh,
            "timestamp.json is expired", "stale or frozen mirror", m.url)


def test_a_frozen_mirror_is_passed_over_for_a_fresh_one(repo, mirrors, open_source, apps, tmp_path) -> None:
    # The frozen mirror kept an old, complete state whose timestamp has since expired.
    repo.md["timestamp"].signed.expires = NOW - timedelta(hours=1)
    repo.snapshot()
    repo.copy_to(tmp_path / "frozen")
    repo.md["timestamp"].signed.expires = NOW + timedelta(days=1)
    repo.add(ROLE, "app-1.3.0.img", apps["1.3.0"])
    repo.publish()
    frozen, good = mirrors(tmp_path / "frozen"), mirrors(repo.dir)
    warnings: list[str] = []
    src = open_source([frozen.url, good.url], repo.root_bytes, warnings=warnings)
    assert src.refresh() == good.url
    assert warnings == [f"{frozen.url}: timestamp.json is expired (a stale or frozen mirror); trying {good.url}"]
    assert max(o.version for o in src.candidates(info())) == "1.3.0"
    # the frozen one alone: refused
    refused(RepositoryErrorCode.EXPIRED, open_source([frozen.url], repo.root_bytes, cache=tmp_path / "c2").refresh)


@pytest.mark.parametrize("what", ["timestamp", "snapshot", "targets"])
def test_rolled_back_metadata_is_refused(repo, mirrors, open_source, what) -> None:
    m = mirrors(repo.dir)
    repo.publish()  # version 2 of everything
    seen = open_source([m.url], repo.root_bytes)
    seen.refresh()  # the client has seen it
    seen.close()
    if what == "timestamp":  # the old timestamp (still unexpired) served again
        (repo.dir / "metadata" / "timestamp.json").write_bytes(repo.history[("timestamp", 1)])
        fragment = "timestamp version 1 must be >= 2"
    elif what == "snapshot":  # a new timestamp naming the old snapshot
        repo.md["timestamp"].signed.snapshot_meta = MetaFile(1)
        repo.write("timestamp")
        fragment = "snapshot version must be >= 2"
    else:  # a new snapshot naming the old targets
        repo.md["snapshot"].signed.meta["targets.json"] = MetaFile(1)
        repo.write("snapshot")
        repo.md["timestamp"].signed.snapshot_meta = MetaFile(repo.md["snapshot"].signed.version)
        repo.write("timestamp")
        fragment = "targets.json version 1, got 2"
    refused(RepositoryErrorCode.ROLLBACK, open_source([m.url], repo.root_bytes).refresh, fragment)


def test_a_stale_second_mirror_is_behind_what_was_seen(repo, mirrors, open_source, tmp_path) -> None:
    repo.copy_to(tmp_path / "stale")  # version 1 of everything, unexpired
    repo.publish()
    fresh, stale = mirrors(repo.dir), mirrors(tmp_path / "stale")
    s = open_source([fresh.url], repo.root_bytes)
    s.refresh()
    s.close()
    st = open_source([stale.url], repo.root_bytes)
    refused(RepositoryErrorCode.ROLLBACK, st.refresh, "behind what a mirror served before")
    st.close()
    warnings: list[str] = []
    assert open_source([stale.url, fresh.url], repo.root_bytes, warnings=warnings).refresh() == fresh.url
    assert len(warnings) == 1 and warnings[0].startswith(f"{stale.url}: ") and "version 1 must be >= 2" in warnings[0]


# --- the targets' bytes and custom metadata ------------------------------------------------------


@pytest.mark.parametrize("how", ["differ", "longer"])
def test_target_bytes_not_those_of_the_metadata_are_refused(repo, mirrors, open_source, how) -> None:
    m = mirrors(repo.dir)
    src = open_source([m.url], repo.root_bytes)
    src.refresh()
    newest = max(src.candidates(info()), key=lambda o: o.key)
    f = repo.target_file(newest.target)
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if how == "differ" else data + b"more")
    if how == "differ":
        refused(RepositoryErrorCode.MISMATCH, lambda: src.load(newest), "hash")
    else:
        refused(RepositoryErrorCode.TOO_LARGE, lambda: src.load(newest), "more bytes than allowed")
    assert not list((src.cache / "targets").iterdir())  # nothing kept


def test_custom_metadata_that_lies_is_refused_after_the_download(repo, mirrors, open_source, apps) -> None:
    from tufkit import custom_for

    lie = custom_for(apps["1.3.0"])
    lie["mpboot"]["counter"] = 9
    repo.add(ROLE, "app-1.3.0.img", apps["1.3.0"], custom=lie)
    bad = custom_for(apps["1.0.0"])
    del bad["mpboot"]["image_hash"]
    repo.add(ROLE, "app-1.0.0-bad.img", apps["1.0.0"], custom=bad)
    repo.publish()
    m = mirrors(repo.dir)
    warnings: list[str] = []
    src = open_source([m.url], repo.root_bytes, warnings=warnings)
    src.refresh()
    offered = {o.name: o for o in src.candidates(info())}
    assert sorted(offered) == ["app-1.0.0.img", "app-1.2.0.img", "app-1.3.0.img"]
    assert warnings == [f"repo: {target_prefix(V, C)}app-1.0.0-bad.img: bad custom metadata "
                        "(image_hash is not 64 lower-case hex digits): ignored"]
    refused(RepositoryErrorCode.BAD_CUSTOM, lambda: src.load(offered["app-1.3.0.img"]),
            "counter 9 in the metadata, 1 in the image")


def test_a_role_listing_targets_outside_its_scope_gets_nothing_in(repo, mirrors, open_source, apps) -> None:
    other = target_prefix(V2, C) + "evil.img"
    deeper = target_prefix(V, C) + "sub/evil.img"
    repo.add(ROLE, "evil.img", apps["1.3.0"], path=other)
    repo.add(ROLE, "evil.img", apps["1.3.0"], path=deeper)
    repo.publish()
    m = mirrors(repo.dir)
    warnings: list[str] = []
    src = open_source([m.url], repo.root_bytes, warnings=warnings)
    src.refresh()
    assert src.candidates(info(V2, C)) == []  # the other vendor's device: not found
    assert sorted(o.name for o in src.candidates(info())) == ["app-1.0.0.img", "app-1.2.0.img"]
    assert sorted(warnings) == sorted([f"repo: role {ROLE} lists {other}, outside its delegated paths: ignored",
                                       f"repo: role {ROLE} lists {deeper}, outside its delegated paths: ignored"])


# --- thresholds and keys ----------------------------------------------------------------------------


def test_targets_signed_by_a_key_not_in_root_is_refused(repo, mirrors, open_source) -> None:
    repo.write("targets", signers=[signer("rsa2048-untrusted")])
    repo.snapshot()
    m = mirrors(repo.dir)
    refused(RepositoryErrorCode.UNSIGNED, open_source([m.url], repo.root_bytes).refresh,
            "targets was signed by 0/1 keys")


def test_a_root_rotation_needs_the_old_threshold(repo, mirrors, open_source, tmp_path) -> None:
    m = mirrors(repo.dir)
    repo.rotate_root(root_signers=ROOT_SIGNERS()[:1])  # 1 of 2 root keys
    refused(RepositoryErrorCode.UNSIGNED, open_source([m.url], repo.root_bytes).refresh,
            "root was signed by 1/2 keys")


def test_a_rotated_timestamp_key_is_followed_and_the_revoked_one_refused(repo, mirrors, open_source) -> None:
    m = mirrors(repo.dir)
    s = open_source([m.url], repo.root_bytes)
    s.refresh()
    s.close()
    repo.rotate_root(timestamp_key="rsa3072")
    repo.publish()
    s = open_source([m.url], repo.root_bytes)  # bootstrapped with root v1: walks to v2
    s.refresh()
    s.close()
    repo.md["timestamp"].signed.version += 1
    repo.write("timestamp", signers=[signer("ci")], bump=False)  # the revoked key
    refused(RepositoryErrorCode.UNSIGNED, open_source([m.url], repo.root_bytes).refresh,
            "timestamp was signed by 0/1 keys")


def test_a_team_role_below_its_threshold_fails_its_vendor_class_only(repo, mirrors, open_source, apps) -> None:
    repo.delegate("acme-other", V2, C, keys=("team", "rsa2048"), threshold=2)
    repo.add("acme-other", "x-1.0.0.img", apps["1.0.0"], path=target_prefix(V2, C) + "x-1.0.0.img")
    repo.write("acme-other", signers=[signer("team")])
    repo.publish(("targets", ROLE))
    m = mirrors(repo.dir)
    src = open_source([m.url], repo.root_bytes)
    src.refresh()
    refused(RepositoryErrorCode.UNSIGNED, lambda: src.candidates(info(V2, C)), "acme-other was signed by 1/2 keys")
    assert len(src.candidates(info())) == 2


def test_an_expired_team_role_fails_its_vendor_class(repo, mirrors, open_source) -> None:
    repo.md[ROLE].signed.expires = NOW - timedelta(days=1)
    repo.publish()
    m = mirrors(repo.dir)
    src = open_source([m.url], repo.root_bytes)
    src.refresh()
    refused(RepositoryErrorCode.EXPIRED, lambda: src.candidates(info()), f"{ROLE} is expired")


# --- mirrors that misbehave: bounded ------------------------------------------------------------


@pytest.mark.parametrize("mode, fragment", [("hang", "no answer within 0.5 s"), ("trickle", "not complete within 1.5 s")])
def test_a_hanging_or_trickling_mirror_is_cut_off(repo, mirrors, open_source, mode, fragment) -> None:
    m = mirrors(repo.dir, mode)
    src = open_source([m.url], repo.root_bytes, timeout_s=0.5, deadline_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(RepositoryUnavailable, match=fragment):
        src.refresh()
    assert time.monotonic() - t0 < BOUND_S
    assert len(m.requests) == 1  # no silent retries


def test_huge_metadata_is_cut_off_at_its_bound(repo, mirrors, open_source) -> None:
    m = mirrors(repo.dir, "huge")
    t0 = time.monotonic()
    refused(RepositoryErrorCode.TOO_LARGE, open_source([m.url], repo.root_bytes, deadline_s=30).refresh,
            "2.root.json", "more bytes than allowed")
    assert time.monotonic() - t0 < BOUND_S


def test_mirrors_down_or_404_fail_over_to_a_good_one(repo, mirrors, open_source, apps) -> None:
    down, empty, good = dead_url(), mirrors(None, "404"), mirrors(repo.dir)
    warnings: list[str] = []
    src = open_source([down, empty.url, good.url], repo.root_bytes, warnings=warnings)
    assert src.refresh() == good.url
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{down}/metadata/2.root.json: cannot connect") and warnings[0].endswith(
        f"trying {empty.url}")
    assert warnings[1].startswith(f"{empty.url}/metadata/timestamp.json: HTTP 404")
    # none good: unavailable (exit 3), every mirror's reason in the one line
    with pytest.raises(RepositoryUnavailable) as exc:
        open_source([down, empty.url], repo.root_bytes, cache=good_cache(src)).refresh()
    assert str(exc.value).startswith("no mirror could be used: ") and down in str(exc.value) and "404" in str(exc.value)
    assert RepositoryUnavailable.exit_code == 3 and RepositoryRefused.exit_code == 1


def good_cache(src: TufSource) -> Path:
    src.close()
    return src.cache.parent


def test_the_bytes_come_from_another_mirror_when_the_first_lacks_them(repo, mirrors, open_source, apps, tmp_path) -> None:
    repo.copy_to(tmp_path / "partial")
    for f in (tmp_path / "partial" / "targets").rglob("*.img"):
        f.unlink()
    partial, full = mirrors(tmp_path / "partial"), mirrors(repo.dir)
    warnings: list[str] = []
    src = open_source([partial.url, full.url], repo.root_bytes, warnings=warnings)
    assert src.refresh() == partial.url
    img = src.load(max(src.candidates(info()), key=lambda o: o.key))
    assert img.data == apps["1.2.0"]
    assert len(warnings) == 1 and "HTTP 404" in warnings[0] and warnings[0].endswith(f"trying {full.url}")


# --- through a Syncer, with a device that records every request -----------------------------------


class RecordingDevice:
    """Answers device info and image state as an mpboot device on `version` would; refuses
    everything else (an upload included); records every request (group, command, op)."""

    def __init__(self, vendor_id: bytes | None, class_id: bytes | None, version: str = "1.0.0") -> None:
        self.vendor_id, self.class_id, self.version = vendor_id, class_id, version
        self.requests: list[tuple[int, int, int, dict[str, Any]]] = []

    def handle(self, op: int, group: int, cmd: int, p: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((group, cmd, op, p))
        if (group, cmd) == (Group.OS, OsCmd.MCUMGR_PARAMS):
            return {"buf_size": 512, "buf_count": 1}
        if (group, cmd) == (Group.MPBOOT, MpbootCmd.DEVICE):
            return {"uid": b"\x01" * 8, "vid": self.vendor_id, "cid": self.class_id, "ctr": 0,
                    "no-downgrade": False}
        if (group, cmd, op) == (Group.IMAGE, ImageCmd.STATE, Op.READ):
            return {"images": [{"image": 0, "slot": 0, "version": self.version, "hash": b"\xaa" * 32,
                                "bootable": True, "pending": False, "confirmed": True, "active": True,
                                "permanent": False}]}
        return {"rc": MgmtErrorCode.ENOTSUP}

    def uploads(self) -> list[dict[str, Any]]:
        return [p for g, c, _, p in self.requests if (g, c) == (Group.IMAGE, ImageCmd.UPLOAD)
                or (g, c) == (Group.MPBOOT, MpbootCmd.ZUPLOAD)]


class RecordingTransport:
    def __init__(self, device: RecordingDevice) -> None:
        self.device = device
        self._rx: asyncio.Queue[bytes] = asyncio.Queue()

    @property
    def name(self) -> str:
        return "recording"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, packet: bytes) -> None:
        b0, _, _, group, seq, cmd = struct.unpack_from(">BBHHBB", packet)
        rsp = self.device.handle(b0 & 7, group, cmd, cbor2.loads(packet[8:]))
        body = cbor2.dumps(rsp)
        self._rx.put_nowait(struct.pack(">BBHHBB", (b0 & ~7) | ((b0 & 7) + 1), 0, len(body), group, seq, cmd) + body)

    async def recv(self) -> bytes:
        return await self._rx.get()

    def max_packet(self, buf_size: int) -> int:
        return min(buf_size, 244)

    def packet_limit(self, buf_size: int) -> int:
        return self.max_packet(buf_size)


class RecordingRadio:
    def __init__(self, device: RecordingDevice) -> None:
        self.device = device
        self.scans = 0

    async def scan(self, seconds: float) -> list[Found]:
        self.scans += 1
        return [Found("dev-a", "AA:BB")]

    def transport(self, address: str) -> RecordingTransport:
        return RecordingTransport(self.device)


def one_pass(src: TufSource, device: RecordingDevice) -> tuple[RecordingRadio, list[str], Any]:
    radio = RecordingRadio(device)
    lines: list[str] = []
    syncer = Syncer(src, radio, SyncOptions(scan_seconds=0.1, timeout=2.0, retries=0),
                    event=lambda a, text: lines.append(f"{a.device}: {text}"))
    attempts = asyncio.run(syncer.run_pass())
    assert len(attempts) == 1
    return radio, lines, attempts[0]


def test_sync_sends_the_repository_image_to_the_device(repo, mirrors, open_source, apps) -> None:
    m = mirrors(repo.dir)
    src = open_source([m.url], repo.root_bytes)
    dev = RecordingDevice(V, C, "1.0.0")
    _, lines, a = one_pass(src, dev)
    assert lines[0] == "dev-a: 1.0.0 -> 1.2.0 (app-1.2.0.img)"
    opening = dev.uploads()[0]
    assert opening["len"] == len(apps["1.2.0"]) and opening["off"] == 0
    assert (a.image, a.to_version, a.result) == ("app-1.2.0.img", "1.2.0", SyncResult.FAILED)  # (it takes no upload)


@pytest.mark.parametrize("attack", ["bytes differ", "custom lies", "team threshold", "no ids"])
def test_sync_sends_nothing_from_a_refused_repository(repo, mirrors, open_source, apps, attack) -> None:
    dev = RecordingDevice(V, C, "1.0.0")
    if attack == "custom lies":
        from tufkit import custom_for

        lie = custom_for(apps["1.3.0"])
        lie["mpboot"]["version"] = [1, 4, 0, 0]
        repo.add(ROLE, "app-1.4.0.img", apps["1.3.0"], custom=lie)
        repo.publish()
    elif attack == "team threshold":
        repo.md["targets"].signed.delegations.roles[ROLE].threshold = 2
        repo.md["targets"].signed.add_key(signer("rsa2048").public_key, ROLE)
        repo.publish()
    elif attack == "no ids":
        dev = RecordingDevice(None, None, "1.0.0")
    m = mirrors(repo.dir)
    src = open_source([m.url], repo.root_bytes)
    if attack == "bytes differ":
        src.refresh()
        newest = max(src.candidates(info()), key=lambda o: o.key)
        repo.target_file(newest.target).write_bytes(b"x" * newest.target.length)
    _, lines, a = one_pass(src, dev)
    assert dev.uploads() == []
    expect = {"bytes differ": (SyncResult.FAILED, "does not match expected hash"),
              "custom lies": (SyncResult.FAILED, "version (1, 4, 0, 0) in the metadata, (1, 3, 0, 0) in the image"),
              "team threshold": (SyncResult.FAILED, f"{ROLE} was signed by 1/2 keys"),
              "no ids": (SyncResult.NO_IMAGE, "the device reports no vendor/class id")}[attack]
    assert a.result is expect[0], (a, lines)
    assert expect[1] in lines[-1] and lines[-1].startswith(f"dev-a: {expect[0]}: "), lines


def test_a_pass_with_no_fresh_metadata_meets_no_device(repo, mirrors, open_source) -> None:
    repo.md["timestamp"].signed.expires = NOW - timedelta(hours=1)
    repo.write("timestamp")
    m = mirrors(repo.dir)
    dev = RecordingDevice(V, C)
    radio = RecordingRadio(dev)
    syncer = Syncer(open_source([m.url], repo.root_bytes), radio, SyncOptions(scan_seconds=0.1))
    with pytest.raises(RepositoryRefused, match="timestamp.json is expired"):
        asyncio.run(syncer.run_pass())
    assert radio.scans == 0 and dev.requests == []


def test_each_pass_refreshes_the_metadata(repo, mirrors, open_source, apps) -> None:
    m = mirrors(repo.dir)
    src = open_source([m.url], repo.root_bytes)
    src.refresh()  # (the CLI's check before the first pass: the first pass uses it)
    syncer = Syncer(src, RecordingRadio(RecordingDevice(V, C, "1.2.0")), SyncOptions(scan_seconds=0.1))
    m.requests.clear()
    assert asyncio.run(syncer.run_pass())[0].result is SyncResult.CURRENT
    assert "/metadata/timestamp.json" not in m.requests
    repo.add(ROLE, "app-1.3.0.img", apps["1.3.0"])
    repo.publish()
    a = asyncio.run(syncer.run_pass())[0]
    assert "/metadata/timestamp.json" in m.requests and a.to_version == "1.3.0"


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_sync_repo_usage_and_unreachable(repo, tmp_path) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes)
    assert_error(run("sync", "--repo", "http://127.0.0.1:9"), 2, "--root")
    assert_error(run("sync", "--repo", "http://127.0.0.1:9", "--repo", str(tmp_path), "--root", root), 2, "DIR")
    assert_error(run("sync"), 2, "REPO_DIR")
    url = dead_url()
    r = run("sync", "--repo", url, "--root", root, "--cache", tmp_path / "cache", "--repo-timeout-s", "1")
    assert_error(r, 3, f"{url}/metadata/2.root.json: cannot connect")
    r = run("sync", "--repo", url, "--repo", url + "/b", "--root", root, "--cache", tmp_path / "cache")
    assert_error(r, 3, "no mirror could be used")
    assert f"trying {url}/b" in r.stdout


def test_cli_sync_help_lists_the_repository_options() -> None:
    out = assert_ok(run("sync", "--help")).stdout
    for opt in ("--repo", "--root", "--cache", "--repo-timeout-s", "--repo-deadline-s"):
        assert opt in out
    assert "3    no mirror of the repository" in out


def test_cli_sync_repo_updates_a_device_over_ble(repo, mirrors, tmp_path) -> None:
    """End to end: `mpboot sync --repo URL` and a simulated device on the simulated air
    (blank, vendor/class ids set) gets the repository's newest image and confirms it."""
    import uuid

    from blekit import BleSim
    from clikit import describe
    from mpboot.sim.air import AirThread

    m = mirrors(repo.dir)
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes)
    with AirThread() as air:
        sim = BleSim(tmp_path / "dev", [Path(__file__).parent / "keys" / "TEST-ONLY-rsa2048.pem"],
                     "--vendor-id", str(uuid.UUID(bytes=V)), "--class-id", str(uuid.UUID(bytes=C)),
                     radio=air.spec, name="tuf-a")
        try:
            sim.wait_for(r"serving SMP over BLE")
            r = run("sync", "--repo", m.url, "--root", root, "--cache", tmp_path / "cache", "--seconds", "1.5",
                    "--ble-backend", f"bumble:{air.spec}")
            assert r.exit_code == 0, describe(r)
            assert f"sync: repo {m.url}: root v1, timestamp v1, snapshot v1" in r.stdout
            assert "sync: tuf-a: nothing -> 1.2.0 (app-1.2.0.img)" in r.stdout and "sync: tuf-a: updated" in r.stdout
            sim.wait_for(r"APP tuf")
        finally:
            sim.stop()


def test_cli_sync_repo_updates_devices_over_udp(repo, mirrors, tmp_path) -> None:
    """End to end on the network: `mpboot sync --repo URL --udp A --udp B --udp C`; A and B
    are blank simulated devices serving SMP over UDP (vendor/class ids set), C answers nothing:
    A and B get the repository's newest image and confirm it, C is not met."""
    from clikit import describe
    from mpboot.keys import load_public_key
    from udpkit import SimUdp, free_udp_port

    m = mirrors(repo.dir)
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes)
    keys = [load_public_key(Path(__file__).parent / "keys" / "TEST-ONLY-rsa2048.pem")]
    pa, pb, silent = free_udp_port(), free_udp_port(), free_udp_port()
    with SimUdp(tmp_path / "a", keys, pa, vendor_id=V, class_id=C) as a, \
            SimUdp(tmp_path / "b", keys, pb, vendor_id=V, class_id=C) as b:
        a.wait_for(r"serving SMP over UDP")
        b.wait_for(r"serving SMP over UDP")
        r = run("sync", "--repo", m.url, "--root", root, "--cache", tmp_path / "cache", "--seconds", "1",
                "--udp", f"127.0.0.1:{pa}", "--udp", f"127.0.0.1:{pb}", "--udp", f"127.0.0.1:{silent}")
        assert r.exit_code == 0, describe(r)
        for port in (pa, pb):
            assert f"sync: 127.0.0.1:{port}: nothing -> 1.2.0 (app-1.2.0.img)" in r.stdout, describe(r)
            assert f"sync: 127.0.0.1:{port}: updated" in r.stdout, describe(r)
        assert f"127.0.0.1:{silent}" not in r.stdout
        a.wait_for(r"APP tuf")
        b.wait_for(r"APP tuf")


def test_cli_sync_udp_usage(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    assert_error(run("sync", str(tmp_path / "imgs"), "--udp", "host:0"), 2, "--udp host:0: port '0'")
    listing = tmp_path / "devices.txt"
    listing.write_text("# the bench\n10.0.0.7\n[::1]:99999\n")
    assert_error(run("sync", str(tmp_path / "imgs"), "--udp-list", listing), 2,
                 f"--udp-list {listing} line 3: port '99999'")
    assert_error(run("sync", str(tmp_path / "imgs"), "--mtu", "1280"), 2, "--mtu goes with --udp")


def test_cli_sync_repo_refused_metadata_is_one_line_and_exit_1(repo, mirrors, tmp_path) -> None:
    repo.md["timestamp"].signed.expires = NOW - timedelta(hours=1)
    repo.write("timestamp")
    m = mirrors(repo.dir)
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes)
    r = run("sync", "--repo", m.url, "--root", root, "--cache", tmp_path / "cache")
    assert_error(r, 1, f"{m.url}: timestamp.json is expired (a stale or frozen mirror)")
    # a DIR through --repo is today's REPO_DIR
    (tmp_path / "empty").mkdir()
    assert_error(run("sync", "--repo", tmp_path / "empty"), 2, "no signed images")
    assert_error(run("sync", "--repo", tmp_path / "empty", "--root", root), 2, "--root and --cache are for")
    bad = tmp_path / "bad-root.json"
    bad.write_bytes(repo.history[("timestamp", 1)])
    assert_error(run("sync", "--repo", m.url, "--root", bad, "--cache", tmp_path / "c2"), 2, "--root: not a TUF root.json")
    assert_error(run("sync", "--repo", m.url, "--root", tmp_path / "nope.json"), 2, "--root")


def test_the_cli_imports_python_tuf_only_when_a_repository_is_used() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom mpboot.cli import cli\n"
            "try:\n    cli(['sync', '--help'], prog_name='mpboot')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('tuf', 'securesystemslib', 'mpboot.tufsource'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# --- review findings (issue 20 review, 5-7 and 10) ---------------------------------------------------


def test_a_cache_that_cannot_be_written_is_a_usage_error_at_once_not_a_mirror_failure(repo, mirrors, open_source,
                                                                                     apps) -> None:
    """A local OSError in the TUF cache (disk full, permissions) is the station's problem, not
    a mirror's: UsageError (exit 2) at once, the same with one mirror or several, and the
    other mirrors are not tried (they share the cache)."""
    a, b = mirrors(repo.dir), mirrors(repo.dir)
    warnings: list[str] = []
    src = open_source([a.url, b.url], repo.root_bytes, warnings=warnings)
    blocked = src.cache / "metadata" / "timestamp.json"
    (blocked / "x").mkdir(parents=True)  # a non-empty directory where the timestamp is written
    with pytest.raises(UsageError) as exc:
        src.refresh()
    assert type(exc.value) is UsageError and str(exc.value).startswith("TUF cache: "), exc.value
    assert warnings == [] and not b.requests
    # the same for an image: its cache file cannot be written
    (blocked / "x").rmdir()
    blocked.rmdir()
    assert src.refresh() == a.url
    newest = max(src.candidates(info()), key=lambda o: o.key)
    target = src.cache / "targets" / newest.path.replace("/", "%2F")
    (target / "x").mkdir(parents=True)
    seen = len(b.requests)
    with pytest.raises(UsageError) as exc:
        src.load(newest)
    assert type(exc.value) is UsageError and str(exc.value).startswith("TUF cache: "), exc.value
    assert warnings == [] and len(b.requests) == seen


@pytest.mark.parametrize("url, fragment", [
    ("http://exa mple.com", "invalid character"),
    ("http://[::1", "not a valid host or port"),
    ("http://127.0.0.1:99999", "127.0.0.1:99999"),
    ("http://a..b/", "label"),
    ("http://bücher.example/", "ASCII"),
    ("http://", "no host"),
    ("http://h:0/fleet", "port 0"),
    ("https://h/fleet?x=1", "query"),
    ("https://h/fleet#top", "fragment"),
])
def test_cli_sync_an_unusable_repo_url_is_a_usage_error(repo, tmp_path, url, fragment) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes)
    good = dead_url()
    for where, label in ((("--repo", url), "--repo"), ((url,), "REPO_DIR")):
        r = run("sync", *where, "--repo", good, "--root", root, "--cache", tmp_path / "cache")
        line = assert_error(r, 2, f"{label} {url}: ", fragment)
        assert "no mirror" not in line and r.stdout == ""
    assert not (tmp_path / "cache").exists()  # refused before anything is used


def test_cli_sync_a_url_as_repo_dir_is_taken_as_repo_url(repo, mirrors, tmp_path) -> None:
    """REPO_DIR given a URL is a mirror's URL, as with --repo URL (not mangled into a path)."""
    m = mirrors(repo.dir)
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes)
    r = run("sync", m.url + "/", "--root", root, "--cache", tmp_path / "cache", "--udp", f"127.0.0.1:{dead_port()}",
            "--seconds", "0.2")
    assert_ok(r)
    assert f"sync: repo {m.url}: root v1, timestamp v1, snapshot v1" in r.stdout
    assert_error(run("sync", m.url, "--root", tmp_path / "nope.json"), 2, "--root")
    assert_error(run("sync", m.url), 2, "--repo URL needs --root FILE")
    assert_error(run("sync", m.url, "--repo", str(tmp_path)), 2, "not both")


def dead_port() -> int:
    from udpkit import free_udp_port

    return free_udp_port()


def test_cli_sync_udp_list_longer_than_its_bound_is_refused(tmp_path) -> None:
    """A --udp-list file is read to its bound (1 MiB): a longer one is refused whole, never
    cut (a line cut in half can be another valid address: 10.0.0.123 -> 10.0.0.12)."""
    from mpboot.cli.ble import UDP_LIST_MAX_BYTES

    (tmp_path / "imgs").mkdir()
    listing = tmp_path / "devices.txt"
    line = b"10.0.0.123\n"
    listing.write_bytes(b"#" * (UDP_LIST_MAX_BYTES - 5) + b"\n" + line)
    assert_error(run("sync", str(tmp_path / "imgs"), "--udp-list", listing), 2,
                 f"--udp-list {listing}: longer than {UDP_LIST_MAX_BYTES} bytes")
    listing.write_bytes(b"#" * (UDP_LIST_MAX_BYTES - len(line) - 1) + b"\n" + line)  # exactly the bound
    assert_error(run("sync", str(tmp_path / "imgs"), "--udp-list", listing), 2, "no signed images")


def test_cli_sync_ble_backend_on_the_command_line_is_refused_with_udp(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    assert_error(run("sync", str(tmp_path / "imgs"), "--udp", "127.0.0.1", "--ble-backend", "bumble:usb:0"), 2,
                 "--ble-backend is for Bluetooth, not --udp")
    # from $MPBOOT_BLE_BACKEND (a station's environment): not an error, the network is used
    assert_error(run("sync", str(tmp_path / "imgs"), "--udp", "127.0.0.1",
                     env={"MPBOOT_BLE_BACKEND": "bumble:usb:0"}), 2, "no signed images")
