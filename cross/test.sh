#!/usr/bin/env bash
# Builds emberd and its tests for an ARM target with Debian's cross gcc and runs the Rust
# test suite under qemu-user (cross/qemu-run.sh). The models are the host's: ONNX files are
# the same on every CPU.
#
#   bash cross/test.sh aarch64 [cargo test args...]   # ONNX Runtime's aarch64 library and tract
#   bash cross/test.sh armv7 [cargo test args...]     # 32-bit Pi: tract only (ONNX Runtime
#                                                     # ships no armv7 library); the tests
#                                                     # that need it are ignored there
#
# Installs what the build needs on a machine that never had a cross toolchain: the Rust
# target, the cross gcc, the target's C library headers (libc6-dev-*-cross, only a Recommends
# of the gcc package), the C++ runtime ONNX Runtime links, and qemu-user.
# Exit status 3 means this machine cannot build for the target (the Rust target or the
# cross toolchain cannot be installed); the message says which.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
arch="${1:-aarch64}"; [ $# -gt 0 ] && shift
say() { printf '[emberd cross] %s\n' "$*"; }
unavailable() { printf '[emberd cross] cannot test %s here: %s\n' "$arch" "$*" >&2; exit 3; }

case "$arch" in
    aarch64) target=aarch64-unknown-linux-gnu; prefix=aarch64-linux-gnu; debarch=arm64; qemu=qemu-aarch64 ;;
    armv7) target=armv7-unknown-linux-gnueabihf; prefix=arm-linux-gnueabihf; debarch=armhf; qemu=qemu-arm ;;
    *) echo "usage: cross/test.sh aarch64|armv7 [cargo test args...]" >&2; exit 2 ;;
esac

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    say "installing the Rust target $target"
    rustup target add "$target" >/dev/null 2>&1 || unavailable "rustup cannot install the Rust target $target (offline, or no rustup)"
fi
missing=()
command -v "$prefix-gcc" >/dev/null 2>&1 || missing+=("gcc-$prefix")
# The C library's headers and crt files: ring's C code and the final link need them.
[ -e "/usr/$prefix/include/stdio.h" ] || missing+=("libc6-dev-$debarch-cross")
# ONNX Runtime's library links the C++ runtime (aarch64 only: armv7 has no ONNX Runtime).
[ "$arch" != aarch64 ] || [ -e "/usr/$prefix/lib/libstdc++.so.6" ] || missing+=("libstdc++6-$debarch-cross")
command -v "$qemu" >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing Debian packages: ${missing[*]}"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null; } || unavailable "apt-get cannot install ${missing[*]}"
fi

if [ "$arch" = aarch64 ]; then
    bash cross/fetch-ort.sh "$arch"
    export ORT_DYLIB_PATH="$root/vendor/onnxruntime-$arch/lib/libonnxruntime.so"
else
    # No ONNX Runtime for this target: nothing may pick up the host's x86_64 library.
    unset ORT_DYLIB_PATH
fi
say "building and testing for $target under $qemu"
cargo --config cross/cargo-config.toml test --release --locked --target "$target" "$@"
