#!/usr/bin/env bash
# What the kernel helper costs a server: accepted connections per second of a
# plain std server (no toa code in it) in a cgroup, with and without the
# helper attached to that cgroup, rounds alternating, in two cases:
#   (a) untrusted: connections over loopback, which the helper does not trust
#       (it trusts 100.125.0.0/16): the traffic of everything but the LB;
#   (b) production: every connection from a trusted LB with a TOA in the
#       handshake's ACK (toa-lb's kernel datapath, placement ack only, on the
#       testbed; the server in a backend namespace).
# Needs root. Prints the rounds, then the means and the ratio with/without.
# Usage: scripts/bench-ebpf.sh [SECONDS_PER_ROUND] [ROUNDS]   (default 3 6)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
rounds=${2:-6}
[ "$(id -u)" = 0 ] || { echo "bench-ebpf.sh: needs root (it attaches the kernel helper)" >&2; exit 1; }
cargo build --release -q -p toa-examples --bin accept-bench -p toa-server-shim --bin toa-shim \
    -p toa-lb-injector --bin toa-lb
bin=./target/release
. scripts/lib/session.sh
helper_session "tbe$$"

# (b)'s testbed: client -> toa-lb (TOA in the handshake ACK only) -> backend.
./scripts/testbed.sh up "$prefix" 1 >/dev/null
cat >"$work/lb.toml" <<TOML
client_interface = "lb-c"
backend_interface = "lb-br"
snat = ["100.125.1.1", "100.125.1.2", "100.125.1.3", "100.125.1.4"]
health = { enabled = false }
[[listener]]
vip = "203.0.113.10:80"
obtain_client_ip = "toa"
placement = { syn = false, ack = true }
[[listener.backend]]
address = "100.125.2.1:8080"
TOML
ip netns exec "$prefix-lb" "$bin/toa-lb" run --config "$work/lb.toml" --socket "$work/ctl.sock" 2>"$work/lb.log" &
pids+=($!)
lb_ready "$!" "$work/lb.log"

# The server joins the cgroup, then (b) enters the backend's namespace.
serve() { # ADDR [NETNS]
    local enter=""
    [ -n "${2:-}" ] && enter="nsenter --net=/run/netns/$2"
    sh -c "echo \$\$ > $cgroup/cgroup.procs && exec $enter $bin/accept-bench --serve $1 --only plain-std --seconds $seconds" 2>/dev/null
}
port=18700
rate_untrusted() {
    port=$((port + 1))
    "$bin/accept-bench" --load "127.0.0.1:$port" --seconds "$((seconds + 3))" &
    local load=$!
    serve "127.0.0.1:$port"
    wait "$load"
}
rate_lb() {
    ip netns exec "$prefix-client" "$bin/accept-bench" --load 203.0.113.10:80 --seconds "$((seconds + 3))" &
    local load=$!
    serve "0.0.0.0:8080" "$prefix-be1"
    wait "$load"
}

declare -A sum
for round in $(seq "$rounds"); do
    for case in untrusted lb; do
        for mode in $([ $((round % 2)) = 1 ] && echo "off on" || echo "on off"); do
            [ "$mode" = on ] && "$bin/toa-shim" ebpf attach --cgroup "$cgroup" --trust-preset huawei-elb --no-udp >/dev/null
            # A 1-second run after each switch, not counted: the first run after a
            # switch was 6-22% slower whichever side it was.
            seconds=1 "rate_$case" >/dev/null
            rate=$("rate_$case")
            if [ "$mode" = on ]; then
                found=$("$bin/toa-shim" ebpf status | sed -n 's/.* found=\([0-9]*\).*/\1/p')
                "$bin/toa-shim" ebpf detach >/dev/null
                echo "round $round: ($case) helper attached  $rate accepts/s (TOAs found: $found)" >&2
            else
                echo "round $round: ($case) helper detached  $rate accepts/s" >&2
            fi
            sum[$case$mode]=$(( ${sum[$case$mode]:-0} + rate ))
        done
    done
done
for case in untrusted lb; do
    label=$([ "$case" = untrusted ] && echo "(a) untrusted peers (loopback)" || echo "(b) trusted LB, TOA in the ACK")
    awk -v l="$label" -v off="${sum[${case}off]}" -v on="${sum[${case}on]}" -v r="$rounds" \
        'BEGIN { printf "%-34s without %6.0f  with %6.0f accepts/s  ratio %.3f\n", l, off / r, on / r, on / off }'
done
