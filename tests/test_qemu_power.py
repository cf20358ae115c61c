"""Power cuts on the emulated Cortex-M3 board (mpboot sim --machine qemu): an update over SMP
(`mpboot flash v2 --test --reset`: upload, final verify, test mark, reset) and the test boot
that follows (the trial record, the app's confirm), cut at seeded flash operations.

The cut is placed by the board, not by a clock: the qemu adapter counts its flash operations
(programs, erases, syncs) in a control block of the flash file, and at the armed one it does
none or half of it and stops QEMU (exit CUT_EXIT: everything written is in the flash file,
nothing more reaches it, as after kill -9). A reference run traces the operations; each
point restores the board as it was before the update, arms a cut, runs the same command,
lets the board come back (the simulator restarts QEMU), and checks that it boots the old or
the new image (never recovery: a good image was always there) and that the state agrees; then
the same `mpboot flash` command again completes the update: the new image test-boots and
confirms itself. The final verify writes nothing: a cut during it leaves the flash as a cut
at the sync before it or the mark after it does, both of which are points here.

A few points are real kill -9s, placed by what the board prints on its console: after the
test boot's "APP" line (before or after the app's confirm, whichever the board reached) and
after its "CONFIRM" line.

Default run: 20 of the points, drawn with a fixed seed, and the two kill -9s, dealt into four
test items (pytest -n runs them side by side); the slow marker runs every point.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import qemukit
from conftest import KEYS_DIR, signing_key
from qemukit import Console
from simkit import image_files, make_app, sign_app
from simserve import mpboot, ok

from mpboot.qemu.runner import arm_cut, trace_ops, traced_ops
from mpboot.qemu.serve import FLASH, QemuSimServer

pytestmark = pytest.mark.qemu

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"^device: mpboot: serving SMP"
BOOTED = r"^device: mpboot: (slot (\d) version (\S+)|recovery)"
CUT = r"^mpboot sim: power cut"
OLD, NEW = "1.0.0", "2.0.0"
TIMEOUT_S = "2"  # the CLI's wait for a reply: a cut mid-upload costs the client this much
SEED = 15
SAMPLE = 20
PHASES = ("upload", "finish", "test-boot")


@pytest.fixture(scope="module", autouse=True)
def qemu_board() -> None:
    qemukit.require()


@dataclass(frozen=True)
class Point:
    op: int
    kind: str  # W program, E erase, S sync
    where: str  # slot 0, slot 1 or state
    tear: bool  # half of the operation done (else none of it)
    phase: str

    def __str__(self) -> str:
        return f"op {self.op} ({self.kind} {self.where}{', torn' if self.tear else ''})"


@dataclass(frozen=True)
class Kill:
    """A kill -9 of QEMU once the board printed `after` (a console line of the test boot)."""

    after: str
    phase: str = "test-boot"
    kind: str = "kill -9"
    tear: bool = False
    op: int = -1

    def __str__(self) -> str:
        return f"kill -9 after /{self.after}/"


KILLS = (Kill(r"^device: APP 2\.0\.0"), Kill(r"^device: CONFIRM True"))


class Board:
    """The emulated board in a state directory, served in-process; its console."""

    def __init__(self, state: Path) -> None:
        self.console = Console()
        self.server = QemuSimServer(state, [signing_key(KEY.name).public()], output=self.console.queue.put)
        self.server.start()
        self.port = ["--port", self.server.path]

    def mark(self) -> int:
        return len(self.console.drain())

    def wait(self, pattern: str, after: int = 0, timeout_s: float = 60) -> int:
        return self.console.wait_for(pattern, timeout_s, after)

    def booted(self, after: int) -> tuple[str, int, int]:
        """The version the first boot from line `after` on runs ("recovery": none), its line,
        and the line saying the board serves SMP after it."""
        i = self.wait(BOOTED, after)
        words = self.console.lines[i].split()
        version = "recovery" if words[2].startswith("recovery") else words[5].split("+")[0]
        return version, i, self.wait(SERVING, i)

    def state(self) -> dict[str, dict[str, object]]:
        return {s["version"].split("+")[0]: s for s in json.loads(ok("state", *self.port, "--json"))["images"]}

    def stop(self) -> None:
        self.server.stop()


def flash_cmd(board: Board, image: Path) -> tuple[str, ...]:
    return ("flash", image, *board.port, "--test", "--reset", "--no-progress", "--timeout", TIMEOUT_S)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The board before the update (running a confirmed 1.0.0 from slot 1, an older image in
    slot 0, which the update overwrites), and the reference run's flash operations."""
    work = tmp_path_factory.mktemp("power")
    images = image_files(work, {v: sign_app(make_app(work / v, v, confirm=True, filler=5500),
                                            signing_key(KEY.name), v) for v in ("0.9.0", OLD, NEW)})
    before = work / "before"
    board = Board(before)
    try:
        board.wait(SERVING)
        for v in ("0.9.0", OLD):
            at = board.mark()
            ok("flash", images[v], *board.port, "--confirm", "--reset", "--no-progress")
            assert board.booted(at)[0] == v
    finally:
        board.stop()
    ref = work / "reference"
    shutil.copytree(before, ref)
    trace_ops(ref / FLASH)
    board = Board(ref)
    try:
        at = board.wait(SERVING)
        ok(*flash_cmd(board, images[NEW]))
        version, boot, _ = board.booted(at + 1)
        assert version == NEW
        board.wait(r"^device: CONFIRM True", boot)
        assert board.state()[NEW]["confirmed"]
    finally:
        board.stop()
    return {"images": images, "before": before, "ops": traced_ops(ref / FLASH)}


