# The serving simulated device, one power-on per process: micropython -m sim_serve CONFIG
#
# CONFIG is sim_device's config ("flash=PATH size=N sector=N align=N [vendor=HEX] [class=HEX]
# [downgrade=0]") plus "uart=PATH" (the pty slave to serve on), "timing=none|nor" (flash
# timing, mpboot.ports.nor_sim), "bufsize=N bufcount=N" (MCUmgr parameters), and for SMP over
# BLE instead of the UART "ble=PORT [blename=NAME]" (the simulator's radio companion on
# 127.0.0.1:PORT, docs/BLE.md; NAME advertised, default "mpboot"). Like a board's boot.py:
# boot (the chosen image's app runs: it prints, and confirms itself), or recovery; then the
# update service until a client asks for a reset: the process exits 0 and the simulator
# (host/mpboot/sim/serve.py) starts the next power-on.
# A chip with stage-1 slots ("s1=BYTES") decides both pairs (mpboot.pairs.decide_all), runs the
# app, and fills the boot record's stage-1 fields, so the service serves stage 1 as image 1
# (docs/PROTOCOL.md, "Stage 1"); a stage-1 test boot has "prove=MS" (default 300000) to prove
# itself (docs/BOOT.md, "Stage 1's proof"). Until boot.start does this itself (issue 19), here.
import sys

import micropython

import mpboot_keys
import sim_config
from mpboot import boot, service
from mpboot.ports import unix as port


class _Announce:
    # The BLE link, printing `line` at its first wait: by then the service advertises.
    def __init__(self, link, line):
        self.ble = link.ble
        self.name = link.name
        self._wait = link.wait
        self.line = line

    def wait(self, ms, ready=None):
        if self.line:
            print(self.line)
            self.line = None
        self._wait(ms, ready)


def _start_two(areas, policy, prove_ms):
    # boot.start for a chip with stage-1 slots: both pairs decided, stage 1's record filled.
    import time

    import mpboot
    from mpboot.boot import BOOTED_S1, HOW_CONFIRMED, HOW_TEST
    from mpboot.pairs import Pair, decide_all, stage1

    slots = Pair(areas[0], areas[1], areas[2], mpboot_keys.KEYS, mapped=port.mapped, factory=areas[3],
                 trust=areas[4], **policy)
    s1 = stage1(slots, areas[5], areas[6])
    (slot, info, trial), r1 = decide_all(slots, s1)
    if r1[0] < 0:
        print("mpboot: stage 1 none")
    else:
        v = r1[1]["version"]
        print("mpboot: stage 1 slot %d version %d.%d.%d+%d%s" % (
            r1[0], v[0], v[1], v[2], v[3], " test boot" if r1[2] else ""))
    deadline = time.ticks_add(time.ticks_ms(), prove_ms) if r1[2] else None
    # set_booted keeps the stage-1 fields of the record it replaces: put them there first.
    boot.set_booted(slots, -1, None, None, HOW_CONFIRMED)
    mpboot._booted[BOOTED_S1:] = [s1, r1[0], r1[1], HOW_TEST if r1[2] else HOW_CONFIRMED, deadline]
    if slot < 0:
        boot.recovery(slots)
    else:
        boot.run(slots, port, slot, info, trial)


def main():
    micropython.kbd_intr(-1)  # SIGINT (Ctrl-C at the simulator's terminal) is a power cut
    cfg, chip, policy = sim_config.load(sys.argv[1])
    areas = sim_config.areas(cfg, chip)
    try:
        if len(areas) > 5:
            _start_two(areas, policy, int(cfg.get("prove", "300000")))
        else:
            boot.start(port, areas, mpboot_keys.KEYS, **policy)
    except Exception as e:  # the app failed; the service still takes updates
        print("mpboot sim: the app raised:")
        sys.print_exception(e)
    buf_size = int(cfg.get("bufsize", 2048))
    buf_count = int(cfg.get("bufcount", 4))
    if "ble" in cfg:
        link = _Announce(port.ble(cfg.get("blename", "mpboot"), int(cfg["ble"])),
                         "mpboot: serving SMP over BLE (buf_size %d, buf_count %d)" % (buf_size, buf_count))
        service.run_ble(port, link, buf_size, buf_count)
    else:
        link = port.uart(cfg["uart"])
        print("mpboot: serving SMP (buf_size %d, buf_count %d)" % (buf_size, buf_count))
        service.run(port, link, buf_size, buf_count)


main()
