#!/usr/bin/env bash
# Connections per second (2 and 64 closed-loop clients) and one bulk TCP
# stream through toa-lb, against the kernel doing the same FULLNAT with
# nftables (dnat + snat to 4 addresses, fully-random, no TOA), in one run on
# the testbed. The kernel is measured as its users run it, with the veths'
# offloads on, and also with them off, the handicap the user-space ring
# datapath needs:
#   kernel FULLNAT, offloads on       the baseline
#   toa-lb kernel datapath, TOA on    offloads on
#   toa-lb kernel datapath, TOA off   offloads on
#   kernel FULLNAT, offloads off      the ring datapath's own baseline
#   toa-lb ring datapath, TOA on      offloads off
# Needs root. The paths run ROUNDS times, in a rotated order each round (so
# that none always runs first or last on this noisy shared machine); prints
# each round, then the means with ratios to both baselines.
# Usage: scripts/bench-lb.sh [SECONDS] [ROUNDS]   (defaults 3, 5)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
rounds=${2:-5}
[ "$(id -u)" = 0 ] || { echo "bench-lb.sh: needs root" >&2; exit 1; }
cargo build --release -q -p toa-lb-injector --bin toa-lb -p toa-examples --bin accept-bench --bin bulk-bench
bin=./target/release
. scripts/lib/session.sh
session "tbench$$"
./scripts/testbed.sh up "$prefix" 1 >/dev/null
lbns="$prefix-lb"; be="$prefix-be1"; client="$prefix-client"
ip netns exec "$be" "$bin/bulk-bench" --serve 0.0.0.0:8081 >/dev/null & pids+=($!)

offloads() { # on|off, on every veth and the bridge
    ip netns exec "$client" ethtool -K c0 tx "$1" tso "$1" gso "$1" gro "$1" >/dev/null 2>&1
    ip netns exec "$be" ethtool -K b0 tx "$1" tso "$1" gso "$1" gro "$1" >/dev/null 2>&1
    for i in lb-c lb-br lb-b1; do
        ip netns exec "$lbns" ethtool -K "$i" tx "$1" tso "$1" gso "$1" gro "$1" >/dev/null 2>&1
    done
}

conn_rate() { # CLIENTS: connections per second with that many closed-loop clients
    ip netns exec "$client" "$bin/accept-bench" --load 203.0.113.10:80 --clients "$1" --seconds $((seconds + 3)) &
    local load=$!
    # The backend server listens on 8080 (what the VIP's port 80 maps to).
    ip netns exec "$be" "$bin/accept-bench" --serve 0.0.0.0:8080 --seconds "$seconds" 2>/dev/null
    wait "$load" 2>/dev/null || true
}

measure() { # prints "conn/s(2 clients) conn/s(64 clients) MB/s"
    local few many mbs
    few=$(conn_rate 2)
    many=$(conn_rate 64)
    mbs=$(ip netns exec "$client" "$bin/bulk-bench" --send 203.0.113.10:81 --seconds "$seconds")
    echo "$few $many $mbs"
}

lb_run() { # MODE DATAPATH
    cat >"$work/lb.toml" <<TOML
datapath = "$2"
${BENCH_LB_EXTRA:-}
client_interface = "lb-c"
backend_interface = "lb-br"
snat = ["100.125.1.1", "100.125.1.2", "100.125.1.3", "100.125.1.4"]
# iperf-like servers take health probes for clients; the benchmark needs none.
health = { enabled = false }
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
    ip netns exec "$lbns" "$bin/toa-lb" run --config "$work/lb.toml" --socket "$work/ctl.sock" 2>"$work/lb.log" &
    local lb=$!
    lb_ready "$lb" "$work/lb.log"
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

paths=("kernel FULLNAT, offloads on (baseline)" "toa-lb kernel, TOA on" "toa-lb kernel, TOA off"
    "kernel FULLNAT, offloads off" "toa-lb ring, TOA on, offloads off")
run_path() {
    case "$1" in
        0) offloads on; kernel_run ;;
        1) offloads on; lb_run toa kernel ;;
        2) offloads on; lb_run off kernel ;;
        3) offloads off; kernel_run ;;
        4) offloads off; lb_run toa ring ;;
    esac
}
n=${#paths[@]}
declare -a few=(0 0 0 0 0) many=(0 0 0 0 0) mbs=(0 0 0 0 0)
for round in $(seq "$rounds"); do
    for k in $(seq 0 $((n - 1))); do
        i=$(( (k + round - 1) % n ))
        # (Not `< <(...)`: the next path must not start while this one's toa-lb still cleans up.)
        result=$(run_path "$i")
        read -r f m b <<<"$result"
        echo "round $round: ${paths[$i]}: $f conn/s (2 clients), $m conn/s (64 clients), $b MB/s" >&2
        few[$i]=$((few[i] + f)); many[$i]=$((many[i] + m)); mbs[$i]=$((mbs[i] + b))
    done
done
echo "conn/s: closed-loop clients, 2 (latency-bound) and 64 (a loaded LB); MB/s: one bulk stream"
printf '%-38s %9s %9s %8s   %-17s  %s\n' "path (mean of $rounds rounds)" "conn/s 2" "conn/s 64" "MB/s" \
    "to offloads on" "to offloads off"
for i in $(seq 0 $((n - 1))); do
    awk -v n="${paths[$i]}" -v f="${few[$i]}" -v m="${many[$i]}" -v b="${mbs[$i]}" \
        -v kf="${few[0]}" -v km="${many[0]}" -v kb="${mbs[0]}" \
        -v of="${few[3]}" -v om="${many[3]}" -v ob="${mbs[3]}" -v r="$rounds" \
        'BEGIN { printf "%-38s %9.0f %9.0f %8.0f   %4.2f %4.2f %4.2f     %4.2f %4.2f %4.2f\n",
            n, f / r, m / r, b / r, f / kf, m / km, b / kb, f / of, m / om, b / ob }'
done
