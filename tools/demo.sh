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
printf '\n--- A simulated device: test boot, self-confirm, and revert of an image that never confirms ---\n'
# Three small apps: v1 and v2 confirm themselves once they run; v3 never does.
for v in 1 2 3; do
    mkdir -p "$work/app-v$v"
    {
        echo "import mpboot"
        echo "print('app v$v is running')"
        if [ "$v" != 3 ]; then
            echo "if mpboot.confirm():  # True only when this changed the state"
            echo "    print('app v$v confirmed itself: it boots from now on')"
        fi
    } > "$work/app-v$v/main.py"
    mpboot sign "$work/app-v$v" -k "$work/signing-key.pem" --version "$v.0.0" --security-counter "$v" \
        --vendor-id example.com --class-id hello-board -o "$work/app-v$v.bin" > /dev/null
done
step mpboot sim init "$work/device" -k "$work/signing-key.pem" --vendor-id example.com --class-id hello-board
step mpboot sim install "$work/device" "$work/app-v1.bin" --permanent
step mpboot sim boot "$work/device"
step mpboot sim install "$work/device" "$work/app-v2.bin" --test
out=$(step mpboot sim boot "$work/device"); echo "$out"
grep -q "version 2.0.0+0 test boot" <<<"$out" && grep -q "app v2 confirmed itself" <<<"$out"
out=$(step mpboot sim boot "$work/device"); echo "$out"
grep -q "app v2 is running" <<<"$out"
step mpboot sim install "$work/device" "$work/app-v3.bin" --test
out=$(step mpboot sim boot "$work/device"); echo "$out"
grep -q "app v3 is running" <<<"$out"
printf '\nv3 never confirmed itself; at the next reset the device reverts to v2:\n'
out=$(step mpboot sim boot "$work/device"); echo "$out"
grep -q "app v2 is running" <<<"$out"
step mpboot sim status "$work/device"

printf '\ndemo: ok (the key in %s is deleted now)\n' "$work"
