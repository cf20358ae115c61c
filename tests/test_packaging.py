"""What `pip install mpboot` ships, and what it must never ship.

Builds the wheel from a copy of the source tree (so no build/ or *.egg-info lands in the
checkout) and checks it carries the device package (mpboot/_firmware: manifest.py and the
mpboot device modules) and the MicroPython scripts the host runs, but no key files and no
tests; that the installed layout finds and exports the device files; that firmware/manifest.py
freezes the `mpboot` package under a MicroPython-style manifest; and that the source tree
(firmware/, host/) holds no keys, in particular no mpboot_keys.py the user should generate.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
HOST = ROOT / "host"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

REQUIRED_WHEEL_FILES = (
    "mpboot/__init__.py",
    "mpboot/cli/__init__.py",
    "mpboot/cli/common.py",
    "mpboot/_firmware/manifest.py",
    "mpboot/_firmware/mpboot/__init__.py",
    "mpboot/_firmware/mpboot/image.py",
    "mpboot/_firmware/mpboot/rsa.py",
    "mpboot/_firmware/mpboot/reader.py",
    "mpboot/_firmware/mpboot/boot.py",
    "mpboot/_firmware/mpboot/slots.py",
    "mpboot/_firmware/mpboot/state.py",
    "mpboot/_firmware/mpboot/update.py",
    "mpboot/_firmware/mpboot/flash.py",
    "mpboot/_firmware/mpboot/ports/__init__.py",
    "mpboot/_firmware/mpboot/ports/unix.py",
    "mpboot/_firmware/mpboot/ports/nor_sim.py",
    "mpboot/_firmware/mpboot/ports/qemu.py",
    "mpboot/qemu/build.py",
    "mpboot/qemu/runner.py",
    "mpboot/qemu/serve.py",
    "mpboot/sim/__init__.py",
    "mpboot/upy_scripts/verify_images.py",
    "mpboot/upy_scripts/sim_device.py",
)
# Not copied into the throwaway source tree the wheel is built from.
_COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                      ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache")
# setuptools learnt `project.license` as an SPDX string (PEP 639) in 77.0.0.
SETUPTOOLS_PEP639 = Version("77")


def _setuptools_in_venv() -> Version | None:
    try:
        return Version(metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mpboot wheel, built by pip from a copy of the checkout.

    Without build isolation when this venv's setuptools can build the project (fast, no
    index); otherwise pip fetches the build backend from the configured (local) index."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=_COPY_IGNORE)
    out = base / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)]
    installed = _setuptools_in_venv()
    if installed is not None and installed >= SETUPTOOLS_PEP639:
        cmd.insert(cmd.index("--no-deps"), "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = sorted(out.glob("mpboot-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_ships_the_device_files_and_scripts(wheel: Path) -> None:
    names = set(_names(wheel))
    missing = [n for n in REQUIRED_WHEEL_FILES if n not in names]
    assert not missing, f"missing from {wheel.name}: {missing}"
    # Byte for byte the files of the checkout.
    with zipfile.ZipFile(wheel) as zf:
        for rel in ("manifest.py", "mpboot/image.py", "mpboot/rsa.py", "mpboot/reader.py"):
            assert zf.read(f"mpboot/_firmware/{rel}") == (FIRMWARE / rel).read_bytes(), rel
        assert zf.read("mpboot/upy_scripts/verify_images.py") == (
            HOST / "mpboot" / "upy_scripts" / "verify_images.py"
        ).read_bytes()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert re.search(r"^mpboot\s*=\s*mpboot\.cli:main$", zf.read(entry_points).decode(), re.M)


def test_wheel_ships_no_keys_and_no_tests(wheel: Path) -> None:
    names = _names(wheel)
    assert not [n for n in names if n.lower().endswith((".pem", ".der", ".key"))]
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n or "conftest" in n]
    assert not [n for n in names if n.rsplit("/", 1)[-1] == "mpboot_keys.py"]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level == {"mpboot", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    with zipfile.ZipFile(wheel) as zf:
        for name in names:
            data = zf.read(name)
            assert b"BEGIN" + b" PRIVATE KEY" not in data, name
            assert b"BEGIN" + b" RSA PRIVATE KEY" not in data, name


def test_installed_layout_finds_and_exports_the_device_files(wheel: Path, tmp_path: Path) -> None:
    """Unpacked as pip installs it, mpboot.firmware reads mpboot/_firmware (not the checkout)."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    dest = tmp_path / "exported"
    # -S: no site-packages, so neither the editable install nor the checkout can answer.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from mpboot.firmware import firmware_root, export;"
        "print(firmware_root()); export(sys.argv[2])"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(site), str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == site / "mpboot" / "_firmware"
    exported = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.py"))
    assert exported == sorted(str(p.relative_to(FIRMWARE)) for p in FIRMWARE.rglob("*.py")
                              if "__pycache__" not in p.parts)


