"""`mpboot sim --machine qemu`: the emulated Cortex-M3 board (mpboot.qemu) as a long-running
device serving SMP on a pty, as `mpboot sim` runs the unix port (mpboot.sim.serve, whose relay,
pty, --link and --baud pacing this reuses).

The state directory holds `qemu.cfg` (the board's slot size and the build's vendor and class
ids) and `flash.img`, the board's 16 MiB flash: QEMU maps the file, so what the device writes
is in it at once and survives resets, a stopped simulator and kill -9. The firmware is
MicroPython's qemu port with mpboot and the trusted keys frozen in (mpboot.qemu.build, built
once per key set and cached).

Each power-on is one QEMU run: the runner enters the raw REPL and calls
mpboot.ports.qemu.main(), the board's boot.py (the port runs none). It boots the image in
place and then serves SMP on the board's one UART, the REPL's. The boot's lines and the app's
prints come first on that UART: the relay shows them ("device: ..."), up to the device's line
saying it serves SMP, and from there relays the UART to the user's pty. A reset request exits
QEMU (machine.reset() on this port) and the relay starts it again, as a board comes back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from mpboot.errors import UsageError
from mpboot.keys import PublicKey
from mpboot.qemu.build import MICROPYTHON_TAG, Firmware, build_firmware, is_built
from mpboot.qemu.runner import FLASH_SIZE, SECTOR, START_TIMEOUT_S, QemuBoard, create_flash
from mpboot.sim import check_machine, read_config, write_config
from mpboot.sim.serve import Power, SimServer, check_same_device

CONFIG = "qemu.cfg"
FLASH = "flash.img"
DEFAULT_SLOT_SIZE = 0x100000  # mpboot.ports.qemu.areas()'s default
# Two slots, then state, factory and trust (two sectors each), in the chip (the flash but its
# last sector, the unique id's).
MAX_SLOT_SIZE = (FLASH_SIZE - 7 * SECTOR) // 2 // SECTOR * SECTOR


class _QemuPower(Power):
    """One QEMU run: its UART socket is the relay's; the console comes on it first."""

    def __init__(self, board: QemuBoard) -> None:
        assert board.proc is not None and board.sock is not None
        # The raw REPL ends the program's output with 04, its error with 04, then prompts.
        super().__init__(board.proc, board.sock.fileno(), None, console=True, ended=b"\x04>")
        self.board = board

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # QEMU runs in its own process group
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.board.stop()


class QemuSimServer(SimServer):
    """SimServer (start, wait, stop, request_stop, path, error) on the emulated board.

    `entry`: device code the raw REPL runs at each power-on instead of the boot entry
    (tests: measurements around the service); it must print the serving line before SMP."""

    def __init__(self, state: Path, keys: Sequence[PublicKey], *, link: Path | None = None,
                 slot_size: int | None = None, vendor_id: bytes | None = None,
                 class_id: bytes | None = None, baud: int | None = None, buf_size: int = 2048,
                 buf_count: int = 4, output: Callable[[str], None] = print, entry: str | None = None,
                 s1_size: int | None = None) -> None:
        super().__init__(state, keys, link=link, slot_size=slot_size, vendor_id=vendor_id, class_id=class_id,
                         baud=baud, buf_size=buf_size, buf_count=buf_count, output=output, s1_size=s1_size)
        if slot_size is not None and not (SECTOR <= slot_size <= MAX_SLOT_SIZE and slot_size % SECTOR == 0):
            raise UsageError(f"slot size {slot_size}: the emulated board takes a multiple of {SECTOR} "
                             f"up to {MAX_SLOT_SIZE} (two slots in its 16 MiB flash)")
        self.entry = entry
        self.firmware: Firmware | None = None
        self.flash = self.state / FLASH
        self.board_slot_size = DEFAULT_SLOT_SIZE
        self.board_s1_size = 0
        self.policy: dict[str, bytes | None] = {}

    def open_device(self) -> None:
        check_machine(self.state, "qemu")
        path = self.state / CONFIG
        if path.exists():
            cfg = read_config(path)
            check_same_device(self.state, cfg, int(cfg["slot_size"]), slot_size=self.slot_size,
                              vendor_id=self.vendor_id, class_id=self.class_id)
            if self.s1_size is not None and self.s1_size != int(cfg.get("s1_size", "0")):
                raise UsageError(f"{self.state} holds a board with {cfg.get('s1_size', 'no')}-byte stage-1 slots, "
                                 f"not {self.s1_size}: use another --state directory")
        else:
            cfg = {"slot_size": str(self.slot_size or DEFAULT_SLOT_SIZE)}
            if self.s1_size:
                slot = int(cfg["slot_size"])
                # Stage 1's two slots follow the trust area (mpboot.ports.qemu.main: state + 16 sectors).
                if self.s1_size % SECTOR or 2 * slot + 16 * SECTOR + 2 * self.s1_size > FLASH_SIZE - SECTOR:
                    raise UsageError(f"stage-1 slot size {self.s1_size}: a multiple of {SECTOR} whose two slots "
                                     f"fit after the app's two {slot}-byte slots in the 16 MiB flash")
                cfg["s1_size"] = str(self.s1_size)
            for name, value in (("vendor", self.vendor_id), ("class", self.class_id)):
                if value is not None:
                    cfg[name] = value.hex()
            write_config(path, cfg)
        self.board_slot_size = int(cfg["slot_size"])
        self.board_s1_size = int(cfg.get("s1_size", "0"))
        self.policy = {f"{name}_id": bytes.fromhex(cfg[name]) if name in cfg else None
                       for name in ("vendor", "class")}
        if not self.flash.is_file():
            create_flash(self.flash)
        if not is_built(self.keys):
            self.output(f"mpboot sim: building MicroPython {MICROPYTHON_TAG} (qemu port) with mpboot and "
                        f"the keys frozen in; the first build takes about half a minute")
        self.firmware = build_firmware(self.keys)

    def describe(self) -> str:
        s1 = f", two {self.board_s1_size}-byte stage-1 slots" if self.board_s1_size else ""
        return (f"the emulated Cortex-M3 (MicroPython {MICROPYTHON_TAG} qemu port, mps2-an385), "
                f"two {self.board_slot_size}-byte slots run in place{s1}, {SECTOR}-byte sectors")

    def entry_code(self) -> str:
        """What the raw REPL runs at each power-on."""
        if self.entry is not None:
            return self.entry
        policy = "".join(f", {k}={v!r}" for k, v in self.policy.items() if v is not None)
        if self.board_s1_size:
            policy += f", s1_size={self.board_s1_size}"
        return (f"from mpboot.ports import qemu\n"
                f"qemu.main({self.board_slot_size}, {self.buf_size}, {self.buf_count}{policy})\n")

    def power_on(self) -> None:
        assert self.firmware is not None
        board = QemuBoard(self.firmware.elf, self.flash)
        board.start()
        try:
            board.raw_repl()
            board.write(self.entry_code().encode() + b"\x04")
            board.read_until(b"OK", START_TIMEOUT_S)
            assert board.sock is not None
            board.sock.setblocking(False)
        except BaseException:
            board.stop()
            raise
        self.powered(_QemuPower(board), board.pending())
