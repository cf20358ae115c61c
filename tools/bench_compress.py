#!/usr/bin/env python3
"""Benchmark compressed uploads (`make bench`, issue 18): realistic payloads uploaded plain and
compressed by mpboot's client, and by smpclient 7.3.0, on the same simulated device and framing.

Payloads, built fresh each run and signed with a freshly generated key:
- app: real MicroPython code compiled with mpy-cross into a ROMFS (mpboot.pack.pack_app, as
  `mpboot sign` of a folder does): microdot 2.7.0 (from the installed distribution) and
  mpboot's device package (firmware/mpboot/) as its libraries, and a main.py that serves a
  page with microdot.
- app + asset: the same, plus a web font: DejaVu Sans (Debian's fonts-dejavu-core) cut down to
  the Latin, punctuation, arrow and box-drawing characters with fontTools, as a device's web
  page would ship it.
- incompressible: random bytes in an app of the size of "app + asset" (the control).

The device and the clock are bench_smp's: `mpboot sim` with NOR flash timing, its pty paced
like a UART, raw (COBS) framing, buf_size 2048 / buf_count 4, a confirmed v1 in slot 0 and an
older image in slot 1 (so every sector the upload needs is erased first, as on a device in
the field); each upload goes to a fresh copy of that prepared device. The clock runs from the
first upload request to the last reply. Effective rate = image bytes / that time.

Each goal of the issue prints one line, met or MISSED, with its numbers. At 921600 the line
outruns the NOR model (an old image in the slot: 45 ms erase + 11.2 ms programming per 4 KiB),
so the device is the bound: the compressed upload also runs with the pty not paced, which
tells what the link costs apart from what the device spends beyond the modelled flash time
(decoding, inflating, verifying, the simulator's own work per flash operation).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# (bench_smp puts host/ and tests/ on sys.path: it comes first.)
from bench_smp import ROOT, Sim, app_image, flash_bound_s, measure_dir, prepare, theirs  # noqa: E402

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from mpboot.pack import pack_app  # noqa: E402
from mpboot.smp.client import SMPClient  # noqa: E402
from mpboot.smp.upload import UploadResult, max_data  # noqa: E402
from mpboot.smp.zchunk import ZUPLOAD_MAX, Packer  # noqa: E402
from mpboot.transport.serial import SerialTransport  # noqa: E402
from simkit import make_app, sign_app  # noqa: E402

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
FONT_PACKAGE = "fonts-dejavu-core"
# What a web page in a Latin script needs: ASCII, Latin-1 and Latin Extended-A, general
# punctuation, the euro sign, arrows and box drawing.
FONT_UNICODES = "U+0020-007E,U+00A0-017F,U+2000-206F,U+20AC,U+2190-21FF,U+2500-257F"
DEVICE_WBITS = 10  # the window mpboot's device offers (firmware/mpboot/smp/zupload.py)
BUF_SIZE = 2048  # the sim's MCUmgr parameters (bench_smp's)
FRAMING = "raw"
NOISE = 0.98  # "not slower than plain" within this much run-to-run noise

MAIN = '''\
# The benchmark's app: a page served with microdot.
import mpboot
from microdot import Microdot, send_file

app = Microdot()


@app.route("/")
async def index(request):
    return "<!doctype html><title>mpboot</title><h1>mpboot %s</h1>", 200, {"Content-Type": "text/html"}
'''
FONT_ROUTE = '''

@app.route("/static/<path:path>")
async def static(request, path):
    if ".." in path:
        return "Not found", 404
    return send_file("/rom/static/" + path, max_age=86400)
'''
RUN = '''

print("CONFIRM", mpboot.confirm())
app.run(port=80)
'''


@dataclass(frozen=True)
class Payload:
    name: str
    image: bytes
    what: str


def font_subset(out: Path) -> int:
    """DejaVu Sans cut down to FONT_UNICODES, written to `out`; its size."""
    if not FONT.exists():
        raise SystemExit(f"bench_compress: {FONT} is missing: install Debian's {FONT_PACKAGE} "
                         f"(apt-get install {FONT_PACKAGE})")
    from fontTools import subset
    from fontTools.ttLib import TTFont

    font = TTFont(str(FONT), recalcTimestamp=False)
    options = subset.Options()
    options.name_IDs = ["*"]  # keep the names and the licence text
    options.drop_tables += ["FFTM"]  # FontForge's timestamps (which fontTools cannot subset)
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=subset.parse_unicodes(FONT_UNICODES))
    subsetter.subset(font)
    font.save(str(out))
    return out.stat().st_size


def app_folder(folder: Path, version: str, *, asset: bool) -> tuple[int, str]:
    """The app's source tree in `folder`: (number of .py files, what the asset is)."""
    from importlib.metadata import distribution

    dist = distribution("microdot")
    lib = folder / "lib"
    count = 0
    for f in dist.files or ():
        if f.parts[0] == "microdot" and f.suffix == ".py":
            dst = lib / Path(*f.parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(str(dist.locate_file(f))), dst)
            count += 1
    if not count:
        raise SystemExit("bench_compress: microdot is not installed in this environment (make setup)")
    shutil.copytree(ROOT / "firmware" / "mpboot", lib / "mpboot", ignore=shutil.ignore_patterns("__pycache__", ".*"))
    count += sum(1 for _ in (lib / "mpboot").rglob("*.py"))
    main = MAIN % version + (FONT_ROUTE if asset else "") + RUN
    (folder / "main.py").write_text(main)
    what = ""
    if asset:
        (folder / "static").mkdir()
        size = font_subset(folder / "static" / "DejaVuSans-latin.ttf")
        what = f" + {FONT.name} subset ({size} bytes)"
    return count + 1, what


