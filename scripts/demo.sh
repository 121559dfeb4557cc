#!/usr/bin/env bash
# The demo: a client, toa-lb (a FULLNAT load balancer talking to backends from
# 100.125.1.1, as Huawei ELB does from 100.125.0.0/16) and two `whoami`
# backends, each in its own network namespace. With "Obtain Client IP" on,
# the backends name the real client; off, they see the load balancer.
# Needs root. Everything is torn down at the end, on Ctrl-C or on failure.
# Exits non-zero, with toa-lb's log, when any answer is missing or names
# another client than expected. DEMO_PROFILE=debug uses debug builds (the
# test script runs the demo that way).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (network namespaces, raw sockets, nftables)" >&2; exit 1; }

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v ethtool >/dev/null || missing+=(ethtool)
if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
. scripts/lib/session.sh
session "toademo$$"
trap 'exit 130' INT TERM

profile=${DEMO_PROFILE:-release}
say "1. Building toa-lb, whoami and toa-shim ($profile)"
cargo build --profile "$([ "$profile" = debug ] && echo dev || echo "$profile")" -q \
    -p toa-lb-injector --bin toa-lb -p toa-examples --bin whoami -p toa-server-shim --bin toa-shim
bin=./target/$profile

say "2. Testbed: client 203.0.113.2 -> VIP 203.0.113.10:80 -> backends 100.125.2.1, 100.125.2.2 (:8080)"
./scripts/testbed.sh up "$prefix" 2 >/dev/null
for i in 1 2; do
    ip netns exec "$prefix-be$i" "$bin/whoami" --listen 0.0.0.0:8080 --trust 100.125.0.0/16 2>/dev/null &
    pids+=($!)
done
# Ready means listening: a connection that came earlier would be reset.
listening() { # NETNS PORT
    for _ in $(seq 100); do
        ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q . && return 0
        sleep 0.05
    done
    echo "demo.sh: nothing listens on port $2 in $1" >&2; exit 1
}
listening "$prefix-be1" 8080
listening "$prefix-be2" 8080

config() {
    cat >"$work/lb.toml" <<TOML
client_interface = "lb-c"
backend_interface = "lb-br"
snat = ["100.125.1.1"]

[[listener]]
vip = "203.0.113.10:80"
obtain_client_ip = "$1"
toa_format = "toa"

[[listener.backend]]
address = "100.125.2.1:8080"

[[listener.backend]]
address = "100.125.2.2:8080"
TOML
}
start_lb() {
    config "$1"
    ip netns exec "$prefix-lb" "$bin/toa-lb" run --config "$work/lb.toml" 2>"$work/lb.log" &
    lb=$!
    pids+=($lb)
    lb_ready "$lb" "$work/lb.log"
}
failed=0
ask() { # EXPECTED_CLIENT_IP: four connections, each must name it
    local got
    for _ in 1 2 3 4; do
        got=$(ip netns exec "$prefix-client" timeout 5 bash -c 'exec 3<>/dev/tcp/203.0.113.10/80; cat <&3' 2>&1) \
            || got="${got:+$got }(no answer)"
        echo "   client got: $got"
        if [[ "$got" != "client=$1:"* ]]; then
            echo "   ^ expected client=$1:PORT" >&2
            failed=$((failed + 1))
        fi
    done
}
check() { # after each step: any failure ends the demo, with toa-lb's log
    if ((failed)); then
        echo "demo.sh: $failed connection(s) failed or named the wrong client; toa-lb's log:" >&2
        cat "$work/lb.log" >&2
        exit 1
    fi
}

say "3. toa-lb with obtain_client_ip = \"toa\": each backend names the real client (203.0.113.2)"
start_lb toa
ip netns exec "$prefix-be1" "$bin/toa-shim" inspect --iface b0 --count 200 --timeout 3s --trust 100.125.0.0/16 \
    >"$work/wire.txt" 2>"$work/inspect.log" &
inspect=$!
for _ in $(seq 100); do grep -q "capturing on" "$work/inspect.log" && break; sleep 0.05; done
ask 203.0.113.2
wait "$inspect" 2>/dev/null || true
check
say "   ...and on the wire, as backend 1 receives the SYN (toa-shim inspect --iface b0):"
# The first SYN from an SNAT address (not the LB host's health probes, from 100.125.0.1).
grep -m1 '^100\.125\.1\.[0-9]*:[0-9]* > .* \[S\] ' "$work/wire.txt" | sed 's/^/   /' \
    || { echo "demo.sh: no SYN from toa-lb was captured" >&2; exit 1; }

say "4. Restarted with obtain_client_ip = \"off\": the backends see the load balancer (100.125.1.1)"
kill "$lb"; wait "$lb" 2>/dev/null || true
start_lb off
ask 100.125.1.1
check

kill "$lb"; wait "$lb" 2>/dev/null || true
if ip netns exec "$prefix-lb" nft list table inet toa_lb >/dev/null 2>&1; then
    echo "demo.sh: toa-lb left its nftables rules behind" >&2; exit 1
fi
say "Done: toa-lb stopped and removed its nftables rules; the testbed is torn down."
