"""`mpboot sim`: the simulated device (serving, and single power-ons), and `sim air`."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mpboot import keys
from mpboot.cli.common import (
    echo_lines,
    on_interrupt,
    parse_heapsize,
    parse_size,
    password,
    password_env_option,
    plural,
    read_image,
)
from mpboot.errors import DeviceRunError, UsageError, slot_error_text
from mpboot.image import class_uuid, vendor_uuid

if TYPE_CHECKING:
    from mpboot.sim.serve import SimServer

# The simulator boots from a RAM copy of the image (the unix port cannot map flash), so its
# heap is a slot plus 128 KiB: slots beyond this would ask the host for gigabytes.
SIM_MAX_SLOT_SIZE = 16 << 20
SIM_MAX_FLASH_SIZE = 2 * SIM_MAX_SLOT_SIZE + (1 << 20)


def _sim_extra_missing(err: ImportError) -> UsageError:
    return UsageError(f"the simulated radio needs Bumble ({err.name} is not installed): "
                      "pip install 'mpboot[sim]'")


@contextmanager
def _until_signal(stop: Callable[[], None]) -> Iterator[list[int]]:
    """SIGINT and SIGTERM call `stop` (from the signal handler) instead of raising; yields a
    list that holds the signal that came, if one did. The old handlers come back after."""
    came: list[int] = []

    def handler(sig: int, _frame: Any) -> None:
        came.append(sig)
        stop()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for sig, handler_before in old.items():
            signal.signal(sig, handler_before)


def _stopped_by_ctrl_c(came: list[int], note: str) -> None:
    """Ctrl-C stops a server as it stops every command: one line and exit 130 (SIGTERM, a
    service manager's stop, is a clean exit 0)."""
    if signal.SIGINT in came:
        on_interrupt(note)
        raise KeyboardInterrupt


_SERVE_OPTIONS = ("machine", "key_files", "link", "slot_size", "s1_size", "vendor_id", "class_id", "flash_timing", "baud",
                  "buf_size", "buf_count", "heapsize", "ble", "radio", "ble_name", "udp", "password_env")


# Serving options the emulated board has no use for: it has no radio, its heap is fixed in its
# firmware, its flash has no timing model.
_NOT_ON_QEMU = ("heapsize", "ble", "radio", "ble_name", "udp")


@click.group("sim", invoke_without_command=True)
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Run the device kept in DIR (created if new): serve SMP on a pty until Ctrl-C.")
@click.option("--machine", type=click.Choice(["unix", "qemu"]), default="unix", show_default=True,
              help="With --state: unix runs the firmware on MicroPython's unix port (fast); qemu runs "
                   "MicroPython's Cortex-M3 firmware with mpboot frozen in under qemu-system-arm, images "
                   "run in place from its flash (built for the --keys on first use; needs "
                   "gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm).")
@click.option("-k", "--keys", "--key", "key_files", multiple=True, type=click.Path(path_type=Path),
              help="Key the device trusts (public or private key file; repeatable).")
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path),
              help="Also make this symlink to the pty (removed at exit).")
@click.option("--slot-size", metavar="SIZE", help="Slot size of a new device (default 256k, at most 16M; 4 KiB sectors).")
@click.option("--s1-size", metavar="SIZE",
              help="A new device with two stages: the update service runs from a signed image (mpboot "
                   "firmware export --stage1, signed --kind updater) in two stage-1 slots of SIZE "
                   "(docs/BOOT.md \"Two stages\"); until one is flashed (mpboot flash --image stage1) "
                   "the firmware's own copy serves.")
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
@click.option("--udp", type=click.IntRange(1, 65535), metavar="PORT",
              help="Serve SMP over UDP on 127.0.0.1:PORT instead of the UART (each power-on binds it): "
                   "prints \"mpboot sim: serving SMP over UDP on 127.0.0.1:PORT\"; hosts use --udp 127.0.0.1:PORT.")
