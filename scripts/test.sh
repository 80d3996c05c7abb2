#!/usr/bin/env bash
# The whole test suite (what CI runs): installs what is missing, prepares the models,
# checks formatting and lints, then runs the Python model checks and the Rust tests against
# the real ONNX Runtime library, tract, mosquitto and the real models; then the units under
# a real systemd (nspawn) and the Rust tests for aarch64 and armv7 (tract only) under qemu-user.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_toolchain
install_apt_packages
# The OpenVINO build of ONNX Runtime too (x86-64 Linux): tests/openvino.rs serves with it.
EMBERD_OPENVINO=1 prepare_models
# Real exports made by Optimum and onnxruntime-genai's builder from the default GGUF (torch in
# its own venv; both cached by content hash outside the clone): tests/exports.rs.
bash models/real_exports.sh
install_test_clients

say "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
say "cargo clippy"
cargo clippy --release --locked --all-targets -- -D warnings
# The build without the tract engine (smaller binary, ONNX Runtime only) stays clean too.
cargo clippy --release --locked --no-default-features --lib --bins -- -D warnings
say "model package checks (pytest)"
.venv/bin/python -m pytest models/tests -q
say "Rust tests"
cargo test --release --locked
# The build without tract (ONNX Runtime only) is tested too, not only linted: its unit tests,
# and one that serves a step with ONNX Runtime and names the missing engine.
cargo test --release --locked --no-default-features --lib
# Each fuzz target for a short run (instrumented build in fuzz/target); fuzz/run.sh says how
# to run them longer.
say "fuzzing (cargo fuzz, ${EMBERD_FUZZ_SECONDS:-20} s per target)"
bash fuzz/run.sh "${EMBERD_FUZZ_SECONDS:-20}" || die "a fuzz target failed (its input and the command to reproduce it are above)"

# Both exit 3 when this machine cannot do what they need (boot a container; install the
# Rust target or cross toolchain): on a developer's machine that is reported loudly and not
# counted as a failure. With EMBERD_STRICT=1 (.ci/run sets it: CI runs as root on a machine
# that can do both) a skip fails the run, so a suite cannot quietly stop running.
run_or_report() {
    local what="$1"; shift
    say "$what"
    local rc=0
    "$@" || rc=$?
    case "$rc" in
        0) ;;
        3) if [ "${EMBERD_STRICT:-0}" = 1 ]; then
               die "$what was skipped (see the message above), and EMBERD_STRICT=1 counts a skip as a failure"
           fi
           say "SKIPPED: $what cannot run on this machine (see the message above)" ;;
        *) die "$what failed (exit $rc)" ;;
    esac
}
run_or_report "systemd units under a real systemd (systemd-nspawn)" bash tests/systemd/nspawn.sh target/release/emberd
# Under emulation the engines, the generator and the daemon's own transports (socket, MQTT,
# systemd) run; the HTTP suites (tests/http.rs, tests/transports.rs) are framing over the same
# ingress, with no code that differs by architecture, and run natively above: under qemu they
# added over 20 minutes (a default-model daemon per test). Under qemu-aarch64, tract on the
# default model (the exact-reference test) ran for over 14 minutes with its two threads
# spinning; the native run keeps it, and the tiny models check tract's aarch64 kernels here.
emulated_suites=(--lib --bins --test engines --test generation --test daemon --test mqtt --test service)
# The coalescing test (the generator's timing of token events, nothing architecture-specific)
# runs three default-model requests of 64 tokens: about 5 minutes emulated on aarch64, more
# with tract on armv7. Both targets skip it; it runs natively above.
run_or_report "the test suite for aarch64 under qemu-user" bash cross/test.sh aarch64 \
    "${emulated_suites[@]}" -- --skip tract_matches_the_exact_reference_on_the_default_model \
    --skip a_stream_interval_coalesces_pieces_into_few_token_events
run_or_report "the test suite for armv7 (tract only) under qemu-user" bash cross/test.sh armv7 \
    "${emulated_suites[@]}" -- --skip a_stream_interval_coalesces_pieces_into_few_token_events