def area_of(offset: int) -> str:
    # ports/qemu.areas()'s default layout: two 1 MiB slots, then the state.
    return "state" if offset >= 0x200000 else f"slot {offset // 0x100000}"


def phases(ops: list[tuple[str, int]]) -> dict[str, list[Point]]:
    """Every cut point, by phase: the upload (up to the sync that opens the final verify),
    finish (that sync, the test mark and its sync), the test boot (its trial record, the
    app's confirm)."""
    first_sync = next(i for i, (kind, _) in enumerate(ops) if kind == "S")
    mark_sync = next(i for i in range(first_sync + 1, len(ops)) if ops[i][0] == "S")
    out: dict[str, list[Point]] = {p: [] for p in PHASES}
    for i, (kind, offset) in enumerate(ops):
        phase = "upload" if i < first_sync else "finish" if i <= mark_sync else "test-boot"
        for tear in (False, True) if kind != "S" else (False,):
            out[phase].append(Point(i, kind, area_of(offset) if kind != "S" else "-", tear, phase))
    return out


def sampled(ops: list[tuple[str, int]], every: bool) -> list[Point]:
    """SAMPLE of the points, drawn with SEED (or every one), in operation order."""
    points = [p for pts in phases(ops).values() for p in pts]
    if not every:
        points = random.Random(SEED).sample(points, min(SAMPLE, len(points)))
    return sorted(points, key=lambda q: (q.op, q.tear))


