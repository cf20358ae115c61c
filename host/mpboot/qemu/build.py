"""Build MicroPython's qemu port (BOARD=MPS2_AN385, Cortex-M3) with mpboot frozen in, cached.

The MicroPython source is `$MPBOOT_MICROPYTHON_SRC` (a directory or a .tar.gz), else
`../shared/third_party/micropython-1.28.0.tar.gz` beside the project root, else a shallow git
clone of v1.28.0. The source is never written to: a tarball is unpacked once into the cache,
and every build (mpy-cross, the port) goes into build folders in the cache (`BUILD=`,
`MICROPY_MPYCROSS=`, `MPY_LIB_DIR=`), so a developer's own checkout can be the source too.

The cache (`$MPBOOT_CACHE`, else ~/.cache/mpboot) holds, per source, under `qemu/<source id>/`:
`src/` (an unpacked tarball), `mpy-cross/`, `port/` (the port's object files, shared by every
key set: a new key set recompiles only the frozen modules, about a second), `build.log` and
`firmware-<hash>.elf`, one per key set and firmware sources (the hash covers the keys module,
every file under firmware/ and the board manifest), and `firmware-bare-r<recipe>.elf`, the same build
with nothing frozen (what mpboot adds to a firmware is the difference). Builds of one source
take a file lock, and each firmware appears by atomic rename, so concurrent test workers
build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mpboot.errors import DeviceRunError
from mpboot.firmware import firmware_root
from mpboot.keys import PublicKey
from mpboot.pubkey import KEYS_MODULE, micropython_module

MICROPYTHON_TAG = "v1.28.0"
MICROPYTHON_GIT = "https://github.com/micropython/micropython"
SHARED_TARBALL = Path("..") / "shared" / "third_party" / "micropython-1.28.0.tar.gz"
SRC_ENV = "MPBOOT_MICROPYTHON_SRC"
CACHE_ENV = "MPBOOT_CACHE"
BOARD = "MPS2_AN385"
# Debian package -> a program it provides; what the build and the runner need.
TOOLS = {"gcc-arm-none-eabi": "arm-none-eabi-gcc", "qemu-system-arm": "qemu-system-arm", "make": "make"}
MAKE_TIMEOUT_S = 900.0
_BUILD_RECIPE = "1"  # bump when the way a firmware is built changes (its hash covers this)


def project_root() -> Path:
    """The source checkout this package runs from (its parent holds ../shared)."""
    return Path(__file__).resolve().parents[3]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mpboot")


def missing_tools() -> list[str]:
    """The Debian packages the build and the runner need that are not installed: their
    programs are not on PATH, or the cross compiler finds no newlib C library."""
    missing = [pkg for pkg, prog in TOOLS.items() if shutil.which(prog) is None]
    if "gcc-arm-none-eabi" not in missing:
        libc = subprocess.run(["arm-none-eabi-gcc", "-print-file-name=libc.a"], capture_output=True, text=True)
        if not Path(libc.stdout.strip()).is_absolute():
            missing.append("libnewlib-arm-none-eabi")
    return missing


@dataclass(frozen=True)
class Source:
    """Where the MicroPython source comes from: kind is "dir", "tar" or "git"."""

    kind: str
    location: str

    def ident(self) -> str:
        """A short id naming this source in the cache."""
        if self.kind == "tar":
            digest = hashlib.sha256(Path(self.location).read_bytes()).hexdigest()
        else:
            digest = hashlib.sha256(f"{self.kind}:{self.location}".encode()).hexdigest()
        return f"{self.kind}-{digest[:16]}"


def find_source() -> Source:
    """$MPBOOT_MICROPYTHON_SRC, else the shared tarball, else a git clone of the tag."""
    given = os.environ.get(SRC_ENV)
    if given:
        path = Path(given).expanduser().resolve()
        if path.is_dir():
            return Source("dir", str(path))
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            return Source("tar", str(path))
        raise DeviceRunError(f"{SRC_ENV}={given}: not a MicroPython directory or .tar.gz")
    shared = (project_root() / SHARED_TARBALL).resolve()
    if shared.is_file():
        return Source("tar", str(shared))
    return Source("git", f"{MICROPYTHON_GIT}@{MICROPYTHON_TAG}")


def local_source() -> Source | None:
    """The source if it is on this machine (no git clone needed), else None."""
    try:
        source = find_source()
    except DeviceRunError:
        return None
    return None if source.kind == "git" else source


@dataclass(frozen=True)
class Firmware:
    elf: Path
    key_hash: str  # the firmware hash: keys module + firmware sources + board manifest
    cached: bool  # True: an earlier build was reused
    build_s: float  # wall time of this call (including waiting for another builder)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_make(args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ make {' '.join(args)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(["make", *args], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, timeout=MAKE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DeviceRunError(f"make {args[1]} took over {MAKE_TIMEOUT_S:.0f} s (log: {log})") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:]
        raise DeviceRunError(f"building {args[1]} failed: {tail[0] if tail else proc.returncode} (log: {log})")


def _tree_root(folder: Path) -> Path:
    # A tarball holds either the tree itself or one folder with it.
    if (folder / "py").is_dir():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / "py").is_dir():
        return subs[0]
    raise DeviceRunError(f"no MicroPython tree (py/, ports/qemu/) in {folder}")


def _source_tree(source: Source, work: Path) -> Path:
    """The MicroPython tree to build from; unpacks or clones into `work`/src once. Called
    with the source's lock held."""
    if source.kind == "dir":
        tree = Path(source.location)
    else:
        dest = work / "src"
        if not dest.is_dir():
            tmp = work / f"src.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if source.kind == "tar":
                with tarfile.open(source.location) as tar:
                    tar.extractall(tmp, filter="data")
            else:
                proc = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", MICROPYTHON_TAG,
                                       MICROPYTHON_GIT, str(tmp / "micropython")],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise DeviceRunError(f"git clone {MICROPYTHON_GIT} failed: {proc.stderr.strip()[-300:]}")
            os.replace(tmp, dest)
        tree = _tree_root(dest)
    if not (tree / "ports" / "qemu" / "boards" / BOARD).is_dir():
        raise DeviceRunError(f"{tree}: no ports/qemu/boards/{BOARD}: not a MicroPython v1.28 tree")
    return tree


