"""Shared fixtures: paths, the test-only keys, and a runner for device code on the
MicroPython unix port (firmware compiled to .mpy with mpy-cross, as a device holds it)."""

from __future__ import annotations

import functools
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpboot import upy
from mpboot.device import script_path, write_keys_module
from mpboot.keys import PublicKey, SigningKey, load_signing_key
from mpboot.upy import compile_tree

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
KEYS_DIR = TESTS / "keys"
VECTORS = TESTS / "vectors"
DEVICE_SCRIPTS = TESTS / "device"
FIRMWARE = ROOT / "firmware"

# Keys the test device trusts, in mpboot_keys.KEYS order (index 0, 1).
TRUSTED_KEY_FILES = ("TEST-ONLY-rsa2048.pem", "TEST-ONLY-rsa3072.pem")
UNTRUSTED_KEY_FILE = "TEST-ONLY-rsa2048-untrusted.pem"

# A shell starts a background job (`make test &`, nohup) with SIGINT ignored, and a program
# inherits that across exec: the Ctrl-C tests' mpboot processes would then never see their
# SIGINT. With a handler here (Python's own), the programs the tests start get the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _signing_log_outside_the_tree(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every signing command appends to a signing log, by default in the working directory
    (the checkout, here): point them all at one log per test process instead. Tests of the
    log itself name their own (--signing-log, or MPBOOT_SIGNING_LOG)."""
    import os

    from mpboot import signlog

    old = os.environ.get(signlog.ENV)
    os.environ[signlog.ENV] = str(tmp_path_factory.mktemp("signlog") / "signing.jsonl")
    yield
    if old is None:
        os.environ.pop(signlog.ENV, None)
    else:
        os.environ[signlog.ENV] = old


@functools.cache
def signing_key(name: str) -> SigningKey:
    # Cached: loading an RSA private key checks it, which costs tens of milliseconds.
    return load_signing_key(KEYS_DIR / name)


def trusted_public_keys() -> list[PublicKey]:
    return [signing_key(name).public() for name in TRUSTED_KEY_FILES]


@pytest.fixture(scope="session")
def rsa2048() -> SigningKey:
    return signing_key("TEST-ONLY-rsa2048.pem")


@pytest.fixture(scope="session")
def rsa3072() -> SigningKey:
    return signing_key("TEST-ONLY-rsa3072.pem")


@pytest.fixture(scope="session")
def untrusted() -> SigningKey:
    return signing_key(UNTRUSTED_KEY_FILE)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    code: int = 0
    version: str = ""
    security_counter: int | None = None
    key_index: int = -1
    total_size: int = 0
    deps: tuple[tuple[int, str], ...] = ()  # (image id, "maj.min.rev+build") per DEPENDENCY TLV

    @classmethod
    def parse(cls, line: str) -> Verdict:
        words = line.split()
        if words[0] == "REJECT":
            return cls(False, int(words[1]))
        assert words[0] == "OK", line
        counter = int(words[2])
        deps = tuple((int(w.split(":")[0]), w.split(":")[1]) for w in words[5:])
        return cls(True, 0, words[1], None if counter < 0 else counter, int(words[3]), int(words[4]), deps)


class Device:
    """Runs device scripts (tests/device/dev_*.py) on MicroPython against the firmware."""

    def __init__(self, lib: Path, workdir: Path) -> None:
        self.lib = lib
        self.workdir = workdir

    def run(self, module: str, *args: object, heapsize: str = "512k") -> str:
        # Run in the work folder: file names passed relative to it keep strings (and so the
        # heap a run needs) independent of where pytest put its temporary folders.
        proc = upy.run(["-m", module, *map(str, args)], path=[self.lib], heapsize=heapsize, cwd=self.workdir)
        if proc.returncode != 0:
            raise AssertionError(f"{module} failed on MicroPython:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return proc.stdout

    def verify_files(self, items: list[tuple[Path, int]], heapsize: str = "512k") -> list[Verdict]:
        listing = self.workdir / f"list-{len(items)}-{id(items)}.txt"
        listing.write_text("".join(f"{self._short(path)} {slot}\n" for path, slot in items))
        lines = self.run("verify_images", listing.name, heapsize=heapsize).splitlines()
        assert len(lines) == len(items), lines
        return [Verdict.parse(line) for line in lines]

    def _short(self, path: Path) -> str:
        path = Path(path)
        return path.name if path.parent == self.workdir else str(path)

    def verify_bytes(self, image: bytes, slot_size: int | None = None, heapsize: str = "512k") -> Verdict:
        path = self.workdir / f"image-{abs(hash(image)) % 10**8:08d}.bin"
        path.write_bytes(image)
        return self.verify_files([(path, slot_size or len(image))], heapsize)[0]


@pytest.fixture(scope="session")
def device(tmp_path_factory: pytest.TempPathFactory) -> Device:
    """The firmware as .mpy, the test-only trusted keys as mpboot_keys, and the device scripts."""
    base = tmp_path_factory.mktemp("device")
    lib = base / "lib"
    compile_tree(FIRMWARE / "mpboot", lib / "mpboot")
    src = base / "src"
    shutil.copytree(DEVICE_SCRIPTS, src)
    shutil.copyfile(script_path("verify_images.py"), src / "verify_images.py")
    write_keys_module(src, trusted_public_keys())
    compile_tree(src, lib)
    work = base / "work"
    work.mkdir()
    return Device(lib, work)


# Summary lines (`record_property("summary", line)`) are printed at the end of the run, also
# under pytest-xdist, where the controller receives each report's user_properties.
_summaries: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _summaries.extend(str(v) for k, v in report.user_properties if k == "summary")


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _summaries:
        terminalreporter.section("summaries")
        for line in sorted(_summaries):
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def sim_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The firmware, the simulated device's main and the test-only trusted keys, as .mpy."""
    from mpboot.sim import build_lib

    return build_lib(tmp_path_factory.mktemp("sim") / "lib", trusted_public_keys())


NO_POSTGRES = ("PostgreSQL is not installed (no initdb/postgres on PATH or in "
               "/usr/lib/postgresql/*/bin): apt-get install postgresql")


@pytest.fixture(scope="session")
def pg_server() -> Any:
    """A real PostgreSQL server (tests/pgserver.py) for this test process (each xdist worker
    has its own dir and port); skips only where PostgreSQL is not installed."""
    import pgserver

    server = pgserver.start_server()
    if server is None:
        pytest.skip(NO_POSTGRES)
    try:
        yield server
    finally:
        server.stop()
