# Shared by setup.sh and test.sh: install what a fresh Debian machine lacks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The time since the script started, so a slow step shows in a CI log.
say() { printf '[emberd %dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
die() { printf '[emberd] ERROR: %s\n' "$*" >&2; exit 1; }

# Debian packages: mosquitto (broker and clients, for the MQTT API and its tests), the
# Python venv module (for model preparation) and systemd's tools (for the unit tests).
install_apt_packages() {
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
    command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
    # openssl makes the MQTT TLS tests' certificates.
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    # systemd-analyze and systemd-socket-activate, for the unit and socket-activation tests.
    command -v systemd-socket-activate >/dev/null 2>&1 || missing+=(systemd)
    # systemd-nspawn, to boot the units under a real systemd (tests/systemd/nspawn.sh).
    command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
    # /bin/kill, which the unit's ExecReload= runs (systemd-analyze verify checks it exists);
    # a minimal Debian lacks procps.
    [ -x /bin/kill ] || missing+=(procps)
    # curl: the HTTP API's tests (and the setup's example) use it.
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    # A C++ compiler: cargo fuzz builds libFuzzer from its C++ source (a minimal Debian with
    # Rust has gcc, not g++).
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        say "installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    fi
    # Debian starts the packaged broker as a service where systemd runs; the tests start
    # their own on free ports, and setup.sh starts one only if none listens.
}

require_toolchain() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
    command -v python3 >/dev/null 2>&1 || die "python3 not found: apt-get install python3"
}

prepare_models() {
    bash "$ROOT/models/prepare.sh"
}

# The real clients the tests run against emberd: the openai and ollama packages (into .venv)
# and Debian's headless Chromium, which loads the device page.
install_test_clients() {
    "$ROOT/.venv/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/tests/requirements.txt" \
        || die "pip install -r tests/requirements.txt failed (is PyPI reachable?)"
    if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        say "installing Debian's headless Chromium (the device page's test)"
        $sudo apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium-headless-shell \
            || die "apt-get install chromium-headless-shell failed"
    fi
}

# ONNX Runtime (the library emberd loads, and the Python package the model preparation and
# checks use) otherwise writes telemetry under ~/.cache and looks up Microsoft's collector.
export ORT_DISABLE_TELEMETRY=1
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/vendor/onnxruntime/lib/libonnxruntime.so}"
