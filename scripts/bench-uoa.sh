#!/usr/bin/env bash
# What the kernel helper's UDP programs cost an unmodified UDP server: the
# datagrams per second a plain echo server (examples/src/bin/udp-bench.rs, no
# toa code in it) answers in a cgroup, with and without the helper attached
# (UDP on, its tc program on the backend's link), rounds alternating.
#
# The load comes from the LB's namespace of the testbed, from a trusted
# address (100.125.0.1), as toa-lb's flows do: each flow's first datagram
# carries an ipo UOA, so with the helper every datagram goes through its tc
# program and recvmsg hook, and every reply through its sendmsg hook (back
# to the sender: the check that the hooks worked). toa-lb itself is left
# out: it would be the bottleneck, and hide what the helper costs.
# Needs root. Prints the rounds, then the means and the ratio with/without.
# Usage: scripts/bench-uoa.sh [SECONDS_PER_ROUND] [ROUNDS]   (default 3 6)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
rounds=${2:-6}
[ "$(id -u)" = 0 ] || { echo "bench-uoa.sh: needs root (it attaches the kernel helper)" >&2; exit 1; }
cargo build --release -q -p toa-examples --bin udp-bench -p toa-server-shim --bin toa-shim
bin=$PWD/target/release
. scripts/lib/session.sh
helper_session "tbu$$"
./scripts/testbed.sh up "$prefix" 1 >/dev/null

port=5400
rate() { # prints the server's datagrams/s
    port=$((port + 1))
    sh -c "echo \$\$ > $cgroup/cgroup.procs && exec nsenter --net=/run/netns/$prefix-be1 $bin/udp-bench --serve 100.125.2.1:$port --seconds $seconds" >"$work/serve" &
    local server=$!
    sleep 0.2
    ip netns exec "$prefix-lb" "$bin/udp-bench" --load "100.125.2.1:$port" --seconds "$((seconds + 2))" --uoa >/dev/null
    wait "$server"
    cat "$work/serve"
}

declare -A sum
for round in $(seq "$rounds"); do
    for mode in $([ $((round % 2)) = 1 ] && echo "off on" || echo "on off"); do
        [ "$mode" = on ] && nsenter --net=/run/netns/"$prefix-be1" "$bin/toa-shim" ebpf attach \
            --cgroup "$cgroup" --trust-preset huawei-elb --udp-iface b0 >/dev/null
        # A 1-second run after each switch, not counted (as bench-ebpf.sh).
        seconds=1 rate >/dev/null
        r=$(rate)
        if [ "$mode" = on ]; then
            counters=$("$bin/toa-shim" ebpf status | sed -n 's/.*\(udp_found=[0-9]*\).*\(udp_received=[0-9]*\) \(udp_sent=[0-9]*\).*/\1 \2 \3/p')
            "$bin/toa-shim" ebpf detach >/dev/null
            echo "round $round: helper attached  $r datagrams/s ($counters)" >&2
        else
            echo "round $round: helper detached  $r datagrams/s" >&2
        fi
        sum[$mode]=$(awk -v a="${sum[$mode]:-0}" -v b="$r" 'BEGIN { print a + b }')
    done
done
awk -v off="${sum[off]}" -v on="${sum[on]}" -v n="$rounds" -v s="$seconds" 'BEGIN {
    printf "echo server, %d rounds of %ss: without the helper %.0f datagrams/s, with %.0f: ratio %.3f\n",
        n, s, off / n, on / n, on / off }'
