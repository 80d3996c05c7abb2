#!/usr/bin/env bash
# Sets everything up on a fresh Debian machine with Rust and Python 3, then runs the daemon:
# Debian packages, the model-preparation venv, the ONNX Runtime library, the default model,
# a release build, a local mosquitto on 127.0.0.1:1883 if none listens, and `emberd serve`
# with the Unix socket and MQTT on. Later runs skip what is done.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_toolchain
install_apt_packages
prepare_models

say "building emberd (release; on a 2-core machine about 25 minutes the first time)"
# cargo's own lines ("Compiling <crate>") are the progress: nothing is filtered out.
cargo build --release --locked || die "the build failed (cargo's messages above say why)"

STATE="$ROOT/.emberd"
mkdir -p "$STATE"
MQTT_PORT="${EMBERD_MQTT_PORT:-1883}"
if ! (exec 3<>"/dev/tcp/127.0.0.1/$MQTT_PORT") 2>/dev/null; then
    say "starting mosquitto on 127.0.0.1:$MQTT_PORT"
    # set_tcp_nodelay: each token event is a small publish; Nagle's algorithm would hold it
    # for the subscriber's delayed ACK (tens of ms a token).
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\nset_tcp_nodelay true\n' \
        "$MQTT_PORT" "$STATE" > "$STATE/mosquitto.conf"
    mosquitto -c "$STATE/mosquitto.conf" -d || die "mosquitto did not start"
fi

CONFIG="$STATE/emberd.toml"
DEVICE_ID="$(hostname 2>/dev/null || echo emberd)"
DEVICE_ID="${DEVICE_ID//[^a-zA-Z0-9_-]/_}"
if [ ! -f "$CONFIG" ]; then
    cat > "$CONFIG" <<TOML
# Written by scripts/setup.sh for a local run; see systemd/emberd.toml for every option.
[model]
dir = "$ROOT/models/smollm2-135m-instruct"
ort_library = "$ROOT/vendor/onnxruntime/lib/libonnxruntime.so"

[socket]
path = "$STATE/emberd.sock"

[mqtt]
enabled = true
host = "127.0.0.1"
port = $MQTT_PORT
device_id = "${DEVICE_ID:-emberd}"
TOML
fi
# The HTTP API on loopback (a config written by an older setup gets it added).
if ! grep -q '^\[http\]' "$CONFIG"; then
    printf '\n[http]\nenabled = true\nlisten = "127.0.0.1:%s"\n' "${EMBERD_HTTP_PORT:-8080}" >> "$CONFIG"
fi
DEVICE="$(sed -n 's/^device_id = "\(.*\)"/\1/p' "$CONFIG")"
HTTP="$(sed -n '/^\[http\]/,/^\[/ s/^listen = "\(.*\)"/\1/p' "$CONFIG")"

cat <<TXT

emberd is starting (Ctrl-C stops it). In another terminal:
  ./target/release/emberd ask --socket $STATE/emberd.sock "Give me one tip for saving energy at home."
  mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -t 'emberd/$DEVICE/response/#' &
  mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t 'emberd/$DEVICE/request' -m '{"id":"q1","prompt":"Hello!"}'
  curl -N http://$HTTP/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"smollm2-135m-instruct","stream":true,"messages":[{"role":"user","content":"Give me one tip for saving energy at home."}]}'
  curl -N http://$HTTP/api/chat -d '{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"Hello!"}]}'
  The device page: http://$HTTP/   Metrics: http://$HTTP/metrics
Without the daemon:
  ./target/release/emberd generate "Hello"

TXT
exec ./target/release/emberd serve --config "$CONFIG"
