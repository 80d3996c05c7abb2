#!/usr/bin/env bash
# Decode speed as a client sees it over the Unix socket, MQTT and HTTP (SSE), next to the
# same request generated in-process (`emberd generate`), round after round in one run; plus
# the daemon's idle CPU, its memory idle (with HTTP on and off) and under load, and how fast a
# full queue answers busy.
#
#   bash bench/transports.sh [--threads N] [--runs N] [--model DIR]
#
# Starts its own mosquitto on a free 127.0.0.1 port and its own `emberd serve`; prints one
# JSON object. Run it on a quiet machine: it measures speed.
set -euo pipefail
# No ONNX Runtime telemetry (its Linux library otherwise looks up Microsoft's collector).
export ORT_DISABLE_TELEMETRY=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
threads=2 runs=5 model="$root/models/smollm2-135m-instruct"
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        *) echo "usage: bench/transports.sh [--threads N] [--runs N] [--model DIR]" >&2; exit 2 ;;
    esac
done
emberd="$root/target/release/emberd"
[ -x "$emberd" ] || { echo "build first: cargo build --release" >&2; exit 2; }
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/vendor/onnxruntime/lib/libonnxruntime.so}"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port="$(free_port)"
http="127.0.0.1:$(free_port)"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" 2>/dev/null & pids+=($!)
cat > "$work/emberd.toml" <<TOML
[model]
dir = "$model"
threads = $threads
[limits]
max_prompt_tokens = 4096
[socket]
path = "$work/emberd.sock"
[mqtt]
enabled = true
port = $port
device_id = "bench"
[http]
enabled = true
listen = "$http"
[log]
journald = "off"
level = "info"
TOML
"$emberd" serve --config "$work/emberd.toml" 2>"$work/serve.log" & daemon=$!; pids+=($daemon)
for _ in $(seq 600); do grep -q "ready: model" "$work/serve.log" && break; sleep 0.1; done
grep -q "ready: model" "$work/serve.log" || { cat "$work/serve.log" >&2; exit 1; }
"$emberd" ask --socket "$work/emberd.sock" --max-tokens 1 hi >/dev/null   # ready and warm

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$daemon/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$daemon/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$daemon/stat"; }
idle_rss="$(rss_kb)"
# Idle CPU over 10 s: the daemon should sleep (the engine worker wakes 4 times a second).
t0="$(cpu_ticks)"; sleep 10; t1="$(cpu_ticks)"
idle_cpu="$(python3 -c "import os; print(($t1-$t0)/os.sysconf('SC_CLK_TCK')/10*100)")"

# About 128 prompt tokens, as `emberd bench` uses; 64 generated, greedy, past end-of-sequence.
prompt="$(python3 -c 'print(("The quick brown fox jumps over the lazy dog while the sensor reports a steady temperature. " * 8).strip())')"
ask() { "$emberd" ask "$@" --raw --max-tokens 64 --ignore-eos --temperature 0 --stats "$prompt" 2>&1 >/dev/null | tail -n1; }
# The same request in-process (`emberd generate`: no daemon, no transport), in the same round.
in_process() {
    "$emberd" generate --model "$model" --threads "$threads" --raw --max-tokens 64 --ignore-eos \
        --temperature 0 --json "$prompt" 2>/dev/null | tail -n1
}
: > "$work/socket.jsonl"; : > "$work/mqtt.jsonl"; : > "$work/http.jsonl"; : > "$work/in_process.jsonl"
for _ in $(seq "$runs"); do
    in_process >> "$work/in_process.jsonl"
    ask --socket "$work/emberd.sock" >> "$work/socket.jsonl"
    ask --mqtt "127.0.0.1:$port" --device bench >> "$work/mqtt.jsonl"
    python3 "$root/bench/http_client.py" stream "$http" "$prompt" 64 >> "$work/http.jsonl"
done
load_hwm="$(hwm_kb)"

# A full queue: fill it with long requests over the socket, then time the busy answers.
"$emberd" ask --socket "$work/emberd.sock" --max-tokens 1000 --ignore-eos "Tell me a story." >/dev/null 2>&1 & pids+=($!)
for _ in $(seq 17); do
    "$emberd" ask --socket "$work/emberd.sock" --max-tokens 1000 --ignore-eos "Tell me a story." >/dev/null 2>&1 & pids+=($!)
done
sleep 2
python3 "$root/bench/http_client.py" busy "$http" 50 > "$work/busy.json"

# Idle memory of the same daemon with HTTP off, after the same warm-up request (the first
# daemon stops first: the two would share the MQTT device).
kill "$daemon"; wait "$daemon" 2>/dev/null || true
sed -e '/^\[http\]/,/^listen/d' -e "s|$work/emberd.sock|$work/plain.sock|" "$work/emberd.toml" > "$work/plain.toml"
"$emberd" serve --config "$work/plain.toml" 2>"$work/plain.log" & plain=$!; pids+=($plain)
for _ in $(seq 600); do grep -q "ready: model" "$work/plain.log" && break; sleep 0.1; done
"$emberd" ask --socket "$work/plain.sock" --max-tokens 1 hi >/dev/null
sleep 1
plain_rss="$(awk '/^VmRSS/ {print $2}' "/proc/$plain/status")"

python3 - "$work" "$idle_cpu" "$idle_rss" "$load_hwm" "$threads" "$plain_rss" <<'PY'
import json, statistics, sys
work, idle_cpu, idle_rss, load_hwm, threads, plain_rss = sys.argv[1:]
def rates(name):
    rows = [json.loads(l) for l in open(f"{work}/{name}.jsonl") if l.strip()]
    return [r["client"]["decode_tokens_per_s"] for r in rows], [r["daemon"]["decode_tokens_per_s"] for r in rows]
inproc = [json.loads(l)["timings"]["decode_tokens_per_s"] for l in open(f"{work}/in_process.jsonl") if l.strip()]
bench = statistics.median(inproc)
out = {"threads": int(threads), "in_process_decode_tokens_per_s": round(bench, 1)}
for name in ("socket", "mqtt"):
    client, daemon = rates(name)
    med = statistics.median(client)
    out[name] = {"client_decode_tokens_per_s": round(med, 1),
                 "daemon_decode_tokens_per_s": round(statistics.median(daemon), 1),
                 "client_over_in_process": round(med / bench, 3),
                 "client_over_daemon": round(statistics.median(c / d for c, d in zip(client, daemon)), 3),
                 "runs": len(client)}
http = [json.loads(l)["decode_tokens_per_s"] for l in open(f"{work}/http.jsonl") if l.strip()]
out["http"] = {"client_decode_tokens_per_s": round(statistics.median(http), 1),
               "client_over_in_process": round(statistics.median(http) / bench, 3),
               "runs": len(http)}
busy = json.load(open(f"{work}/busy.json"))["busy_ms"]
out["http_busy_answer_ms"] = {"median": round(statistics.median(busy), 2), "max": round(max(busy), 2),
                              "n": len(busy)}
out["idle_cpu_percent"] = round(float(idle_cpu), 2)
out["rss_idle_mib"] = round(int(idle_rss) / 1024, 1)
out["rss_idle_http_off_mib"] = round(int(plain_rss) / 1024, 1)
out["rss_peak_under_load_mib"] = round(int(load_hwm) / 1024, 1)
print(json.dumps(out, indent=2))
PY
