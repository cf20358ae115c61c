"""mpboot sync without a radio: which image a device gets, and the attempt log formats."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mpboot.errors import UsageError
from mpboot.keys import load_signing_key
from mpboot.smp.messages import DeviceInfo, SlotState
from mpboot.sync import Attempt, AttemptLog, SyncResult, choose, load_repo, summary_rows
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
    assert len(skipped) == 1 and skipped[0].startswith("broken.img: ")
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
