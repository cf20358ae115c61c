# MicroPython: Wycheproof RSA cases through mpboot.rsa.
# Usage: dev_wycheproof CASEFILE; lines "tcId scheme bits e n_hex sig_hex msg_hex" with
# scheme "pss" or "pkcs1v15" ("-" for an empty hex field). Prints "tcId 1|0" per case.
import hashlib
import sys
from binascii import unhexlify

from mpboot import rsa


def field(text):
    return b"" if text == "-" else unhexlify(text)


with open(sys.argv[1]) as cases:
    for line in cases:
        tc, scheme, bits, e, n, sig, msg = line.split()
        verify = rsa.verify_pss if scheme == "pss" else rsa.verify_pkcs1v15
        ok = verify(int(n, 16), int(bits), field(sig), hashlib.sha256(field(msg)).digest(), int(e, 16))
        print(tc, 1 if ok else 0)
