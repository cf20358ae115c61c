"""Power cuts on the emulated Cortex-M3 board with two stages (issue 19): a combined update of
the app and stage 1 (`mpboot flash APP --with-stage1 S1 --test --reset`: both uploads, the
pair mark, the reset, the pair's test boot, the app's confirm of its half, stage 1's probe
and confirm), cut at seeded flash operations, as tests/test_qemu_power.py cuts an app update.

After each cut every boot runs the old pair or the new one, never a mixed pair (the new app,
which needs the new stage 1, with the old stage 1, or the reverse), and the state agrees;
then the same command again (or, when the new pair already runs its trial, `mpboot confirm
--image stage1`, the proof) completes the update: both new, confirmed. The cut is placed by
the board's flash operation count (mpboot.qemu.runner.arm_cut), from a traced reference run.

Default run: SAMPLE points drawn with a fixed seed, dealt into two test items; the slow
marker runs every point."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import qemukit
from conftest import KEYS_DIR, signing_key
from qemukit import Console
from simkit import make_app, make_service, sign_app
from simserve import mpboot, ok

from mpboot.image import ImageKind
from mpboot.qemu.runner import arm_cut, trace_ops, traced_ops
from mpboot.qemu.serve import FLASH, QemuSimServer

pytestmark = pytest.mark.qemu

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"^device: mpboot: serving SMP"
APP_LINE = r"^device: mpboot: (slot \d version (\S+)|recovery)"
S1_LINE = r"^device: mpboot: stage 1 (slot \d version (\S+)|none)"
CUT = r"^mpboot sim: power cut"
OLD, NEW = "1.0.0", "2.0.0"
TIMEOUT_S = "2"
SEED = 19
SAMPLE = 12
CHUNKS = 2
SIZE = 64 * 1024


@pytest.fixture(scope="module", autouse=True)
def qemu_board() -> None:
    qemukit.require()


@dataclass(frozen=True)
class Point:
    op: int
    kind: str  # W program, E erase, S sync
    tear: bool

    def __str__(self) -> str:
        return f"op {self.op} ({self.kind}{', torn' if self.tear else ''})"


class Board:
    def __init__(self, state: Path) -> None:
        self.console = Console()
        self.server = QemuSimServer(state, [signing_key(KEY.name).public()], slot_size=SIZE, s1_size=SIZE,
                                    output=self.console.queue.put)
        self.server.start()
        self.port = ["--port", self.server.path]

    def mark(self) -> int:
        return len(self.console.drain())

    def wait(self, pattern: str, after: int = 0, timeout_s: float = 60) -> int:
        return self.console.wait_for(pattern, timeout_s, after)

    def booted(self, after: int) -> tuple[str, str, int]:
        """(stage 1's version, the app's) of the first boot from line `after` on ("none",
        "recovery" when nothing runs), and the line of its serving."""
        i = self.wait(S1_LINE, after)
        words = self.console.lines[i].split()
        s1 = "none" if words[4].startswith("none") else words[7].split("+")[0]
        j = self.wait(APP_LINE, i)
        words = self.console.lines[j].split()
        app = "recovery" if words[2].startswith("recovery") else words[5].split("+")[0]
        return s1, app, self.wait(SERVING, j)

    def boots(self, after: int) -> list[tuple[str, str]]:
        """(stage 1's version, the app's) of every boot whose lines came from line `after` on."""
        out, s1 = [], None
        for line in self.console.lines[after:]:
            m = re.match(S1_LINE, line)
            if m:
                s1 = "none" if m.group(1).startswith("none") else m.group(2).split("+")[0]
                continue
            m = re.match(APP_LINE, line)
            if m and s1 is not None:
                out.append((s1, "recovery" if m.group(1) == "recovery" else m.group(2).split("+")[0]))
                s1 = None
        return out

    def pairs(self) -> dict[tuple[int, str], dict[str, object]]:
        rows = json.loads(ok("state", *self.port, "--json"))["images"]
        return {(r.get("image", 0), r["version"].split("+")[0]): r for r in rows}

    def stop(self) -> None:
        self.server.stop()


def flash_cmd(board: Board, images: dict[str, Path]) -> tuple[str, ...]:
    return ("flash", images["app-" + NEW], *board.port, "--with-stage1", images["s1-" + NEW], "--test", "--reset",
            "--no-progress", "--timeout", TIMEOUT_S)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The board running app 1.0.0 and stage 1 1.0.0, both confirmed; app 2.0.0 needs stage 1
    2.0.0. And the reference run's flash operations."""
    work = tmp_path_factory.mktemp("s1power")
    key = signing_key(KEY.name)
    images = {}
    for v in (OLD, NEW):
        images["app-" + v] = work / f"app-{v}.bin"
        images["app-" + v].write_bytes(sign_app(make_app(work / f"app-{v}", v, confirm=True, filler=3000), key, v,
                                                depends=((1, v),)))
        images["s1-" + v] = work / f"s1-{v}.bin"
        images["s1-" + v].write_bytes(sign_app(make_service(work / f"s1-{v}"), key, v, kind=ImageKind.UPDATER))
    before = work / "before"
    board = Board(before)
    try:
        board.wait(SERVING)
        ok("flash", images["s1-" + OLD], *board.port, "--image", "stage1", "--test", "--reset", "--no-progress")
        at = board.mark()
        ok("flash", images["app-" + OLD], *board.port, "--confirm", "--reset", "--no-progress")
        at = board.wait(r"^mpboot sim: device reset", at)
        assert board.booted(at)[:2] == (OLD, OLD)
    finally:
        board.stop()
    ref = work / "reference"
    shutil.copytree(before, ref)
    trace_ops(ref / FLASH)
    board = Board(ref)
    try:
        at = board.wait(SERVING)
        ok(*flash_cmd(board, images))
        p = board.pairs()
        assert p[(0, NEW)]["confirmed"] and p[(1, NEW)]["confirmed"], p
    finally:
        board.stop()
    return {"images": images, "before": before, "ops": traced_ops(ref / FLASH)}


