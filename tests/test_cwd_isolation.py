"""Device code the host runs on MicroPython imports only what the host gave it, wherever the
user stands (issue 13, security).

`micropython -m module` puts '' (the working directory) first on sys.path, so a run started in
the user's folder would import a stray `mpboot_keys.py` (another key: an image signed by it
passes), an `mpboot/` package (a `firmware export` folder: source modules that do not fit the
device heap) or a module named like the host's scripts. Each test stands in such a folder,
with the real `mpboot` console script, and proves the answer is the one a clean folder gives.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from simserve import SimProcess

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "keys"
KEY = KEYS / "TEST-ONLY-rsa2048.pem"
OTHER = KEYS / "TEST-ONLY-rsa2048-untrusted.pem"
KEY3072 = KEYS / "TEST-ONLY-rsa3072.pem"
MPBOOT = Path(sys.executable).parent / "mpboot"
MARK = "HOSTILE-CODE-RAN"
_HOSTILE = f"import sys\nsys.stdout.write('{MARK}\\n')\n"


def mpboot(*args: object, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MPBOOT), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An app signed by the trusted key and the same app signed by the other key."""
    folder = tmp_path_factory.mktemp("images")
    app = folder / "app"
    app.mkdir()
    (app / "main.py").write_text("import mpboot\nprint('APP ran')\nmpboot.confirm()\n")
    out = {}
    for name, key in (("ours", KEY), ("foreign", OTHER)):
        out[name] = folder / f"{name}.bin"
        ok(mpboot("sign", app, "-k", key, "--version", "1.0.0", "-o", out[name], cwd=folder))
    return out


@pytest.fixture(params=["keys-of-another", "two-keys", "package", "scripts"])
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A folder a user might stand in, holding modules a device run must never import."""
    folder = tmp_path / "here"
    folder.mkdir()
    if request.param == "keys-of-another":  # the README's own `pubkey` step, for another key
        ok(mpboot("pubkey", OTHER, "--format", "micropython", "-o", "mpboot_keys.py", cwd=folder))
    elif request.param == "two-keys":  # key index 1 answered for one trusted key
        ok(mpboot("pubkey", KEY3072, OTHER, "--format", "micropython", "-o", "mpboot_keys.py", cwd=folder))
    elif request.param == "package":  # a `firmware export` folder: mpboot/ as source
        ok(mpboot("firmware", "export", ".", cwd=folder))
        ok(mpboot("pubkey", OTHER, "--format", "micropython", "-o", "mpboot_keys.py", cwd=folder))
    else:  # modules named like the host's device scripts and the firmware package
        for name in ("verify_images.py", "sim_device.py", "sim_serve.py", "sim_config.py",
                     "bluetooth.py", "mpboot_keys.py"):
            (folder / name).write_text(_HOSTILE)
        (folder / "mpboot").mkdir()
        (folder / "mpboot" / "__init__.py").write_text(_HOSTILE)
    return folder


def test_verify_device_ignores_the_folder(hostile: Path, images: dict[str, Path]) -> None:
    foreign = mpboot("verify", images["foreign"], "-k", KEY, "--device", cwd=hostile)
    assert foreign.returncode == 1, foreign.stdout + foreign.stderr
    assert "device: REJECTED UNKNOWN_KEY" in foreign.stderr
    assert "device: OK" not in foreign.stdout and MARK not in foreign.stdout + foreign.stderr
    assert "Traceback" not in foreign.stderr
    good = ok(mpboot("verify", images["ours"], "-k", KEY, "--device", cwd=hostile))
    assert "device: OK version 1.0.0" in good and f"key {KEY}" in good


def test_sim_power_ons_ignore_the_folder(hostile: Path, images: dict[str, Path]) -> None:
    dev = hostile / "dev"
    ok(mpboot("sim", "init", "dev", "-k", KEY, cwd=hostile))
    refused = mpboot("sim", "install", "dev", images["foreign"], "--permanent", cwd=hostile)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "not trusted" in refused.stderr and MARK not in refused.stdout
    booted = mpboot("sim", "boot", "dev", cwd=hostile)
    assert booted.returncode == 3 and "APP ran" not in booted.stdout  # recovery: nothing to run
    status = ok(mpboot("sim", "status", "dev", cwd=hostile))
    assert "no bootable image" in status and MARK not in status
    # The device's own key still works from that folder.
    ok(mpboot("sim", "install", dev, images["ours"], "--permanent", cwd=hostile))
    assert "device: APP ran" in ok(mpboot("sim", "boot", dev, cwd=hostile))


def test_serving_sim_ignores_the_folder(tmp_path: Path, images: dict[str, Path]) -> None:
    folder = tmp_path / "here"
    folder.mkdir()
    ok(mpboot("pubkey", OTHER, "--format", "micropython", "-o", "mpboot_keys.py", cwd=folder))
    shutil.copytree(folder, folder / "dev")  # the device's own folder holds one too
    sim = SimProcess(folder / "dev", [KEY], cwd=folder)
    try:
        flashed = mpboot("flash", images["foreign"], "--port", sim.path, "--confirm", "--no-progress",
                         cwd=folder, timeout=120)
        assert flashed.returncode == 1, flashed.stdout + flashed.stderr
        assert "not trusted" in flashed.stderr
    finally:
        assert sim.stop(signal.SIGTERM) == 0
    assert MARK not in sim.output()
