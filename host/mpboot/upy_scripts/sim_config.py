# The simulated device's config file, shared by its mains (sim_device, sim_serve): one
# KEY=VALUE per line (mpboot.sim.write_config), flash=PATH size=N sector=N align=N
# [vendor=HEX] [class=HEX] [downgrade=0] [timing=none|nor] [uid=HEX] [trust=1] [s1=BYTES] ...; a value
# may hold spaces. load() returns the fields, the NOR flash chip and the Slots policy (the
# thresholds of mpboot_keys too); areas() the flash areas (trust=1: the chip has a trust area,
# devices made before it have none).
from binascii import unhexlify

import mpboot_keys
from mpboot import trust
from mpboot.ports import unix as port


def load(path):
    cfg = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            cfg[k] = v
    timing = cfg.get("timing", "none")
    chip = port.flash(cfg["flash"], int(cfg["size"]), int(cfg["sector"]), int(cfg["align"]),
                      None if timing == "none" else timing)
    if "uid" in cfg:
        # This board's identity (machine.unique_id() on hardware), kept in the state dir.
        uid = unhexlify(cfg["uid"])
        port.unique_id = lambda: uid
    policy = {
        "vendor_id": unhexlify(cfg["vendor"]) if "vendor" in cfg else None,
        "class_id": unhexlify(cfg["class"]) if "class" in cfg else None,
        "downgrade": cfg.get("downgrade", "1") == "1",
    }
    policy.update(trust.policy(mpboot_keys))
    return cfg, chip, policy


def areas(cfg, chip):
    # s1=BYTES: the size of each of stage 1's slots (a chip laid out with them; none without)
    return port.areas(chip, cfg.get("trust") == "1", int(cfg.get("s1", "0")))
