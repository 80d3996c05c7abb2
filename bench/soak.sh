#!/usr/bin/env bash
# A soak of the built emberd (not in the test command): mixed load for N minutes (socket
# streams, cancels, hang-ups, bad input, HTTP, MQTT, broker kills), sampling RSS, file
# descriptors and threads. Needs scripts/setup.sh (or test.sh) run once.
#
#   bash bench/soak.sh --minutes 30 --csv target/soak.csv
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$ROOT/target/release/emberd" ] || { echo "build first: cargo build --release" >&2; exit 1; }
# The MQTT client the soak drives its MQTT load with.
"$ROOT/.venv/bin/python" -m pip install --disable-pip-version-check -q paho-mqtt==2.1.0
exec "$ROOT/.venv/bin/python" "$ROOT/bench/soak.py" "$@"
