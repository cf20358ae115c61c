"""The device package (firmware/) shipped inside this host package."""

from __future__ import annotations

import shutil
from pathlib import Path

from mpboot.errors import UsageError


def firmware_root() -> Path:
    """The folder holding manifest.py and the device package mpboot/.

    Installed wheels carry it as mpboot/_firmware; an editable install or a source checkout
    reads the repository's firmware/ folder directly."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_firmware", here.parent.parent / "firmware"):
        if (candidate / "manifest.py").is_file() and (candidate / "mpboot" / "image.py").is_file():
            return candidate
    raise UsageError("the mpboot device files are missing from this installation")


def firmware_files() -> list[Path]:
    """Relative paths of every file the device needs (and the freeze manifest)."""
    root = firmware_root()
    return sorted(p.relative_to(root) for p in root.rglob("*.py") if "__pycache__" not in p.parts)


# Stage 1, the update service (docs/BOOT.md "Two stages"): these parts of the device package
# run from a signed image of their own on boards with stage-1 slots; the rest is stage 0.
STAGE1_PARTS = ("mpboot/smp", "mpboot/transport")
STAGE1_ENTRY = "mpboot/smp/service"  # what a stage-1 folder must hold (as an app holds main.py)


def stage1_files() -> list[Path]:
    """Relative paths of the stage-1 files: an app folder to sign with --kind updater."""
    return [f for f in firmware_files()
            if any(f.as_posix() == p or f.as_posix().startswith(p + "/") for p in STAGE1_PARTS)]


def export(destination: Path, stage1: bool = False) -> list[Path]:
    """Copy the device files (with `stage1`: only stage 1's, as a folder to sign) into
    `destination` (created if needed); never overwrite."""
    root = firmware_root()
    destination = Path(destination)
    files = stage1_files() if stage1 else firmware_files()
    clashes = [str(destination / f) for f in files if (destination / f).exists()]
    if clashes:
        raise UsageError(f"{clashes[0]}: already exists; export into an empty or new folder")
    for rel in files:
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    return [destination / f for f in files]
