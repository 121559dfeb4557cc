#!/usr/bin/env bash
# Builds the Debian package target/debian/toa_VERSION_ARCH.deb with cargo-deb:
# toa-lb and toa-shim (release, stripped), the systemd units toa-lb.service
# (`toa-lb run --config /etc/toa-lb/lb.toml`, a commented example installed
# there) and toa-shim.service (arguments in /etc/default/toa-shim), neither
# enabled; man pages and bash/zsh/fish completions generated from the CLIs.
#
# --test (root): also installs it, attaches the helper and an injector through
# the installed binaries, removes the package, and fails if a pin, a loaded
# program or a tc filter is left; and checks that `cargo install --path` works
# for both crates. Installs cargo-deb when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { printf 'package.sh: %s\n' "$*" >&2; exit 1; }

if ! cargo deb --version 2>/dev/null | grep -q '^3\.'; then
    cargo install cargo-deb --version '^3' --locked
fi
cargo build --release --locked -p toa-lb-injector --bin toa-lb -p toa-server-shim --bin toa-shim

dist=target/dist
rm -rf "$dist"
mkdir -p "$dist/man" "$dist/bash" "$dist/zsh" "$dist/fish"
for bin in toa-lb toa-shim; do
    "target/release/$bin" assets manpages "$dist/man"
    # bash-completion looks a command's script up by its bare name.
    "target/release/$bin" assets completions bash >"$dist/bash/$bin"
    "target/release/$bin" assets completions zsh >"$dist/zsh/_$bin"
    "target/release/$bin" assets completions fish >"$dist/fish/$bin.fish"
done
gzip -9n "$dist"/man/*.1

deb=$(cargo deb -p toa-lb-injector --no-build --locked 2>/dev/null | tail -n 1)
[ -f "$deb" ] || die "cargo deb made no package"
echo "$deb"

[ "${1:-}" = --test ] || exit 0
[ "$(id -u)" = 0 ] || die "--test needs root"

contents=$(dpkg-deb --contents "$deb")
for path in ./usr/bin/toa-lb ./usr/bin/toa-shim ./etc/toa-lb/lb.toml ./etc/default/toa-shim \
    ./usr/lib/systemd/system/toa-lb.service ./usr/lib/systemd/system/toa-shim.service \
    ./usr/share/man/man1/toa-lb-run.1.gz ./usr/share/man/man1/toa-shim-ebpf-attach.1.gz \
    ./usr/share/bash-completion/completions/toa-lb ./usr/share/zsh/vendor-completions/_toa-shim; do
    grep -q " $path\$" <<<"$contents" || die "$path is not in the package"
done
# Stripped: no symbol table.
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/toa-lb >"target/dist/toa-lb.installed"
if readelf -S "target/dist/toa-lb.installed" | grep -q '\.symtab'; then die "toa-lb is not stripped"; fi

# (Before the cleanup trap, which removes the package.)
if dpkg-query -W -f='${Status}' toa 2>/dev/null | grep -q "install ok installed"; then
    die "the toa package is installed on this machine; not testing over it"
fi
tag="pkg$$"
cg="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)/toa-$tag"
cleanup() {
    # Purge: the test's removal (dpkg -r) keeps the conffiles, as Debian does.
    dpkg -P toa >/dev/null 2>&1 || true
    ip netns del "$tag" 2>/dev/null || true
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
[ -e /sys/fs/bpf/toa ] && die "the kernel helper is attached on this machine; not testing over it"
[ -e /sys/fs/bpf/toa-lb ] && die "an injector is attached on this machine; not testing over it"
dpkg -i "$deb" >/dev/null
/usr/bin/toa-lb check --config /etc/toa-lb/lb.toml >/dev/null || die "the shipped lb.toml does not check"
mkdir -p "$cg"
ip netns add "$tag"
ip -n "$tag" link add c0 type veth peer name c1
ip -n "$tag" link set c0 up
ip -n "$tag" link set c1 up
# In the test's namespace: the helper's UDP program goes on c1, not on the host's links.
nsenter --net=/run/netns/"$tag" /usr/bin/toa-shim ebpf attach --cgroup "$cg" --trust-preset huawei-elb \
    --udp-iface c1 >/dev/null
nsenter --net=/run/netns/"$tag" /usr/bin/toa-lb inject attach --iface c0 --listener 203.0.113.10:80 >/dev/null
[ -n "$(ls /sys/fs/bpf/toa)" ] && [ -n "$(ls -R /sys/fs/bpf/toa-lb)" ] || die "nothing was attached"
dpkg -r toa >/dev/null
left=()
[ -e /sys/fs/bpf/toa ] && left+=("/sys/fs/bpf/toa")
[ -e /sys/fs/bpf/toa-lb ] && left+=("/sys/fs/bpf/toa-lb")
[ -n "$(ip netns exec "$tag" tc filter show dev c0 ingress)" ] && left+=("a tc filter on c0")
[ -e /usr/bin/toa-lb ] && left+=("/usr/bin/toa-lb")
((${#left[@]} == 0)) || die "removing the package left: ${left[*]}"
echo "installed, attached, removed: nothing left"

# cargo install works for both crates (reusing this build).
root=$(mktemp -d)
for crate in toa-server-shim toa-lb-injector; do
    cargo install --quiet --locked --path "$crate" --root "$root" --target-dir target
done
"$root/bin/toa-shim" --version >/dev/null && "$root/bin/toa-lb" --version >/dev/null \
    || die "cargo install made no working binaries"
rm -rf "$root"
echo "cargo install --path: ok"
