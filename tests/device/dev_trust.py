# Device driver: the verifier and the record checks under a given trust state.
# Usage: micropython -m dev_trust CASES.json
# CASES.json: a list of {"name", "trust": {"roots": [DER hex], "threshold", "image_threshold",
# "root_version", "revocation", "revoked_keys": [hex], "revoked_serials": [int]},
# "image": PATH, "slot_size": N} or {..., "record": PATH}. Prints one line per case:
#   image:  "<name> OK <signers key_index>" or "<name> REJECT <code>"
#   record: "<name> OK <root_version> <threshold> <image_threshold> <revocation>
#            <root keyhashes, comma separated hex> <revoked keys> <revoked serials>"
#           or "<name> REFUSE <code>"
import json
import sys
from binascii import hexlify, unhexlify

from mpboot import image, reader, records, trust as trust_mod


def state(t):
    s = trust_mod.initial([records.der_key(unhexlify(d)) for d in t["roots"]],
                          t.get("threshold", 1), t.get("image_threshold", 1))
    s[trust_mod.ROOT_VERSION] = t.get("root_version", 1)
    s[trust_mod.REVOCATION] = t.get("revocation", 0)
    s[trust_mod.REVOKED_KEYS] = [unhexlify(h) for h in t.get("revoked_keys", [])]
    s[trust_mod.REVOKED_SERIALS] = list(t.get("revoked_serials", []))
    return s


def hexes(items):
    return ",".join(hexlify(x).decode() for x in items) or "-"


buf = bytearray(image.BUF_SIZE)
with open(sys.argv[1]) as f:
    cases = json.load(f)
for c in cases:
    s = state(c["trust"])
    if "image" in c:
        with open(c["image"], "rb") as f:
            try:
                info = image.verify(reader.file_reader(f), s, c["slot_size"], buf)
                print(c["name"], "OK", info["key_index"])
            except image.ImageError as e:
                print(c["name"], "REJECT", e.args[0])
    else:
        with open(c["record"], "rb") as f:
            rec = f.read()
        try:
            n = records.apply(s, rec)
        except records.TrustError as e:
            print(c["name"], "REFUSE", e.args[0])
            continue
        print(c["name"], "OK", n[trust_mod.ROOT_VERSION], n[trust_mod.THRESHOLD],
              n[trust_mod.IMAGE_THRESHOLD], n[trust_mod.REVOCATION],
              hexes(k[0] for k in n[trust_mod.ROOTS]), hexes(n[trust_mod.REVOKED_KEYS]),
              ",".join(str(x) for x in n[trust_mod.REVOKED_SERIALS]) or "-")
