"""`mpboot` command line: a thin face over the library. The only module that prints."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from intelhex import IntelHex, IntelHexError

from mpboot import __version__, device, firmware, keys, pack, pubkey
from mpboot.errors import ImageErrorCode, ImageRejected, InputFileError, MpbootError, UsageError
from mpboot.image import (
    DEFAULT_HEADER_SIZE,
    ImageVersion,
    ParsedImage,
    SignOptions,
    Tlv,
    TlvType,
    build_image,
    class_uuid,
    parse_image,
    vendor_uuid,
    verify_image,
)
from mpboot.keys import SignatureScheme


class _Group(click.Group):
    """Turns library errors into one line on stderr and an exit code; never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MpbootError as err:
            click.echo(f"mpboot: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            click.echo(f"mpboot: error: {where}{err.strerror or err}", err=True)
            ctx.exit(2)


_SIZE_RE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)([kKmM]?)$")


def parse_size(text: str, what: str) -> int:
    """Decimal, 0x-hex, with an optional k/M (KiB/MiB) suffix."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UsageError(f"bad {what} {text!r}: expected a number like 0x200, 4096 or 512k")
    value = int(m.group(1), 0) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return value


def _password(env_var: str | None) -> bytes | None:
    if not env_var:
        return None
    value = os.environ.get(env_var)
    if not value:
        raise UsageError(f"--password-env {env_var}: that environment variable is not set or empty")
    return value.encode()


def _read_image(path: Path) -> bytes:
    """An image file: raw binary, or Intel hex when it ends in .hex."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.suffix.lower() == ".hex":
        try:
            return bytes(IntelHex(str(path)).tobinarray())
        except (IntelHexError, ValueError) as err:
            raise InputFileError(f"{path}: not a valid Intel hex file ({err})") from None
    return path.read_bytes()


password_env_option = click.option(
    "--password-env", metavar="VAR", help="Read the private key passphrase from environment variable VAR."
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpboot")
def cli() -> None:
    """mpboot: sign, inspect and verify MCUboot-format images for MicroPython devices."""


@cli.command()
@click.option("--type", "key_type", type=click.Choice(list(keys.KEY_TYPES)), default="rsa-2048",
              show_default=True, help="Key type.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Private key file to create (PEM, PKCS#8); never overwritten.")
@password_env_option
def keygen(key_type: str, output: Path, password_env: str | None) -> None:
    """Generate a new signing key."""
    password = _password(password_env)
    key = keys.generate(key_type)
    keys.write_new_file(output, key.private_pem(password), private=True)
    click.echo(f"wrote {key_type} key {output} (key hash {key.public().keyhash().hex()})")


@cli.command("pubkey")
@click.argument("key_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(pubkey.FORMATS), default="pem", show_default=True,
              help="pem/der: SubjectPublicKeyInfo; raw: PKCS#1 RSAPublicKey DER (what KEYHASH "
                   "hashes); micropython: the device's mpboot_keys module; c: C arrays.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of standard output.")
@password_env_option
def pubkey_cmd(key_files: tuple[Path, ...], fmt: str, output: Path | None, password_env: str | None) -> None:
    """Export the public key(s) of KEY_FILES (private or public key files)."""
    password = _password(password_env)
    data = pubkey.export([keys.load_public_key(p, password) for p in key_files], fmt)
    if output is None:
        click.echo(data if fmt in ("der", "raw") else data.decode(), nl=False)
    else:
        output.write_bytes(data)


def _security_counter(value: str, version: ImageVersion) -> int:
    if value == "auto":
        return version.auto_security_counter()
    try:
        counter = int(value, 0)
    except ValueError:
        raise UsageError(f"bad security counter {value!r}: expected a number or 'auto'") from None
    if not 0 <= counter <= 0xFFFFFFFF:
        raise UsageError(f"security counter {counter} is not a 32-bit unsigned number")
    return counter


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-k", "--key", "key_file", type=click.Path(path_type=Path), required=True,
              help="Private key (PEM or DER).")
@click.option("--version", "version_text", required=True, metavar="MAJ.MIN.REV[+BUILD]",
              help="Image version.")
@click.option("--security-counter", default="auto", show_default=True, metavar="N|auto",
              help="Anti-rollback counter (SEC_CNT TLV); auto derives it from the version as imgtool does.")
