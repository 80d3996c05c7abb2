#!/usr/bin/env bash
# The whole test suite (what CI runs): installs what is missing, prepares the models,
# checks formatting and lints, then runs the Python model checks and the Rust tests against
# the real ONNX Runtime library, tract, mosquitto and the real models.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_toolchain
install_apt_packages
prepare_models

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --release --locked --all-targets -- -D warnings
say "model package checks (pytest)"
.venv/bin/python -m pytest models/tests -q
say "Rust tests"
cargo test --release --locked
