"""The device verifier run on the MicroPython unix port (`mpboot verify --device`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mpboot import upy
from mpboot.errors import DeviceRunError, ImageErrorCode
from mpboot.firmware import firmware_root
from mpboot.upy import compile_tree
from mpboot.keys import PublicKey
from mpboot.pubkey import KEYS_MODULE, micropython_module

DEFAULT_HEAPSIZE = "24k"


@dataclass(frozen=True)
class DeviceVerdict:
    accepted: bool
    code: ImageErrorCode | None = None  # why it was rejected
    version: str = ""
    security_counter: int | None = None
    key_index: int = -1


def script_path(name: str) -> Path:
    """A MicroPython script the host runs on the unix port (mpboot/upy_scripts)."""
    return Path(str(resources.files("mpboot.upy_scripts") / name))


def write_keys_module(folder: Path, keys: Sequence[PublicKey]) -> Path:
    path = Path(folder) / f"{KEYS_MODULE}.py"
    path.write_text(micropython_module(keys))
    return path


def verify_on_device(image: bytes, keys: Sequence[PublicKey], slot_size: int,
                     heapsize: str = DEFAULT_HEAPSIZE) -> DeviceVerdict:
    """Run firmware/mpboot/image.verify with `keys` embedded over `image`, which it reads
    from a file through its default 2 KiB buffer, in a MicroPython heap of `heapsize`."""
    with tempfile.TemporaryDirectory(prefix="mpboot-dev-") as tmp:
        lib = Path(tmp) / "lib"
        compile_tree(firmware_root() / "mpboot", lib / "mpboot")
        source = Path(tmp) / "src"
        source.mkdir()
        write_keys_module(source, keys)
        shutil.copyfile(script_path("verify_images.py"), source / "verify_images.py")
        compile_tree(source, lib)
        image_path = Path(tmp) / "image.bin"
        image_path.write_bytes(image)
        listing = Path(tmp) / "images.txt"
        listing.write_text(f"{image_path} {slot_size}\n")
        proc = upy.run(["-m", "verify_images", listing], path=[lib], heapsize=heapsize)
    words = proc.stdout.split()
    if proc.returncode != 0 or not words:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise DeviceRunError(f"device verifier failed: {lines[-1] if lines else 'no output'}")
    try:
        if words[0] == "REJECT":
            return DeviceVerdict(False, ImageErrorCode(int(words[1])))
        counter, key_index = int(words[2]), int(words[3])
    except (ValueError, IndexError):
        raise DeviceRunError(f"device verifier answered {proc.stdout.strip()[:200]!r}") from None
    if not 0 <= key_index < len(keys):
        # Fail closed: the verdict names a key the host did not give it.
        raise DeviceRunError(f"device verifier answered key index {key_index} for {len(keys)} keys: "
                             "it did not run with the keys given")
    return DeviceVerdict(True, None, words[1], None if counter < 0 else counter, key_index)
