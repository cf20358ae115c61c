"""The emulated board: MicroPython's qemu port (mps2-an385, Cortex-M3) with mpboot frozen in,
built by `build` and run by `runner` (docs/PORTING.md)."""

from mpboot.qemu.build import Firmware, Source, build_firmware, find_source, local_source, missing_tools
from mpboot.qemu.runner import FLASH_BASE, FLASH_SIZE, QemuBoard, create_flash, write_flash

__all__ = ["FLASH_BASE", "FLASH_SIZE", "Firmware", "QemuBoard", "Source", "build_firmware", "create_flash",
           "find_source", "local_source", "missing_tools", "write_flash"]
