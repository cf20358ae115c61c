# MicroPython: the SMP codec's decoder (mpboot.cbor.Decoder) on payloads made on the host.
#   dev_cbor check IN
#       IN: records of u16 BE length + a CBOR payload. Prints "STR_COUNTS 0|1" (the text path
#       this port takes, mpboot.cbor._STR_COUNTS), then one line per record: the answer of
#       that path, a space, the answer of the max() fallback (_STR_COUNTS forced off). Each
#       answer is "ERR" when the decoder refuses the payload, else "OK:HEX", HEX the UTF-8
#       bytes of the map's "d" when that is text (else "OK:-").
#   dev_cbor bench COUNT IN
#       decodes each payload of IN (records as above) COUNT times: "BENCH I us=T" per record, T
#       the mean microseconds of one decode.
import sys
import time
from binascii import hexlify

from mpboot import cbor
from mpboot.cbor import Decoder


def records(path):
    with open(path, "rb") as f:
        data = f.read()
    out = []
    i = 0
    while i < len(data):
        n = data[i] << 8 | data[i + 1]
        out.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    return out


def answer(dec, p):
    try:
        v = dec.decode(p)
    except ValueError:
        return "ERR"
    d = v.get("d")
    return "OK:" + (hexlify(d.encode()).decode() if type(d) is str else "-")


def check(args):
    dec = Decoder()
    counts = cbor._STR_COUNTS
    print("STR_COUNTS", int(counts))
    for p in records(args[0]):
        a = answer(dec, p)
        cbor._STR_COUNTS = False
        b = answer(dec, p)
        cbor._STR_COUNTS = counts
        print(a, b)


def bench(args):
    dec = Decoder()
    count = int(args[0])
    for i, p in enumerate(records(args[1])):
        p = bytes(p)
        dec.decode(p)  # warm up (and fail here if it is refused)
        t = time.ticks_us()
        for _ in range(count):
            dec.decode(p)
        us = time.ticks_diff(time.ticks_us(), t)
        print("BENCH", i, "us=%.2f" % (us / count))


{"check": check, "bench": bench}[sys.argv[1]](sys.argv[2:])
