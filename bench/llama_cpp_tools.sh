#!/usr/bin/env bash
# llama.cpp's own C++ tools (llama-bench, llama-server, llama-quantize), built from the
# llama.cpp source that the llama-cpp-python source package carries (vendor/llama.cpp), with
# this machine's compiler and -DGGML_NATIVE=ON, into bench/.llama-cpp/bin. Once; ~10 minutes
# on 2 cores. bench/compare.sh runs it when the tools are missing.
#
#   bash bench/llama_cpp_tools.sh [VERSION]     (default: the version below)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:-0.3.36}"
flavour="$version no-amx"
dest="$root/bench/.llama-cpp"
bin="$dest/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-server" ] && [ -x "$bin/llama-quantize" ] \
        && [ "$(cat "$dest/VERSION" 2>/dev/null || true)" = "$flavour" ]; then
    echo "[llama.cpp] tools up to date ($bin, llama-cpp-python $version)" >&2
    exit 0
fi
work="$dest/build-$version"
mkdir -p "$work"
if [ ! -x "$dest/venv/bin/cmake" ]; then
    echo "[llama.cpp] cmake from PyPI into $dest/venv" >&2
    python3 -m venv "$dest/venv"
    "$dest/venv/bin/pip" install --disable-pip-version-check -q cmake ninja
fi
if [ ! -d "$work/src" ]; then
    echo "[llama.cpp] llama-cpp-python $version source package" >&2
    "$dest/venv/bin/pip" download --disable-pip-version-check -q --no-deps \
        --no-binary llama-cpp-python -d "$work" "llama-cpp-python==$version"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
    mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$work/src"
    # A submodule's .git file pointing nowhere: cmake's version lookup would ask git about it.
    rm -f "$work/src/.git"
    rm -rf "$work/llama_cpp_python-$version" "$work/llama_cpp_python-$version.tar.gz"
fi
echo "[llama.cpp] building llama-bench, llama-server, llama-quantize (GGML_NATIVE, no AMX)" >&2
# ggml's AMX backend (built where -march=native has AMX, as on Sapphire Rapids) segfaulted in
# ggml_backend_amx_mul_mat on the first matmul here, for Q4_0 and Q4_1 alike, in llama-bench
# and llama-server: it is left out (-mno-amx-*, which win over -march=native whatever their
# order), and ggml's AVX-512 kernels with weight repacking, its default, do the work.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PATH="$dest/venv/bin:$PATH" cmake -S "$work/src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF > "$work/configure.log" \
    || { tail -30 "$work/configure.log" >&2; exit 1; }
PATH="$dest/venv/bin:$PATH" cmake --build "$work/build" -j "$(nproc)" \
    --target llama-bench llama-server llama-quantize > "$work/build.log" \
    || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$bin"
for tool in llama-bench llama-server llama-quantize; do
    cp "$work/build/bin/$tool" "$bin/"
done
echo "$flavour" > "$dest/VERSION"
echo "[llama.cpp] tools ready in $bin ($("$bin/llama-bench" --version 2>&1 | head -n1))" >&2
