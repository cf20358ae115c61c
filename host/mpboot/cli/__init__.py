"""`mpboot` command line: a thin face over the library, and the only part that prints.

One module per command family, all over `common` (the error mapping, bounded parsing, the
options declared once, the device link):

    image    keygen, pubkey, verify, info, firmware export
    sign     sign, cosign (key files, token keys, signatures made elsewhere; the signing log)
    keys     key delegate, key revoke, key rotate-root, key show (docs/KEYS.md)
    device   flash, state, confirm, reset, erase, echo (SMP over a serial port or BLE)
    sim      sim (serve), sim air, sim init/install/boot/status
    ble      scan, sync
    factory  provision, provision report
    trust    trust push, trust show (a device's root set and revocations, over SMP)
    repo     repo init/delegate/add/remove/sign/rotate/publish/status (a TUF repository)
    channel  channel sign, channel show (channel records devices pull)
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from mpboot import __version__
from mpboot.cli.common import MpbootGroup, one_line_logs

# Each top-level command and the family module that defines it (in its COMMANDS). A command
# imports only its own family: `mpboot sign` does not load the BLE stack, the factory
# database or the simulator (tests/test_cli.py checks this map against every COMMANDS).
FAMILIES: dict[str, str] = {
    **dict.fromkeys(("keygen", "pubkey", "verify", "info", "firmware"), "image"),
    **dict.fromkeys(("sign", "cosign"), "sign"),
    "key": "keys",
    **dict.fromkeys(("flash", "state", "confirm", "reset", "erase", "echo"), "device"),
    "sim": "sim",
    **dict.fromkeys(("scan", "sync"), "ble"),
    "provision": "factory",
    "trust": "trust",
    "repo": "repo",
    "channel": "channel",
}


class LazyGroup(MpbootGroup):
    """The root group, loading a command's family module the first time it is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(FAMILIES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in FAMILIES:
            family: Any = importlib.import_module(f"mpboot.cli.{FAMILIES[cmd_name]}")
            for command in family.COMMANDS:
                self.add_command(command)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpboot")
def cli() -> None:
    """mpboot: a secure bootloader for MicroPython devices, and its host tool.

    Sign and verify MCUboot-format images, flash them over SMP (serial or BLE), run a
    simulated device, bring a fleet up to date (sync) and provision boards in the factory.

    Exit status: 0 done, 1 image rejected or refused (or an attempt failed), 2 usage, file
    or port problem, 3 silent device or broken link, 130 interrupted (Ctrl-C)."""



def main() -> None:
    one_line_logs()
    cli(prog_name="mpboot")


__all__ = ["FAMILIES", "cli", "main"]
