#!/usr/bin/env bash
# Builds the release binary for an ARM device with Debian's cross gcc and prints its size
# and the newest glibc symbol version it needs (its glibc floor).
#
#   bash cross/build.sh aarch64   # Pi 4/5 64-bit, Jetson
#   bash cross/build.sh armv7     # Pi 32-bit (tract engine: ONNX Runtime ships no armv7 build)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
case "${1:-aarch64}" in
    aarch64) target=aarch64-unknown-linux-gnu; prefix=aarch64-linux-gnu ;;
    armv7) target=armv7-unknown-linux-gnueabihf; prefix=arm-linux-gnueabihf ;;
    *) echo "usage: cross/build.sh aarch64|armv7" >&2; exit 2 ;;
esac
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
command -v "$prefix-gcc" >/dev/null || { echo "cross/build.sh: $prefix-gcc missing: apt-get install gcc-$prefix" >&2; exit 2; }
cargo --config cross/cargo-config.toml build --release --locked --target "$target" --bin emberd
bin="target/$target/release/emberd"
floor="$("$prefix-objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)"
printf '%s: %s bytes (%s MiB), needs %s\n' "$bin" "$(stat -c %s "$bin")" \
    "$(( $(stat -c %s "$bin") / 1048576 ))" "$floor"
