#!/usr/bin/env bash
# Cargo's runner for the ARM targets (cross/cargo-config.toml): runs a cross-built program
# under qemu-user. Without binfmt the kernel cannot start ARM programs, so qemu is named
# explicitly, here and (through EMBERD_TEST_EXEC_WRAPPER) wherever the tests start emberd.
#
# qemu's -L prefix holds the target's Debian sysroot and an ARM /proc/cpuinfo: ONNX
# Runtime's cpuinfo library reads that file at start and crashes on the x86 host's.
set -euo pipefail
arch="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$arch" in
    aarch64) qemu=qemu-aarch64; sysroot=/usr/aarch64-linux-gnu ;;
    armv7) qemu=qemu-arm; sysroot=/usr/arm-linux-gnueabihf ;;
    *) echo "qemu-run.sh: unknown arch $arch (aarch64 | armv7)" >&2; exit 2 ;;
esac
command -v "$qemu" >/dev/null || { echo "qemu-run.sh: $qemu not found (apt-get install qemu-user)" >&2; exit 2; }
[ -d "$sysroot/lib" ] || { echo "qemu-run.sh: no $sysroot (apt-get install the $arch cross gcc)" >&2; exit 2; }

prefix="$here/../target/qemu-$arch-root"
if [ ! -f "$prefix/proc/cpuinfo" ]; then
    mkdir -p "$prefix/proc"
    ln -sfn "$sysroot/lib" "$prefix/lib"
    cp "$here/cpuinfo-$arch" "$prefix/proc/cpuinfo"
fi
export EMBERD_TEST_EXEC_WRAPPER="bash $here/qemu-run.sh $arch"
exec "$qemu" -L "$prefix" "$@"