def points(ops: list[tuple[str, int]], every: bool) -> list[Point]:
    pts = [Point(i, kind, tear) for i, (kind, _) in enumerate(ops) for tear in ((False, True) if kind != "S" else (False,))]
    if not every:
        pts = random.Random(SEED).sample(pts, min(SAMPLE, len(pts)))
    return sorted(pts, key=lambda q: (q.op, q.tear))


def cut_and_complete(world: dict[str, object], work: Path, point: Point) -> str:
    """'safe' or why not, for one cut."""
    images = world["images"]
    assert isinstance(images, dict)
    state = work / f"p{point.op}{'t' if point.tear else ''}"
    shutil.copytree(world["before"], state)  # type: ignore[arg-type]
    arm_cut(state / FLASH, point.op, point.tear)
    board = Board(state)
    try:
        at = board.wait(SERVING)
        cmd = flash_cmd(board, images)
        mpboot(*cmd)  # fails, or completes by itself after the board came back, as the power goes
        board.wait(CUT, at)
        for pair in board.boots(at):
            if pair not in ((OLD, OLD), (NEW, NEW)):
                return f"{point}: a boot ran stage 1 {pair[0]} with app {pair[1]}"
        p = board.pairs()
        running = tuple(next((v for (i, v), r in p.items() if i == n and r["active"]), "-") for n in (1, 0))
        if running not in ((OLD, OLD), (NEW, NEW)):
            return f"{point}: runs stage 1 {running[0]} with app {running[1]}: {p}"
        done = running == (NEW, NEW) and all(p[(i, NEW)]["confirmed"] for i in (0, 1))
        if not done:
            # The same command again; or, when the new pair already runs its trial, the proof.
            again = mpboot(*cmd) if running == (OLD, OLD) else mpboot("confirm", *board.port, "--image", "stage1")
            if again.exit_code != 0:
                return f"{point}: completing: exit {again.exit_code}: {again.stderr.strip()}"
            p = board.pairs()
            if not all(p[(i, NEW)]["active"] and p[(i, NEW)]["confirmed"] for i in (0, 1)):
                return f"{point}: after completing, state {p}"
        return "safe"
    finally:
        board.stop()
        shutil.rmtree(state, ignore_errors=True)


def run_chunk(world: dict[str, object], tmp_path: Path, k: int, every: bool, record_property) -> None:  # type: ignore[no-untyped-def]
    ops = world["ops"]
    assert isinstance(ops, list)
    pts = points(ops, every)[k::CHUNKS]
    results = [cut_and_complete(world, tmp_path, p) for p in pts]
    safe = results.count("safe")
    record_property("summary", f"power-cut on Cortex-M3 (QEMU), app + stage 1 as a pair {k + 1}/{CHUNKS}"
                               f"{' (every point)' if every else ''}: {len(pts)} cuts of a {len(ops)}-operation "
                               f"update, {safe} safe, {len(pts) - safe} not")
    failures = [r for r in results if r != "safe"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("k", range(CHUNKS), ids=[f"part{k + 1}" for k in range(CHUNKS)])
def test_power_cut_during_a_pair_update(world: dict[str, object], tmp_path: Path, k: int,
                                        record_property) -> None:  # type: ignore[no-untyped-def]
    run_chunk(world, tmp_path, k, False, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(CHUNKS), ids=[f"part{k + 1}" for k in range(CHUNKS)])
def test_power_cut_every_operation_of_a_pair_update(world: dict[str, object], tmp_path: Path, k: int,
                                                    record_property) -> None:  # type: ignore[no-untyped-def]
    run_chunk(world, tmp_path, k, True, record_property)
