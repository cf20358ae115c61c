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


def pack_app(directory: Path) -> bytes:
    """Compile every .py under `directory` to .mpy and pack the tree as a ROMFS image."""
    from mpremote.romfs import make_romfs

    directory = Path(directory)
    if not any(directory.rglob("*")):
        raise InputFileError(f"{directory}: app directory is empty")
    with tempfile.TemporaryDirectory(prefix="mpboot-app-") as tmp:
        staging = Path(tmp) / "app"
        shutil.copytree(directory, staging, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        for src in sorted(staging.rglob("*.py")):
            try:
                mpy_cross_compile(src, src.with_suffix(".mpy"))
            except InputFileError as err:
                # Name the user's file, not the staging copy.
                raise InputFileError(str(err).replace(str(src), str(directory / src.relative_to(staging)), 1)) from None
            src.unlink()
        # make_romfs prints a tree to stdout; the CLI speaks for itself.
        with contextlib.redirect_stdout(io.StringIO()):
            return bytes(make_romfs(str(staging), mpy_cross=False))


def load_input(path: Path) -> SignInput:
    path = Path(path)
    if path.is_dir():
        return SignInput(pack_app(path), "app")
    if not path.exists():
        raise InputFileError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".hex":
        try:
            ih = IntelHex(str(path))
        except (IntelHexError, ValueError) as err:
            raise InputFileError(f"{path}: not a valid Intel hex file ({err})") from None
        if ih.minaddr() is None:
            raise InputFileError(f"{path}: Intel hex file holds no data")
        return SignInput(bytes(ih.tobinarray()), "hex", ih.minaddr())
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputFileError(f"{path}: cannot read: {err.strerror}") from None
    if suffix in (".romfs", ".img"):
        if not data.startswith(ROMFS_MAGIC):
            raise InputFileError(f"{path}: not a ROMFS image (no ROMFS header)")
        return SignInput(data, "romfs")
    return SignInput(data, "bin")


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
    """Write the signed image: Intel hex when `path` ends in .hex, raw binary otherwise."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".hex":
            ih = IntelHex()
            ih.frombytes(image, offset=base_addr or 0)
            ih.tofile(str(path), format="hex")
        else:
            path.write_bytes(image)
    except OSError as err:
        raise UsageError(f"{path}: cannot write: {err.strerror}") from None
