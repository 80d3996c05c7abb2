#!/usr/bin/env bash
# emberd vs each exporting tool's own runtime on the same real export (models/real_exports.sh:
# Optimum fp32, int4 and q4f16 with onnxruntime, the genai builder's int4 with onnxruntime-genai), in
# one run: 2 threads, a 128-token prompt then 64 greedy tokens; emberd and the tool alternate
# round after round, and the table gives median decode tokens/s, prefill ms and the ratio.
#
#   bash bench/exports.sh [--rounds 3] [--runs 3]
#
# Needs target/release/emberd and models/real-exports (both made by the test command).
set -euo pipefail
export ORT_DISABLE_TELEMETRY=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds=3 runs=3
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        *) echo "usage: bench/exports.sh [--rounds N] [--runs N]" >&2; exit 2 ;;
    esac
done
emberd="$root/target/release/emberd"
exports="$(readlink -f "$root/models/real-exports" || true)"
[ -x "$emberd" ] || { echo "build first: cargo build --release" >&2; exit 2; }
[ -f "$exports/references.json" ] || { echo "make the exports first: bash models/real_exports.sh" >&2; exit 2; }
venv="$(ls -d "$(dirname "$exports")"/venv-* | head -n1)"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/vendor/onnxruntime/lib/libonnxruntime.so}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

for round in $(seq "$rounds"); do
    for name in optimum-fp32 optimum-int4 optimum-q4f16 genai-int4; do
        echo "[exports-bench] round $round/$rounds: $name" >&2
        "$emberd" bench --model "$exports/$name" --backend ort --threads 2 --prompt-tokens 128 \
            --gen-tokens 64 --runs "$runs" >> "$out/emberd-$name.json"
        "$venv/bin/python" "$root/models/real_exports.py" --bench "$exports/$name" \
            --prompt-tokens 128 --gen-tokens 64 --runs "$runs" >> "$out/tool-$name.jsonl"
    done
done
python3 - "$out" "$exports/references.json" <<'PY'
import json, statistics, sys
from pathlib import Path
out, refs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
def reports(path):
    dec = json.JSONDecoder(); text = path.read_text().strip(); i = 0
    while i < len(text):
        obj, j = dec.raw_decode(text, i); yield obj; i = j
        while i < len(text) and text[i].isspace(): i += 1
print(f"versions: {refs['versions']}")
fmt = lambda v: f"{min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f}"
print("| export | tool runtime | emberd decode tok/s (min / median / max) | tool decode tok/s | ratio of medians | emberd prefill ms | tool prefill ms |")
print("|---|---|---|---|---|---|---|")
for name in ["optimum-fp32", "optimum-int4", "optimum-q4f16", "genai-int4"]:
    em = list(reports(out / f"emberd-{name}.json"))
    tool = list(reports(out / f"tool-{name}.jsonl"))
    ed = [r["decode_tokens_per_s"] for r in em]
    td = [r["decode_tokens_per_s"] for r in tool]
    ep = statistics.median(r["prefill_ms"] for r in em)
    tp = statistics.median(r["prefill_ms"] for r in tool)
    print(f"| {name} | {refs['exports'][name]['runtime']} | {fmt(ed)} | {fmt(td)} | "
          f"{statistics.median(ed) / statistics.median(td):.2f} | {ep:.0f} | {tp:.0f} |")
PY
