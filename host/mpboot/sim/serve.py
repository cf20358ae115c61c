"""`mpboot sim`: a simulated device that keeps running and serves SMP on a pty, as a board
on a USB-serial adapter does.

The user gets one pty (its path printed, optionally symlinked) for the life of the simulator.
Each power-on of the device is a new `micropython` process (upy_scripts/sim_serve.py) on a
fresh inner pty pair: it boots the image its flash file holds (the app prints), then serves
SMP until a client asks for a reset, and exits; the simulator then powers it on again, so RAM
state is really gone and only the flash file (in the state directory) persists. Another
machine powers on its own way (a Power, from SimServer.power_on): mpboot.qemu.serve runs the
emulated Cortex-M3 board, whose console comes on its UART before SMP. A relay
thread moves bytes between the user's pty and the device's, optionally paced like an 8N1 line
at `baud`; bytes sent while no device process runs are lost, as on a UART whose chip is in
reset. A device that keeps crashing right after power-on is stopped and reported.

With `ble=True` the device serves SMP over BLE instead (docs/BLE.md): the simulator runs the
device's radio, a Bumble peripheral (mpboot.sim.radio.Companion) on an event loop in its own
thread, on the Bumble transport `radio` (another simulator's air, `mpboot sim air`, a USB
dongle) or else on an air it hosts itself; each power-on's `bluetooth` shim connects to it.
The radio outlives power-ons, so the board keeps its address, and a reset ends its
connections as a power cut does.

With `udp=PORT` the device serves SMP over UDP instead (docs/PROTOCOL.md, "SMP over UDP"):
each power-on binds 127.0.0.1:PORT itself (the real transport over the host's network
stack), so between power-ons nothing listens there and a client's datagrams are lost (its
host answers them with ICMP port unreachable), as with a board that resets.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from mpboot import upy
from mpboot.errors import MpbootError, UsageError
from mpboot.keys import PublicKey
from mpboot.sim import (
    CUT_EXIT,
    Geometry,
    SimDevice,
    build_lib,
    check_machine,
    explain_console_line,
    read_config,
    write_config,
)
from mpboot.sim.line import PacedLine

if TYPE_CHECKING:
    from mpboot.sim.radio import CompanionThread, RadioInfo

SECTOR = 4096
ALIGN = 4
DEFAULT_SLOT_SIZE = 256 * 1024
TIMINGS = ("none", "nor")
FAST_FAIL_S = 2.0  # a crash sooner than this after power-on counts towards a crash loop
FAST_FAILS = 3  # crash-loop: this many fast crashes in a row stop the simulator
PENDING_MAX = 64 * 1024  # bytes the relay holds per direction before it pushes back / drops
_READ = 65536
UDP_MAX = 1472  # the device's buf_size over UDP is at most this (mpboot.smp.service.UDP_MAX)


def open_state(state: Path, keys: Sequence[PublicKey], *, slot_size: int | None = None,
               vendor_id: bytes | None = None, class_id: bytes | None = None,
               s1_size: int | None = None) -> SimDevice:
    """The simulated device in `state`: created (blank flash, `slot_size` slots of 4 KiB
    sectors, with `s1_size` stage-1 slots a board with two stages) if the directory holds
    none, else opened; refused if it was made with another slot size, stage-1 slot size,
    vendor or class id. Its firmware is rebuilt to trust `keys`."""
    state = Path(state)
    if not (state / "device.cfg").exists():
        slot = DEFAULT_SLOT_SIZE if slot_size is None else slot_size
        if slot < SECTOR or slot % SECTOR:
            raise UsageError(f"slot size {slot} must be a non-zero multiple of {SECTOR}")
        if s1_size and s1_size % SECTOR:
            raise UsageError(f"stage-1 slot size {s1_size} must be a multiple of {SECTOR}")
        return SimDevice.create(state, keys, Geometry.for_slots(slot, SECTOR, ALIGN, s1_size=s1_size or 0),
                                vendor_id=vendor_id, class_id=class_id)
    dev = SimDevice.open(state)
    check_same_device(state, read_config(dev.config), dev.geometry.slot_size, slot_size=slot_size,
                      vendor_id=vendor_id, class_id=class_id)
    if s1_size is not None and s1_size != dev.geometry.s1_size:
        raise UsageError(f"{state} holds a device with {dev.geometry.s1_size or 'no'}-byte stage-1 slots, "
                         f"not {s1_size}: use another --state directory")
    build_lib(state / "lib", keys)
    return dev


def check_same_device(state: Path, cfg: dict[str, str], have_slot_size: int, *, slot_size: int | None,
                      vendor_id: bytes | None, class_id: bytes | None) -> None:
    """Refuses to run the device in `state` (its config `cfg`: vendor, class as hex) with
    another slot size, vendor or class id than it was made with (None: as it was made)."""
    if slot_size is not None and slot_size != have_slot_size:
        raise UsageError(f"{state} holds a device with {have_slot_size}-byte slots, "
                         f"not {slot_size}: use another --state directory")
    for name, want in (("vendor", vendor_id), ("class", class_id)):
        have = cfg.get(name)
        if want is not None and want.hex() != have:
            raise UsageError(f"{state} holds a device with {'no' if have is None else 'another'} "
                             f"{name} id: use another --state directory")


SERVING_LINE = b"mpboot: serving SMP"  # the device's line when its update service starts
CONSOLE_LINE_MAX = 4096  # a console line longer than this is shown in pieces


class Power:
    """One power-on: the device process, the host end of its UART (`uart`, a non-blocking
    descriptor the relay reads and writes) and where its console lines come from: `out` (a
    pipe), or with `console` the UART itself until the device says it serves SMP (a board
    whose one UART is its REPL's; then `ended`, if given, is what the UART ends with when the
    device's program ended without serving: the board sits at its REPL). Machines other than
    the unix port subclass it for their own close() and kill()."""

    def __init__(self, proc: subprocess.Popen[bytes], uart: int, out: IO[bytes] | None, *,
                 console: bool = False, ended: bytes | None = None) -> None:
        self.proc = proc
        self.uart = uart
        self.out = out
        self.console = console
        self.ended = ended
        self.started = time.monotonic()
        self.partial = b""  # the console line being received

    def kill(self) -> None:
        self.proc.kill()

    def close(self) -> None:
        """Releases the descriptors (the process has ended)."""
        if self.out is not None:
            self.out.close()


class _UnixPower(Power):
    """A micropython process on a pty pair (the host keeps the slave open so the master never
    reads EIO; it is closed with the process), its stdout the console."""

    def __init__(self, proc: subprocess.Popen[bytes], master: int, slave: int) -> None:
        assert proc.stdout is not None
        super().__init__(proc, master, proc.stdout)
        self.slave = slave

    def close(self) -> None:
        super().close()
        os.close(self.uart)
        os.close(self.slave)


class SimServer:
    """The long-running simulated device in `state` (see the module docstring).

    `output` receives every line for people: the simulator's own ("mpboot sim: ..."), and the
    device's console ("device: ...": the boot line, the app's prints). Call start(), then
    wait() until it returns True (stopped: by stop()/request_stop(), an interrupt of the
    device, or a crash loop, then `error` says why); stop() cleans up (idempotent)."""

    def _heapsize(self) -> str:
        """The device's heap: as given, else what booting its slot size takes."""
        if self.heapsize:
            return self.heapsize
        assert self.device is not None
        return f"{self.device.geometry.boot_heap_kib}k"

    def __init__(self, state: Path, keys: Sequence[PublicKey], *, link: Path | None = None,
                 slot_size: int | None = None, vendor_id: bytes | None = None,
                 class_id: bytes | None = None, timing: str = "none", baud: int | None = None,
                 buf_size: int = 2048, buf_count: int = 4, heapsize: str | None = None,
                 ble: bool = False, radio: str | None = None, ble_name: str | None = None,
                 output: Callable[[str], None] = print, s1_size: int | None = None,
                 udp: int | None = None) -> None:
        if timing not in TIMINGS:
            raise UsageError(f"flash timing {timing!r}: expected one of {', '.join(TIMINGS)}")
        if baud is not None and baud <= 0:
            raise UsageError(f"baud rate {baud} must be positive")
        if buf_size < 64 or buf_count < 1:
            raise UsageError("buf_size must be at least 64 and buf_count at least 1")
        if not ble and (radio is not None or ble_name is not None):
            raise UsageError("--radio and --ble-name go with --ble")
        if ble and link is not None:
            raise UsageError("--link names the UART's pty; with --ble the device serves SMP over BLE only")
        if udp is not None:
            if not 0 < udp < 65536:
                raise UsageError(f"UDP port {udp}: expected 1 to 65535")
            if ble:
                raise UsageError("--udp and --ble exclude each other: the device serves SMP on one of them")
            if link is not None:
                raise UsageError("--link names the UART's pty; with --udp the device serves SMP over UDP only")
        if ble_name is not None and (not 0 < len(ble_name.encode()) <= 29
                                     or any(c.isspace() for c in ble_name)):
            raise UsageError(f"BLE name {ble_name!r}: 1 to 29 bytes of UTF-8, no spaces")
        self.state = Path(state).absolute()
        self.keys = list(keys)
        self.link = link
        self.slot_size = slot_size
        self.s1_size = s1_size
        self.vendor_id = vendor_id
        self.class_id = class_id
        self.timing = timing
        self.baud = baud
        self.buf_size = buf_size
        self.buf_count = buf_count
        self.heapsize = heapsize
        self.ble = ble
        self.radio = radio
        self.ble_name = ble_name
        self.udp = udp
        self.output = output
        self.ble_info: RadioInfo | None = None  # with ble: name, address, spec, shim port
        self._radio: CompanionThread | None = None
        self.device: SimDevice | None = None
        self.path = ""  # the user's pty
        self.powerons = 0
        self.error: str | None = None
        self._lock: int | None = None
        self._master = self._slave = -1
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._power: Power | None = None
        self._crashes = 0
        self._linked = False

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Opens (or creates) the device, opens the user's pty, powers the device on; returns
        the pty's path. A start that fails leaves no new state directory behind."""
        if self.link is not None and not Path(self.link).parent.is_dir():
            raise UsageError(f"--link {self.link}: cannot make the link there: {Path(self.link).parent} is not a folder")
        created = not self.state.exists()
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.state / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise UsageError(f"{self.state} is in use by another mpboot sim") from None
        try:
            self.open_device()
            self._master, self._slave = os.openpty()
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.path = os.ttyname(self._slave)
            if self.link is not None:
                self._make_link(Path(self.link))
            if self.ble:
                self._start_radio()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        except BaseException:
            self._cleanup()
            if created:
                shutil.rmtree(self.state, ignore_errors=True)
            raise
        self.output(f"mpboot sim: device in {self.state}: {self.describe()}, "
                    f"{'unpaced line' if self.baud is None else f'{self.baud} baud 8N1'}, "
                    f"buf_size {min(self.buf_size, UDP_MAX) if self.udp is not None else self.buf_size}, "
                    f"buf_count {self.buf_count}")
        if self.udp is not None:  # (as over BLE: its UART has no service then)
            self.output(f"mpboot sim: serving SMP over UDP on 127.0.0.1:{self.udp}")
        elif not self.ble:  # over BLE the device serves SMP there only: its UART has no service
            self.output(f"mpboot sim: UART on {self.path}")
        if self._linked:
            self.output(f"mpboot sim: {self.link} -> {self.path}")
        if self.ble_info is not None:
            i = self.ble_info
            self.output(f"mpboot sim: BLE {i.name} {i.address} on {i.spec}")
        self._thread = threading.Thread(target=self._run, name="mpboot-sim-relay", daemon=True)
        self._thread.start()
        return self.path

    def request_stop(self) -> None:
        """Asks the relay to stop; safe from a signal handler and from any thread."""
        self._stopping.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> bool:
        """True once the simulator has stopped (call stop() then)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Powers the device off and releases the pty, the link and the state directory."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._cleanup()

    @property
    def pid(self) -> int | None:
        """The running device process's pid, if one runs."""
        p = self._power
        return p.proc.pid if p is not None else None

    # open_device, describe and power_on: what a machine does its own way (mpboot.qemu.serve
    # overrides them); powered(): how its power_on hands a power-on to the relay.

    def open_device(self) -> None:
        """Opens (or creates) the device in the state directory, ready to power on; called
        with the directory locked, from start()."""
        upy.micropython_command()  # not installed: say so now, not from the relay thread
        check_machine(self.state, "unix")
        self.device = open_state(self.state, self.keys, slot_size=self.slot_size,
                                 vendor_id=self.vendor_id, class_id=self.class_id, s1_size=self.s1_size)

    def describe(self) -> str:
        """The device for the start line: what it is, its flash."""
        assert self.device is not None
        g = self.device.geometry
        s1 = f", two {g.s1_size}-byte stage-1 slots" if g.s1_size else ""
        return f"two {g.slot_size}-byte slots{s1}, {g.sector}-byte sectors, flash timing {self.timing}"

    def _start_radio(self) -> None:
        from mpboot.sim.radio import CompanionThread

        assert self.device is not None
        radio = CompanionThread(self.device.uid, name=self.ble_name, radio=self.radio)
        try:
            self.ble_info = radio.start()
        except Exception as err:  # noqa: BLE001 - any transport's failure: one line for people
            where = f"--radio {self.radio}" if self.radio else "the simulated radio"
            raise UsageError(f"{where}: cannot open it: {err or type(err).__name__}") from None
        self._radio = radio

    def _make_link(self, link: Path) -> None:
        try:
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                raise UsageError(f"--link {link}: a file is there (not a symlink); refusing to replace it")
            link.symlink_to(self.path)
        except OSError as err:
            raise UsageError(f"--link {link}: cannot make the link there: {err.strerror or err}") from None
        self._linked = True

    def _cleanup(self) -> None:
        if self._radio is not None:
            self._radio.stop()
            self._radio = None
        if self._linked and self.link is not None:
            link = Path(self.link)
            try:
                if link.is_symlink() and os.readlink(link) == self.path:
                    link.unlink()
            except OSError:
                pass
            self._linked = False
        for name in ("_master", "_slave", "_wake_r", "_wake_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    # ---- the device process -------------------------------------------------------------

    def power_on(self) -> None:
        """Starts the next power-on (in the relay's thread), then calls powered()."""
        assert self.device is not None
        master, slave = os.openpty()
        tty.setraw(slave)  # before any byte arrives: no echo, no line editing
        os.set_blocking(master, False)
        inner = os.ttyname(slave)
        cfg = self.state / "serve.cfg"
        fields: dict[str, object] = {**read_config(self.device.config), "uart": inner, "timing": self.timing,
                                     "bufsize": self.buf_size, "bufcount": self.buf_count}
        if self.ble_info is not None:
            fields.update(ble=self.ble_info.shim_port, blename=self.ble_info.name)
        if self.udp is not None:
            fields["udp"] = self.udp
        write_config(cfg, fields)
        # Only the device's own modules: sys.path and the working directory are its lib.
        cmd, env, workdir = upy.command(["-m", "sim_serve", cfg], path=[self.device.lib],
                                        heapsize=self._heapsize())
        env.pop("MPBOOT_NOR_FAULT", None)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, cwd=workdir)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.powered(_UnixPower(proc, master, slave))

    def powered(self, p: Power, early: bytes = b"") -> None:
        """A power-on has started: power_on() hands it to the relay. `early`: what its UART
        sent already."""
        self._power = p
        self.powerons += 1
        self.output(f"mpboot sim: power on {self.powerons} (pid {p.proc.pid})")
        if early:
            self._uart_bytes(p, early)

    def _power_off(self, kill: bool) -> int:
        """Ends the current power-on (killing the process if `kill`); its returncode."""
        p = self._power
        assert p is not None
        if kill and p.proc.poll() is None:
            p.kill()
        try:
            rc = p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.proc.wait()
        self._from_device(p)  # what it wrote last (the reset response) still goes out
        self._device_output(p, final=True)
        for fd in (p.uart, *([] if p.out is None else [p.out.fileno()])):
            try:
                self._sel.unregister(fd)
            except KeyError:
                pass
        p.close()
        self._power = None
        self._to_device.buf.clear()  # bytes in flight to a device that is gone
        self._to_device.blocked = False
        return rc

    def _device_output(self, p: Power, final: bool = False) -> bool:
        """Relays the device's console lines from its output pipe; False at end of file."""
        if p.out is None:
            if final:
                self._console(p, b"", final=True)
            return True
        alive = True
        while True:
            try:
                chunk = os.read(p.out.fileno(), _READ)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                alive = False
                break
            self._console(p, chunk)
        if final:
            self._console(p, b"", final=True)
        return alive

    def _console(self, p: Power, chunk: bytes, final: bool = False) -> bytes:
        """Shows the complete console lines in p.partial + chunk ("device: ..."). For a console
        on the UART (p.console), the line saying the device serves SMP is the last: returns
        what came after it (SMP), and the UART is the relay's from then on."""
        p.partial += chunk
        while True:
            i = p.partial.find(b"\n")
            if i < 0:
                if final or len(p.partial) > CONSOLE_LINE_MAX:
                    i = len(p.partial)
                    if not i:
                        return b""
                else:
                    return b""
            line, p.partial = p.partial[:i], p.partial[i + 1 :]
            # (04: a raw REPL's end of output, on a console on the UART)
            text = line.replace(b"\x04", b"").decode(errors="replace").rstrip("\r")
            self.output("device: " + explain_console_line(text))
            if p.console and line.startswith(SERVING_LINE):
                p.console = False
                rest, p.partial = p.partial, b""
                return rest

    def _exited(self) -> None:
        """The device process ended: report, then power on again unless it is time to stop."""
        p = self._power
        assert p is not None
        ran = time.monotonic() - p.started
        rc = self._power_off(kill=False)
        if self._stopping.is_set():
            return
        if rc == 0:
            self._crashes = 0
            self.output("mpboot sim: device reset")
        elif rc == CUT_EXIT:
            self._crashes = 0
            self.output("mpboot sim: power cut (flash fault injection)")
        elif rc in (-signal.SIGINT, 130):
            self.output("mpboot sim: device interrupted; stopping")
            self._stopping.set()
            return
        else:
            self._crashes = self._crashes + 1 if ran < FAST_FAIL_S else 1
            self.output(f"mpboot sim: device crashed (exit {rc})")
            if self._crashes >= FAST_FAILS:
                self.error = (f"the simulated device crashed {self._crashes} times in a row within "
                              f"{FAST_FAIL_S:.0f} s of power-on (exit {rc}); stopped")
                self._stopping.set()
                return
        self.power_on()

    # ---- the relay ----------------------------------------------------------------------

    def _from_device(self, p: Power) -> bool:
        """Reads the device's UART; False once it is closed (the machine is off)."""
        while True:
            try:
                data = os.read(p.uart, _READ)
            except (BlockingIOError, OSError):
                return True
            if not data:
                return False
            self._uart_bytes(p, data)

    def _uart_bytes(self, p: Power, data: bytes) -> None:
        if p.console:
            data = self._console(p, data)
            if p.console and p.ended is not None and p.partial.endswith(p.ended):
                # Stuck at its REPL, its error shown: off, as a crash (a loop of them stops).
                p.partial = p.partial[: -len(p.ended)]
                self._console(p, b"", final=True)
                self.output("mpboot sim: the device stopped before serving SMP")
                p.kill()
        self._to_host.buf += data

    def _from_host(self) -> None:
        try:
            data = os.read(self._master, _READ)
        except (BlockingIOError, OSError):
            return
        if self._power is not None:
            self._to_device.buf += data
        # else: no device process runs (the chip is in reset): the bytes are lost

    def _run(self) -> None:
        self._to_device = PacedLine(self.baud)
        self._to_host = PacedLine(self.baud)
        sel = self._sel = selectors.DefaultSelector()
        to_dev, to_host = self._to_device, self._to_host
        try:
            self.power_on()
            while not self._stopping.is_set():
                p = self._power
                now = time.monotonic()
                if p is not None:
                    to_dev.release(p.uart, now)
                to_host.release(self._master, now)
                if len(to_host.buf) > PENDING_MAX:
                    # Nobody reads the user's pty: like a UART with nothing attached, what
                    # the device sends is lost.
                    del to_host.buf[: len(to_host.buf) - PENDING_MAX]
                want = {self._wake_r: selectors.EVENT_READ}
                ev = selectors.EVENT_READ if len(to_dev.buf) < PENDING_MAX else 0
                want[self._master] = ev | (selectors.EVENT_WRITE if to_host.blocked else 0)
                if p is not None:
                    if p.out is not None:
                        want[p.out.fileno()] = selectors.EVENT_READ
                    # Always read the device: a UART never stalls its sender.
                    want[p.uart] = selectors.EVENT_READ | (selectors.EVENT_WRITE if to_dev.blocked else 0)
                _reregister(sel, {fd: e for fd, e in want.items() if e})
                delays = [d for d in (to_dev.delay(), to_host.delay()) if d is not None]
                for key, events in sel.select(min(delays) if delays else None):
                    fd = key.fd
                    if events & selectors.EVENT_WRITE:
                        (to_host if fd == self._master else to_dev).blocked = False
                    if not events & selectors.EVENT_READ:
                        continue
                    if fd == self._wake_r:
                        try:
                            os.read(fd, 64)
                        except BlockingIOError:
                            pass
                    elif fd == self._master:
                        self._from_host()
                    elif p is not None and fd == p.uart:
                        if not self._from_device(p):
                            self._exited()
                            break  # another power-on: its own descriptors
                    elif p is not None and p.out is not None and fd == p.out.fileno():
                        if not self._device_output(p):
                            self._exited()
                            break
        except Exception as err:  # report (once, by whoever reads `error`) and stop
            self.error = f"simulator failed: {err}" if isinstance(err, MpbootError) else \
                f"simulator failed: {type(err).__name__}: {err}"
        finally:
            if self._power is not None:
                self._power_off(kill=True)
                self.output("mpboot sim: device powered off")
            sel.close()
            self._stopping.set()


def _reregister(sel: selectors.BaseSelector, want: dict[int, int]) -> None:
    """Makes the selector watch exactly `want` (fd -> events)."""
    have = {key.fd: key.events for key in sel.get_map().values()}
    for fd, events in have.items():
        if fd not in want:
            sel.unregister(fd)
        elif want[fd] != events:
            sel.modify(fd, want[fd])
    for fd, events in want.items():
        if fd not in have:
            sel.register(fd, events)
