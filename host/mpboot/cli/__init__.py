"""`mpboot` command line: a thin face over the library, and the only part that prints.

One module per command family, all over `common` (the error mapping, bounded parsing, the
options declared once, the device link):

    image    keygen, pubkey, sign, cosign, verify, info, firmware export
    keys     key delegate, key revoke, key rotate-root, key show (docs/KEYS.md)
    device   flash, state, confirm, reset, erase, echo (SMP over a serial port or BLE)
    sim      sim (serve), sim air, sim init/install/boot/status
    ble      scan, sync
    factory  provision, provision report
    trust    trust push, trust show (a device's root set and revocations, over SMP)
"""

from __future__ import annotations

import click

from mpboot import __version__
from mpboot.cli import ble, device, factory, image, keys, sim, trust
from mpboot.cli.common import MpbootGroup, one_line_logs


@click.group(cls=MpbootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpboot")
def cli() -> None:
    """mpboot: a secure bootloader for MicroPython devices, and its host tool.

    Sign and verify MCUboot-format images, flash them over SMP (serial or BLE), run a
    simulated device, bring a fleet up to date (sync) and provision boards in the factory.

    Exit status: 0 done, 1 image rejected or refused (or an attempt failed), 2 usage, file
    or port problem, 3 silent device or broken link, 130 interrupted (Ctrl-C)."""


for _family in (image, keys, device, sim, ble, factory, trust):
    for _command in _family.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    one_line_logs()
    cli(prog_name="mpboot")


__all__ = ["cli", "main"]
