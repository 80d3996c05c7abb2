#!/usr/bin/env bash
# Puts ONNX Runtime's library for an ARM target into vendor/onnxruntime-<arch>/lib, taken
# from the onnxruntime wheel on PyPI (same version as the host's vendor/onnxruntime).
# ONNX Runtime publishes aarch64 wheels only; armv7 devices use the tract engine.
set -euo pipefail
arch="${1:-aarch64}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ "$arch" = aarch64 ] || { echo "fetch-ort.sh: PyPI has no onnxruntime wheel for $arch; use backend = \"tract\"" >&2; exit 2; }
version="$(cat "$root/vendor/onnxruntime/VERSION" 2>/dev/null || true)"
[ -n "$version" ] || { echo "fetch-ort.sh: run models/prepare.sh first (it records the ONNX Runtime version)" >&2; exit 2; }
dest="$root/vendor/onnxruntime-$arch/lib"
if [ -f "$dest/libonnxruntime.so.$version" ]; then exit 0; fi
wheels="$root/target/cross-wheels"
mkdir -p "$wheels" "$dest"
"$root/.venv/bin/python" -m pip download --quiet "onnxruntime==$version" --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
    --platform manylinux2014_aarch64 -d "$wheels"
wheel="$(ls "$wheels"/onnxruntime-"$version"-*aarch64.whl | head -n1)"
"$root/.venv/bin/python" - "$wheel" "$dest" "$version" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so."))
    (dest / f"libonnxruntime.so.{version}").write_bytes(z.read(name))
PY
ln -sfn "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
echo "ONNX Runtime $version for $arch: $dest/libonnxruntime.so"
