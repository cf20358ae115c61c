"""What every command family of the CLI shares: the error mapping (one line, one exit code),
input parsing with bounds, the options declared once, the device link, and consoles.

Exit codes (README "Commands"): 0 done; 1 an image rejected or refused, an attempt that
failed; 2 a usage, file or port problem; 3 a silent device or a broken link; 130 interrupted
(Ctrl-C), after one line saying where it stopped and how to resume; 141 a closed pipe.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import stat
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import click

from mpboot import files, signlog
from mpboot.errors import InputFileError, MpbootError, UsageError
from mpboot.keys import SignatureScheme
from mpboot.pkcs11uri import MODULE_ENV, PIN_ENV, Pkcs11Uri
from mpboot.signing import Recorder, TokenAccess, parse_key_ref
from mpboot.trust import ImageKind
from mpboot.transport.framing import Framing

EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE, as `yes | head` reports
EXIT_BUG: Final = 70  # EX_SOFTWARE: an error mpboot did not expect (a bug)
DEBUG_ENV: Final = "MPBOOT_DEBUG"  # set: a bug shows its traceback instead of one line

MAX_IMAGE_BYTES: Final = files.MAX_IMAGE_BYTES
ADDRESS_LIMIT: Final = 1 << 32  # MCUboot images and Intel hex address 32 bits
SLOT_SIZE_LIMIT: Final = 1 << 32  # MCUboot image sizes are 32-bit

_T = TypeVar("_T")
_META_INTERRUPT: Final = "mpboot.interrupt_note"


class MpbootGroup(click.Group):
    """The root group: turns errors into one line on stderr and an exit code; never a
    traceback for a mistake. Subcommands and subgroups run inside its invoke."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        # --help and --version print while the root parses: a closed pipe there is 141 too
        try:
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(EXIT_BROKEN_PIPE)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MpbootError as err:
            _say(f"mpboot: error: {err}")
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            note = ctx.meta.get(_META_INTERRUPT)
            text = note() if callable(note) else note
            _say(_interrupted_line(text or f"mpboot {ctx.invoked_subcommand or ''} stopped before it finished; "
                                   "run it again"))
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            _quiet_stdout()
            ctx.exit(EXIT_BROKEN_PIPE)
        except (TimeoutError, ConnectionError) as err:  # a link, not a file: as LinkError
            _say(f"mpboot: error: {err.strerror or err or type(err).__name__}")
            ctx.exit(3)
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            _say(f"mpboot: error: {where}{err.strerror or err}")
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:  # a bug: say so in one line (MPBOOT_DEBUG=1 for the traceback)
            if os.environ.get(DEBUG_ENV):
                raise
            tb = traceback.extract_tb(err.__traceback__)
            where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
            _say(f"mpboot: internal error (a bug, please report it): {type(err).__name__}: {err}{where}; "
                 f"{DEBUG_ENV}=1 shows the traceback")
            ctx.exit(EXIT_BUG)


def _interrupted_line(note: str) -> str:
    return f"mpboot: interrupted: {note}"


def exit_interrupted_now(note: str) -> NoReturn:
    """Ctrl-C in a command whose worker threads cannot be waited for (each ends at its next
    step): the same line as everywhere, then exit 130 at once."""
    _say(_interrupted_line(note))
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _say(line: str) -> None:
    try:
        click.echo(line, err=True)
    except OSError:
        pass  # stderr closed too: the exit code is all that is left


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush of
    what is still buffered does not raise again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# Bumble's records are the stack's diagnostics, and noise to a user: Ctrl-C during an HCI
# command gives "no pending response future to set" or "Exception in on_packet". What matters
# reaches mpboot as an exception (a lost link, a silent device) and is said there.
_QUIET_LOGGERS: Final = frozenset({"bumble"})


class _OneLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Warnings from the libraries under the CLI (asyncio, ...) as one line each on stderr,
    never with the traceback they may carry; Bumble's not at all (MPBOOT_DEBUG=1: Python's
    default logging, tracebacks and all)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".", 1)[0] in _QUIET_LOGGERS:
            return
        record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        super().emit(record)


def one_line_logs() -> None:
    """Route library log records of WARNING and above through _OneLineHandler (the console
    script does this; tests that import the CLI keep Python's defaults)."""
    if os.environ.get(DEBUG_ENV):
        return
    handler = _OneLineHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mpboot: %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def on_interrupt(note: str | Callable[[], str]) -> None:
    """What the one line after Ctrl-C says (where the command stopped, how to resume); a
    callable is asked at the moment of the interrupt."""
    click.get_current_context().find_root().meta[_META_INTERRUPT] = note


