"""Inputs to signing and outputs of it: .bin, Intel .hex, .romfs, and MicroPython app
directories (compiled with mpy-cross and packed as ROMFS with mpremote's builder)."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from intelhex import IntelHex, IntelHexError

from mpboot.errors import InputFileError, UsageError
from mpboot.files import MAX_IMAGE_BYTES, write_atomic
from mpboot.upy import mpy_cross_compile

ROMFS_MAGIC = b"\xd2\xcd\x31"
HEADER_FILL = 0xFF  # as imgtool --pad-header: the erased value of NOR flash


@dataclass(frozen=True)
class SignInput:
    data: bytes
    kind: str  # "bin", "hex", "romfs" or "app"
    base_addr: int | None = None  # load address of data[0] for .hex input

    @property
    def has_header_room(self) -> bool:
        """ROMFS and app inputs never carry room for a header: it is always added."""
        return self.kind in ("bin", "hex")


DEFAULT_ENTRY = "main"  # the module mpboot.boot imports from the mounted image (boot.start(entry=))

_ROMFS_FILE = 5  # ROMFS record kinds (MicroPython extmod/vfs_rom.c)
_ROMFS_DIRECTORY = 4


def _uint(data: bytes, pos: int) -> tuple[int, int]:
    """A ROMFS variable-length unsigned integer at `pos`: (value, next position)."""
    value = 0
    for _ in range(5):
        if pos >= len(data):
            raise ValueError("truncated")
        byte = data[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos
    raise ValueError("integer too long")


def romfs_top_names(data: bytes) -> list[str]:
    """The names of the files and folders at the top of a ROMFS image (bounded by its data;
    ValueError when malformed)."""
    if not data.startswith(ROMFS_MAGIC):
        raise ValueError("no ROMFS header")
    size, pos = _uint(data, len(ROMFS_MAGIC))
    end = pos + size
    if end > len(data):
        raise ValueError("shorter than its header says")
    names = []
    while pos < end:
        kind, pos = _uint(data, pos)
        length, pos = _uint(data, pos)
        record_end = pos + length
        if record_end > end:
            raise ValueError("a record runs past the image")
        if kind in (_ROMFS_FILE, _ROMFS_DIRECTORY):
            name_len, name_at = _uint(data, pos)
            names.append(data[name_at:name_at + name_len].decode("ascii", "replace"))
        pos = record_end
    return names


def _check_entry(names: list[str], entry: str, where: str) -> None:
    if "/" in entry:
        # A stage-1 folder's entry (mpboot/smp/service): a ROMFS shows its top folder only.
        if entry.split("/")[0] not in names:
            raise InputFileError(f"{where}: no {entry}.py in it: a stage-1 image is the folder "
                                 "mpboot firmware export --stage1 writes")
        return
    if f"{entry}.py" not in names and f"{entry}.mpy" not in names:
        raise InputFileError(f"{where}: no {entry}.py at its top: the device boots the app by importing "
                             f"{entry!r}, so it could not run it (another entry module: --entry NAME)")


def pack_app(directory: Path, entry: str | None = DEFAULT_ENTRY) -> bytes:
    """Compile every .py under `directory` to .mpy and pack the tree as a ROMFS image. The
    app must hold its entry module (`entry`.py or .mpy at its top; None: not checked)."""
    from mpremote.romfs import make_romfs

    directory = Path(directory)
    if not any(directory.rglob("*")):
        raise InputFileError(f"{directory}: app directory is empty")
    if entry is not None:
        if "/" in entry:
            if not any((directory / f"{entry}{ext}").is_file() for ext in (".py", ".mpy")):
                raise InputFileError(f"{directory}: no {entry}.py in it: a stage-1 image is the folder "
                                     "mpboot firmware export --stage1 writes")
        else:
            _check_entry([p.name for p in directory.iterdir()], entry, str(directory))
    with tempfile.TemporaryDirectory(prefix="mpboot-app-") as tmp:
        staging = Path(tmp) / "app"
        shutil.copytree(directory, staging, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        for src in sorted(staging.rglob("*.py")):
            try:
                # Named by its place in the app, not the staging folder's random path: the
                # same app gives the same image, byte for byte (the detached signing flow
                # rebuilds it and must get the digest that was signed).
                mpy_cross_compile(src, src.with_suffix(".mpy"), src.relative_to(staging).as_posix())
            except InputFileError as err:
                # Name the user's file, not the staging copy.
                raise InputFileError(str(err).replace(str(src), str(directory / src.relative_to(staging)), 1)) from None
            src.unlink()
        # make_romfs prints a tree to stdout; the CLI speaks for itself.
        with contextlib.redirect_stdout(io.StringIO()):
            return bytes(make_romfs(str(staging), mpy_cross=False))


def load_input(path: Path, entry: str | None = DEFAULT_ENTRY) -> SignInput:
    """What `sign` signs: an app folder (packed), a ROMFS image, Intel hex or raw binary.
    An app folder or ROMFS image must hold the entry module the device boots (`entry`; None:
    not checked, for images that are not apps)."""
    path = Path(path)
    if path.is_dir():
        return SignInput(pack_app(path, entry), "app")
    if not path.exists():
        raise InputFileError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".hex":
        data, start = read_hex(path)
        return SignInput(data, "hex", start)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputFileError(f"{path}: cannot read: {err.strerror}") from None
    if suffix in (".romfs", ".img"):
        try:
            names = romfs_top_names(data)
        except ValueError as err:
            raise InputFileError(f"{path}: not a ROMFS image ({err})") from None
        if entry is not None:
            _check_entry(names, entry, str(path))
        return SignInput(data, "romfs")
    return SignInput(data, "bin")



def read_hex(path: Path) -> tuple[bytes, int]:
    """An Intel hex file's bytes (gaps filled 0xff) and the address of the first."""
    try:
        ih = IntelHex(str(path))
    except (IntelHexError, ValueError) as err:
        raise InputFileError(f"{path}: not a valid Intel hex file ({err})") from None
    start = ih.minaddr()
    if start is None:
        raise InputFileError(f"{path}: Intel hex file holds no data")
    span = ih.maxaddr() - start + 1
    if span > MAX_IMAGE_BYTES:
        # Gaps are filled: a few records far apart would otherwise ask for gigabytes.
        raise InputFileError(f"{path}: its data spans {span:#x} bytes ({start:#x}..{ih.maxaddr():#x}), more than "
                             f"any image ({MAX_IMAGE_BYTES:#x})")
    return bytes(ih.tobinarray()), start


