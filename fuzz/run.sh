#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each and prints a line per target:
# executions, coverage (libFuzzer's cov/ft) and the corpus size. Exits non-zero, naming the
# input, on the first crash, failed assertion or time-out.
#
#   bash fuzz/run.sh 20                  # the test command's short run
#   bash fuzz/run.sh 600 request config  # a long run of two targets
#
# cargo fuzz with `--sanitizer none` builds on the stable toolchain: AddressSanitizer needs
# nightly's -Zsanitizer, but libFuzzer's coverage instrumentation (sancov) is stable, and the
# code these targets reach is safe Rust, where the sanitizer would find nothing more than the
# panics and assertions already caught. New inputs go to fuzz/corpus/TARGET (not in git);
# fuzz/seeds/TARGET is the committed seed corpus.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(request http_body config template detok_stop response_format)
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz@0.13.2
if [ -z "${EMBERD_FUZZ_MODEL:-}" ] && [ ! -f ../models/smollm2-135m-instruct/tokenizer.json ]; then
    echo "[fuzz] the default model is missing: run models/prepare.sh first" >&2
    exit 1
fi
# -O: optimized, with debug assertions (so integer overflow panics) still on.
flags=(--sanitizer none -O)
echo "[fuzz] building the targets (instrumented, in fuzz/target)"
cargo fuzz build "${flags[@]}" || { echo "[fuzz] building the targets failed (above)" >&2; exit 1; }
mkdir -p logs
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    log="logs/$target.log"
    # -timeout: one input taking over 10 s is a finding (a request that stalls the ingress).
    if ! cargo fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "[fuzz] $target FAILED; the input is under fuzz/artifacts/$target/;" \
            "reproduce with: cd fuzz && cargo fuzz run ${flags[*]} $target ARTIFACT" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    printf '[fuzz] %-16s %4ss  %10s execs  cov %6s  ft %6s  corpus %s\n' \
        "$target" "$seconds" "$execs" "$cov" "$ft" "$(ls "corpus/$target" | wc -l)"
done