# --- parsing, with bounds ---------------------------------------------------------------------

_SIZE_RE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)([kKmMgG]?)$")
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str, what: str, *, maximum: int | None = None, minimum: int = 0) -> int:
    """Decimal or 0x-hex, with an optional k/M/G (KiB/MiB/GiB) suffix, within the bounds."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UsageError(f"bad {what} {text!r}: expected a number like 0x200, 4096 or 512k")
    value = int(m.group(1), 0) * _UNITS[m.group(2).lower()]
    if value < minimum:
        raise UsageError(f"{what} {text} is below the minimum of {_size_suffixed(minimum)}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{what} {text} is above the maximum of {_size_suffixed(maximum)}")
    return value


def parse_address(text: str, what: str) -> int:
    """A 32-bit address (0x-hex or decimal)."""
    return parse_size(text, what, maximum=ADDRESS_LIMIT - 1)


def _size_suffixed(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def size_text(n: float) -> str:
    """A byte count for people: 512 bytes, 12.5 KiB, 1.0 MiB."""
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return plural(round(n), "byte") if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """"1 image", "2 images" ("1 pass", "2 passes" given the plural)."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"


def parse_heapsize(text: str) -> str:
    if not re.fullmatch(r"\d+[kKmM]?", text):
        raise UsageError(f"bad --heapsize {text!r}: expected e.g. 24k or 4m")
    return text


def password(env_var: str | None) -> bytes | None:
    """The private key passphrase from `--password-env VAR`."""
    if not env_var:
        return None
    value = os.environ.get(env_var)
    if not value:
        raise UsageError(f"--password-env {env_var}: that environment variable is not set or empty")
    return value.encode()


def check_input_file(path: Path, what: str = "file") -> Path:
    """A file to read: it exists, is a regular file, and is not empty."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except OSError as err:
        raise InputFileError(f"{path}: cannot read: {err.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{path}: is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{path}: not a regular file, so not {what}")
    if st.st_size == 0:
        raise InputFileError(f"{path}: is empty, so not {what}")
    return path


def read_image(path: Path) -> bytes:
    """A signed image file: raw binary, or Intel hex when it ends in .hex."""
    from mpboot.pack import read_hex

    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory; sign it first (mpboot sign {path} -k KEY "
                             "--version X.Y.Z -o app.bin), then give the signed image")
    size = check_input_file(path, "a signed image").stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise InputFileError(f"{path}: {size_text(size)} is larger than any slot; not a signed image")
    if path.suffix.lower() == ".hex":
        return read_hex(path)[0]
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputFileError(f"{path}: cannot read: {err.strerror}") from None


# --- options declared once ----------------------------------------------------------------

password_env_option = click.option(
    "--password-env", metavar="VAR", help="Read the private key passphrase from environment variable VAR.")

ble_backend_option = click.option(
    "--ble-backend", envvar="MPBOOT_BLE_BACKEND", metavar="bumble:SPEC",
    help="Bluetooth through Bumble on an HCI transport (bumble:usb:0, or the simulator's "
         "bumble:tcp-client:127.0.0.1:PORT) instead of the system's; default $MPBOOT_BLE_BACKEND.")

timeout_option = click.option(
    "--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.05), metavar="S",
    help="Seconds to wait for an SMP reply before giving up (or re-sending).")

baud_option = click.option(
    "-b", "--baud", default=115200, show_default=True, type=click.IntRange(min=1), metavar="B",
    help="Baud rate (ignored by USB CDC ports).")

framing_option = click.option(
    "--framing", type=click.Choice([f.value for f in Framing]), default=Framing.RAW.value, show_default=True,
    help="raw: COBS frames (MCUboot serial recovery); console: Zephyr SMP-over-console lines.")

retries_option = click.option(
    "--retries", default=5, show_default=True, type=click.IntRange(0, 100), metavar="N",
    help="Over BLE: lost links reconnected and resumed, at most N times.")

udp_option = click.option(
    "--udp", metavar="HOST[:PORT]",
    help="Talk to the device over SMP over UDP at HOST (port 1337 unless given; IPv6 as [ADDR]:PORT), "
         "instead of --port.")

mtu_option = click.option(
    "--mtu", default=1500, show_default=True, type=click.IntRange(576, 65535), metavar="BYTES",
    help="With --udp: the path's MTU; requests stay within one unfragmented datagram (MTU - 28 "
         "bytes over IPv4, - 48 over IPv6).")

confirm_timeout_option = click.option(
    "--confirm-timeout", default=30.0, show_default=True, type=click.FloatRange(min=1),
    metavar="S", help="How long a new app gets to confirm itself after its test boot.")

class KeyRefType(click.ParamType):
    """A -k value: a key file, or a key on a PKCS#11 token named by a `pkcs11:` URI."""

    name = "KEY|pkcs11:URI"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (Path, Pkcs11Uri)):
            return value
        return parse_key_ref(str(value))