@click.option("--vendor-id", metavar="UUID|NAME", help="UUID_VID TLV (a name is hashed to a UUIDv5, as imgtool).")
@click.option("--class-id", metavar="UUID|NAME", help="UUID_CID TLV (a name is hashed in the vendor's namespace).")
@click.option("--header-size", default=hex(DEFAULT_HEADER_SIZE), show_default=True, metavar="SIZE",
              help="Header size (payload offset).")
@click.option("--pad-header", is_flag=True,
              help="Add room for the header before a .bin/.hex payload (ROMFS and app inputs always get it).")
@click.option("--slot-size", metavar="SIZE", help="Refuse an image larger than this.")
@click.option("--load-addr", metavar="ADDR", help="Load address (sets the RAM_LOAD flag, as imgtool).")
@click.option("--scheme", type=click.Choice([s.value for s in SignatureScheme]), default="pss",
              show_default=True, help="pss: RSA*_PSS TLV (MCUboot); pkcs1v15: vendor TLV 0xa0.")
@click.option("--hex-addr", metavar="ADDR", help="Address of a .hex output (default: the input's).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Signed image (.bin, or Intel hex when it ends in .hex).")
@password_env_option
def sign(input_path: Path, key_file: Path, version_text: str, security_counter: str,
         vendor_id: str | None, class_id: str | None, header_size: str, pad_header: bool,
         slot_size: str | None, load_addr: str | None, scheme: str, hex_addr: str | None,
         output: Path, password_env: str | None) -> None:
    """Sign INPUT (.bin, .hex, .romfs, or a directory of .py files) into an MCUboot image."""
    version = ImageVersion.parse(version_text)
    vid = vendor_uuid(vendor_id) if vendor_id else None
    options = SignOptions(
        version=version,
        header_size=parse_size(header_size, "header size"),
        security_counter=_security_counter(security_counter, version),
        vendor_id=vid,
        class_id=class_uuid(class_id, vid) if class_id else None,
        load_addr=parse_size(load_addr, "load address") if load_addr else 0,
        scheme=SignatureScheme(scheme),
        slot_size=parse_size(slot_size, "slot size") if slot_size else None,
    )
    key = keys.load_signing_key(key_file, _password(password_env))
    source = pack.load_input(input_path)
    body, base_addr = pack.with_header_room(source, options.header_size, pad_header)
    image = build_image(body, key, options)
    if hex_addr:
        base_addr = parse_size(hex_addr, "hex address")
    pack.write_output(output, image, base_addr)
    click.echo(f"signed {input_path} ({source.kind}, {len(source.data)} bytes) -> {output} "
               f"({len(image)} bytes, version {version}, security counter {options.security_counter})")


