"""Helpers for tests on the simulated device (mpboot.sim): signed app images and scenarios."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mpboot.image import ImageKind, ImageVersion, SignOptions, build_image
from mpboot.keys import SigningKey
from mpboot.pack import pack_app
from mpboot.errors import ImageRefused, UpdateRefused
from mpboot.sim import Geometry, Run, SimDevice, install_result

HEADER_ROOM = 0x200


def make_app(folder: Path, name: str, *, confirm: bool, filler: int = 0) -> bytes:
    """A ROMFS app whose main prints `APP name` and, if `confirm`, confirms itself.
    `filler` bytes of incompressible data make the image span several sectors."""
    folder.mkdir(parents=True, exist_ok=True)
    main = f"import mpboot\nprint('APP {name}')\n"
    if confirm:
        main += "print('CONFIRM', mpboot.confirm())\n"
    (folder / "main.py").write_text(main)
    if filler:
        import random

        (folder / "filler.bin").write_bytes(random.Random(name).randbytes(filler))
    return pack_app(folder)


def sign_app(romfs: bytes, key: SigningKey, version: str, *, security_counter: int | None = 1,
             vendor_id: bytes | None = None, class_id: bytes | None = None,
             kind: ImageKind = ImageKind.APP, depends: tuple[tuple[int, str], ...] = ()) -> bytes:
    """The ROMFS app signed as an image (header room in front): its version, SEC_CNT (None: no
    SEC_CNT TLV), the vendor and class ids it is for, its kind (MPBOOT_KIND) and its
    DEPENDENCY TLVs ((image id, minimum version), ...)."""
    opts = SignOptions(ImageVersion.parse(version), security_counter=security_counter,
                       vendor_id=vendor_id, class_id=class_id, kind=kind,
                       dependencies=tuple((i, ImageVersion.parse(v)) for i, v in depends))
    return build_image(bytes(HEADER_ROOM) + romfs, key, opts)


def image_files(folder: Path, images: dict[str, bytes]) -> dict[str, Path]:
    """Each signed image written to folder/NAME.bin: the paths by name."""
    paths = {}
    for name, data in images.items():
        paths[name] = folder / f"{name}.bin"
        paths[name].write_bytes(data)
    return paths


_S1 = re.compile(r"^mpboot: stage 1 (?:none|slot (\d) version (\S+?)(\+\d+)?( test boot)?)$", re.M)
_BOOT = re.compile(r"^mpboot: slot (\d) version (\S+?)(\+\d+)?( test boot)?( watchdog \d+ ms)?$", re.M)


@dataclass(frozen=True)
class Booted:
    slot: int  # -1: recovery
    version: str = ""
    trial: bool = False
    watchdog: bool = False
    app: str = ""  # what the app printed (APP name)
    confirmed: bool | None = None  # the app's mpboot.confirm() result, if it called it
    # On a chip with stage-1 slots: stage 1's version ("" none; None: no stage-1 slots), and
    # whether it was its test boot.
    s1: str | None = None
    s1_trial: bool = False

    @classmethod
    def parse(cls, run: Run) -> Booted:
        m = _BOOT.search(run.stdout)
        s = _S1.search(run.stdout)
        s1 = None if not s else s.group(2) or ""
        s1_trial = bool(s and s.group(4))
        if not m:
            assert "RECOVERY" in run.stdout, run.stdout + run.stderr
            return cls(-1, s1=s1, s1_trial=s1_trial)
        app = re.search(r"^APP (\S+)$", run.stdout, re.M)
        conf = re.search(r"^CONFIRM (True|False)$", run.stdout, re.M)
        return cls(int(m.group(1)), m.group(2), bool(m.group(4)), bool(m.group(5)),
                   app.group(1) if app else "", None if not conf else conf.group(1) == "True", s1, s1_trial)


def boot(dev: SimDevice, **kw: object) -> Booted:
    return Booted.parse(dev.boot(**kw))


def make_stage1(folder: Path, name: str, *, prove: bool, filler: int = 0) -> bytes:
    """A stand-in stage-1 ROMFS (sign it with kind=ImageKind.UPDATER): with `prove`, the
    simulated device's proof stand-in confirms its test boot (sim_device: a file "prove")."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(f"print('STAGE1 {name}')\n")
    if prove:
        (folder / "prove").write_text("1\n")
    if filler:
        import random

        (folder / "filler.bin").write_bytes(random.Random(name).randbytes(filler))
    return pack_app(folder)


