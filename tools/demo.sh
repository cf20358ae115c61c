#!/usr/bin/env bash
# `make demo`: the main job end to end, on the simulated device (MicroPython unix port).
# Generates a FRESH key in a temporary folder every run: no key is shipped or reused.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/mpboot-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step mpboot keygen --type rsa-2048 -o "$work/signing-key.pem"
step mpboot pubkey "$work/signing-key.pem" --format micropython -o "$work/mpboot_keys.py"
step mpboot sign examples/hello_app -k "$work/signing-key.pem" --version 1.2.3+45 \
    --vendor-id example.com --class-id hello-board --slot-size 256k -o "$work/hello_app.bin"
step mpboot info "$work/hello_app.bin"
step mpboot verify "$work/hello_app.bin" -k "$work/signing-key.pem" --device --heapsize 24k

printf '\nTampering with one payload byte; both verifiers must refuse it:\n'
python3 - "$work/hello_app.bin" "$work/tampered.bin" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[0x200 + 8] ^= 0x01
open(sys.argv[2], "wb").write(data)
PY
if mpboot verify "$work/tampered.bin" -k "$work/signing-key.pem" --device; then
    echo "demo: the tampered image was accepted" >&2
    exit 1
fi
printf '\ndemo: ok (the key in %s is deleted now)\n' "$work"