def payloads(work: Path, key) -> list[Payload]:  # type: ignore[no-untyped-def]
    version = "2.0.0"
    out = []
    for name, asset in (("app", False), ("app + asset", True)):
        folder = work / name.replace(" ", "").replace("+", "-")
        folder.mkdir()
        files, what = app_folder(folder, version, asset=asset)
        romfs = pack_app(folder)  # every .py compiled with mpy-cross (an error stops the bench)
        out.append(Payload(name, sign_app(romfs, key, version),
                           f"microdot 2.7.0 + mpboot device package + main.py, {files} .py -> .mpy{what}"))
    target = len(out[-1].image)
    # Random filler sized so that the signed image matches "app + asset" (within a few bytes).
    filler = target - len(sign_app(make_app(work / "probe", version, confirm=True, filler=1), key, version)) + 1
    image = sign_app(make_app(work / "random", version, confirm=True, filler=filler), key, version)
    out.append(Payload("incompressible", image, "random bytes in an app"))
    return out


def stream_room(size: int) -> int:
    """The raw deflate bytes one compressed request carries for an image of `size` bytes, as
    mpboot.smp.upload sizes it (the largest `off` and `ulen`)."""
    budget = SerialTransport("unused", framing=FRAMING).max_packet(BUF_SIZE)
    return max_data(budget, {"off": size, "ulen": ZUPLOAD_MAX})


def packed_ratio(image: bytes) -> tuple[float, float]:
    """(image bytes / stream bytes over the whole image as the packer cuts it, packing seconds)."""
    t0 = time.perf_counter()
    packer = Packer(image, DEVICE_WBITS, stream_room(len(image)))
    off = stream = 0
    while off < len(image):
        c = packer.chunk(off)
        if c is None:
            return 1.0, time.perf_counter() - t0
        stream += len(c.data)
        off = c.end
    return len(image) / stream, time.perf_counter() - t0


@dataclass(frozen=True)
class Run:
    seconds: float
    result: UploadResult | None  # None: smpclient's

    def rate(self, size: int) -> float:
        return size / self.seconds

    @property
    def ratio_sent(self) -> float:
        r = self.result
        return r.image_sent / r.sent if r is not None and r.sent else 1.0


async def ours(path: str, baud: int, image: bytes, compress: bool | None) -> Run:
    async with SMPClient(SerialTransport(path, baudrate=baud, framing=FRAMING)) as client:
        # The MCUmgr parameters before the clock, as smpclient reads them when it connects.
        await client.params_or_default()
        t0 = time.perf_counter()
        result = await client.upload(image, compress=compress)
        return Run(time.perf_counter() - t0, result)


def measure(base: Path, work: Path, pub: Path, baud: int, image: bytes, client: str, *, paced: bool = True) -> Run:
    """One upload by `client` to a fresh copy of the device `base`; paced: the pty runs at
    `baud` (else as fast as the device takes it: what the device alone allows)."""
    sim = Sim(measure_dir(base, work), pub, baud=baud if paced else None)
    try:
        sim.wait_for("serving")
        if client == "smpclient":
            return Run(asyncio.run(theirs(sim.path, baud, image, FRAMING)), None)
        return asyncio.run(ours(sim.path, baud, image, False if client == "mpboot plain" else None))
    finally:
        sim.stop()


def goal(text: str, ok: bool, numbers: str) -> None:
    print(f"    goal {text}: {'met' if ok else 'MISSED'} ({numbers})")


