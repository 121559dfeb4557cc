# Sourced by the scripts that run things on a testbed of their own (demo.sh,
# bench-lb.sh): `session PREFIX` sets $prefix and $work, collects background
# pids in $pids, and on exit kills them, tears the testbed down and removes $work.
session() {
    prefix="$1"
    work=$(mktemp -d)
    pids=()
    trap session_end EXIT
}

session_end() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ./scripts/testbed.sh down "$prefix" >/dev/null 2>&1 || true
    rm -rf "$work"
}
