"""The power-cut matrix: run a scenario on the simulated device, count its flash operations,
then repeat it cutting the power at every operation (and tearing writes and erases), reboot
after each cut and check the device boots the old or the new image, that its state is
consistent, and that the scenario then completes."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mpboot.sim import Run, SimDevice
from simkit import Booted, boot

# Torn variants per operation kind ("" = the operation does not happen at all).
TEARS = {"W": ("", "half", "word"), "E": ("", "erase-half")}


@dataclass(frozen=True)
class Step:
    kind: str  # "install", "zinstall" (image: a zsmp file, test_zupload.zsmp_file), "boot"
    # or "pairmark" (stage-1 slots: mark both pairs' free slots for one combined test boot)
    image: Path | None = None
    mode: str = "test"
    pair: int = 0  # install: 0 the app's slots, 1 stage 1's


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    old: str  # version running before the scenario
    new: str  # version the scenario installs
    # On a chip with stage-1 slots: stage 1's versions before and after. The pair booted
    # after a cut must be (old, old1) or (new, new1), or one of `also` (the pairs a scenario
    # passes through when it updates the images one after the other), and satisfy `deps`:
    # (app version, the lowest stage-1 version it may run with), its DEPENDENCY TLV.
    old1: str | None = None
    new1: str | None = None
    also: tuple[tuple[str, str], ...] = ()
    deps: tuple[tuple[str, str], ...] = ()
    # The steps where an update starts: after a cut the scenario completes from the start of
    # the update the cut fell in (an update done earlier is not replayed: it would meet its
    # own result, e.g. a newer app where the reference run still had the old one).
    phases: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Point:
    step: int
    op: int
    kind: str
    tear: str

    def fault(self) -> str:
        return f"cut={self.op}" + (f",tear={self.tear}" if self.tear else "")


def run_step(dev: SimDevice, step: Step, **kw: object) -> Run:
    if step.kind == "install":
        assert step.image is not None
        # Named by its sha with a checkpoint every sector: cuts land in checkpoint writes,
        # and the completion run after a cut resumes the persisted session.
        if step.pair:
            return dev.run("install", step.image, step.mode, 512, "sha", "ckpt=4096", "image=1", **kw)  # type: ignore[arg-type]
        return dev.install(step.image, step.mode, chunk=512, sha=True, checkpoint=4096, **kw)
    if step.kind == "pairmark":
        return dev.run("pairmark", **kw)  # type: ignore[arg-type]
    if step.kind == "zinstall":
        # A compressed upload and its test mark through the SMP server (sim_device zsmp).
        return dev.run("zsmp", step.image, "ckpt=4096", **kw)  # type: ignore[arg-type]
    return dev.boot(**kw)  # type: ignore[arg-type]


def outcome(step: Step, run: Run) -> tuple[object, ...]:
    """What a step did, independent of which slot it used."""
    if step.kind == "install":
        line = run.line("INSTALLED") or run.line("REFUSED") or run.stdout
        return ("install", line.split("version=")[-1] if "INSTALLED" in line else line)
    if step.kind == "zinstall":
        return ("zinstall", run.line("ZDONE"), run.stdout.strip().splitlines()[-1])  # the mark's reply
    if step.kind == "pairmark":
        return ("pairmark", "MARKED" if run.line("MARKED") else run.line("REFUSED"))  # not its slots
    b = Booted.parse(run)
    if b.s1 is not None:
        return ("boot", b.version, b.trial, b.app, b.s1, b.s1_trial)
    return ("boot", b.version, b.trial, b.app)


class Matrix:
    def __init__(self, dev: SimDevice, scenario: Scenario, work: Path) -> None:
        self.dev = dev
        self.scenario = scenario
        self.work = work
        self.snaps: list[Path] = []
        self.ops: list[list[str]] = []  # per step: the kind of each flash operation
        self.expected: list[tuple[object, ...]] = []

    def trace(self) -> None:
        """The reference run: snapshots before each step, its operations, its outcomes."""
        for i, step in enumerate(self.scenario.steps):
            snap = self.work / f"{self.scenario.name}-before-{i}"
            self.dev.snapshot(snap)
            self.snaps.append(snap)
            trace = self.work / f"{self.scenario.name}-trace-{i}.txt"
            trace.unlink(missing_ok=True)
            run = run_step(self.dev, step, trace=trace)
            assert run.returncode == 0, run.stderr
            self.expected.append(outcome(step, run))
            self.ops.append([line.split()[0] for line in trace.read_text().splitlines()] if trace.exists() else [])

    def points(self) -> list[Point]:
        return [Point(i, j, kind, tear)
                for i, kinds in enumerate(self.ops) for j, kind in enumerate(kinds)
                for tear in TEARS[kind]]

    def op_count(self) -> int:
        return sum(map(len, self.ops))

    def check(self, point: Point, dev: SimDevice) -> str:
        """'safe', 'bricked' or 'unsafe: why' for one cut, on `dev` (a device of its own)."""
        sc = self.scenario
        dev.restore(self.snaps[point.step])
        run = run_step(dev, sc.steps[point.step], fault=point.fault())
        if not run.cut:
            return f"unsafe: {point} did not cut the power"
        after = boot(dev)
        if after.slot < 0:
            return "bricked"
        if after.version not in (sc.old, sc.new) or after.app != after.version:
            return f"unsafe: booted {after}"
        st = dev.status()
        if not st.found or st.active not in (0, 1):
            return f"unsafe: state {st}"
        active = st.slots[st.active]
        if not (active.ok and active.confirmed and active.version.split("+")[0] in (sc.old, sc.new)):
            return f"unsafe: active slot {active}"
        if after.trial != (st.trial == after.slot) and not after.confirmed:
            return f"unsafe: trial flag {after} vs {st}"
        if sc.old1 is not None:
            why = self.check_pair(after, st)
            if why:
                return f"unsafe: {why}"
        # The scenario completes from here, with the same outcomes as the reference run.
        start = max(p for p in sc.phases if p <= point.step)
        for step, want in zip(sc.steps[start:], self.expected[start:]):
            got = outcome(step, run_step(dev, step))
            if got != want:
                return f"unsafe: after the cut, {step.kind} gave {got}, expected {want}"
        return "safe"

    def check_pair(self, after: Booted, st: object) -> str:
        """Two pairs: the pair that booted, and the confirmed pair in the state, are the old
        or the new one (or one the scenario passes through), never mixed; what booted meets
        its dependencies; stage 1's active slot holds its confirmed image."""
        sc = self.scenario
        pairs = ((sc.old, sc.old1), (sc.new, sc.new1), *sc.also)
        if (after.version, after.s1) not in pairs:
            return f"booted a mixed pair {after}"
        need = dict(sc.deps).get(after.version)
        if need is not None and (not after.s1 or _v3(after.s1) < _v3(need)):
            return f"booted app {after.version} with stage 1 {after.s1!r}, below its dependency {need}"
        s1 = getattr(st, "s1")
        if s1 is None or s1.active not in (0, 1):
            return f"stage-1 state {s1}"
        active1 = s1.slots[s1.active]
        app = st.slots[st.active]  # type: ignore[attr-defined]
        if not (active1.ok and active1.confirmed):
            return f"stage-1 active slot {active1}"
        if (app.version.split("+")[0], active1.version.split("+")[0]) not in pairs:
            return f"confirmed a mixed pair: app {app}, stage 1 {active1}"
        return ""

    def run_points(self, points: Iterable[Point], base: SimDevice, workers: int = 2) -> Counter[str]:
        points = list(points)

        def one(args: tuple[int, Point]) -> str:
            n, point = args
            d = SimDevice(self.work / f"{self.scenario.name}-p{n}", base.lib, base.geometry,
                          heapsize=base.heapsize)
            try:
                return self.check(point, d)
            finally:
                shutil.rmtree(d.workdir, ignore_errors=True)

        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, enumerate(points)))
        self.failures = [f"{p}: {r}" for p, r in zip(points, results) if r != "safe"]
        return Counter("unsafe" if r.startswith("unsafe") else r for r in results)


def _v3(version: str) -> tuple[int, ...]:
    """major, minor, revision of "M.m.r[+b]": dependencies compare as MCUboot does."""
    return tuple(int(x) for x in version.split("+")[0].split("."))[:3]


def sample(points: list[Point], k: int, seed: int) -> list[Point]:
    return points if len(points) <= k else random.Random(seed).sample(points, k)


def summary(label: str, counts: Counter[str]) -> str:
    n = sum(counts.values())
    line = f"power-cut{label}: {n} points, {counts['safe']} safe, {counts['bricked']} bricked"
    if counts["unsafe"]:
        line += f", {counts['unsafe']} unsafe"
    return line