CLIENTS = ("mpboot plain", "mpboot compressed", "smpclient")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-compress-") as name:
        work = Path(name)
        key = generate("rsa-2048")  # fresh every run: no key is shipped or reused
        pub = work / "pub.pem"
        pub.write_bytes(key.public().key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        loads = payloads(work, key)
        v1 = app_image(work, key, "1.0.0", 16 * 1024)
        old = app_image(work, key, "0.9.0", 512 * 1024)  # more than any payload: every sector erased
        dirty = prepare(work, pub, v1, old, "dirty")
        print("mpboot compressed-upload benchmark (mpboot sim, NOR timing, UART-paced pty, raw framing; "
              f"buf_size {BUF_SIZE}, buf_count 4; slot 1 holds an old image: every sector is erased first)")
        print(f"  payloads (ratio: image bytes / raw deflate bytes, {1 << DEVICE_WBITS}-byte window, "
              "streams of one request each):")
        for p in loads:
            ratio, pack_s = packed_ratio(p.image)
            print(f"    {p.name}: {len(p.image)} bytes, ratio {ratio:.2f} (packed in {pack_s:.2f} s; {p.what})")
        app, asset, noise = loads
        plan = ((115200, ((app, CLIENTS), (asset, CLIENTS), (noise, CLIENTS[:2]))),
                (921600, ((app, CLIENTS), (asset, CLIENTS))))
        for baud, cases in plan:
            line = baud / 10
            print(f"  {baud} baud (line {line:.0f} B/s):")
            for p, clients in cases:
                size = len(p.image)
                print(f"   {p.name}, {size} bytes:")
                runs: dict[str, Run] = {}
                for client in clients:
                    run = runs[client] = measure(dirty, work, pub, baud, p.image, client)
                    r = run.result
                    detail = (f"ratio sent {run.ratio_sent:.2f}, {r.compressed}/{r.requests} requests compressed"
                              if r is not None else "plain requests")
                    if r is not None and r.compressed and r.wbits != DEVICE_WBITS:
                        detail += f" (window bits {r.wbits}, not {DEVICE_WBITS}: the payload ratio above is off)"
                    print(f"    {client}: {run.rate(size):.0f} B/s, {run.rate(size) / line:.1%} of line, "
                          f"{detail} ({run.seconds:.1f} s)")
                plain, z = runs["mpboot plain"], runs["mpboot compressed"]
                zr = z.rate(size)
                print(f"    ratio mpboot compressed / mpboot plain: {zr / plain.rate(size):.2f}x", end="")
                if "smpclient" in runs:
                    print(f", mpboot compressed / smpclient: {zr / runs['smpclient'].rate(size):.2f}x", end="")
                print()
                ceiling = size / flash_bound_s(size)
                if baud == 115200 and p is not noise:
                    want = 0.95 * line * z.ratio_sent
                    goal(f"{baud} {p.name}: compressed >= 95% of line x ratio sent", zr >= want,
                         f"{zr:.0f} B/s vs 0.95 x {line:.0f} x {z.ratio_sent:.2f} = {want:.0f} B/s; "
                         f"{zr / (line * z.ratio_sent):.1%}")
                if baud == 115200 and p is asset:
                    goal(f"{baud} {p.name}: compressed >= 1.4x line rate", zr >= 1.4 * line,
                         f"{zr / line:.2f}x line")
                if p is noise:
                    pr = plain.rate(size)
                    goal(f"{baud} {p.name}: compressed not slower than plain (>= {NOISE:.2f}x)",
                         zr >= NOISE * pr, f"{zr:.0f} vs {pr:.0f} B/s, {zr / pr:.3f}x; "
                         f"{z.result.compressed if z.result else 0} requests compressed")
                if ceiling < line * z.ratio_sent:  # the flash, not the line, is the limit
                    # The same upload with the pty not paced: the device's own bound (the flash
                    # model plus what the device does besides: decoding, inflating, verifying).
                    free = measure(dirty, work, pub, baud, p.image, "mpboot compressed", paced=False)
                    print(f"    flash-bound ceiling (NOR model alone, old image in the slot): {ceiling:.0f} B/s; "
                          f"mpboot compressed with the line not paced: {free.rate(size):.0f} B/s "
                          f"({free.rate(size) / ceiling:.1%} of the ceiling; paced reaches "
                          f"{zr / free.rate(size):.1%} of it)")
                    goal(f"{baud} {p.name}: compressed within 5% of the flash-bound ceiling",
                         zr >= 0.95 * ceiling,
                         f"{zr:.0f} vs {ceiling:.0f} B/s (old image in the slot: "
                         f"{-(-size // 4096)} sectors erased), {zr / ceiling:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
