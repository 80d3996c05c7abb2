#!/usr/bin/env bash
# Builds emberd and its tests for an ARM target with Debian's cross gcc and runs the Rust
# test suite under qemu-user (cross/qemu-run.sh), against the target's ONNX Runtime library
# (aarch64) and tract. The models are the host's: ONNX files are the same on every CPU.
#
#   bash cross/test.sh [aarch64] [cargo test args...]
#
# Exit status 3 means this machine cannot build for the target (the Rust target or the
# cross toolchain cannot be installed); the message says which.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
arch="${1:-aarch64}"; [ $# -gt 0 ] && shift
say() { printf '[emberd cross] %s\n' "$*"; }
unavailable() { printf '[emberd cross] cannot test %s here: %s\n' "$arch" "$*" >&2; exit 3; }

case "$arch" in
    aarch64) target=aarch64-unknown-linux-gnu; gcc=gcc-aarch64-linux-gnu; cxxlib=libstdc++6-arm64-cross; qemu=qemu-aarch64 ;;
    *) echo "cross/test.sh: only aarch64 runs the suite (ONNX Runtime has no armv7 build); try cross/build.sh armv7" >&2; exit 2 ;;
esac

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    say "installing the Rust target $target"
    rustup target add "$target" >/dev/null 2>&1 || unavailable "rustup cannot install the Rust target $target (offline, or no rustup)"
fi
missing=()
command -v "${gcc#gcc-}-gcc" >/dev/null 2>&1 || missing+=("$gcc")
[ -e "/usr/${gcc#gcc-}/lib/libstdc++.so.6" ] || missing+=("$cxxlib")
command -v "$qemu" >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing Debian packages: ${missing[*]}"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null; } || unavailable "apt-get cannot install ${missing[*]}"
fi

bash cross/fetch-ort.sh "$arch"
export ORT_DYLIB_PATH="$root/vendor/onnxruntime-$arch/lib/libonnxruntime.so"
say "building and testing for $target under $qemu"
cargo --config cross/cargo-config.toml test --release --locked --target "$target" "$@"
