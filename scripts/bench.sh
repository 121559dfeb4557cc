#!/usr/bin/env bash
# Runs the toa-core criterion benches and prints, per operation, the time of
# toa-core and of its etherparse baseline measured in the same run, and the
# ratio (baseline / toa-core: above 1 means toa-core is faster). Absolute times
# move on a shared machine; the ratios are what to compare.
#
# Extra arguments go to criterion (e.g. a filter: scripts/bench.sh insert).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p toa-core --bench codec -- --warm-up-time 2 --measurement-time 5 "$@" >&2
python3 - <<'PY'
import json, pathlib
root = pathlib.Path("target/criterion")
rows = []
for group in ["find", "insert-syn60", "insert-1500", "strip", "clamp"]:
    def ns(name):
        f = root / group / name / "new" / "estimates.json"
        return json.loads(f.read_text())["median"]["point_estimate"] if f.exists() else None
    ours, base = ns("toa-core"), ns("etherparse")
    if ours and base:
        rows.append((group, ours, base, base / ours))
print(f"{'operation':<14}{'toa-core':>12}{'etherparse':>14}{'ratio':>9}")
for group, ours, base, ratio in rows:
    print(f"{group:<14}{ours:>10.1f}ns{base:>12.1f}ns{ratio:>8.1f}x")
PY
