#!/usr/bin/env bash
# The one test command. On a fresh Debian 12 machine as root it installs what
# is missing, then runs: a check that the committed eBPF objects are current,
# rustfmt, clippy -D warnings, a fuzz smoke of every cargo-fuzz target, the
# docs (no warnings) and doctests, the Prometheus alerting rules (promtool
# check and unit tests), `cargo publish --dry-run` of toa-core, the
# whole test suite (unit, property, golden and end-to-end tests) with
# cargo-nextest, the kernel datapath's end-to-end tests again with tc filters
# (as kernels before 6.6 attach), the demo twice, and the Debian package built, installed and
# removed (scripts/package.sh --test).
#
# FUZZ_SECONDS (default 20) sets the fuzz time per target; 0 skips the smoke.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
step() { printf '\n==> %s\n' "$*"; }
die() { printf 'test.sh: %s\n' "$*" >&2; exit 1; }

step "checking prerequisites"
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
apt_missing=()
command -v ip >/dev/null || apt_missing+=(iproute2)     # network namespaces for end-to-end tests
command -v g++ >/dev/null || apt_missing+=(g++)         # libfuzzer-sys builds libFuzzer (C++)
command -v sysctl >/dev/null || apt_missing+=(procps)
command -v clang >/dev/null || apt_missing+=(clang)         # rebuilds the eBPF object to check it is current
command -v llvm-strip >/dev/null || apt_missing+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || apt_missing+=(libbpf-dev)
command -v socat >/dev/null || apt_missing+=(socat)         # unmodified servers in the eBPF end-to-end test
command -v python3 >/dev/null || apt_missing+=(python3)
command -v nsenter >/dev/null || apt_missing+=(util-linux)
command -v nft >/dev/null || apt_missing+=(nftables)         # toa-lb keeps the kernel out of its flows
command -v ethtool >/dev/null || apt_missing+=(ethtool)     # the LB testbed turns veth offloads off
command -v bpftool >/dev/null || apt_missing+=(bpftool)     # a test detaches a TCX link as an operator would
if ((${#apt_missing[@]})); then
    [ "$(id -u)" = 0 ] || die "missing ${apt_missing[*]}: run as root, or apt-get install them"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}"
fi
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi
if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13'; then
    cargo install cargo-fuzz --version '^0.13' --locked
fi

step "the committed eBPF object is built from its source"
./scripts/build-bpf.sh --check

step "cargo fmt --check"
cargo fmt --all --check
(cd fuzz && cargo fmt --check)

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd fuzz && cargo clippy --locked -- -D warnings)
# A library user of the shim compiles no BPF loader, CLI or capture code.
cargo clippy -p toa-server-shim --no-default-features --features tokio --locked -- -D warnings

if [ "$FUZZ_SECONDS" != 0 ]; then
    step "fuzz smoke: ${FUZZ_SECONDS}s per target"
    # cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
    for target in $(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list); do
        echo "--- $target"
        # Work in a scratch copy of the seed corpus so the committed one stays clean.
        corpus=$(mktemp -d)
        log=$(mktemp)
        cp fuzz/corpus/"$target"/* "$corpus"/
        if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$corpus" -- \
            -max_total_time="$FUZZ_SECONDS" -print_final_stats=1) >"$log" 2>&1; then
            tail -n 40 "$log"
            die "fuzz target $target failed (crash inputs, if any, are in fuzz/artifacts/$target)"
        fi
        grep -E '^(Done|stat::number_of_executed_units)' "$log" || true
        rm -rf "$corpus" "$log"
    done
fi

step "docs (no warnings) and doctests"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo test --workspace --doc --locked

step "Prometheus alerting rules: promtool check and unit tests"
# promtool from Debian's prometheus package, unpacked into target/tools, not
# installed (installing the package would start a Prometheus server here).
promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
    promtool="$PWD/target/tools/promtool"
    if [ ! -x "$promtool" ]; then
        scratch=$(mktemp -d)
        if ! (cd "$scratch" && apt-get download prometheus >/dev/null 2>&1); then
            [ "$(id -u)" = 0 ] || die "promtool missing: run as root, or apt-get install prometheus"
            apt-get update -qq
            (cd "$scratch" && apt-get download prometheus >/dev/null 2>&1) || die "apt-get download prometheus failed"
        fi
        dpkg-deb -x "$scratch"/prometheus_*.deb "$scratch/root"
        mkdir -p target/tools
        cp "$scratch/root/usr/bin/promtool" "$promtool"
        rm -rf "$scratch"
    fi
fi
"$promtool" check rules deploy/prometheus/toa-alerts.yml
(cd deploy/prometheus && "$promtool" test rules toa-alerts.test.yml)

step "cargo publish --dry-run -p toa-core"
cargo publish --dry-run -p toa-core --locked --quiet --allow-dirty  # (a developer's tree may be dirty; CI's clone is not)

step "tests (cargo nextest)"
[ "$(id -u)" = 0 ] || echo "note: not root, end-to-end tests that need namespaces will skip"
cargo nextest run --workspace --locked --no-fail-fast

step "the kernel datapath's end-to-end tests again, attached as before Linux 6.6 (clsact + tc filters)"
# Debian 12's kernel (6.1) has no TCX: the injector hangs off a clsact qdisc
# there, which lives on after toa-lb, and tc filters outlive a SIGKILL. This
# machine's kernel may have TCX; TOA_LB_TC_NETLINK makes toa-lb attach the
# old way anyway (a restart once failed on the clsact an earlier run left).
TOA_LB_TC_NETLINK=1 cargo nextest run -p toa-lb-injector --test lb_e2e --locked --no-fail-fast kernel

step "the demo, twice, each on a testbed it just created"
# A first run on a new testbed once failed quietly (issue 14); demo.sh now
# checks every answer and exits non-zero with toa-lb's log.
if [ "$(id -u)" = 0 ]; then
    for run in 1 2; do
        DEMO_PROFILE=debug ./scripts/demo.sh >/tmp/toa-demo.$$.log 2>&1 \
            || { cat /tmp/toa-demo.$$.log; die "the demo failed (run $run)"; }
        echo "demo run $run: ok"
    done
    rm -f /tmp/toa-demo.$$.log
else
    echo "note: not root, the demo is skipped"
fi

step "the Debian package: built, installed, removed, nothing left; cargo install --path"
if [ "$(id -u)" = 0 ]; then
    ./scripts/package.sh --test
else
    echo "note: not root, the package test is skipped"
fi