KEY_REF: Final = KeyRefType()

pkcs11_module_option = click.option(
    "--pkcs11-module", envvar=MODULE_ENV, metavar="PATH",
    help="PKCS#11 module for pkcs11: keys (e.g. /usr/lib/softhsm/libsofthsm2.so); default "
         f"${MODULE_ENV}. The token PIN: pin-source=FILE in the URI, or ${PIN_ENV}.")

signing_log_option = click.option(
    "--signing-log", type=click.Path(dir_okay=False, path_type=Path), envvar=signlog.ENV,
    default=signlog.DEFAULT_NAME, show_default=True,
    help=f"Append one JSON line per signature made to this log (default ${signlog.ENV}, else "
         "./mpboot-signing.jsonl); nothing is written when it cannot be.")


def token_access(module: str | None) -> TokenAccess:
    """How this command reaches tokens: the module, and a hidden PIN prompt when a person is
    at the terminal (never in a pipeline: there a missing PIN is an error)."""
    def prompt(text: str) -> str:
        return str(click.prompt(text, hide_input=True))

    return TokenAccess(module, prompt if sys.stdin.isatty() else None)


def log_signatures(log_path: Path, recorders: Sequence[Recorder], subject: dict[str, Any],
                   output: Path | None) -> None:
    """Record every signature `recorders` made, before the signed file is written."""
    made = [m for r in recorders for m in r.made]
    signlog.SigningLog(log_path).append(signlog.entries_for(made, subject, output))


scheme_option = click.option(
    "--scheme", type=click.Choice([s.value for s in SignatureScheme]), default="pss", show_default=True,
    help="pss: RSA*_PSS (MCUboot's); pkcs1v15: RSASSA-PKCS1-v1_5 (vendor TLV 0xa0, for HSMs without PSS).")

# `--kind`: what an image is (MPBOOT_KIND; an app image carries none), and what a
# certificate may sign for.
KIND_NAMES: Final = {"app": ImageKind.APP, "updater": ImageKind.UPDATER, "firmware": ImageKind.FIRMWARE}

# Certificates and trust records are at most 4096 bytes: a larger file is refused as it is
# read (the trust rules say TOO_LARGE for 4097..TRUST_FILE_LIMIT, so verify can show that).
TRUST_FILE_LIMIT: Final = 64 * 1024


def read_trust_file(path: Path, what: str = "a certificate or trust record") -> bytes:
    """A certificate or trust record file (a CBOR envelope), whole."""
    path = check_input_file(Path(path), what)
    size = path.stat().st_size
    if size > TRUST_FILE_LIMIT:
        raise InputFileError(f"{path}: {size_text(size)} is far larger than {what} can be")
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputFileError(f"{path}: cannot read: {err.strerror}") from None


scan_seconds_option = click.option(
    "--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.1), metavar="S",
    help="How long to scan for devices.")


