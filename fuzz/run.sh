#!/usr/bin/env bash
# Builds every fuzz target, then runs each in turn for a bounded time and prints its
# executions and findings. Usage: fuzz/run.sh [SECONDS per target, default 60].
#
# The seeds in fuzz/corpus/<target> are only read; what a run adds goes to
# fuzz/target/corpus/<target> (not in git) and is reused by the next run. Findings land in
# fuzz/artifacts/<target>/; the script exits non-zero if any target found something.
set -euo pipefail

seconds="${1:-60}"
cd "$(dirname "$0")/.."

cargo +nightly fuzz build
status=0
printf '%-12s %8s %12s %9s\n' target seconds executions findings
for target in $(cargo +nightly fuzz list); do
    work="fuzz/target/corpus/$target"
    artifacts="fuzz/artifacts/$target"
    log="fuzz/target/run-$target.log"
    mkdir -p "$work" "$artifacts"
    before=$(find "$artifacts" -type f | wc -l)
    start=$SECONDS
    # libFuzzer stops itself after -max_total_time; the outer timeout is a backstop.
    if ! timeout --signal=INT --kill-after=30 "$((seconds + 120))" \
        cargo +nightly fuzz run "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        status=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    found=$(($(find "$artifacts" -type f | wc -l) - before))
    printf '%-12s %8s %12s %9s\n' "$target" "$((SECONDS - start))" "${execs:-?}" "$found"
    if [ "$found" -gt 0 ]; then
        status=1
        echo "  see $log and $artifacts/"
    fi
done
exit "$status"
