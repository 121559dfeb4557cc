#!/usr/bin/env bash
# Builds the kernel helper (toa-server-shim/bpf/toa.bpf.c) into the committed
# object toa-server-shim/bpf/toa.bpf.o, so that `cargo build` needs no clang.
# With --check, builds into a temporary file and fails if the committed object
# differs (scripts/test.sh runs that).
#
# Needs clang, llvm (llvm-strip) and libbpf-dev (bpf_helpers.h).
set -euo pipefail
cd "$(dirname "$0")/../toa-server-shim"
out=bpf/toa.bpf.o
check=0
[ "${1:-}" = "--check" ] && check=1 && out=$(mktemp --suffix=.o)
# Mapped source paths and stripped DWARF keep the object identical wherever it is built.
clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -Wall -Werror \
    -fdebug-prefix-map="$PWD"=. -ffile-prefix-map="$PWD"=. \
    -c bpf/toa.bpf.c -o "$out"
llvm-strip -g "$out"
if [ "$check" = 1 ]; then
    if ! cmp -s "$out" bpf/toa.bpf.o; then
        rm -f "$out"
        echo "toa-server-shim/bpf/toa.bpf.o is stale: run scripts/build-bpf.sh and commit it" >&2
        exit 1
    fi
    rm -f "$out"
    echo "toa-server-shim/bpf/toa.bpf.o is current"
fi
