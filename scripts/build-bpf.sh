#!/usr/bin/env bash
# Builds the eBPF programs into their committed objects, so that `cargo build`
# needs no clang:
#   toa-server-shim/bpf/toa.bpf.c      -> toa.bpf.o      (the backend's kernel helper)
#   toa-lb-injector/bpf/inject.bpf.c   -> inject.bpf.o   (toa-lb's TOA injector)
# With --check, builds into temporary files and fails if a committed object
# differs (scripts/test.sh runs that).
#
# Needs clang, llvm (llvm-strip) and libbpf-dev (bpf_helpers.h).
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
[ "${1:-}" = "--check" ] && check=1
stale=0
for source in toa-server-shim/bpf/toa.bpf.c toa-lb-injector/bpf/inject.bpf.c; do
    dir=$(dirname "$source")
    committed=${source%.c}.o
    out=$PWD/$committed
    [ "$check" = 1 ] && out=$(mktemp --suffix=.o)
    # Built from the crate's directory, with mapped source paths and stripped
    # DWARF: the object is identical wherever the repository is.
    (cd "$dir/.." && clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -Wall -Werror \
        -fdebug-prefix-map="$PWD"=. -ffile-prefix-map="$PWD"=. \
        -c "bpf/$(basename "$source")" -o "$out")
    llvm-strip -g "$out"
    if [ "$check" = 1 ]; then
        if ! cmp -s "$out" "$committed"; then
            echo "$committed is stale: run scripts/build-bpf.sh and commit it" >&2
            stale=1
        else
            echo "$committed is current"
        fi
        rm -f "$out"
    fi
done
exit "$stale"