@cli.command()
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.option("-k", "--key", "key_files", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Trusted key (public or private, PEM or DER); repeat for several.")
@click.option("--slot-size", metavar="SIZE", help="Slot size the image must fit (default: the file size).")
@click.option("--device", "on_device", is_flag=True,
              help="Also run the device verifier itself on the MicroPython unix port.")
@click.option("--heapsize", default=device.DEFAULT_HEAPSIZE, show_default=True,
              help="MicroPython heap for --device.")
@password_env_option
def verify(image_path: Path, key_files: tuple[Path, ...], slot_size: str | None, on_device: bool,
           heapsize: str, password_env: str | None) -> None:
    """Verify IMAGE's hash and signature against trusted keys."""
    if not re.fullmatch(r"\d+[kKmM]?", heapsize):
        raise UsageError(f"bad --heapsize {heapsize!r}: expected e.g. 24k")
    password = _password(password_env)
    trusted = [keys.load_public_key(p, password) for p in key_files]
    data = _read_image(image_path)
    slot = parse_size(slot_size, "slot size") if slot_size else len(data)
    rejected = False
    try:
        result = verify_image(data, trusted, slot)
        img = result.image
        click.echo(f"host:   OK version {img.header.version}, security counter "
                   f"{img.security_counter}, key {key_files[result.key_index]} "
                   f"(RSA-{result.key.bits} {result.scheme.value})")
    except ImageRejected as err:
        rejected = True
        click.echo(f"host:   REJECTED {err.code.name}: {err}", err=True)
    if on_device:
        verdict = device.verify_on_device(data, trusted, slot, heapsize)
        if verdict.accepted:
            click.echo(f"device: OK version {verdict.version}, security counter "
                       f"{verdict.security_counter}, key {key_files[verdict.key_index]} "
                       f"(MicroPython unix port, heap {heapsize})")
        else:
            rejected = True
            assert verdict.code is not None
            click.echo(f"device: REJECTED {verdict.code.name}: {ImageRejected(verdict.code)}", err=True)
    if rejected:
        raise click.exceptions.Exit(1)


def _tlv_dict(t: Tlv) -> dict[str, Any]:
    return {"type": t.type, "name": t.type_name, "offset": t.offset, "length": len(t.value),
            "value": t.value.hex()}


def image_summary(img: ParsedImage) -> dict[str, Any]:
    h = img.header
    sha = next((t.value for t in img.unprotected if t.type == TlvType.SHA256), None)
    keyhash = next((t.value for t in img.unprotected if t.type == TlvType.KEYHASH), None)
    return {
        "header": {
            "magic": f"{h.magic:#010x}", "load_addr": h.load_addr, "hdr_size": h.hdr_size,
            "protect_tlv_size": h.protect_tlv_size, "img_size": h.img_size, "flags": h.flags,
        },
        "version": str(h.version),
        "security_counter": img.security_counter,
        "vendor_id": str(uuid.UUID(bytes=img.vendor_id)) if img.vendor_id else None,
        "class_id": str(uuid.UUID(bytes=img.class_id)) if img.class_id else None,
        "total_size": img.total_size,
        "computed_sha256": img.digest.hex(),
        "sha256_tlv": sha.hex() if sha else None,
        "hash_matches": sha == img.digest,
        "keyhash": keyhash.hex() if keyhash else None,
        "protected_tlvs": [_tlv_dict(t) for t in img.protected],
        "tlvs": [_tlv_dict(t) for t in img.unprotected],
    }


@cli.command()
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(image_path: Path, as_json: bool) -> None:
    """Show IMAGE's header, version, security counter, ids, TLVs and hashes (checks no signature)."""
    summary = image_summary(parse_image(_read_image(image_path)))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    h = summary["header"]
    click.echo(f"image:            {image_path} ({summary['total_size']} bytes)")
    click.echo(f"version:          {summary['version']}")
    click.echo(f"security counter: {summary['security_counter']}")
    click.echo(f"vendor id:        {summary['vendor_id']}")
    click.echo(f"class id:         {summary['class_id']}")
    click.echo(f"header:           magic {h['magic']}, hdr_size {h['hdr_size']:#x}, img_size {h['img_size']}, "
               f"protected TLVs {h['protect_tlv_size']}, flags {h['flags']:#x}, load_addr {h['load_addr']:#x}")
    click.echo(f"sha256:           {summary['computed_sha256']} "
               f"({'matches TLV' if summary['hash_matches'] else 'DOES NOT MATCH TLV'})")
    click.echo(f"key hash:         {summary['keyhash']}")
    for label, tlvs in (("protected TLV", summary["protected_tlvs"]), ("TLV", summary["tlvs"])):
        for t in tlvs:
            value = t["value"] if t["length"] <= 32 else t["value"][:64] + "..."
            click.echo(f"{label:>15}:  {t['name']:<20} len {t['length']:<4} {value}")


@cli.group("firmware")
def firmware_group() -> None:
    """The device package shipped with mpboot."""


@firmware_group.command("export")
@click.argument("destination", type=click.Path(file_okay=False, path_type=Path))
def firmware_export(destination: Path) -> None:
    """Copy the device files (and manifest.py to freeze them) into DESTINATION."""
    files = firmware.export(destination)
    click.echo(f"exported {len(files)} files to {destination} (freeze with {destination / 'manifest.py'})")


@cli.group("sim", invoke_without_command=True)
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Run the device kept in DIR (created if new): serve SMP on a pty until Ctrl-C.")
@click.option("-k", "--keys", "--key", "key_files", multiple=True, type=click.Path(path_type=Path),
              help="Key the device trusts (public or private key file; repeatable).")
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path),
              help="Also make this symlink to the pty (removed at exit).")
@click.option("--slot-size", metavar="SIZE", help="Slot size of a new device (default 256k; 4 KiB sectors).")
@click.option("--vendor-id", metavar="UUID|NAME", help="Vendor id images must carry (new device).")
@click.option("--class-id", metavar="UUID|NAME", help="Class id images must carry (new device).")
@click.option("--flash-timing", type=click.Choice(["none", "nor"]), default="none", show_default=True,
              help="nor: erase and program as slowly as a typical SPI NOR chip.")
@click.option("--baud", type=click.IntRange(min=1), metavar="B",
              help="Pace the line like an 8N1 UART at B baud (default: unpaced).")
@click.option("--buf-size", default=2048, show_default=True, type=click.IntRange(64, 65535),
              help="MCUmgr buf_size the device announces.")
