"""The simulated device: the firmware on the MicroPython unix port over a NOR flash file.

Each call is one power-on: a new `micropython` process runs `mpboot/upy_scripts/sim_device.py`
against the flash file, so state survives exactly as much as flash would. Faults
(`MPBOOT_NOR_FAULT`, see firmware/mpboot/ports/nor_sim.py) cut the power mid-operation.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpboot import upy
from mpboot.device import script_path, write_keys_module
from mpboot.errors import DeviceRunError, ImageRefused, UpdateRefused, UsageError, slot_error_text
from mpboot.firmware import firmware_root
from mpboot.keys import PublicKey
from mpboot.upy import compile_tree

CUT_EXIT = 75  # nor_sim.CUT_EXIT: the process lost power

# What marks a state directory as a machine's: its config file.
MACHINE_CONFIGS = {"unix": "device.cfg", "qemu": "qemu.cfg"}


def check_machine(state: Path, machine: str) -> None:
    """Refuses a state directory that holds another machine's device."""
    for other, name in MACHINE_CONFIGS.items():
        if other != machine and (Path(state) / name).exists():
            raise UsageError(f"{state} holds a device of machine {other}, not {machine}: "
                             f"use --machine {other}, or another --state directory")


def check_unix_device(workdir: Path) -> None:
    """Refuses, for the single power-on commands (sim init, boot, install, status), a
    directory that holds an emulated board (`mpboot sim --machine qemu`): they run only the
    unix port's device, and the two keep different files under the same names (flash.img)."""
    if (Path(workdir) / MACHINE_CONFIGS["qemu"]).exists():
        raise UsageError(f"{workdir} holds an emulated Cortex-M3 board (mpboot sim --machine qemu); sim init, "
                         f"boot, install and status work on the unix port's devices only: run it with "
                         f"mpboot sim --state {workdir} --machine qemu and use the SMP commands on its pty")


def build_lib(dest: Path, keys: Sequence[PublicKey]) -> Path:
    """Compile the firmware, the simulated device's mains (sim_device: one command per
    power-on; sim_serve: boot then serve SMP on a pty or over BLE), the `bluetooth` shim the
    unix port lacks, and `keys` (as mpboot_keys) into .mpy files under `dest`, the simulated
    device's sys.path."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)  # exactly this build: nothing left from an earlier one
    compile_tree(firmware_root() / "mpboot", dest / "mpboot")
    with tempfile.TemporaryDirectory(prefix="mpboot-sim-src-") as tmp:
        src = Path(tmp)
        write_keys_module(src, keys)
        for main in ("sim_config.py", "sim_device.py", "sim_serve.py", "bluetooth.py"):
            shutil.copyfile(script_path(main), src / main)
        compile_tree(src, dest)
    return dest


RESERVED_SECTORS = 6  # the state, trust and factory areas, two sectors each
TRUST_RECORD = 2304  # a trust area's sector must hold one trust record (docs/KEYS.md section 5)


@dataclass(frozen=True)
class Geometry:
    size: int = 64 * 1024  # whole chip: slot 0 | slot 1 | state | trust | factory (2 sectors each)
    sector: int = 4096
    align: int = 1
    # Laid out with a trust area (docs/KEYS.md), when its sectors can hold a trust record
    # (trust_area). False: a device made before it (its config has no "trust=1"), laid out as
    # slot 0 | slot 1 | state | factory; it keeps its frozen keys.
    trust: bool = True
    # Each of stage 1's two slots (issue 19), a multiple of `sector`: laid out after the
    # app's slots (slot 0 | slot 1 | stage 1's 0 | stage 1's 1 | state ...). 0: none, the
    # app-only layout (its config has no "s1").
    s1_size: int = 0

    @classmethod
    def for_slots(cls, slot_size: int, sector: int = 4096, align: int = 1, s1_size: int = 0) -> Geometry:
        """The chip whose two slots are `slot_size` bytes (a multiple of `sector`), and whose
        stage-1 slots are `s1_size` bytes each (0: none)."""
        reserved = RESERVED_SECTORS if sector >= TRUST_RECORD else RESERVED_SECTORS - 2
        return cls(2 * slot_size + 2 * s1_size + reserved * sector, sector, align, s1_size=s1_size)

    @property
    def trust_area(self) -> bool:
        """Whether the chip has a trust area (ports/unix.areas(): not with sectors smaller
        than a trust record, such as `mpboot sim init --sector 1k`)."""
        return self.trust and self.sector >= TRUST_RECORD

    @property
    def reserved_sectors(self) -> int:
        return RESERVED_SECTORS if self.trust_area else RESERVED_SECTORS - 2

    @property
    def slot_size(self) -> int:
        return (self.size // self.sector - self.reserved_sectors - 2 * (self.s1_size // self.sector)) // 2 * self.sector

    @property
    def boot_heap_kib(self) -> int:
        """The heap a power-on that boots needs: the unix port cannot map flash, so the boot
        copies the image it runs into RAM (as on esp32), plus 128 KiB for the firmware and
        service modules (.mpy, about 60 KiB; frozen on a board they cost none) and the app."""
        return (self.slot_size + self.s1_size + 128 * 1024) // 1024

    @property
    def s1_start(self) -> int | None:
        """Stage 1's slot 0, after the app's slots (None: no stage-1 slots)."""
        return 2 * self.slot_size if self.s1_size else None

    @property
    def state_start(self) -> int:
        return 2 * self.slot_size + 2 * self.s1_size

    @property
    def trust_start(self) -> int | None:
        """The trust area: the two sectors after the state area (None: no trust area)."""
        return self.state_start + 2 * self.sector if self.trust_area else None

    @property
    def factory_start(self) -> int:
        """The factory area: the chip's last two sectors."""
        return self.size - 2 * self.sector


