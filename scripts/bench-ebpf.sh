#!/usr/bin/env bash
# Accepted connections per second of a plain std server (no toa code in it)
# with and without the kernel helper attached to its cgroup, in one run, the
# rounds alternating; the load comes from a process outside the cgroup, as
# remote clients would. Needs root. Prints the ratio (with / without).
# Usage: scripts/bench-ebpf.sh [SECONDS_PER_ROUND] [ROUNDS]   (default 3 6)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
rounds=${2:-6}
[ "$(id -u)" = 0 ] || { echo "bench-ebpf.sh: needs root (it attaches the kernel helper)" >&2; exit 1; }
cargo build --release -q -p toa-examples --bin accept-bench -p toa-server-shim --bin toa-shim
shim=./target/release/toa-shim
if [ -d /sys/fs/bpf/toa ]; then
    echo "bench-ebpf.sh: the helper is attached already; detach it first" >&2
    exit 1
fi
root=$(awk '$3 == "cgroup2" { print $2 }' /proc/mounts | awk '{ print length, $0 }' | sort -n | head -1 | cut -d' ' -f2)
cgroup="$root/toa-bench-$$"
mkdir "$cgroup"
cleanup() { "$shim" ebpf detach >/dev/null 2>&1 || true; rmdir "$cgroup" 2>/dev/null || true; }
trap cleanup EXIT

# Runs the plain server in the cgroup and the load outside it (as clients
# elsewhere would be), and prints the server's accepts/s.
port=18700
run() {
    port=$((port + 1))
    ./target/release/accept-bench --load "127.0.0.1:$port" --seconds "$((seconds + 3))" &
    local load=$!
    sh -c "echo \$\$ > $cgroup/cgroup.procs && exec ./target/release/accept-bench --serve 127.0.0.1:$port --only plain-std --seconds $seconds" 2>/dev/null
    wait "$load"
}

without=0; with=0
for round in $(seq "$rounds"); do
    for mode in $([ $((round % 2)) = 1 ] && echo "off on" || echo "on off"); do
        if [ "$mode" = on ]; then
            "$shim" ebpf attach --cgroup "$cgroup" --trust 127.0.0.0/8 >/dev/null
            rate=$(run); with=$((with + rate))
            "$shim" ebpf detach >/dev/null
            echo "round $round: helper attached  $rate accepts/s" >&2
        else
            rate=$(run); without=$((without + rate))
            echo "round $round: helper detached  $rate accepts/s" >&2
        fi
    done
done
echo "without helper: $((without / rounds)) accepts/s"
echo "with helper:    $((with / rounds)) accepts/s"
awk -v a="$with" -v b="$without" 'BEGIN { printf "ratio with/without: %.3f\n", a / b }'
