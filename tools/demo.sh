#!/usr/bin/env bash
# `make demo`: the main job end to end, on the simulated device (MicroPython unix port).
# `make demo-qemu` (tools/demo.sh qemu): the same story on the emulated Cortex-M3 board,
# MicroPython's qemu port with mpboot and the demo's key frozen into its firmware (built for
# that key: about half a minute the first time, a few seconds after).
# Generates a FRESH key in a temporary folder every run: no key is shipped or reused.
set -euo pipefail
machine=${1:-unix}
case "$machine" in
    unix) board="A simulated device"; sim_args=() ;;
    qemu) board="The emulated Cortex-M3 board (mpboot frozen into MicroPython's qemu port)"
          sim_args=(--machine qemu) ;;
    *) echo "usage: tools/demo.sh [unix|qemu]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/mpboot-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Every signature is logged (mpboot info shows which line made it); the demo's log is its own.
export MPBOOT_SIGNING_LOG="$work/signing-log.jsonl"
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
printf '\n--- %s over SMP: flash v2, test boot, self-confirm ---\n' "$board"
# Two small apps: each prints its version and confirms itself once it runs.
for v in 1 2; do
    mkdir -p "$work/app-v$v"
    {
        echo "import mpboot"
        echo "print('app v$v is running')"
        echo "if mpboot.confirm():  # True only when this changed the state"
        echo "    print('app v$v confirmed itself: it boots from now on')"
    } > "$work/app-v$v/main.py"
    step mpboot sign "$work/app-v$v" -k "$work/signing-key.pem" --version "$v.0.0" --security-counter "$v" \
        --vendor-id example.com --class-id hello-board -o "$work/app-v$v.bin"
done
# The simulated device: the firmware on MicroPython, NOR flash in $work/device, its UART a
# pty linked at $work/uart. Its console (boot lines, the app's prints) goes to sim.log.
printf '\n\033[1m$ mpboot sim %s--state %s --keys signing-key.pem --vendor-id example.com --class-id hello-board --link %s &\033[0m\n' \
    "${sim_args[*]:+${sim_args[*]} }" "$work/device" "$work/uart"
mpboot sim "${sim_args[@]}" --state "$work/device" --keys "$work/signing-key.pem" --vendor-id example.com \
    --class-id hello-board --link "$work/uart" > "$work/sim.log" 2>&1 &
sim=$!
trap 'kill -TERM $sim 2>/dev/null || true; wait $sim 2>/dev/null || true; rm -rf "$work"' EXIT
# Wait (bounded: a first firmware build for the qemu board takes about half a minute) until
# the device prints what is awaited.
wait_log() {
    for _ in $(seq 1800); do
        [ "$(grep -c "$1" "$work/sim.log" 2>/dev/null)" -ge "${2:-1}" ] && return 0
        kill -0 $sim 2>/dev/null || break
        sleep 0.1
    done
    echo "demo: the simulator never printed '$1'" >&2; cat "$work/sim.log" >&2; exit 1
}
wait_log "serving SMP"
step mpboot flash "$work/app-v1.bin" --port "$work/uart" --confirm --reset
wait_log "app v1 is running"
wait_log "serving SMP" 2
step mpboot flash "$work/app-v2.bin" --port "$work/uart" --test --reset
wait_log "app v2 confirmed itself"
wait_log "serving SMP" 3
printf '\nThe simulated device printed:\n'
sed 's/^/    /' "$work/sim.log"
step mpboot state --port "$work/uart"
mpboot state --port "$work/uart" --json | python3 -c '
import json, sys
images = json.load(sys.stdin)["images"]
assert any(i["version"].startswith("2.0.0") and i["active"] and i["confirmed"] for i in images), images
'
kill -TERM $sim; wait $sim  # SIGTERM: the simulator stops cleanly (exit 0; Ctrl-C is 130)

printf '\ndemo: ok (the key in %s is deleted now)\n' "$work"