# --------------------------------------------------------------------------- the freeze manifest


class _Options:
    """MicroPython's manifest `options`: keyword arguments of include(), with defaults."""

    def __init__(self, **given: Any) -> None:
        self.__dict__.update(given)

    def defaults(self, **kw: Any) -> None:
        for k, v in kw.items():
            self.__dict__.setdefault(k, v)


class _ManifestRecorder:
    """Stand-ins for the functions MicroPython's manifest files call."""

    def __init__(self, **options: Any) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.options = _Options(**options)

    def _record(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return call

    def namespace(self) -> dict[str, Any]:
        names = ("metadata", "package", "module", "include", "require", "freeze")
        return {"options": self.options, **{name: self._record(name) for name in names}}

    def named(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for n, a, k in self.calls if n == name]

    def frozen_files(self) -> list[str]:
        out = []
        for args, kw in self.named("package"):
            assert args[0] == "mpboot", self.calls
            out += [f"mpboot/{f}" for f in kw["files"]]
        return sorted(out)


def _run_manifest(**options: Any) -> _ManifestRecorder:
    manifest = FIRMWARE / "manifest.py"
    recorder = _ManifestRecorder(**options)
    exec(compile(manifest.read_text(), str(manifest), "exec"), recorder.namespace())  # noqa: S102
    return recorder


# Device modules frozen only on request (each says so in its header): espimg and espota, the
# esp32 firmware update (ota=True).
NOT_FROZEN_YET = {"mpboot/espimg.py", "mpboot/espota.py"}
CORE = sorted(f"mpboot/{p.relative_to(FIRMWARE / 'mpboot')}" for p in (FIRMWARE / "mpboot").rglob("*.py")
              if "__pycache__" not in p.parts and p.parent.name != "ports"
              and f"mpboot/{p.relative_to(FIRMWARE / 'mpboot')}" not in NOT_FROZEN_YET) + ["mpboot/ports/__init__.py"]


def test_manifest_freezes_the_mpboot_package() -> None:
    recorder = _run_manifest()
    # Every device module but the port adapters, each of which exists.
    assert recorder.frozen_files() == sorted(CORE)
    for rel in recorder.frozen_files():
        assert (FIRMWARE / rel).is_file(), rel
    # Keys are the user's to generate and freeze, never part of this manifest.
    assert not recorder.named("module") and not recorder.named("include"), recorder.calls

    [(_, meta)] = recorder.named("metadata")
    version = PYPROJECT["project"]["version"]
    assert meta.get("version") == version
    firmware_init = (FIRMWARE / "mpboot" / "__init__.py").read_text()
    assert re.search(rf'^__version__ = "{re.escape(version)}"$', firmware_init, re.M)


@pytest.mark.parametrize("port", ["esp32", "qemu", "rp2", "stm32", "unix"])
def test_manifest_adds_only_the_chosen_port(port: str) -> None:
    extra = sorted(set(_run_manifest(port=port).frozen_files()) - set(CORE))
    expected = ["mpboot/ports/nor_sim.py", "mpboot/ports/unix.py"] if port == "unix" else [f"mpboot/ports/{port}.py"]
    assert extra == expected
    for rel in extra:
        assert (FIRMWARE / rel).is_file(), rel


def test_manifest_ota_adds_the_esp32_firmware_update() -> None:
    extra = sorted(set(_run_manifest(port="esp32", ota=True).frozen_files()) - set(CORE))
    assert extra == ["mpboot/espimg.py", "mpboot/espota.py", "mpboot/ports/esp32.py"]
    with pytest.raises(ValueError, match="port must be esp32"):
        _run_manifest(port="rp2", ota=True)


# --------------------------------------------------------------------------- no shipped keys


def _source_files() -> list[Path]:
    return [p for top in (FIRMWARE, HOST) for p in sorted(top.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts]


def test_no_keys_in_the_source_tree() -> None:
    files = _source_files()
    assert files
    for path in files:
        data = path.read_bytes()
        assert b"BEGIN" + b" PRIVATE KEY" not in data, path
        assert b"BEGIN" + b" RSA PRIVATE KEY" not in data, path
        assert b"BEGIN" + b" ENCRYPTED PRIVATE KEY" not in data, path
        assert b"BEGIN PUBLIC KEY" not in data, path
        assert path.suffix.lower() not in (".pem", ".der", ".key"), path
    assert not list(FIRMWARE.rglob("mpboot_keys.py")), "firmware/ must not ship trusted keys"
    assert not list(FIRMWARE.rglob("mpboot_keys.mpy"))
