# Sourced by the scripts that run things on a testbed of their own (demo.sh,
# bench-lb.sh, bench-ebpf.sh, bench-uoa.sh): `session PREFIX` sets $prefix and $work,
# collects background pids in $pids, and on exit kills them, tears the
# testbed down and removes $work. `lb_ready PID LOG` waits for toa-lb.
session() {
    prefix="$1"
    work=$(mktemp -d)
    pids=()
    trap session_end EXIT
}

# Waits (10 s at most) until the toa-lb of PID says, last in LOG, that it runs
# (its rules are in and the injector attached); else prints its log and exits 1.
lb_ready() {
    for _ in $(seq 200); do
        grep -q "running on the interfaces" "$2" && return 0
        kill -0 "$1" 2>/dev/null || break
        sleep 0.05
    done
    echo "$(basename "$0"): toa-lb did not start; its log:" >&2
    cat "$2" >&2
    exit 1
}

session_end() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ./scripts/testbed.sh down "$prefix" >/dev/null 2>&1 || true
    rm -rf "$work"
}

# For the helper's benchmarks: `helper_session PREFIX` refuses to run over an
# attached helper, makes $cgroup (a cgroup of its own under the cgroup v2
# root), starts the session, and on exit detaches the helper ($bin/toa-shim),
# ends the session and removes the cgroup.
helper_session() {
    if [ -d /sys/fs/bpf/toa ]; then
        echo "$(basename "$0"): the helper is attached already; detach it first" >&2
        exit 1
    fi
    local root
    root=$(awk '$3 == "cgroup2" { print $2 }' /proc/mounts | awk '{ print length, $0 }' | sort -n | head -1 | cut -d' ' -f2)
    cgroup="$root/toa-bench-$1"
    mkdir "$cgroup"
    session "$1"
    trap helper_session_end EXIT
}

helper_session_end() {
    "$bin/toa-shim" ebpf detach >/dev/null 2>&1 || true
    session_end
    rmdir "$cgroup" 2>/dev/null || true
}
