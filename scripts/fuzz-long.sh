#!/usr/bin/env bash
# Fuzzing at scale: each cargo-fuzz target (or the ones named) for MAX_RUNS
# executions or MAX_SECONDS, whichever comes first (defaults: 10 million, 20
# minutes), starting from its committed corpus; then the corpus is minimised
# (cargo fuzz cmin) into fuzz/corpus/TARGET, to be committed. Prints, per
# target, the executions, the time, the coverage (edges, libFuzzer's `cov:`)
# and the corpus size. A crash stops the script with the input's path.
# Usage: scripts/fuzz-long.sh [TARGET...]   (env: MAX_RUNS, MAX_SECONDS, NICE)
set -euo pipefail
cd "$(dirname "$0")/.."
max_runs=${MAX_RUNS:-10000000}
max_seconds=${MAX_SECONDS:-1200}
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
summary=()
for target in "${targets[@]}"; do
    log=$(mktemp)
    work=$(mktemp -d)
    cp fuzz/corpus/"$target"/* "$work"/
    start=$(date +%s)
    echo "--- $target: up to $max_runs runs or ${max_seconds}s" >&2
    if ! (cd fuzz && RUSTC_BOOTSTRAP=1 nice -n "${NICE:-10}" cargo fuzz run "$target" "$work" -- \
        -runs="$max_runs" -max_total_time="$max_seconds" -print_final_stats=1) >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz-long.sh: $target failed; the input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    seconds=$(($(date +%s) - start))
    runs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
    cov=$(grep -E '^#[0-9]+' "$log" | grep -o 'cov: [0-9]*' | tail -1 | awk '{print $2}')
    # Minimise what was found together with the seeds into the committed corpus.
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz cmin "$target" "$work") >/dev/null 2>&1
    find fuzz/corpus/"$target" -type f ! -name 'seed-*' -delete
    for f in "$work"/*; do
        name=$(basename "$f")
        [ -e fuzz/corpus/"$target"/"$name" ] || cp "$f" fuzz/corpus/"$target"/
    done
    files=$(find fuzz/corpus/"$target" -type f | wc -l)
    summary+=("$(printf '%-14s %12s runs %6ss  cov %5s edges  corpus %5s files' "$target" "$runs" "$seconds" "$cov" "$files")")
    rm -rf "$work" "$log"
done
printf '%s\n' "${summary[@]}"
