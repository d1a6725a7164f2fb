#!/usr/bin/env bash
# After `cargo +nightly fuzz run TARGET`, keeps at most N (default 20) grown inputs that add
# coverage over the seeds, as fuzz/corpus/TARGET/min-<hash>, and moves the rest of the
# grown corpus out of the tree (to $GROWN, default /tmp/fuzz-grown/TARGET).
#
#   fuzz/pick-corpus.sh TARGET [N]
#
# 1. the hashed files libFuzzer wrote into fuzz/corpus/TARGET/ move to $GROWN;
# 2. libFuzzer's -merge=1 keeps those that add coverage over seed-* and min-* (a set cover);
# 3. each survivor is scored by the features it adds to the seeds alone (one run each), and
#    the N best are copied back as min-<first 16 hex digits of their name>.
set -euo pipefail
t=$1
n=${2:-20}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/target/x86_64-unknown-linux-gnu/release/$t
dir=$here/corpus/$t
grown=${GROWN:-/tmp/fuzz-grown/$t}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$grown" "$work/kept" "$work/base" "$work/one"

find "$dir" -maxdepth 1 -type f ! -name 'seed-*' ! -name 'min-*' -exec mv -t "$grown" {} +
cp "$dir"/seed-* "$dir"/min-* "$work/kept/" 2>/dev/null || true
cp "$dir"/seed-* "$dir"/min-* "$work/base/" 2>/dev/null || true
"$bin" -merge=1 -rss_limit_mb=2048 -malloc_limit_mb=512 "$work/kept" "$grown" 2>/dev/null
ft() { "$bin" -runs=0 -rss_limit_mb=2048 -malloc_limit_mb=512 "$@" 2>&1 | sed -n 's/.*INITED.* ft: \([0-9]*\).*/\1/p'; }
base=$(ft "$work/base")
for f in "$work/kept"/*; do
    name=$(basename "$f")
    [[ -e $work/base/$name ]] && continue
    cp "$f" "$work/one/"
    echo "$(( $(ft "$work/base" "$work/one") - base )) $name"
    rm "$work/one/$name"
done | sort -rn | head -n "$n" | while read -r gain name; do
    cp "$work/kept/$name" "$dir/min-${name:0:16}"
    echo "kept min-${name:0:16} (+$gain features)"
done
echo "$t: $(ls "$dir" | grep -c '^seed-') seeds, $(ls "$dir" | grep -c '^min-') minimised inputs"
