"""A newcomer's run, scripted: the README's commands in order, in a fresh folder, with the real
`mpboot` console script, then the mistakes a careless user makes (issue 13). Nothing may
print a traceback or a misleading line: every mistake is one line on stderr with the exit
code of the README's convention (0 done, 1 rejected/refused/failed, 2 usage/file/port,
3 silent device or recovery, 130 Ctrl-C, 141 closed pipe).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpboot.keys import load_signing_key
from mpboot.pack import pack_app
from simkit import sign_app
from simserve import SimProcess

ROOT = Path(__file__).resolve().parents[1]
MPBOOT = str(Path(sys.executable).parent / "mpboot")
_MISLEADING = (re.compile(r"\bNone\b"),
               re.compile(r"\b1 (images|boards|devices|keys|files|requests|reconnects|bytes|passes|points)\b"),
               re.compile(r"Traceback|Errno|Error:|Aborted!"))


class Newcomer:
    """Runs `mpboot` as a user does, in one folder, and holds every answer to the contract."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {k: v for k, v in os.environ.items() if k not in ("MPBOOT_DEBUG", "MPBOOT_PORT")}

    def run(self, *args: object, code: int = 0, out: str = "", err: str = "", cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([MPBOOT, *map(str, args)], cwd=cwd or self.folder, capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=timeout)
        self.check(proc, args, code, out, err)
        return proc

    def check(self, proc: subprocess.CompletedProcess[str], args: object, code: int, out: str, err: str) -> None:
        said = f"mpboot {args}: exit {proc.returncode}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-1500:]}"
        assert proc.returncode == code, said
        for rx in _MISLEADING:
            assert not rx.search(proc.stdout + proc.stderr), f"{rx.pattern} in output\n{said}"
        assert out in proc.stdout, said
        assert err in proc.stderr, said
        if code not in (0, 141) and not (code == 1 and "REJECTED" in proc.stderr):
            lines = proc.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("mpboot: "), f"not one line\n{said}"


@pytest.fixture(scope="module")
def me(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newcomer]:
    folder = tmp_path_factory.mktemp("newcomer")
    shutil.copytree(ROOT / "examples" / "hello_app", folder / "hello_app")
    yield Newcomer(folder)


def test_readme_in_order(me: Newcomer) -> None:
    readme_steps(me)


def readme_steps(me: Newcomer) -> None:
    f = me.folder
    me.run("--help", out="provision")
    # keygen, pubkey
    me.run("keygen", "--type", "rsa-2048", "-o", "signing-key.pem", out="wrote rsa-2048 key signing-key.pem")
    me.run("keygen", "-o", "key.pem", "--password-env", "MPBOOT_PASS", env={"MPBOOT_PASS": "secret"})
    me.run("pubkey", "signing-key.pem", "--format", "micropython", "-o", "mpboot_keys.py")
    me.run("pubkey", "signing-key.pem", "key.pem", "--format", "micropython", "-o", "two_keys.py",
           env={"MPBOOT_PASS": "secret"}, code=2, err="--password-env")  # the second key is encrypted
    for fmt in ("pem", "der", "raw", "c"):
        me.run("pubkey", "signing-key.pem", "--format", fmt, "-o", f"pub.{fmt}")
    # sign: an app folder, a .romfs, a .bin and a .hex
    me.run("sign", "hello_app", "-k", "signing-key.pem", "--version", "1.2.3+4", "-o", "app.bin", out="(app, ")
    subprocess.run([str(Path(sys.executable).parent / "mpremote"), "romfs", "-o", "app.romfs", "build", "hello_app"],
                   cwd=f, check=True, capture_output=True)
    me.run("sign", "app.romfs", "-k", "signing-key.pem", "--version", "1.2.3", "-o", "romfs.bin", out="(romfs, ")
    (f / "fw.bin").write_bytes(bytes(range(256)) * 16)
    me.run("sign", "fw.bin", "-k", "signing-key.pem", "--version", "1.2.3", "--pad-header", "-o", "fw.signed.bin")
    me.run("sign", "fw.signed.bin", "-k", "signing-key.pem", "--version", "1.2.3", "--pad-header",
           "--hex-addr", "0x8000000", "-o", "fw.signed.hex")
    # verify, info, firmware export
    me.run("verify", "app.bin", "-k", "signing-key.pem", out="host:   OK version 1.2.3+4")
    me.run("verify", "app.bin", "-k", "pub.pem", "--device", out="device: OK version 1.2.3+4")
    info = me.run("info", "app.bin").stdout
    assert "vendor id:        none (no UUID_VID TLV)" in info
    assert json.loads(me.run("info", "app.bin", "--json").stdout)["version"] == "1.2.3+4"
    me.run("firmware", "export", "mpboot-device", out="exported ")
    # the device verifier from inside that folder (its mpboot/ and the keys module beside it)
    shutil.copy(f / "mpboot_keys.py", f / "mpboot-device")
    me.run("verify", f / "app.bin", "-k", f / "pub.pem", "--device", cwd=f / "mpboot-device", out="device: OK")
    # sim: single power-ons
    me.run("sim", "init", "dev", "-k", "pub.pem", "--flash-size", "256k", "--sector", "4k", "--align", "4",
           out="1 trusted key")
    # device error numbers come with their names wherever they are printed
    me.run("sim", "boot", "dev", code=3, out="device: mpboot: recovery: no bootable image (slot 0: error 1 "
                                               "(BAD_MAGIC: empty, or not an MCUboot image), slot 1: error 1 (")
    me.run("sim", "install", "dev", "app.bin", "--permanent", out="in slot 0, confirmed")
    me.run("sim", "boot", "dev", out="device: hello from a verified app, mpboot")
    status = me.run("sim", "status", "dev", out="slot 0: version 1.2.3+4").stdout
    assert "slot 1: no bootable image (error 1: BAD_MAGIC: empty, or not an MCUboot image)" in status
    # an app without its entry module (signed by an older tool): the boot says what is missing
    (f / "no_entry").mkdir()
    (f / "no_entry" / "app.py").write_text("print('never')\n")
    (f / "no_entry.bin").write_bytes(sign_app(pack_app(f / "no_entry", entry=None),
                                              load_signing_key(f / "signing-key.pem"), "1.3.0",
                                              security_counter=(1 << 24) + (3 << 16)))
    me.run("sim", "install", "dev", "no_entry.bin", "--test")
    me.run("sim", "boot", "dev", code=0, out="slot 1 cannot run (error -2 (NO_ENTRY: its ROMFS has no entry "
                                             "module (main.py)))")


def _wait_file(path: Path, pred: object, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred(path):  # type: ignore[operator]
        assert time.monotonic() < end, f"{path} never changed"
        time.sleep(0.05)


def test_device_commands_and_their_mistakes(me: Newcomer, tmp_path: Path) -> None:
    f = me.folder
    if not (f / "app.bin").exists():  # the README part ran on another worker
        readme_steps(me)
    v2 = f / "app-v2"
    v2.mkdir(exist_ok=True)
    (v2 / "main.py").write_text("import mpboot\nprint('v2 runs')\nmpboot.confirm()\n")
    (v2 / "data.bin").write_bytes(random.Random(2).randbytes(100_000))  # ~9 s at 115200 baud
    me.run("sign", v2, "-k", "signing-key.pem", "--version", "2.0.0", "-o", "app-v2.bin")
    sim = SimProcess(tmp_path / "serving", [f / "pub.pem"], "--link", str(f / "uart"), "--baud", "115200",
                     cwd=f)
    port = ["--port", "uart"]
    try:
        sim.wait_for("serving SMP")
        # in recovery: nothing to confirm, nothing listed
        me.run("confirm", *port, code=2, err="runs no image (it is in recovery)")
        me.run("state", *port, out="no images (the device is in recovery")
        # Ctrl-C in the middle of an upload: 130, where it stopped, and how to resume
        flash = subprocess.Popen([MPBOOT, "flash", "app-v2.bin", *port, "--test", "--reset", "--no-progress"],
                                 cwd=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=me.env)
        flash_file = tmp_path / "serving" / "flash.bin"
        _wait_file(flash_file, lambda p: p.read_bytes()[:4] != b"\xff" * 4)  # the upload began
        flash.send_signal(signal.SIGINT)
        out, err = flash.communicate(timeout=60)
        me.check(subprocess.CompletedProcess(flash.args, flash.returncode, out, err), "flash (Ctrl-C)", 130,
                 "", "mpboot: interrupted: ")
        assert re.search(r"the upload reached \d+ of \d+ bytes; run the same command again: it resumes there|"
                         r"before the upload began", err), err
        me.run("flash", "app-v2.bin", *port, "--test", "--reset", "--no-progress", out="marked for a test boot")
        sim.wait_for("v2 runs")
        sim.wait_for("serving SMP")
        me.run("flash", "app-v2.bin", *port, "--test", "--no-progress", out="already runs on the device")
        state = json.loads(me.run("state", *port, "--json").stdout)
        assert state["uid"] and state["serial"] is None and state["images"][0]["version"] == "2.0.0"
        me.run("confirm", *port, out="confirmed the running image")
        me.run("echo", "hello", *port, out="hello")
        me.run("echo", "x" * 2040, *port, code=2, err="the echo request takes 2054 bytes, more than the device's "
                                                    "buffer holds (2048 of buf_size 2048 over uart)")
        assert len(me.run("echo", "x" * 2030, *port).stdout) == 2031  # what fits still does
        me.run("erase", *port, out="erased the slot not running")
        # a closed pipe: no message, 141
        p = subprocess.Popen([MPBOOT, "state", *port, "--json"], cwd=f, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=me.env)
        assert p.stdout is not None
        p.stdout.close()
        assert p.wait(timeout=60) == 141 and p.stderr is not None and p.stderr.read() == ""
        for args in (["--help"], ["--version"], ["flash", "--help"]):  # help and version too
            p = subprocess.Popen([MPBOOT, *args], cwd=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=me.env)
            assert p.stdout is not None and p.stderr is not None
            p.stdout.close()
            assert (p.wait(timeout=60), p.stderr.read()) == (141, b""), args
    finally:
        sim.stop()
    # the mistakes with files and ports
    (f / "notakey.txt").write_text("hello, not a key\n")
    (f / "empty_app").mkdir(exist_ok=True)
    (f / "empty_app" / "data.txt").write_text("no code\n")
    for args, code, err in [
        (("state", "-p", "/dev/null"), 2, "not a serial port: /dev/null"),
        (("state", "-p", "notakey.txt"), 2, "not a serial port: notakey.txt"),
        (("flash", "hello_app", "-p", "/dev/null"), 2, "is a directory; sign it first"),
        (("verify", "/dev/null", "-k", "pub.pem"), 2, "/dev/null: not a regular file"),
        (("verify", "app.bin", "-k", "notakey.txt"), 2, "notakey.txt: not a public or private key"),
        (("sign", "hello_app", "-k", "key.pem", "--version", "1.0.0", "-o", "x.bin"), 2, "--password-env"),
        (("sign", "empty_app", "-k", "signing-key.pem", "--version", "1.0.0", "-o", "x.bin"), 2, "no main.py"),
        (("sign", "fw.bin", "-k", "signing-key.pem", "--version", "1.0.0", "--pad-header",
          "--hex-addr", "0x100000000", "-o", "l.hex"), 2, "above the maximum"),
        (("sign", "fw.bin", "-k", "signing-key.pem", "--version", "1.0.0", "--pad-header",
          "--hex-addr", "0xffffff00", "-o", "l.hex"), 2, "runs past the 32-bit address space"),
        (("sign", "fw.bin", "-k", "signing-key.pem", "--version", "1.0.0", "--pad-header",
          "--hex-addr", "0x1000", "-o", "l.bin"), 2, "--hex-addr sets where a .hex output starts"),
        (("sim", "--keys", "pub.pem"), 2, "serving options need --state DIR"),
        (("sim", "--state", "big", "--keys", "pub.pem", "--slot-size", "1G"), 2, "above the maximum of 16M"),
        (("sim", "--state", "linked", "--keys", "pub.pem", "--link", "/proc/nope/uart"), 2,
         "--link /proc/nope/uart: cannot make the link there"),
        (("sim", "--state", "odd", "--keys", "pub.pem", "--slot-size", "4097"), 2, "slot size 4097"),
        (("sync", "hello_app", "--log", "/proc/nope/x.jsonl"), 2, "no signed images"),
        (("sync", ".", "--log", "/proc/nope/x.jsonl", "--ble-backend", "bumble:tcp-client:127.0.0.1:1"), 2,
         "--log /proc/nope/x.jsonl: cannot use it: No such file or directory"),
        (("provision", "--port", "/dev/null", "--image", "app.bin", "--expect-key", "signing-key.pem",
          "--serial-prefix", "SN-", "--db", "f.sqlite"), 2, "a private key, where only a public key belongs"),
    ]:
        me.run(*args, code=code, err=err)
    me.run("verify", "notakey.txt", "-k", "pub.pem", code=1, err="REJECTED BAD_MAGIC")
    assert not (f / "l.hex").exists() and not (f / "l.bin").exists() and not (f / "x.bin").exists()
    assert not (f / "big").exists() and not (f / "f.sqlite").exists()
    assert not (f / "linked").exists() and not (f / "odd").exists()  # a failed start leaves nothing


def test_plain_install_without_the_sim_extra(me: Newcomer, tmp_path: Path) -> None:
    """Without Bumble (a plain `pip install mpboot`), the simulated radio says which extra to
    install, in one line."""
    shim = tmp_path / "no-bumble"
    (shim / "bumble").mkdir(parents=True)
    (shim / "bumble" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'bumble'\", name='bumble')\n")
    me.run("sim", "air", code=2, err="pip install 'mpboot[sim]'", env={"PYTHONPATH": str(shim)})
