#!/usr/bin/env bash
# Accepted connections per second on loopback, plain listener vs ToaListener
# (saved SYN) and vs capture mode (as root or with CAP_NET_RAW), std and
# tokio, interleaved in one run; prints the ratios.
# Arguments go to the benchmark (default: --seconds 3 --rounds 6).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p toa-examples --bin accept-bench
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--seconds 3 --rounds 6)
exec ./target/release/accept-bench "${args[@]}"