@click.option("--buf-count", default=4, show_default=True, type=click.IntRange(1, 64),
              help="MCUmgr buf_count (requests a client may pipeline).")
@click.option("--heapsize", default=None,
              help="The device's MicroPython heap (default: the slot size + 128k: the boot copies "
                   "the image into RAM, and firmware, service and app share the rest).")
@click.option("--ble", is_flag=True,
              help="Serve SMP over Bluetooth LE instead of the UART: prints \"mpboot sim: BLE NAME "
                   "ADDRESS on SPEC\"; hosts use --ble NAME --ble-backend bumble:SPEC.")
@click.option("--radio", metavar="SPEC",
              help="With --ble: the Bumble transport of the device's radio (an air from `mpboot sim "
                   "air` or another sim, e.g. tcp-client:127.0.0.1:PORT, or usb:0); default: an air "
                   "of its own on a free port.")
@click.option("--ble-name", metavar="NAME", help="With --ble: the name to advertise (default mpb-XXXX "
                                                  "from the board's unique id; at most 8 bytes fit the advertisement in full).")
@password_env_option
@click.pass_context
def sim_group(ctx: click.Context, state_dir: Path | None, key_files: tuple[Path, ...], link: Path | None,
              slot_size: str | None, vendor_id: str | None, class_id: str | None, flash_timing: str,
              baud: int | None, buf_size: int, buf_count: int, heapsize: str | None,
              ble: bool, radio: str | None, ble_name: str | None,
              password_env: str | None) -> None:
    """A simulated device: the firmware on the MicroPython unix port over a NOR flash file.

    With --state: the device keeps running. It boots, runs the app, then serves SMP (mcumgr)
    on a pty whose path it prints ("mpboot sim: UART on PATH"), or with --ble over a simulated
    Bluetooth LE radio; a reset request powers it on again. Ctrl-C stops it; the flash in DIR
    keeps what it wrote.

    The subcommands are single power-ons of a device made with `sim init`."""
    if ctx.invoked_subcommand is not None:
        return
    if state_dir is None:
        click.echo(ctx.get_help())
        return
    if not key_files:
        raise UsageError("mpboot sim --state DIR needs at least one --keys KEY (the keys the device trusts)")
    if heapsize is not None and not re.fullmatch(r"\d+[kKmM]?", heapsize):
        raise UsageError(f"bad --heapsize {heapsize!r}: expected e.g. 512k")
    if not ble and (radio is not None or ble_name is not None):
        raise UsageError("--radio and --ble-name go with --ble")
    import signal
    import sys

    from mpboot.sim.serve import SimServer

    trusted = [keys.load_public_key(path, _password(password_env)) for path in key_files]
    vid = vendor_uuid(vendor_id) if vendor_id else None

    def say(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    server = SimServer(state_dir, trusted, link=link,
                       slot_size=parse_size(slot_size, "slot size") if slot_size else None,
                       vendor_id=vid, class_id=class_uuid(class_id, vid) if class_id else None,
                       timing=flash_timing, baud=baud, buf_size=buf_size, buf_count=buf_count,
                       heapsize=heapsize, ble=ble, radio=radio, ble_name=ble_name, output=say)
    handlers = {sig: signal.signal(sig, lambda *_: server.request_stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        while not server.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, old in handlers.items():
            signal.signal(sig, old)
    if server.error:
        from mpboot.errors import DeviceRunError

        raise DeviceRunError(server.error)
    say("mpboot sim: stopped")


@sim_group.command("air")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port on 127.0.0.1 to serve HCI on (0: a free one).")
def sim_air(port: int) -> None:
    """A simulated Bluetooth LE radio that sims and hosts share, until Ctrl-C.

    Every Bumble host that opens the printed transport spec gets a controller on one virtual
    link: `mpboot sim --ble --radio SPEC` devices, and `--ble-backend bumble:SPEC` hosts."""
    import signal
    import sys
    import threading

    from mpboot.sim.air import AirThread

    air = AirThread(port=port)
    try:
        spec = air.start()
    except OSError as err:
        raise UsageError(f"cannot serve the air on 127.0.0.1:{port}: {err.strerror or err}") from None
    done = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"mpboot sim: air on {spec} (devices: mpboot sim --ble --radio {spec}; "
                   f"hosts: --ble-backend bumble:{spec})")
        sys.stdout.flush()
        while not done.wait(0.5):
            pass
    finally:
        air.stop()
        for sig, old in handlers.items():
            signal.signal(sig, old)
    click.echo("mpboot sim: air stopped")


@sim_group.command("init")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("-k", "--key", "key_files", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Key the device trusts (public or private key file; repeatable).")
@click.option("--flash-size", default="256k", show_default=True, metavar="SIZE",
              help="Whole flash: slot 0, slot 1, a two-sector state area and a two-sector factory area.")
@click.option("--sector", default="4k", show_default=True, metavar="SIZE", help="Erase sector size.")
@click.option("--align", type=click.Choice(["1", "4", "8", "16"]), default="4", show_default=True,
              help="Flash write unit in bytes.")
@click.option("--vendor-id", metavar="UUID|NAME", help="Vendor id images must carry.")
@click.option("--class-id", metavar="UUID|NAME", help="Class id images must carry.")
@click.option("--no-downgrade", is_flag=True, help="Refuse updates older than the confirmed image.")
@password_env_option
def sim_init(directory: Path, key_files: tuple[Path, ...], flash_size: str, sector: str, align: str,
             vendor_id: str | None, class_id: str | None, no_downgrade: bool, password_env: str | None) -> None:
    """Create a simulated device in DIR with blank flash, trusting the given keys."""
    from mpboot.sim import Geometry, SimDevice

    trusted = [keys.load_public_key(path, _password(password_env)) for path in key_files]
    size, sec = parse_size(flash_size, "flash size"), parse_size(sector, "sector size")
    if sec < 1024 or sec & (sec - 1) or size % sec:
        raise UsageError(f"sector size {sec} must be a power of two of at least 1k dividing the flash size")
    vid = vendor_uuid(vendor_id) if vendor_id else None
    dev = SimDevice.create(directory, trusted, Geometry(size, sec, int(align)), vendor_id=vid,
                           class_id=class_uuid(class_id, vid) if class_id else None,
                           downgrade=not no_downgrade)
    g = dev.geometry
    click.echo(f"simulated device in {directory}: {g.size} bytes of flash, two {g.slot_size}-byte slots, "
               f"{g.sector}-byte sectors, {g.align}-byte writes, {len(trusted)} trusted key(s)")


def _echo_device(text: str) -> None:
    for line in text.splitlines():
        if not line.startswith("RECOVERY "):  # the machine-readable twin of the line before
            click.echo(f"device: {line}")


@sim_group.command("boot")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
def sim_boot(directory: Path) -> None:
    """Power on: verify and run the chosen image's app (exit 3 in recovery)."""
    from mpboot.sim import SimDevice

    run = SimDevice.open(directory).boot()
    _echo_device(run.stdout)
    if run.line("RECOVERY"):
        raise click.exceptions.Exit(3)


@sim_group.command("install")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.option("--test", "mark", flag_value="test", default=True, help="Boot it once at the next reset (default).")
@click.option("--permanent", "mark", flag_value="permanent", help="Boot it from now on (confirmed).")
@click.option("--no-mark", "mark", flag_value="none", help="Write and verify it only.")
@click.option("--chunk", default=512, show_default=True, type=click.IntRange(1, 65536),
              help="Bytes per write to the device's updater.")
def sim_install(directory: Path, image_path: Path, mark: str, chunk: int) -> None:
    """Power on into the update service and take IMAGE into the slot not running."""
    from mpboot.sim import SimDevice, install_result

    data = _read_image(image_path)
    dev = SimDevice.open(directory)
    with tempfile.TemporaryDirectory(prefix="mpboot-sim-") as tmp:
        raw = Path(tmp) / "image.bin"
        raw.write_bytes(data)
        done = install_result(dev.install(raw, mark, chunk=chunk, manifest=True))
    how = {"test": "marked for a test boot", "permanent": "confirmed", "none": "not marked"}[mark]
    click.echo(f"installed {image_path} (version {done.version}) in slot {done.slot}, {how}")


@sim_group.command("status")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
def sim_status(directory: Path) -> None:
    """Show the boot state and what each slot holds (without booting)."""
    from mpboot.sim import SimDevice

    st = SimDevice.open(directory).status()

    def slot_name(n: int) -> str:
        return "-" if n == 255 else str(n)

    click.echo(f"state: record {st.seq}, active slot {slot_name(st.active)}, test {slot_name(st.test)}, "
               f"trial {slot_name(st.trial)}, security counter floor {st.floor}")
    for n, slot in enumerate(st.slots):
        if slot.ok:
            click.echo(f"slot {n}: version {slot.version}, security counter {slot.counter}"
                       f"{', confirmed' if slot.confirmed else ''}")
        else:
            try:
                why = str(ImageRejected(ImageErrorCode(slot.error)))
            except ValueError:
                why = f"error {slot.error}"
            click.echo(f"slot {n}: no bootable image ({why})")


# --- talking to a device over a serial port or BLE (SMP) ----------------------------------
# Device commands share --port/--baud/--framing/--timeout and --ble/--ble-backend, gathered
# into one DeviceLink. Library errors (PortError, DeviceSilent, the SMPError family) become
# one line and an exit code in _Group.

ble_backend_option = click.option(
    "--ble-backend", envvar="MPBOOT_BLE_BACKEND", metavar="bumble:SPEC",
    help="Bluetooth through Bumble on an HCI transport (bumble:usb:0, or the simulator's "
         "bumble:tcp-client:127.0.0.1:PORT) instead of the system's (or $MPBOOT_BLE_BACKEND).")


@dataclass(frozen=True)
class DeviceLink:
    """Where a device command talks to the device: a serial port, or a BLE peripheral."""

    port: str | None
    baud: int
    framing: str
    timeout: float
    ble: str | None  # address or advertised name
    ble_backend: str | None

    @property
    def name(self) -> str:
        return self.ble if self.ble is not None else str(self.port)

    def transport_factory(self) -> Callable[[], Any]:
        """Makes a fresh, unopened transport per call (BLE reconnects open a new one)."""
        if self.ble is not None:
            from mpboot import ble
            from mpboot.transport.ble import BleTransport

            backend = ble.select(self.ble_backend)
            target = self.ble
            return lambda: BleTransport(target, backend=backend)
        from mpboot.transport.serial import SerialTransport

        port, baud, framing = str(self.port), self.baud, self.framing
        return lambda: SerialTransport(port, baudrate=baud, framing=framing)

    def client_factory(self) -> Callable[[], Any]:
        from mpboot.smp import SMPClient

        make = self.transport_factory()
        timeout = self.timeout
        return lambda: SMPClient(make(), timeout=timeout)


def _device_options(func: Any) -> Any:
    """Adds the link options; the command gets them as one `link: DeviceLink` argument."""

    @functools.wraps(func)
    def command(*args: Any, port: str | None, baud: int, framing: str, timeout: float,
                ble: str | None, ble_backend: str | None, **kwargs: Any) -> Any:
        ctx = click.get_current_context()

        def given(name: str) -> bool:
            return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT,
                                                        click.core.ParameterSource.DEFAULT_MAP)

        if ble is not None:
            if port is not None and ctx.get_parameter_source("port") is not click.core.ParameterSource.ENVIRONMENT:
                raise UsageError("--port and --ble exclude each other: a serial port, or a BLE device")
            for name, flag in (("baud", "--baud"), ("framing", "--framing")):
                if given(name):
                    raise UsageError(f"{flag} is for serial ports, not --ble")
            port = None
        elif port is None:
            raise UsageError("which device? give --port PORT (or $MPBOOT_PORT) for a serial port, "
                             "or --ble NAME_OR_ADDRESS for Bluetooth")
        elif given("ble_backend") and ctx.get_parameter_source("ble_backend") is not click.core.ParameterSource.ENVIRONMENT:
            raise UsageError("--ble-backend goes with --ble NAME_OR_ADDRESS")
        link = DeviceLink(port, baud, framing, timeout, ble, ble_backend)
        return func(*args, link=link, **kwargs)

    options = (
        click.option("-p", "--port", envvar="MPBOOT_PORT", metavar="PORT",
                     help="Serial port of the device (or $MPBOOT_PORT), e.g. /dev/ttyACM0."),
        click.option("--ble", metavar="NAME_OR_ADDRESS",
                     help="Talk to the BLE device advertising SMP with this name or address, instead of --port."),
        ble_backend_option,
        click.option("-b", "--baud", default=115200, show_default=True, type=click.IntRange(min=1),
                     metavar="B", help="Baud rate (ignored by USB CDC ports)."),
        click.option("--framing", type=click.Choice(["raw", "console"]), default="raw", show_default=True,
                     help="raw: COBS frames (MCUboot serial recovery); console: Zephyr SMP-over-console lines."),
        click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.05),
                     metavar="S", help="Seconds to wait for a reply before giving up (or re-sending)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


async def _release(link: DeviceLink) -> None:
    """Close what the BLE backend opened in this event loop (Bumble's HCI transport)."""
    if link.ble is not None:
        from mpboot import ble

        await ble.close()


def _with_device(link: DeviceLink, action: Any) -> Any:
    """Open the link, run `await action(client)`, close the link; return its result."""
    import asyncio

    make = link.client_factory()

    async def run() -> Any:
        try:
            async with make() as client:
                return await action(client)
        finally:
            await _release(link)

    return asyncio.run(run())


def _size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@cli.command("flash")
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@_device_options
@click.option("--test", "test_boot", is_flag=True, help="Mark it for one test boot (the app confirms it, or it reverts).")
@click.option("--confirm", "permanent", is_flag=True, help="Make it permanent: it boots from the next reset on.")
@click.option("--reset", "reset_after", is_flag=True, help="Reset the device afterwards.")
@click.option("--window", type=click.IntRange(1, 64), metavar="N",
              help="Upload requests in flight (default: the device's buf_count).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0, 1000), metavar="N",
              help="With --ble: reconnect and resume up to N times when the link drops.")
@click.option("--no-progress", is_flag=True, help="No progress bar: print a one-line summary at the end.")
def flash_cmd(image_path: Path, link: DeviceLink, test_boot: bool, permanent: bool, reset_after: bool,
              window: int | None, retries: int, no_progress: bool) -> None:
    """Upload IMAGE to the device (resuming an interrupted upload), then optionally mark and reset.

    Without --test or --confirm the image is written and verified but does not boot."""
    import asyncio

    from mpboot.flashing import Mark, flash, flash_with_retries, prepare

    if test_boot and permanent:
        raise UsageError("--test and --confirm exclude each other: test-boot it, or make it permanent")
    mark = Mark.TEST if test_boot else Mark.CONFIRM if permanent else Mark.NONE
    prepared = prepare(_read_image(image_path))  # a malformed image fails here, before the port opens
    make = link.client_factory()

    async def run_flash(progress: Any, note: Callable[[str], None]) -> Any:
        try:
            if link.ble is None:
                async with make() as client:
                    return await flash(client, prepared, mark=mark, reset=reset_after, window=window,
                                       progress=progress)

            def on_retry(attempt: int, err: Exception) -> None:
                note(f"mpboot: link lost ({err}); reconnecting ({attempt}/{retries})")

            return await flash_with_retries(make, prepared, retries=retries, mark=mark, reset=reset_after,
                                            progress=progress, window=window, on_retry=on_retry)
        finally:
            await _release(link)

    async def action() -> Any:
        if no_progress:
            return await run_flash(None, lambda text: click.echo(text, err=True))
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn())
        console = Console(stderr=True)
        with contextlib.ExitStack() as stack:
            bars: list[tuple[Any, Any]] = []  # the bar appears once the device answers

            def progress(done: int, total: int) -> None:
                if not bars:
                    bar = stack.enter_context(Progress(*columns, console=console))
                    bars.append((bar, bar.add_task(f"flash {image_path.name}", total=total)))
                bar, task = bars[0]
                bar.update(task, completed=done, total=total)

            return await run_flash(progress, lambda text: console.print(text, markup=False, highlight=False))

    done = asyncio.run(action())
    up = done.upload
    if no_progress:
        resumed = f", resumed at {up.resumed_from}" if up.resumed_from else ""
        reconnects = f", {done.reconnects} reconnects" if done.reconnects else ""
        click.echo(f"uploaded {up.size} bytes in {up.elapsed:.1f} s ({_size_text(up.rate)}/s, "
                   f"{up.requests} requests, window {up.window}{resumed}{reconnects})")
    where = f" in slot {done.slot.slot}" if done.slot is not None else ""
    how = {Mark.NONE: "not marked (it does not boot until marked)",
           Mark.TEST: "marked for a test boot at the next reset",
           Mark.CONFIRM: "made permanent (boots from the next reset)"}[mark]
    click.echo(f"flashed {image_path} (version {prepared.version}){where}: {how}"
               f"{'; device reset' if reset_after else ''}")


def _slot_dict(s: Any) -> dict[str, Any]:
    return {"image": s.image, "slot": s.slot, "version": s.version, "hash": s.hash.hex(),
            "bootable": s.bootable, "pending": s.pending, "confirmed": s.confirmed,
            "active": s.active, "permanent": s.permanent}


@cli.command("state")
@_device_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def state_cmd(link: DeviceLink, as_json: bool) -> None:
    """List the images on the device: slot, version, hash and flags."""

    async def action(client: Any) -> Any:
        return await client.identity()

    slots, uid, serial = _with_device(link, action)
    if as_json:
        click.echo(json.dumps([_slot_dict(s) for s in slots], indent=2))
        return
    if uid is not None:
        click.echo(f"device {uid.hex()}" + (f", serial {serial}" if serial else ", not provisioned"))
    if not slots:
        click.echo("no images")
        return
    click.echo(f"{'slot':<5} {'version':<14} {'hash':<17} flags")
    for s in slots:
        click.echo(f"{s.slot:<5} {s.version:<14} {s.hash.hex()[:16]:<17} {' '.join(s.flags)}")


@cli.command("confirm")
@click.argument("hash_text", metavar="[HASH]", required=False)
@_device_options
def confirm_cmd(hash_text: str | None, link: DeviceLink) -> None:
    """Confirm the running image, or make the image with HASH permanent.

    HASH is its SHA256 TLV in hex (as `mpboot state` lists it); a unique prefix will do."""
    wanted = hash_text.strip().lower() if hash_text else None
    if wanted is not None and not re.fullmatch(r"[0-9a-f]{4,64}", wanted):
        raise UsageError(f"bad hash {hash_text!r}: expected hex digits (at least 4) as `mpboot state` lists them")

    async def action(client: Any) -> Any:
        if wanted is None:
            return await client.state_write(None, confirm=True), None
        matches = [s for s in await client.state() if s.hash.hex().startswith(wanted)]
        if len({s.hash for s in matches}) != 1:
            raise UsageError(f"{'no' if not matches else 'more than one'} image on the device has a hash "
                             f"starting {wanted}")
        return await client.state_write(matches[0].hash, confirm=True), matches[0].hash

    slots, target = _with_device(link, action)
    if target is None:
        active = next((s for s in slots if s.active), None)
        what = f" (slot {active.slot}, version {active.version})" if active else ""
        click.echo(f"confirmed the running image{what}")
        return
    entry = next((s for s in slots if s.hash == target), None)
    if entry is not None and entry.active:
        click.echo(f"confirmed the running image (slot {entry.slot}, version {entry.version})")
    else:
        what = f" in slot {entry.slot} (version {entry.version})" if entry else ""
        click.echo(f"image {target.hex()[:16]}{what} made permanent: it boots from the next reset")


@cli.command("reset")
@_device_options
def reset_cmd(link: DeviceLink) -> None:
    """Reset the device."""

    async def action(client: Any) -> None:
        await client.reset()

    _with_device(link, action)
    click.echo(f"reset {link.name}")


@cli.command("erase")
@click.option("--slot", type=click.IntRange(0, 1), help="Slot to erase (default: the slot not running).")
@_device_options
def erase_cmd(slot: int | None, link: DeviceLink) -> None:
    """Erase a slot (never the running one)."""

    async def action(client: Any) -> None:
        await client.erase(slot)

    _with_device(link, action)
    click.echo(f"erased {'the slot not running' if slot is None else f'slot {slot}'}")


@cli.command("echo")
@click.argument("text")
@_device_options
def echo_cmd(text: str, link: DeviceLink) -> None:
    """Send TEXT to the device and print its echo (a link check)."""

    async def action(client: Any) -> Any:
        return await client.echo(text)

    click.echo(_with_device(link, action))


@cli.command("scan")
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.1), metavar="N",
              help="How long to listen.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of {name, address, rssi}.")
@ble_backend_option
def scan_cmd(seconds: float, as_json: bool, ble_backend: str | None) -> None:
    """List the BLE devices advertising the SMP service: name, address, RSSI (strongest first)."""
    import asyncio

    from mpboot import ble

    backend = ble.select(ble_backend)

    async def run() -> list[ble.Found]:
        try:
            return await ble.scan(seconds, backend)
        finally:
            await ble.close()

    found = asyncio.run(run())
    if as_json:
        click.echo(json.dumps([{"name": f.name, "address": f.address, "rssi": f.rssi} for f in found], indent=2))
        return
    if not found:
        click.echo(f"no devices advertising SMP (listened {seconds:g} s)")
        return
    click.echo(f"{'address':<18} {'rssi':>5}  name")
    for f in found:
        click.echo(f"{f.address:<18} {f.rssi:>5}  {f.name or '-'}")


from mpboot.cli_sync import sync_cmd  # noqa: E402  (the sync command lives in its own module)

cli.add_command(sync_cmd)

from mpboot.cli_provision import provision_cmd  # noqa: E402  (the factory station, its own module)

cli.add_command(provision_cmd)


def main() -> None:
    cli(prog_name="mpboot")