# --- the device link ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLink:
    """Where a device command talks to the device: a serial port, a BLE peripheral, or an
    SMP over UDP address."""

    port: str | None
    baud: int
    framing: str
    timeout_s: float
    ble: str | None  # address or advertised name
    ble_backend: str | None
    udp: tuple[str, int] | None = None  # (host, port)
    mtu: int = 1500

    @property
    def name(self) -> str:
        if self.udp is not None:
            host, port = self.udp
            return f"udp:{f'[{host}]' if ':' in host else host}:{port}"
        return self.ble if self.ble is not None else str(self.port)

    def transport_factory(self) -> Callable[[], Any]:
        """Makes a fresh, unopened transport per call (BLE reconnects open a new one)."""
        if self.udp is not None:
            from mpboot.transport.udp import UdpTransport

            (host, udp_port), mtu = self.udp, self.mtu
            return lambda: UdpTransport(host, udp_port, mtu=mtu)
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
        timeout_s = self.timeout_s
        return lambda: SMPClient(make(), timeout=timeout_s)

    async def release(self) -> None:
        """Close what the BLE backend opened in this event loop (Bumble's HCI transport)."""
        if self.ble is not None:
            from mpboot import ble

            await ble.close()

    def run(self, action: Callable[[Any], Awaitable[_T]]) -> _T:
        """Open the link, run `await action(client)`, close the link; return its result."""
        import asyncio

        make = self.client_factory()

        async def run() -> _T:
            try:
                async with make() as client:
                    return await action(client)
            finally:
                await self.release()

        return asyncio.run(run())


def device_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the link options; the command gets them as one `link: DeviceLink` argument."""

    @functools.wraps(func)
    def command(*args: Any, port: str | None, baud: int, framing: str, timeout: float,
                ble: str | None, ble_backend: str | None, udp: str | None, mtu: int, **kwargs: Any) -> Any:
        ctx = click.get_current_context()

        def given(name: str) -> bool:
            return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT,
                                                        click.core.ParameterSource.DEFAULT_MAP)

        def on_command_line(name: str) -> bool:
            return given(name) and ctx.get_parameter_source(name) is not click.core.ParameterSource.ENVIRONMENT

        address = None
        if udp is not None:
            from mpboot.transport.udp import parse_address

            if ble is not None:
                raise UsageError("--udp and --ble exclude each other: a UDP address, or a BLE device")
            if port is not None and on_command_line("port"):
                raise UsageError("--port and --udp exclude each other: a serial port, or a UDP address")
            for name, flag in (("baud", "--baud"), ("framing", "--framing")):
                if given(name):
                    raise UsageError(f"{flag} is for serial ports, not --udp")
            if on_command_line("ble_backend"):
                raise UsageError("--ble-backend goes with --ble NAME_OR_ADDRESS")
            try:
                address = parse_address(udp)
            except ValueError as err:
                raise UsageError(f"--udp {udp}: {err} (expected HOST, HOST:PORT or [IPV6]:PORT)") from None
            port = None
        elif given("mtu"):
            raise UsageError("--mtu goes with --udp HOST[:PORT]")
        elif ble is not None:
            if port is not None and on_command_line("port"):
                raise UsageError("--port and --ble exclude each other: a serial port, or a BLE device")
            for name, flag in (("baud", "--baud"), ("framing", "--framing")):
                if given(name):
                    raise UsageError(f"{flag} is for serial ports, not --ble")
            port = None
        elif port is None:
            raise UsageError("which device? give --port PORT (or $MPBOOT_PORT) for a serial port, "
                             "--ble NAME_OR_ADDRESS for Bluetooth, or --udp HOST[:PORT] for SMP over UDP")
        elif on_command_line("ble_backend"):
            raise UsageError("--ble-backend goes with --ble NAME_OR_ADDRESS")
        return func(*args, link=DeviceLink(port, baud, framing, timeout, ble, ble_backend, address, mtu), **kwargs)

    options = (
        click.option("-p", "--port", envvar="MPBOOT_PORT", metavar="PORT",
                     help="Serial port of the device (or $MPBOOT_PORT), e.g. /dev/ttyACM0."),
        click.option("--ble", metavar="NAME_OR_ADDRESS",
                     help="Talk to the BLE device advertising SMP with this name or address, instead of --port."),
        ble_backend_option,
        udp_option,
        mtu_option,
        baud_option,
        framing_option,
        timeout_option,
    )
    for option in reversed(options):
        command = option(command)
    return command


# --- consoles -----------------------------------------------------------------------------


def console(*, stderr: bool = False) -> Any:
    """A rich Console for tables and live views. On a terminal it fits the window; on
    anything else (a pipe, a log file) lines are never wrapped, so grep finds them whole.
    No markup: what it prints comes from outside (device names, file names, errors), and
    `[/]` in a BLE name must print as it is, not end a style or crash."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False, markup=False)
    if not out.is_terminal:
        out = Console(stderr=stderr, highlight=False, markup=False, soft_wrap=True, width=1000)
    return out


def echo_lines(text: str, prefix: str) -> None:
    for line in text.splitlines():
        click.echo(f"{prefix}{line}")