def _patch(f: Path, old: str, new: str) -> None:
    text = f.read_text()
    assert text.count(old) == 1, f"{f.name} changed: update this patch"
    f.write_text(text.replace(old, new))


def make_service(folder: Path, variant: str = "") -> bytes:
    """Stage 1 as it ships (`mpboot firmware export --stage1`), packed as a ROMFS to sign with
    kind=ImageKind.UPDATER. `variant` "shout" answers echoes in capitals (so a test can tell
    which stage 1 serves); "crash" raises while mpboot.smp.service imports; "breaks" answers
    but writes zeros for every upload chunk after the first; "mute" never answers."""
    from mpboot import firmware

    firmware.export(folder, stage1=True)
    if variant == "shout":
        f = folder / "mpboot/smp/os_mgmt.py"
        text = f.read_text()
        old = '        enc.text("r")\n        enc.text(d)\n'
        assert text.count(old) == 1, "the echo handler changed: update this patch"
        f.write_text(text.replace(old, '        enc.text("r")\n        enc.text(d.upper())\n'))
    elif variant == "crash":
        f = folder / "mpboot/smp/service.py"
        f.write_text(f.read_text() + "\nraise RuntimeError('stage 1 crashes at import')\n")
    elif variant == "breaks":  # answers, but every upload chunk after the first lands as zeros
        _patch(folder / "mpboot/smp/img_mgmt.py", "        nxt = up.write(off, data)\n",
               "        nxt = up.write(off, bytes(len(data)))\n")
    elif variant == "mute":  # never answers a request
        _patch(folder / "mpboot/smp/server.py", "    def handle(self, pkt):\n",
               "    def handle(self, pkt):\n        return None\n")
    elif variant:
        raise ValueError(variant)
    return pack_app(folder, entry=firmware.STAGE1_ENTRY)


def installed(run: Run) -> int:
    """The slot an install went to; a refusal raises (mpboot.sim.install_result)."""
    return install_result(run).slot


def refused(run: Run) -> tuple[str, int]:
    """("image", code) or ("update", code) of a refused install; fails if it was taken."""
    try:
        done = install_result(run)
    except ImageRefused as err:
        assert err.code is not None
        return "image", err.code
    except UpdateRefused as err:
        assert err.code is not None
        return "update", err.code
    raise AssertionError(f"the device took the image: {done}")


class FlashFile:
    """A NorFlash file as the host sees it (the unix port's layout, mpboot.sim.Geometry: slot
    0 | slot 1 | state, two sectors | trust, two sectors | factory, the last two sectors), and
    its wear counters."""

    def __init__(self, path: Path, sector: int = 4096, size: int = 64 * 1024, trust: bool = True) -> None:
        self.path = path
        self.size = size
        self.sector = sector
        self.geometry = Geometry(size, sector, trust=trust)
        self.slot = self.geometry.slot_size

    def bytes(self) -> bytes:
        return self.path.read_bytes()

    def slot_bytes(self, s: int) -> bytes:
        return self.bytes()[s * self.slot : (s + 1) * self.slot]

    def wear(self) -> list[int]:
        data = Path(str(self.path) + ".wear").read_bytes()
        return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)]

    def slot_wear(self, s: int) -> list[int]:
        n = self.slot // self.sector
        return self.wear()[s * n : (s + 1) * n]

    def state_range(self) -> range:
        return range(2 * self.slot, 2 * self.slot + 2 * self.sector)

    def trust_range(self) -> range:
        start = self.geometry.trust_start
        assert start is not None
        return range(start, start + 2 * self.sector)

    def factory_range(self) -> range:
        return range(self.size - 2 * self.sector, self.size)