def cut_and_complete(world: dict[str, object], work: Path, point: Point | Kill) -> str:
    """'safe' or why not, for one cut."""
    images = world["images"]
    assert isinstance(images, dict)
    state = work / f"p{point.op}{'t' if point.tear else ''}"
    shutil.copytree(world["before"], state)  # type: ignore[arg-type]
    if isinstance(point, Point):
        arm_cut(state / FLASH, point.op, point.tear)
    board = Board(state)
    try:
        at = board.wait(SERVING)
        cmd = flash_cmd(board, images[NEW])
        first = mpboot(*cmd)  # may fail, or recover by itself: the power goes during it or after
        if isinstance(point, Point):
            cut = board.wait(CUT, at)
        else:
            board.wait(point.after, at)
            pid = board.server.pid
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)  # QEMU runs in a process group of its own
            cut = board.wait(r"^mpboot sim: device crashed \(exit -9\)", at)
        version, _, _ = board.booted(cut)
        if version not in (OLD, NEW):
            return f"{point}: booted {version} after the cut"
        # Each cut or reset is followed by one boot: the board is settled after the last one.
        last = cut
        if first.exit_code == 0 and "device reset" in first.stdout:
            last = max(cut, board.wait(r"^mpboot sim: device reset", at))
        version, _, at = board.booted(last)
        st = board.state()
        if not st.get(version, {}).get("active") or version == OLD and not st[OLD]["confirmed"]:
            return f"{point}: booted {version}, state {st}"
        at = board.mark()
        again = mpboot(*cmd)
        if again.exit_code != 0:
            return f"{point}: the same command again: exit {again.exit_code}: {again.stderr.strip()}"
        if "device reset" in again.stdout:
            version, _, _ = board.booted(board.wait(r"^mpboot sim: device reset", at))
            if version != NEW:
                return f"{point}: after the command again, booted {version}"
        st = board.state()
        if not (st[NEW]["active"] and st[NEW]["confirmed"]):
            return f"{point}: after the command again, state {st}"
        return "safe"
    finally:
        board.stop()
        shutil.rmtree(state, ignore_errors=True)


CHUNKS = 4  # test items the points are dealt into (pytest -n spreads them over the cores)


def chunk(ops: list[tuple[str, int]], k: int, every: bool) -> list[Point | Kill]:
    """The k-th share of the points (the sampled ones, or every one) and of the kill -9s."""
    points: list[Point | Kill] = [*sampled(ops, every), *KILLS]
    return points[k::CHUNKS]


def run_chunk(world: dict[str, object], tmp_path: Path, k: int, every: bool, record_property) -> None:  # type: ignore[no-untyped-def]
    ops = world["ops"]
    assert isinstance(ops, list)
    points = chunk(ops, k, every)
    results = [cut_and_complete(world, tmp_path, p) for p in points]
    safe = results.count("safe")
    by_phase = Counter(p.phase for p in points)
    kinds = Counter(p.kind + ("~" if p.tear else "") for p in points)
    record_property("summary", f"power-cut on Cortex-M3 (QEMU) {k + 1}/{CHUNKS}{' (every point)' if every else ''}: "
                               f"{len(points)} cuts ({', '.join(f'{n} {p}' for p, n in by_phase.items())}; "
                               f"{', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}; ~ torn) of a "
                               f"{len(ops)}-operation update, {safe} safe, {len(points) - safe} not")
    failures = [r for r in results if r != "safe"]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("k", range(CHUNKS), ids=[f"part{k + 1}" for k in range(CHUNKS)])
def test_power_cut_during_update_and_test_boot(world: dict[str, object], tmp_path: Path, k: int,
                                               record_property) -> None:  # type: ignore[no-untyped-def]
    run_chunk(world, tmp_path, k, False, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(CHUNKS), ids=[f"part{k + 1}" for k in range(CHUNKS)])
def test_power_cut_every_operation(world: dict[str, object], tmp_path: Path, k: int,
                                   record_property) -> None:  # type: ignore[no-untyped-def]
    run_chunk(world, tmp_path, k, True, record_property)


def test_reference_run_traced_what_the_points_need(world: dict[str, object]) -> None:
    ops = world["ops"]
    assert isinstance(ops, list)
    by_phase = phases(ops)
    kinds = {p: {(q.kind, q.where) for q in pts} for p, pts in by_phase.items()}
    assert {("E", "slot 0"), ("W", "slot 0")} <= kinds["upload"], kinds
    assert ("W", "state") in kinds["finish"] and ("W", "state") in kinds["test-boot"], kinds
    assert sum(map(len, by_phase.values())) >= SAMPLE
    drawn = [p for k in range(CHUNKS) for p in chunk(ops, k, False)]
    assert len(drawn) == SAMPLE + len(KILLS) and {p.phase for p in drawn} == set(PHASES)
