#!/usr/bin/env bash
# Which system calls emberd (with ONNX Runtime or tract) makes at start and while serving a
# request, and which of them the shipped unit's filter denies. Not part of the test command:
# run it by hand after a change to the engines or the unit (needs strace and systemd-analyze).
#
#   bash tests/systemd/syscall-audit.sh [ort|tract] [model dir]
#
# Prints the `strace -f -c` tables of the start (load, bind, READY) and of one request, then
# the calls of both that the unit's SystemCallFilter= lines deny (answered with EPERM there,
# SystemCallErrorNumber=EPERM).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
backend="${1:-ort}"
model="${2:-$root/models/smollm2-135m-instruct}"
bin="$root/target/release/emberd"
for tool in strace systemd-analyze; do
    command -v "$tool" >/dev/null || { echo "syscall-audit: $tool not found" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "syscall-audit: build first (cargo build --release)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cat >"$work/emberd.toml" <<EOF
[model]
dir = "$model"
ort_library = "${ORT_DYLIB_PATH:-$root/vendor/onnxruntime/lib/libonnxruntime.so}"
backend = "$backend"
threads = 2
[socket]
path = "$work/emberd.sock"
[log]
journald = "off"
EOF

# The unit's filter: @system-service without @privileged and @resources, groups expanded.
expand() {
    systemd-analyze syscall-filter --no-pager "$1" | sed -n '2,$p' | sed 's/#.*//' | tr -d ' ' |
        grep -v '^$' | while read -r entry; do
            if [[ "$entry" == @* ]]; then expand "$entry"; else echo "$entry"; fi
        done
}
filter_lines="$(grep '^SystemCallFilter=' "$root/systemd/emberd.service")"
allowed_sets="$(echo "$filter_lines" | grep -v '=~' | sed 's/^SystemCallFilter=//')"
denied_sets="$(echo "$filter_lines" | grep '=~' | sed 's/^SystemCallFilter=~//')"
for set in $allowed_sets; do expand "$set"; done | sort -u >"$work/allowed"
for set in $denied_sets; do expand "$set"; done | sort -u >"$work/denied"
comm -23 "$work/allowed" "$work/denied" >"$work/permitted"

calls_of() { awk 'NR > 2 && $NF != "total" && $1 !~ /^-/ {print $NF}' "$1" | sort -u; }
report() {
    local name="$1" table="$2"
    echo "== $name: strace -f -c"
    cat "$table"
    local denied
    denied="$(calls_of "$table" | comm -23 - "$work/permitted" | tr '\n' ' ')"
    echo "== $name: calls the unit's filter denies: ${denied:-none}"
}

# Start: everything from exec to READY (the log's ready line), then SIGTERM.
strace -f -c -o "$work/start.txt" "$bin" serve --config "$work/emberd.toml" 2>"$work/start.log" &
pid=$!
until grep -q 'ready: model' "$work/start.log"; do
    kill -0 "$pid" 2>/dev/null || { cat "$work/start.log" >&2; exit 1; }
    sleep 0.2
done
# SIGTERM to emberd itself (strace's child): strace then writes its table and exits.
pkill -TERM -P "$pid"
wait "$pid" || true
report "start ($backend)" "$work/start.txt"

# One request, traced on a daemon that is already up.
"$bin" serve --config "$work/emberd.toml" 2>"$work/serve.log" &
pid=$!
until grep -q 'ready: model' "$work/serve.log"; do sleep 0.2; done
strace -f -c -o "$work/request.txt" -p "$pid" 2>/dev/null &
tracer=$!
sleep 1
"$bin" ask --socket "$work/emberd.sock" --max-tokens 32 --temperature 0 "Name three colors." >/dev/null
kill -INT "$tracer"
wait "$tracer" || true
report "one request ($backend)" "$work/request.txt"