def with_header_room(inp: SignInput, header_size: int, pad_header: bool) -> tuple[bytes, int | None]:
    """The body build_image signs: header_size bytes of room, then the payload.

    As imgtool: with pad_header (always for ROMFS and apps) the room is added, filled with
    0xff; without it a .bin/.hex must already start with header_size zero bytes.
    Returns (body, base address of the body for .hex output)."""
    base = inp.base_addr
    if pad_header or not inp.has_header_room:
        if base is not None:
            if base < header_size:
                raise UsageError(
                    f"hex data starts at {base:#x}: no room below it for a {header_size:#x}-byte header"
                )
            base -= header_size
        return bytes([HEADER_FILL]) * header_size + inp.data, base
    if len(inp.data) < header_size or any(inp.data[:header_size]):
        raise UsageError(
            f"input does not start with {header_size:#x} zero bytes for the header; use --pad-header"
        )
    return inp.data, base


def write_output(path: Path, image: bytes, base_addr: int | None) -> None:
    """Write the signed image, whole or not at all: Intel hex when `path` ends in .hex (the
    image must fit the 32-bit address space from `base_addr`), raw binary otherwise."""
    path = Path(path)
    if path.suffix.lower() == ".hex":
        start = base_addr or 0
        if not 0 <= start or start + len(image) > 1 << 32:
            raise UsageError(f"a {len(image)}-byte image at {start:#x} runs past the 32-bit address space "
                             "of Intel hex: give a lower --hex-addr")
        ih = IntelHex()
        ih.frombytes(image, offset=start)
        text = io.StringIO()
        ih.tofile(text, format="hex")
        write_atomic(path, text.getvalue().encode("ascii"))
    else:
        write_atomic(path, image)