@dataclass
class Run:
    """One power-on: its output, and whether the power was cut during it."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def cut(self) -> bool:
        return self.returncode == CUT_EXIT

    def line(self, prefix: str) -> str | None:
        for line in self.stdout.splitlines():
            if line.startswith(prefix):
                return line
        return None


@dataclass
class SlotStatus:
    ok: bool
    version: str = ""
    counter: int = 0
    confirmed: bool = False
    error: int = 0


@dataclass
class Status:
    seq: int
    active: int
    test: int
    trial: int
    floor: int
    found: bool
    pos: int  # state area offset of the next record (-1: the next one switches sectors)
    record: int  # state record size
    slots: list[SlotStatus] = field(default_factory=list)
    s1: Status1 | None = None  # stage 1's pair, on a chip with stage-1 slots


@dataclass
class Status1:
    """Stage 1's fields of the state record (v2) and its slots' verdicts."""

    active: int
    test: int
    trial: int
    floor: int
    flags: int  # the record's pair flags (PAIR 1, PAIR_APP_OK 2, PAIR_S1_OK 4)
    slots: list[SlotStatus] = field(default_factory=list)


_DEVICE_ERROR = re.compile(r"\berror (-?\d+)\b")


def explain_console_line(line: str) -> str:
    """A line of the device's console with each slot error number named and explained:
    "slot 0: error 1" -> "slot 0: error 1 (BAD_MAGIC: empty, or not an MCUboot image)"."""
    return _DEVICE_ERROR.sub(lambda m: f"{m.group(0)} ({slot_error_text(int(m.group(1)))})", line)


def _fields(line: str) -> dict[str, str]:
    """The KEY=VALUE words of one line the device printed (STATE, SLOT, INSTALLED)."""
    return dict(re.findall(r"(\w+)=(\S+)", line))


def write_config(path: Path, fields: dict[str, object]) -> None:
    """A simulated device's config file (upy_scripts/sim_config.py reads it on the device):
    one KEY=VALUE per line, so a value may hold spaces (a path under "My Documents")."""
    Path(path).write_text("".join(f"{k}={v}\n" for k, v in fields.items()))


def read_config(path: Path) -> dict[str, str]:
    text = Path(path).read_text()
    lines = text.splitlines()
    if len(lines) == 1 and " size=" in lines[0]:  # the one-line format of earlier versions
        return _fields(lines[0])
    return dict(line.split("=", 1) for line in lines if "=" in line)


@dataclass(frozen=True)
class Installed:
    slot: int
    version: str


def install_result(run: Run) -> Installed:
    """What an install power-on did: the slot and version, or the device's refusal raised as
    ImageRefused (image or policy code; VerificationFailed when the whole image had arrived)
    or UpdateRefused (updater code): the types and codes the same refusal has over SMP
    (without the SMP wire details)."""
    line = run.line("INSTALLED")
    if line:
        f = _fields(line)
        return Installed(int(f["slot"]), f["version"])
    line = run.line("REFUSED")
    if line:
        _, kind, number, *finish = line.split()
        if kind == "image":
            refusal = ImageRefused.from_number(int(number))
            raise refusal.after_upload() if finish else refusal
        raise UpdateRefused.from_number(int(number))
    raise DeviceRunError(f"simulated device gave no install result: {run.stdout.strip()[-200:]!r}")


class SimDevice:
    """A simulated board in `workdir`: flash file, config, and the compiled firmware."""

    def __init__(self, workdir: Path, lib: Path, geometry: Geometry = Geometry(), *,
                 vendor_id: bytes | None = None, class_id: bytes | None = None,
                 downgrade: bool = True, heapsize: str | None = None,
                 uid: bytes | None = None) -> None:
        self.workdir = Path(workdir).absolute()  # its config names files the device opens
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lib = Path(lib)
        self.geometry = geometry
        # a power-on's heap: as given, else what booting this slot size takes (4 MiB at least)
        self.heapsize = heapsize or f"{max(4096, geometry.boot_heap_kib)}k"
        self.flash = self.workdir / "flash.bin"
        fields: dict[str, object] = {"flash": self.flash, "size": geometry.size, "sector": geometry.sector,
                                     "align": geometry.align, "trust": int(geometry.trust)}
        if geometry.s1_size:
            fields["s1"] = geometry.s1_size
        if vendor_id is not None:
            fields["vendor"] = vendor_id.hex()
        if class_id is not None:
            fields["class"] = class_id.hex()
        if not downgrade:
            fields["downgrade"] = 0
        # The board's unique id (machine.unique_id() on hardware): random per simulated board,
        # kept in its config, so a fleet of sims are different devices (BLE address, OS info).
        self.uid = uid if uid is not None else os.urandom(8)
        fields["uid"] = self.uid.hex()
        self.config = self.workdir / "device.cfg"
        if self.config.exists():
            # Stage 1's proof window in ms (upy_scripts/sim_serve.py; default 300000), set by
            # hand or by tests, is kept when the board is opened again.
            prove = read_config(self.config).get("prove")
            if prove is not None:
                fields["prove"] = prove
        write_config(self.config, fields)

    @classmethod
    def create(cls, workdir: Path, keys: Sequence[PublicKey], geometry: Geometry = Geometry(), *,
               vendor_id: bytes | None = None, class_id: bytes | None = None,
               downgrade: bool = True) -> SimDevice:
        """A new simulated board in `workdir` trusting `keys`, its flash blank."""
        workdir = Path(workdir)
        check_unix_device(workdir)
        if (workdir / MACHINE_CONFIGS["unix"]).exists():
            raise UsageError(f"{workdir}: there is a simulated device here already")
        if geometry.slot_size < geometry.sector:
            raise UsageError(f"a {geometry.size}-byte flash with {geometry.sector}-byte sectors has no room "
                             "for two slots, the state area, the trust area and the factory area")
        lib = build_lib(workdir / "lib", keys)
        return cls(workdir, lib, geometry, vendor_id=vendor_id, class_id=class_id, downgrade=downgrade)

    @classmethod
    def open(cls, workdir: Path) -> SimDevice:
        """The simulated board `create` made in `workdir`."""
        workdir = Path(workdir)
        check_unix_device(workdir)
        try:
            cfg = read_config(workdir / "device.cfg")
            geometry = Geometry(int(cfg["size"]), int(cfg["sector"]), int(cfg["align"]),
                                cfg.get("trust") == "1",  # made before the trust area: none
                                int(cfg.get("s1", "0")))
        except FileNotFoundError:
            raise UsageError(f"{workdir}: no simulated device here (mpboot sim init)") from None
        except (KeyError, ValueError, UnicodeDecodeError):
            raise UsageError(f"{workdir}/device.cfg: not a simulated device's config; make a new "
                             "device (mpboot sim init)") from None
        return cls(workdir, workdir / "lib", geometry,
                   vendor_id=bytes.fromhex(cfg["vendor"]) if "vendor" in cfg else None,
                   class_id=bytes.fromhex(cfg["class"]) if "class" in cfg else None,
                   downgrade=cfg.get("downgrade", "1") == "1",
                   uid=bytes.fromhex(cfg["uid"]) if "uid" in cfg else None)

    # Flash files (the chip and its wear counters) as a power-off snapshot.
    def flash_files(self) -> list[Path]:
        return [self.flash, self.flash.with_name(self.flash.name + ".wear")]

    def snapshot(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for f in self.flash_files():
            if f.exists():
                shutil.copyfile(f, dest / f.name)

    def restore(self, src: Path) -> None:
        for f in self.flash_files():
            saved = src / f.name
            if saved.exists():
                shutil.copyfile(saved, f)
            else:
                f.unlink(missing_ok=True)

    def wear(self) -> list[int]:
        data = self.flash_files()[1].read_bytes()
        return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]

    def run(self, *args: object, fault: str | None = None, trace: Path | None = None,
            heapsize: str | None = None) -> Run:
        env = {}
        if fault:
            env["MPBOOT_NOR_FAULT"] = fault
        if trace:
            env["MPBOOT_NOR_TRACE"] = str(trace)
        proc = upy.run(["-m", "sim_device", self.config, *map(str, args)], path=[self.lib],
                       heapsize=heapsize or self.heapsize, env=env)
        run = Run(proc.returncode, proc.stdout, proc.stderr)
        if proc.returncode not in (0, CUT_EXIT):
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            err = DeviceRunError(f"simulated device failed: {tail[-1] if tail else proc.returncode}")
            err.add_note(proc.stdout[-2000:] + proc.stderr[-3000:])
            raise err
        return run

    def boot(self, **kw: object) -> Run:
        return self.run("boot", **kw)  # type: ignore[arg-type]

    def install(self, image: Path, mode: str = "test", chunk: int = 512, manifest: bool = False,
                sha: bool = False, checkpoint: int | None = None, **kw: object) -> Run:
        """Take `image` through the updater. `sha`: name the session by the image's SHA-256,
        so it is persisted and an install after a power cut resumes from its last
        checkpoint (every `checkpoint` bytes; the firmware's default when None)."""
        args: list[object] = ["install", image, mode, chunk]
        if manifest:
            args.append("manifest")
        if sha:
            args.append("sha")
        if checkpoint:
            args.append(f"ckpt={checkpoint}")
        return self.run(*args, **kw)  # type: ignore[arg-type]

    def age(self, records: int) -> Run:
        return self.run("age", records)

    def age_to(self, free: int) -> None:
        """Write state records until the current state sector has `free` record slots left
        (0: the next state change erases the other sector and switches to it)."""
        st = self.status()
        per = self.geometry.sector // st.record
        now = 0 if st.pos < 0 else (self.geometry.sector - st.pos % self.geometry.sector) // st.record
        n = (now - free) % per
        if n:
            self.age(n)

    def status(self) -> Status:
        run = self.run("status")
        state = _fields(run.line("STATE") or "")
        st = Status(int(state["seq"]), int(state["active"]), int(state["test"]),
                    int(state["trial"]), int(state["floor"]), state["found"] == "1",
                    int(state["pos"]), int(state["record"]))
        s1 = run.line("STATE1")
        if s1:
            f = _fields(s1)
            st.s1 = Status1(int(f["active"]), int(f["test"]), int(f["trial"]), int(f["floor"]), int(f["flags"]))
        for line in run.stdout.splitlines():
            if line.startswith(("SLOT ", "S1SLOT ")):
                f = _fields(line)
                if "error" in f:
                    slot = SlotStatus(False, error=int(f["error"]))
                else:
                    slot = SlotStatus(True, f["version"], int(f["counter"]), f["confirmed"] == "1")
                (st.slots if line.startswith("SLOT ") else st.s1.slots).append(slot)  # type: ignore[union-attr]
        return st


