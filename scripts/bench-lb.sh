#!/usr/bin/env bash
# Connections per second and bulk throughput through toa-lb against the
# kernel doing the same FULLNAT with nftables (dnat + snat, no TOA), in one
# run on the testbed: the pnet datapath (one frame per system call: the
# "before") and the ring datapath (the default: the "after"), TOA on and off.
# Needs root. Prints the ratios.
# Usage: scripts/bench-lb.sh [SECONDS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
[ "$(id -u)" = 0 ] || { echo "bench-lb.sh: needs root" >&2; exit 1; }
cargo build --release -q -p toa-lb-injector --bin toa-lb -p toa-examples --bin accept-bench --bin bulk-bench
bin=./target/release
. scripts/lib/session.sh
session "tbench$$"
./scripts/testbed.sh up "$prefix" 1 >/dev/null
lbns="$prefix-lb"; be="$prefix-be1"; client="$prefix-client"
ip netns exec "$be" "$bin/bulk-bench" --serve 0.0.0.0:8081 & pids+=($!)

measure() { # prints "conn/s MB/s"
    local port=$((18000 + RANDOM % 1000))
    ip netns exec "$client" "$bin/accept-bench" --load 203.0.113.10:80 --seconds $((seconds + 3)) &
    local load=$!
    # The backend server listens on 8080 (what the VIP's port 80 maps to).
    local rate
    rate=$(ip netns exec "$be" "$bin/accept-bench" --serve 0.0.0.0:8080 --seconds "$seconds" 2>/dev/null)
    wait "$load" 2>/dev/null || true
    local mbs
    mbs=$(ip netns exec "$client" "$bin/bulk-bench" --send 203.0.113.10:81 --seconds "$seconds")
    echo "$rate $mbs"
    : "$port"
}

lb_run() { # MODE DATAPATH
    cat >"$work/lb.toml" <<TOML
datapath = "$2"
${BENCH_LB_EXTRA:-}
client_interface = "lb-c"
backend_interface = "lb-br"
snat = ["100.125.1.1", "100.125.1.2", "100.125.1.3", "100.125.1.4"]
[[listener]]
vip = "203.0.113.10:80"
obtain_client_ip = "$1"
[[listener.backend]]
address = "100.125.2.1:8080"
[[listener]]
vip = "203.0.113.10:81"
obtain_client_ip = "$1"
[[listener.backend]]
address = "100.125.2.1:8081"
TOML
    ip netns exec "$lbns" "$bin/toa-lb" run --config "$work/lb.toml" 2>/dev/null &
    local lb=$!
    sleep 1
    measure
    kill "$lb"; wait "$lb" 2>/dev/null || true
}

kernel_run() {
    ip netns exec "$lbns" ip addr add 203.0.113.10/32 dev lb-c
    for i in 1 2 3 4; do ip netns exec "$lbns" ip addr add "100.125.1.$i/32" dev lb-br; done
    ip netns exec "$lbns" sysctl -qw net.ipv4.ip_forward=1
    ip netns exec "$lbns" nft -f - <<NFT
table ip bench_fullnat {
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr 203.0.113.10 tcp dport 80 dnat to 100.125.2.1:8080
    ip daddr 203.0.113.10 tcp dport 81 dnat to 100.125.2.1:8081
  }
  chain post {
    type nat hook postrouting priority srcnat;
    ip daddr 100.125.2.1 snat to 100.125.1.1-100.125.1.4 fully-random
  }
}
NFT
    measure
    ip netns exec "$lbns" nft delete table ip bench_fullnat
    ip netns exec "$lbns" sysctl -qw net.ipv4.ip_forward=0
    ip netns exec "$lbns" ip addr del 203.0.113.10/32 dev lb-c
    for i in 1 2 3 4; do ip netns exec "$lbns" ip addr del "100.125.1.$i/32" dev lb-br; done
}

read -r kc kb < <(kernel_run)
read -r pc pb < <(lb_run toa pnet)
read -r tc tb < <(lb_run toa ring)
read -r oc ob < <(lb_run off ring)
printf '%-34s %10s %10s %16s\n' "path" "conn/s" "MB/s" "ratio to kernel"
row() { awk -v n="$1" -v c="$2" -v b="$3" -v kc="$kc" -v kb="$kb" \
    'BEGIN { printf "%-34s %10s %10s    %5.2f  %5.2f\n", n, c, b, c / kc, b / kb }'; }
row "kernel nftables FULLNAT (no TOA)" "$kc" "$kb"
row "toa-lb pnet, TOA on (before)" "$pc" "$pb"
row "toa-lb ring, TOA on (after)" "$tc" "$tb"
row "toa-lb ring, TOA off" "$oc" "$ob"
