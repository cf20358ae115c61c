"""`mpboot sim` (the serving simulator) as a test peer: the real CLI in a subprocess, its
console collected line by line so tests wait on what it prints (never on time); and the CLI
in-process (`mpboot`, `ok`, `slots`) for the commands tests run against it."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from mpboot.cli import cli

MPBOOT = str(Path(sys.executable).parent / "mpboot")
UART_LINE = re.compile(r"UART on (\S+)")


def mpboot(*args: object) -> Any:
    """The CLI in-process (a click Result); never a traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="mpboot")
    assert "Traceback" not in result.output + result.stderr
    return result


def ok(*args: object) -> str:
    """A command that must succeed: its stdout."""
    result = mpboot(*args)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return str(result.stdout)


def slots(port: list[str]) -> dict[str, dict[str, Any]]:
    """`mpboot state --json` by version."""
    return {s["version"]: s for s in json.loads(ok("state", *port, "--json"))["images"]}


class WaitsForLines:
    """wait_for over the lines a simulator prints, which another thread puts in `_q` (None:
    they ended): each match starts after the last one."""

    lines: list[str]
    _q: queue.Queue[str | None]
    _seen: int  # lines already matched by wait_for

    def _stopped(self) -> str | None:
        """Why the simulator stopped, when no line came for a second (None: it runs)."""
        return None

    def _ended(self) -> str:
        return "ended"

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        """The first line after the last match that matches `pattern` (a regex)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        end = time.monotonic() + timeout
        while True:
            while self._seen < len(self.lines):
                line = self.lines[self._seen]
                self._seen += 1
                m = rx.search(line)
                if m:
                    return m
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"sim never printed /{rx.pattern}/; last lines:\n" + "\n".join(self.lines[-30:]))
            try:
                got = self._q.get(timeout=min(left, 1.0))
            except queue.Empty:
                why = self._stopped()
                if why:
                    raise AssertionError(f"sim stopped: {why}") from None
                continue
            if got is None:
                raise AssertionError(f"sim {self._ended()} before /{rx.pattern}/:\n" + "\n".join(self.lines[-30:]))
            self.lines.append(got)


class SimProcess(WaitsForLines):
    def __init__(self, state: Path, keys: list[Path], *extra: str, cwd: Path | None = None) -> None:
        cmd = [MPBOOT, "sim", "--state", str(state)]
        for k in keys:
            cmd += ["--keys", str(k)]
        cmd += list(extra)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=cwd, start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._seen = 0  # lines already matched by wait_for
        threading.Thread(target=self._pump, daemon=True).start()
        # Over BLE or UDP the device serves SMP there only, and no UART pty is announced.
        self.path = None if "--ble" in extra or "--udp" in extra else self.wait_for(UART_LINE).group(1)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def _ended(self) -> str:
        return f"exited ({self.proc.wait()})"

    def output(self) -> str:
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines)

    def device_pid(self) -> int | None:
        """The pid of the running MicroPython process (the simulated device), if any."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it as a service manager does (SIGTERM: exit 0), or as Ctrl-C does (SIGINT:
        exit 130); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        """Power cut: the whole simulator (supervisor and device) dies at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
