"""mpboot sync without a radio: which image a device gets, and the attempt log formats."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from mpboot.errors import UsageError
from mpboot.image import ImageKind
from mpboot.keys import load_signing_key
from mpboot.smp.messages import DeviceInfo, SlotState
from mpboot.sync import Attempt, AttemptLog, SyncResult, choose, exit_status, load_repo, plan, summary_rows
from simkit import make_app, sign_app

KEYS = Path(__file__).parent / "keys"
V1, V2 = b"\x01" * 16, b"\x02" * 16
C1, C2 = b"\x0c" * 16, b"\x0d" * 16


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("repo")
    key = load_signing_key(KEYS / "TEST-ONLY-rsa2048.pem")
    app = make_app(d / "src", "x", confirm=True)
    for name, version, counter, vendor_id, class_id in (
        ("a-1.0.0.img", "1.0.0", 1, V1, C1),
        ("a-1.2.0.img", "1.2.0", 1, V1, C1),
        ("a-1.3.0-ctr3.img", "1.3.0", 3, V1, C1),
        ("a-2.0.0-class2.img", "2.0.0", 5, V1, C2),
        ("b-9.0.0.img", "9.0.0", 1, V2, C1),
        ("plain-0.5.0.img", "0.5.0", 1, None, None),
    ):
        (d / name).write_bytes(sign_app(app, key, version, security_counter=counter, vendor_id=vendor_id,
                                        class_id=class_id))
    (d / "updater-3.0.0.img").write_bytes(sign_app(app, key, "3.0.0", vendor_id=V1, class_id=C1,
                                                   kind=ImageKind.UPDATER))
    (d / "notes.txt").write_text("not an image")
    (d / "broken.img").write_bytes(b"\x00" * 64)
    return d


def info(vendor_id: bytes | None, class_id: bytes | None, floor: int = 0) -> DeviceInfo:
    return DeviceInfo(b"uid", vendor_id, class_id, floor, False)


def running(version: str, h: bytes = b"\xee" * 32) -> SlotState:
    return SlotState(0, 0, version, h, True, False, True, True, False)


def test_repo_loads_signed_images_and_says_what_it_skipped(repo: Path) -> None:
    images, skipped = load_repo(repo)
    assert sorted(i.path.name for i in images) == sorted(
        ["a-1.0.0.img", "a-1.2.0.img", "a-1.3.0-ctr3.img", "a-2.0.0-class2.img", "b-9.0.0.img", "plain-0.5.0.img"])
    assert len(skipped) == 2 and skipped[0].startswith("broken.img: ")
    assert skipped[1].startswith("updater-3.0.0.img: not an app")
    by = {i.path.name: i for i in images}
    assert (by["a-1.3.0-ctr3.img"].counter, by["a-1.3.0-ctr3.img"].vendor_id) == (3, V1)
    assert by["plain-0.5.0.img"].vendor_id is None
    with pytest.raises(UsageError):
        load_repo(repo / "notes.txt")


def test_choose_newest_that_fits_vendor_class_and_counter(repo: Path) -> None:
    images, _ = load_repo(repo)
    pick = lambda i, r=None: (c.path.name if (c := choose(images, i, r)) else None)  # noqa: E731
    # vendor V1 class C1: 1.3.0 (counter 3) is the newest; 2.0.0 is another class, 9.0.0 another vendor
    assert pick(info(V1, C1)) == "a-1.3.0-ctr3.img"
    assert pick(info(V1, C1), running("1.2.0")) == "a-1.3.0-ctr3.img"
    # the floor: nothing below it; 2.0.0 fits class C2 only
    assert pick(info(V1, C2, floor=5)) == "a-2.0.0-class2.img"
    assert pick(info(V1, C2, floor=6)) is None
    # current: the newest fitting is not newer than what runs, or is what runs
    assert pick(info(V1, C1), running("1.3.0")) is None
    assert pick(info(V1, C1), running("1.4.0.1")) is None
    newest = next(i for i in images if i.path.name == "a-1.3.0-ctr3.img")
    assert pick(info(V1, C1), running("0.0.1", newest.image.hash)) is None
    # a device that checks no ids takes the newest image of all
    assert pick(info(None, None)) == "b-9.0.0.img"
    assert pick(info(V2, C2)) is None


@pytest.mark.parametrize("name", ["log.jsonl", "log.sqlite"])
def test_attempt_log(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    log = AttemptLog(path)
    a = Attempt(1, "dev-a", "AA:BB", uid="01", from_version="1.0.0", to_version="1.2.0", image="a.img",
                bytes=1234, resumed_from=512, reconnects=2, result=SyncResult.UPDATED)
    b = Attempt(1, "dev-b", "CC:DD", result=SyncResult.FAILED, error="link lost")
    log.write(a)
    log.write(b)
    log.close()
    if path.suffix == ".sqlite":
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT device, from_version, to_version, bytes, result, error FROM attempts ORDER BY id").fetchall()
        assert rows == [("dev-a", "1.0.0", "1.2.0", 1234, "updated", None), ("dev-b", None, None, 0, "failed", "link lost")]
    else:
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["device"], r["result"], r["bytes"], r["error"]) for r in recs] == [
            ("dev-a", "updated", 1234, None), ("dev-b", "failed", 0, "link lost")]
    rows = summary_rows([b, a])
    assert rows[0][:5] == ("dev-a", "1.0.0", "1.2.0", "1234", "updated")
    assert rows[0][6] == "resumed at 512; 2 reconnects"
    assert rows[1][4] == "failed" and rows[1][6] == "link lost"


def test_a_log_that_cannot_be_opened_is_a_usage_error_before_any_device(tmp_path: Path) -> None:
    for name in ("missing/log.sqlite", "missing/log.jsonl"):
        with pytest.raises(UsageError, match="--log"):
            AttemptLog(tmp_path / name)


def test_plan_says_why_nothing_is_sent(repo: Path) -> None:
    images, _ = load_repo(repo)
    by = {i.path.name: i for i in images}
    newest = by["a-1.3.0-ctr3.img"]
    # newer than the repository for it: ahead, not no-image (its floor is above every image)
    p = plan(images, info(V1, C1, floor=7), running("2.0.0"))
    assert (p.image, p.result) == (None, SyncResult.AHEAD)
    assert p.note == "runs 2.0.0, newer than anything in the repository for it (newest 1.3.0)"
    # the same with a floor the images still fit
    assert plan(images, info(V1, C1), running("1.4.0.1")).result is SyncResult.AHEAD
    # current: it runs the newest image for it (by hash, or by version)
    assert plan(images, info(V1, C1), running("0.0.1", newest.image.hash)).result is SyncResult.CURRENT
    assert plan(images, info(V1, C1), running("1.3.0")).result is SyncResult.CURRENT
    # nothing for its vendor/class; every image for it below its floor
    p = plan(images, info(V2, C2), running("1.0.0"))
    assert (p.result, p.note) == (SyncResult.NO_IMAGE, "nothing in the repository is for this device's vendor and class")
    p = plan(images, info(V1, C2, floor=6), running("1.0.0"))
    assert (p.result, p.note) == (SyncResult.NO_IMAGE, "every image for this device is below its security-counter floor 6")
    # an update
    p = plan(images, info(V1, C1), running("1.2.0"))
    assert (p.image, p.result, p.note) == (newest, None, None)


def test_plan_holds_an_image_that_reverted_until_a_newer_one_appears(repo: Path, tmp_path: Path) -> None:
    images, _ = load_repo(repo)
    by = {i.path.name: i for i in images}
    reverted = frozenset({by["a-1.3.0-ctr3.img"].image.hash})
    p = plan(images, info(V1, C1), running("1.0.0"), reverted)
    # held on the newest: no falling back to an older image (1.2.0)
    assert (p.image, p.result) == (by["a-1.3.0-ctr3.img"], SyncResult.HELD)
    assert p.note == "1.3.0 reverted on this device before; waiting for a newer image"
    # another device, or a repository with something newer: sent as usual
    assert plan(images, info(V1, C1), running("1.0.0")).result is None
    newer = tmp_path / "newer"
    shutil.copytree(repo, newer)
    key = load_signing_key(KEYS / "TEST-ONLY-rsa2048.pem")
    (newer / "a-1.4.0.img").write_bytes(sign_app(make_app(tmp_path / "src", "x", confirm=True), key, "1.4.0",
                                                 security_counter=3, vendor_id=V1, class_id=C1))
    again, _ = load_repo(newer)
    p = plan(again, info(V1, C1), running("1.0.0"), reverted)
    assert p.result is None and p.image is not None and p.image.version == "1.4.0"


@pytest.mark.parametrize("name", ["log.jsonl", "log.sqlite"])
def test_the_log_remembers_which_image_reverted_on_which_device(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    h1, h2 = "aa" * 32, "bb" * 32
    log = AttemptLog(path)
    for uid, image_hash, result in (("01", h1, SyncResult.REVERTED), ("02", h1, SyncResult.REVERTED),
                                    ("02", h1, SyncResult.UPDATED),  # it took later (by hand): forgotten
                                    ("03", h2, SyncResult.FAILED), ("01", h2, SyncResult.HELD)):
        log.write(Attempt(1, f"dev-{uid}", "AA", uid=uid, image_hash=image_hash, result=result))
    log.close()
    memory = AttemptLog(path).reverted()
    assert memory.on("01") == frozenset({bytes.fromhex(h1)})
    assert memory.on("02") == memory.on("03") == memory.on("04") == frozenset()
    if path.suffix == ".sqlite":
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT image_hash, note FROM attempts WHERE result = 'held'").fetchall() == [(h2, None)]
    else:
        assert json.loads(path.read_text().splitlines()[0])["image_hash"] == h1


OLD_SQLITE = """CREATE TABLE attempts (
    id INTEGER PRIMARY KEY, pass_no INTEGER NOT NULL, device TEXT NOT NULL, address TEXT NOT NULL,
    uid TEXT, from_version TEXT, to_version TEXT, image TEXT, bytes INTEGER NOT NULL,
    resumed_from INTEGER NOT NULL, reconnects INTEGER NOT NULL, result TEXT NOT NULL, error TEXT,
    started REAL NOT NULL, seconds REAL NOT NULL)"""
OLD_JSON = ('{"address": "AA", "bytes": 10, "device": "d", "error": "did not confirm", "from_version": "1.0.0", '
            '"image": "a.img", "pass_no": 1, "reconnects": 0, "result": "reverted", "resumed_from": 0, '
            '"seconds": 1.0, "started": 1.0, "to_version": "1.2.0", "uid": "01"}')


@pytest.mark.parametrize("name", ["log.jsonl", "log.sqlite"])
def test_logs_written_before_image_hashes_stay_readable(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if path.suffix == ".sqlite":
        with sqlite3.connect(path) as db:
            db.execute(OLD_SQLITE)
            db.execute("INSERT INTO attempts (pass_no, device, address, uid, bytes, resumed_from, reconnects, "
                       "result, started, seconds) VALUES (1, 'd', 'AA', '01', 10, 0, 0, 'reverted', 1.0, 1.0)")
        db.close()
    else:
        # an old record, and a last line cut short (a run killed while writing)
        path.write_text(OLD_JSON + "\n" + OLD_JSON[:40])
    log = AttemptLog(path)
    assert log.reverted().on("01") == frozenset()  # no image hash: nothing to hold
    log.write(Attempt(2, "d", "AA", uid="01", image_hash="cc" * 32, result=SyncResult.REVERTED))
    log.close()
    assert AttemptLog(path).reverted().on("01") == frozenset({b"\xcc" * 32})


def test_exit_status_and_notes_of_a_pass() -> None:
    def attempt(result: SyncResult, **kw: object) -> Attempt:
        return Attempt(1, f"dev-{result}", "AA", result=result, **kw)  # type: ignore[arg-type]

    quiet = [attempt(r) for r in (SyncResult.UPDATED, SyncResult.CURRENT, SyncResult.AHEAD, SyncResult.NO_IMAGE)]
    held = attempt(SyncResult.HELD, from_version="1.0.0", to_version="1.3.0",
                   note="1.3.0 reverted on this device before; waiting for a newer image")
    assert exit_status([]) == exit_status([*quiet, held]) == 0
    assert exit_status([*quiet, attempt(SyncResult.REVERTED)]) == 1
    assert exit_status([attempt(SyncResult.FAILED), *quiet]) == 1
    row = summary_rows([held])[0]
    assert row[1:5] == ("1.0.0", "1.3.0", "0", "held") and row[6] == held.note
