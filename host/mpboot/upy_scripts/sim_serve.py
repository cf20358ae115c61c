# The serving simulated device, one power-on per process: micropython -m sim_serve CONFIG
#
# CONFIG is sim_device's config ("flash=PATH size=N sector=N align=N [vendor=HEX] [class=HEX]
# [downgrade=0]") plus "uart=PATH" (the pty slave to serve on), "timing=none|nor" (flash
# timing, mpboot.ports.nor_sim), "bufsize=N bufcount=N" (MCUmgr parameters), and for SMP over
# BLE instead of the UART "ble=PORT [blename=NAME]" (the simulator's radio companion on
# 127.0.0.1:PORT, docs/BLE.md; NAME advertised, default "mpboot"), or over UDP "udp=PORT"
# (bound on 127.0.0.1:PORT by each power-on; buf_size clamped to 1472). Like a board's boot.py:
# boot (the chosen image's app runs: it prints, and confirms itself), or recovery; then the
# update service until a client asks for a reset: the process exits 0 and the simulator
# (host/mpboot/sim/serve.py) starts the next power-on. With stage-1 slots ("s1=BYTES") the
# service is the stage 1 that mpboot.stages.start() loaded from its slot (else the rescue:
# the service in the firmware folder), serving stage 1 as image 1 (docs/PROTOCOL.md, "Stage
# 1"); a stage-1 test boot has "prove=MS" (default 300000) to prove itself (docs/BOOT.md,
# "Stage 1's proof").
import sys

import micropython

import mpboot_keys
import sim_config
from mpboot import boot
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


def main():
    micropython.kbd_intr(-1)  # SIGINT (Ctrl-C at the simulator's terminal) is a power cut
    cfg, chip, policy = sim_config.load(sys.argv[1])
    areas = sim_config.areas(cfg, chip)
    try:
        if len(areas) > 5:  # stage-1 slots: a board with two stages
            from mpboot import stages

            stages.start(port, areas, mpboot_keys.KEYS, prove_ms=int(cfg.get("prove", stages.PROVE_MS)), **policy)
        else:
            boot.start(port, areas, mpboot_keys.KEYS, **policy)
    except Exception as e:  # the app failed; the service still takes updates
        print("mpboot sim: the app raised:")
        sys.print_exception(e)
    from mpboot.smp import service  # only now: stage 1's, which stages.start() loaded (or the rescue)

    buf_size = int(cfg.get("bufsize", 2048))
    buf_count = int(cfg.get("bufcount", 4))
    if "ble" in cfg:
        link = _Announce(port.ble(cfg.get("blename", "mpboot"), int(cfg["ble"])),
                         "mpboot: serving SMP over BLE (buf_size %d, buf_count %d)" % (buf_size, buf_count))
        service.run_ble(port, link, buf_size, buf_count)
    elif "udp" in cfg:
        link = port.udp(int(cfg["udp"]))
        print("mpboot: serving SMP over UDP on 127.0.0.1:%s (buf_size %d, buf_count %d)"
              % (cfg["udp"], min(buf_size, service.UDP_MAX), buf_count))
        service.run_udp(port, link, buf_size, buf_count)
    else:
        link = port.uart(cfg["uart"])
        print("mpboot: serving SMP (buf_size %d, buf_count %d)" % (buf_size, buf_count))
        service.run(port, link, buf_size, buf_count)


main()