def board_manifest(keys_dir: Path) -> str:
    """The FROZEN_MANIFEST: mpboot with the qemu adapter, and the keys module."""
    manifest = firmware_root() / "manifest.py"
    return (f"include({str(manifest)!r}, port=\"qemu\")\n"
            f"module(\"{KEYS_MODULE}.py\", base_path={str(keys_dir)!r})\n")


def firmware_hash(keys: Sequence[PublicKey]) -> str:
    """What a firmware depends on beyond the MicroPython tree: the keys, every firmware file."""
    h = hashlib.sha256(f"recipe {_BUILD_RECIPE} board {BOARD}\n".encode())
    h.update(micropython_module(keys).encode())
    root = firmware_root()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(f"\0{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _work(source: Source | None, cache: Path | None) -> Path:
    return (cache or cache_root()) / "qemu" / (source or find_source()).ident()


def is_built(keys: Sequence[PublicKey], source: Source | None = None, cache: Path | None = None) -> bool:
    """True if build_firmware(keys) will come from the cache."""
    return (_work(source, cache) / f"firmware-{firmware_hash(keys)}.elf").is_file()


def build_firmware(keys: Sequence[PublicKey], source: Source | None = None,
                   cache: Path | None = None) -> Firmware:
    """The firmware.elf with mpboot and `keys` frozen in: from the cache, else built (about a
    minute for the first key set of a source, about a second for each further one)."""
    key_hash = firmware_hash(keys)

    def manifest(keys_dir: Path) -> str:
        (keys_dir / f"{KEYS_MODULE}.py").write_text(micropython_module(keys))
        return board_manifest(keys_dir)

    return _build(key_hash, f"keys-{key_hash}", manifest, source, cache)


def build_bare(source: Source | None = None, cache: Path | None = None) -> Firmware:
    """The same firmware with nothing frozen in (an empty board manifest): the baseline for
    what mpboot adds. Cached like build_firmware."""
    return _build(f"bare-r{_BUILD_RECIPE}", "bare", lambda _: "# nothing frozen\n", source, cache)


def text_bytes(elf: Path) -> int:
    """The firmware's flash footprint: text and read-only data, where frozen modules live
    (the "text" column of arm-none-eabi-size)."""
    out = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[1].split()[0])


def _build(name: str, folder: str, manifest: Callable[[Path], str], source: Source | None,
           cache: Path | None) -> Firmware:
    # firmware-<name>.elf built with the board manifest manifest(folder) returns (the folder,
    # in the cache, holds it and any module it names).
    t0 = time.monotonic()
    missing = missing_tools()
    if missing:
        raise DeviceRunError(f"the QEMU board needs these packages: apt-get install {' '.join(missing)}")
    source = source or find_source()
    work = _work(source, cache)
    elf = work / f"firmware-{name}.elf"
    if elf.is_file():
        return Firmware(elf, name, True, time.monotonic() - t0)
    with _locked(work / "lock"):
        if elf.is_file():  # another process built it while this one waited
            return Firmware(elf, name, True, time.monotonic() - t0)
        tree = _source_tree(source, work)
        log = work / "build.log"
        jobs = f"-j{os.cpu_count() or 2}"
        mpy_cross = work / "mpy-cross" / "mpy-cross"
        if not mpy_cross.is_file():
            _run_make(["-C", str(tree / "mpy-cross"), jobs, f"BUILD={work / 'mpy-cross'}"], log)
        # The freezer insists the micropython-lib submodule exists; mpboot needs none of it.
        mpy_lib = work / "micropython-lib"
        mpy_lib.mkdir(exist_ok=True)
        (mpy_lib / "README.md").touch()
        manifest_dir = work / folder
        manifest_dir.mkdir(exist_ok=True)
        board = manifest_dir / "board_manifest.py"
        board.write_text(manifest(manifest_dir))
        port = work / "port"
        # The freezer regenerates its output only when a frozen file is newer than it: a
        # manifest freezing nothing (or older files: another checkout's firmware/, a file
        # restored by git) would link the previous build's modules. Freeze from scratch.
        (port / "frozen_content.c").unlink(missing_ok=True)
        shutil.rmtree(port / "frozen_mpy", ignore_errors=True)
        _run_make(["-C", str(tree / "ports" / "qemu"), jobs, f"BOARD={BOARD}", "MICROPY_PY_BTREE=0",
                   f"BUILD={port}", f"MICROPY_MPYCROSS={mpy_cross}", f"MPY_LIB_DIR={mpy_lib}",
                   f"FROZEN_MANIFEST={board}"], log, env={"MICROPY_MPYCROSS": str(mpy_cross)})
        tmp = elf.with_name(f"{elf.name}.tmp-{os.getpid()}")
        shutil.copyfile(port / "firmware.elf", tmp)
        os.replace(tmp, elf)
    return Firmware(elf, name, False, time.monotonic() - t0)