@password_env_option
@click.pass_context
def sim_group(ctx: click.Context, state_dir: Path | None, machine: str, key_files: tuple[Path, ...],
              link: Path | None,
              slot_size: str | None, s1_size: str | None, vendor_id: str | None, class_id: str | None, flash_timing: str,
              baud: int | None, buf_size: int, buf_count: int, heapsize: str | None,
              ble: bool, radio: str | None, ble_name: str | None, udp: int | None,
              password_env: str | None) -> None:
    """A simulated device: the firmware on the MicroPython unix port over a NOR flash file
    (needs the [sim] extra: pip install 'mpboot[sim]').

    With --state: the device keeps running. It boots, runs the app, then serves SMP (mcumgr)
    on a pty whose path it prints ("mpboot sim: UART on PATH"), or with --ble over a simulated
    Bluetooth LE radio, or with --udp over UDP on 127.0.0.1; a reset request powers it on
    again. Ctrl-C stops it; the flash in DIR keeps what it wrote. With --machine qemu the same device is an emulated Cortex-M3 board
    (MicroPython's qemu port, mps2-an385) with mpboot frozen into its firmware.

    The subcommands are single power-ons of a device made with `sim init`."""
    given = [name for name in _SERVE_OPTIONS
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if ctx.invoked_subcommand is not None:
        if state_dir is not None or given:
            raise UsageError(f"`mpboot sim {ctx.invoked_subcommand}` takes its own options after its name; "
                             "--state and the serving options go with `mpboot sim --state DIR` alone")
        return
    if state_dir is None:
        if given:
            flags = ", ".join(max(p.opts, key=len) for p in ctx.command.params if p.name in given)
            raise UsageError(f"{flags}: serving options need --state DIR (the device's folder), e.g. "
                             "mpboot sim --state dev --keys KEY")
        click.echo(ctx.get_help(), err=True)  # as every group given nothing (click): help, exit 2
        ctx.exit(2)
    if not key_files:
        raise UsageError("mpboot sim --state DIR needs at least one --keys KEY (the keys the device trusts)")
    if machine == "qemu":
        not_here = [max(p.opts, key=len) for p in ctx.command.params if p.name in _NOT_ON_QEMU and p.name in given]
        if flash_timing != "none":
            not_here.append(f"--flash-timing {flash_timing}")
        if not_here:
            raise UsageError(f"{', '.join(not_here)}: not with --machine qemu (the emulated board has no radio, "
                             "a heap fixed in its firmware and flash without a timing model)")
    if heapsize is not None:
        heapsize = parse_heapsize(heapsize)
    if not ble and (radio is not None or ble_name is not None):
        raise UsageError("--radio and --ble-name go with --ble")
    trusted = [keys.load_public_key(path, password(password_env)) for path in key_files]
    vid = vendor_uuid(vendor_id) if vendor_id else None

    def say(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    common: dict[str, Any] = dict(link=link, vendor_id=vid, class_id=class_uuid(class_id, vid) if class_id else None,
                                  baud=baud, buf_size=buf_size, buf_count=buf_count, output=say,
                                  s1_size=parse_size(s1_size, "stage-1 slot size", minimum=4096,
                                                     maximum=SIM_MAX_SLOT_SIZE) if s1_size else None)
    server: SimServer
    if machine == "qemu":
        from mpboot.qemu.serve import MAX_SLOT_SIZE, QemuSimServer

        server = QemuSimServer(state_dir, trusted, **common, slot_size=parse_size(
            slot_size, "slot size", minimum=4096, maximum=MAX_SLOT_SIZE) if slot_size else None)
    else:
        from mpboot.sim.serve import SimServer

        server = SimServer(state_dir, trusted, **common, slot_size=parse_size(
            slot_size, "slot size", minimum=4096, maximum=SIM_MAX_SLOT_SIZE) if slot_size else None,
            timing=flash_timing, heapsize=heapsize, ble=ble, radio=radio, ble_name=ble_name, udp=udp)
    with _until_signal(server.request_stop) as came:
        try:
            try:
                server.start()
            except ImportError as err:
                raise _sim_extra_missing(err) from None
            while not server.wait(0.2):
                pass
        finally:
            server.stop()
    if server.error:
        raise DeviceRunError(server.error)
    say("mpboot sim: stopped")
    _stopped_by_ctrl_c(came, f"the device in {state_dir} is off and keeps its flash; "
                             "the same command powers it on again")


@sim_group.command("air")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port on 127.0.0.1 to serve HCI on (0: a free one).")
@click.option("--pace-ms", type=click.FloatRange(0, 4000, min_open=True), metavar="MS",
              help="Pace every link like a radio: a connection event every MS milliseconds (default, "
                   "when --per-event or --data-length is given: the interval the central asked for).")
@click.option("--per-event", type=click.IntRange(1, 1000), metavar="N",
              help="Paced: LL data packets each way per connection event [default: 6].")
@click.option("--data-length", type=click.IntRange(27, 251), metavar="BYTES",
              help="Paced: LL payload bytes per packet; an L2CAP PDU of L bytes takes ceil(L/BYTES) packets "
                   "[default: 251].")
def sim_air(port: int, pace_ms: float | None, per_event: int | None, data_length: int | None) -> None:
    """A simulated Bluetooth LE radio that sims and hosts share, until Ctrl-C.

    Every Bumble host that opens the printed transport spec gets a controller on one virtual
    link: `mpboot sim --ble --radio SPEC` devices, and `--ble-backend bumble:SPEC` hosts.
    Unpaced (the default), a packet crosses as soon as it is sent; with --pace-ms (or
    --per-event, --data-length) each link carries data only in its connection events, a few
    packets each way per event, as a radio does (docs/BLE.md, "The paced air")."""
    try:
        from mpboot.sim.air import AirThread, Pacing
    except ImportError as err:
        raise _sim_extra_missing(err) from None

    pace = None
    if (pace_ms, per_event, data_length) != (None, None, None):
        pace = Pacing(None if pace_ms is None else pace_ms / 1000, per_event or 6, data_length or 251)
    air = AirThread(port=port, pace=pace)
    try:
        spec = air.start()
    except OSError as err:
        raise UsageError(f"cannot serve the air on 127.0.0.1:{port}: {err.strerror or err}") from None
    if pace is not None:
        every = "at each link's own interval" if pace.interval is None else f"every {pace.interval * 1000:g} ms"
        paced = (f"; paced: connection events {every}, {pace.per_event} packets each way, "
                 f"data length {pace.data_length}")
    else:
        paced = ""
    done = threading.Event()
    with _until_signal(done.set) as came:
        try:
            click.echo(f"mpboot sim: air on {spec} (devices: mpboot sim --ble --radio {spec}; "
                       f"hosts: --ble-backend bumble:{spec}){paced}")
            sys.stdout.flush()
            while not done.wait(0.5):
                pass
        finally:
            air.stop()
    click.echo("mpboot sim: air stopped")
    _stopped_by_ctrl_c(came, "the air is down; the same command starts another")


@sim_group.command("init")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("-k", "--key", "key_files", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Key the device trusts (public or private key file; repeatable).")
@click.option("--flash-size", default="256k", show_default=True, metavar="SIZE",
              help="Whole flash (at most 33M): slot 0, slot 1 and two-sector state, trust and factory "
                   "areas (no trust area on 1 and 2 KiB sectors).")
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

    trusted = [keys.load_public_key(path, password(password_env)) for path in key_files]
    size = parse_size(flash_size, "flash size", maximum=SIM_MAX_FLASH_SIZE)
    sec = parse_size(sector, "sector size", maximum=1 << 20)
    if sec < 1024 or sec & (sec - 1) or size % sec:
        raise UsageError(f"sector size {sec} must be a power of two of at least 1k dividing the flash size")
    vid = vendor_uuid(vendor_id) if vendor_id else None
    geometry = Geometry(size, sec, int(align))
    if geometry.slot_size > SIM_MAX_SLOT_SIZE:
        raise UsageError(f"--flash-size {flash_size} makes {geometry.slot_size}-byte slots: at most 16M each "
                         "(the simulator boots from a RAM copy of the image)")
    dev = SimDevice.create(directory, trusted, geometry, vendor_id=vid,
                           class_id=class_uuid(class_id, vid) if class_id else None,
                           downgrade=not no_downgrade)
    g = dev.geometry
    click.echo(f"simulated device in {directory}: {g.size} bytes of flash, two {g.slot_size}-byte slots, "
               f"{g.sector}-byte sectors, {g.align}-byte writes, {plural(len(trusted), 'trusted key')}")


def _echo_device(text: str) -> None:
    from mpboot.sim import explain_console_line

    # RECOVERY lines are the machine-readable twin of the line before them
    echo_lines("\n".join(explain_console_line(line) for line in text.splitlines()
                         if not line.startswith("RECOVERY ")), "device: ")


@sim_group.command("boot")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
def sim_boot(directory: Path) -> None:
    """Power on: verify and run the chosen image's app (exit 3 in recovery)."""
    from mpboot.sim import SimDevice

    run = SimDevice.open(directory).boot()
    _echo_device(run.stdout)
    if run.line("RECOVERY"):
        click.echo(f"mpboot: the device is in recovery: no slot holds an image it can run "
                   f"(mpboot sim install {directory} IMAGE)", err=True)
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

    data = read_image(image_path)
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
            click.echo(f"slot {n}: no bootable image (error {slot.error}: {slot_error_text(slot.error)})")


COMMANDS = (sim_group,)

__all__ = ["COMMANDS"]
