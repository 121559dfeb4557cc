#!/usr/bin/env bash
# The LB testbed: network namespaces for a client, the load balancer and N
# backends, all traffic inside them.
#
#   client (PREFIX-client)  c0 203.0.113.2/24, 2001:db8:c::2/64
#        |  veth
#   LB (PREFIX-lb)          lb-c 203.0.113.1/24, 2001:db8:c::1/64
#                             (toa-lb answers the VIPs 203.0.113.10, 2001:db8:c::10)
#                           lb-br 100.125.0.1/16, 2001:db8:64::1/64 (a bridge;
#                             toa-lb answers the SNATs 100.125.1.1, 2001:db8:64::1:1)
#        |  veths on the bridge
#   backends (PREFIX-beN)   b0 100.125.2.N/16, 2001:db8:64::2:N/64
#
# Usage: scripts/testbed.sh up|down|relink [PREFIX] [BACKENDS]   (defaults: toa, 2)
# relink deletes the client link (c0 - lb-c) and makes it again.
# OFFLOADS=off turns the offloads of every veth and the bridge off, as the
# user-space datapaths (ring, pnet) need; the default leaves them on, as the
# kernel sets them and the kernel datapath runs.
set -euo pipefail
action=${1:-}
prefix=${2:-toa}
backends=${3:-2}
offloads=${OFFLOADS:-on}
ns() { ip netns exec "$1" "${@:2}"; }
# With OFFLOADS=off: the user-space datapath must see real frames, not 64 KiB
# GSO batches, and finished checksums (with tx checksum offload a veth hands
# over only the pseudo-header sum, which rewriting would carry into an
# invalid packet).
no_offload() {
    [ "$offloads" = off ] || return 0
    command -v ethtool >/dev/null || { echo "testbed.sh: OFFLOADS=off needs ethtool" >&2; return 1; }
    ns "$1" ethtool -K "$2" tx off tso off gso off gro off >/dev/null 2>&1
}

# The client's veth pair, c0 - lb-c.
client_link() {
    ip link add c0 netns "$prefix-client" type veth peer name lb-c netns "$prefix-lb"
    ns "$prefix-client" ip addr add 203.0.113.2/24 dev c0
    ns "$prefix-client" ip -6 addr add 2001:db8:c::2/64 dev c0 nodad
    ns "$prefix-client" ip link set c0 up
    ns "$prefix-lb" ip addr add 203.0.113.1/24 dev lb-c
    ns "$prefix-lb" ip -6 addr add 2001:db8:c::1/64 dev lb-c nodad
    ns "$prefix-lb" ip link set lb-c up
    no_offload "$prefix-client" c0
    no_offload "$prefix-lb" lb-c
}

down() {
    for n in $(ip netns list | awk '{print $1}' | grep -E "^${prefix}-(client|lb|be[0-9]+)$" || true); do
        ip netns del "$n"
    done
}

up() {
    down
    # A step that fails leaves nothing half built.
    trap 'down; echo "testbed.sh: setting up $prefix failed" >&2' ERR
    ip netns add "$prefix-client"
    ip netns add "$prefix-lb"
    for n in "$prefix-client" "$prefix-lb"; do ns "$n" ip link set lo up; done
    client_link
    ns "$prefix-lb" ip link add lb-br type bridge
    ns "$prefix-lb" ip addr add 100.125.0.1/16 dev lb-br
    ns "$prefix-lb" ip -6 addr add 2001:db8:64::1/64 dev lb-br nodad
    ns "$prefix-lb" ip link set lb-br up
    no_offload "$prefix-lb" lb-br
    for i in $(seq "$backends"); do
        b="$prefix-be$i"
        ip netns add "$b"
        ns "$b" ip link set lo up
        ip link add b0 netns "$b" type veth peer name "lb-b$i" netns "$prefix-lb"
        ns "$b" ip addr add "100.125.2.$i/16" dev b0
        ns "$b" ip -6 addr add "2001:db8:64::2:$i/64" dev b0 nodad
        ns "$b" ip link set b0 up
        # Replies to clients go through the LB (used by the transparent mode, which keeps the
        # client's address as the source).
        ns "$b" ip route add 203.0.113.0/24 via 100.125.0.1
        ns "$b" ip -6 route add 2001:db8:c::/64 via 2001:db8:64::1
        ns "$prefix-lb" ip link set "lb-b$i" master lb-br up
        no_offload "$b" b0
        no_offload "$prefix-lb" "lb-b$i"
        # TIME_WAIT hygiene for connection-rate runs.
        ns "$b" sysctl -qw net.ipv4.tcp_max_tw_buckets=4096
    done
    ns "$prefix-client" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
}

case "$action" in
    up) up; echo "testbed $prefix up (offloads $offloads): client 203.0.113.2, VIP 203.0.113.10, $backends backends 100.125.2.1-$backends" ;;
    down) down; echo "testbed $prefix down" ;;
    # The client link deleted (if it is there) and made again, as `up` made it
    # (new interface indexes): what an LB had put on lb-c is gone.
    relink) ns "$prefix-lb" ip link del lb-c 2>/dev/null || true; client_link; echo "testbed $prefix: client link made again" ;;
    *) echo "usage: $0 up|down|relink [PREFIX] [BACKENDS]" >&2; exit 2 ;;
esac
