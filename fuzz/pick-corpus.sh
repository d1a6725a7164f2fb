#!/usr/bin/env bash
# After `cargo +nightly fuzz run TARGET`, keeps at most N (default 20) grown inputs that add
# coverage over the seeds, as fuzz/corpus/TARGET/min-<hash>, and moves the grown corpus out
# of the tree (to $GROWN, default /tmp/fuzz-grown/TARGET).
#
#   fuzz/pick-corpus.sh TARGET [N]
#
# 1. the hashed files libFuzzer wrote into fuzz/corpus/TARGET/ move to $GROWN (so do
#    earlier min-* files: they compete again);
# 2. one libFuzzer merge pass (-merge=1 -merge_control_file) runs the seeds first (every
#    committed input but the min-* ones; they are the first corpus directory), then the grown inputs from small to large, and records for
#    each input the features no earlier input had;
# 3. the N grown inputs with the most such features are copied back as
#    min-<first 16 hex digits of the name>. Each of them adds coverage over the seeds;
#    together they are an approximation of the best N, not the optimum.
set -euo pipefail
t=$1
n=${2:-20}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/target/x86_64-unknown-linux-gnu/release/$t
dir=$here/corpus/$t
grown=${GROWN:-/tmp/fuzz-grown/$t}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$grown" "$work/seeds"

find "$dir" -maxdepth 1 -type f -name 'min-*' -exec sh -c 'mv "$1" "$2/$(basename "$1" | cut -c5-)"' _ {} "$grown" \;
# Only libFuzzer's own names (40 hex digits): committed inputs under other names (the
# seeds, `dl-*`, `disk-log-*`) stay.
find "$dir" -maxdepth 1 -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}' \
    -exec mv -t "$grown" {} +
# Every committed input but the min-* ones (moved above) counts as a seed.
find "$dir" -maxdepth 1 -type f ! -name 'min-*' -exec cp -t "$work/seeds/" {} +
"$bin" -merge=1 -merge_control_file="$work/control" -rss_limit_mb=2048 -malloc_limit_mb=512 \
    "$work/seeds" "$grown" >"$work/merge.log" 2>&1 || {
    tail -20 "$work/merge.log" >&2
    exit 1
}
python3 - "$work/control" "$dir" "$n" "$work/seeds" <<'PY'
import os, shutil, sys
control, dest, n, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lines = open(control).read().split("\n")
nfiles = int(lines[0])
files = lines[2:2 + nfiles]
features = {}
for line in lines[2 + nfiles:]:
    parts = line.split()
    if parts and parts[0] == "FT":
        features[int(parts[1])] = set(map(int, parts[2:]))
covered = set()
candidates = {}
for i, path in enumerate(files):
    if os.path.dirname(path) == seeds:
        covered |= features.get(i, set())
    else:
        candidates[path] = features.get(i, set())
print(f"seeds: {len(covered)} features; grown inputs: {len(candidates)}")
ranked = sorted(candidates, key=lambda p: (-len(candidates[p]), os.path.getsize(p)))
for best in ranked[:n]:
    gain = len(candidates[best])
    if gain == 0:
        break
    covered |= candidates[best]
    name = "min-" + os.path.basename(best)[:16]
    shutil.copy(best, os.path.join(dest, name))
    print(f"kept {name} (+{gain} features, {os.path.getsize(best)} bytes)")
print(f"seeds + kept: {len(covered)} features")
PY
echo "$t: $(ls "$dir" | grep -c '^seed-') seeds, $(ls "$dir" | grep -c '^min-' || true) minimised inputs"
