#!/usr/bin/env bash
# Regenerates the seed corpus of the write-path targets (fuzz/harness/ops.rs):
#
#   fuzz/make-ops-corpus.sh       # rewrites fuzz/corpus/ops_crash/seed-* and ops_guest_data/seed-*
#
# ops_crash gets hand-written operation sequences (every operation, the refusals, the
# inactive marks on parked bitmaps, a reopen after an abandoned active store, marks through
# a Tracker across add, inactivate, remove and activate) for 512 B,
# 1 KiB and 4 KiB clusters. ops_guest_data gets images made by the real qemu-img and qemu-io
# (QEMU 10) that hold guest data (plain, compressed and zeroed clusters, a snapshot, a
# backing file, extended L2 entries, an in_use bitmap), each followed by an operation tail
# (the four tails in turn) and the tail's length byte. Files made here are named seed-*; minimised finds kept next
# to them are named min-* and are left alone.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
corpus=$here/corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || {
    echo "make-ops-corpus.sh needs qemu-img and qemu-io" >&2
    exit 1
}
for t in ops_crash ops_guest_data; do
    mkdir -p "$corpus/$t"
    rm -f "$corpus/$t"/seed-*
done

img() { qemu-img create -q -f qcow2 -o "cluster_size=$2${3:+,$3}" "$work/$1.qcow2" 1M; }
io() { qemu-io -f qcow2 "$@" >/dev/null; }

for cs in 512 4096; do
    img "data-$cs" "$cs"
    qemu-img bitmap --add -g 4K "$work/data-$cs.qcow2" b1
    qemu-img bitmap --add -g 64K "$work/data-$cs.qcow2" b2
    io -c 'write -P 0xab 0 8k' -c 'write -P 0xcd 512k 4k' -c 'write -P 0xef 1020k 4k' \
        "$work/data-$cs.qcow2"
    qemu-img bitmap --disable "$work/data-$cs.qcow2" b2

    img "compressed-$cs" "$cs"
    qemu-img bitmap --add -g 8K "$work/compressed-$cs.qcow2" c
    io -c 'write -c -P 0xab 0 16k' -c 'write -P 0x11 128k 4k' -c 'write -z 256k 16k' \
        "$work/compressed-$cs.qcow2"

    img "snapshot-$cs" "$cs"
    io -c 'write -P 0xab 0 32k' "$work/snapshot-$cs.qcow2"
    qemu-img snapshot -c snap1 "$work/snapshot-$cs.qcow2"
    qemu-img bitmap --add -g 4K "$work/snapshot-$cs.qcow2" s
    io -c 'write -P 0xcd 16k 32k' "$work/snapshot-$cs.qcow2"

    img "base-$cs" "$cs"
    io -c 'write -P 0x77 0 16k' "$work/base-$cs.qcow2"
    qemu-img create -q -f qcow2 -o "cluster_size=$cs" -b "base-$cs.qcow2" -F qcow2 \
        "$work/backing-$cs.qcow2"
    qemu-img bitmap --add -g 4K "$work/backing-$cs.qcow2" incr
    (cd "$work" && io -c 'write -P 0x88 64k 8k' "backing-$cs.qcow2")

    img "inuse-$cs" "$cs"
    qemu-img bitmap --add -g 4K "$work/inuse-$cs.qcow2" crashed
    io -c 'write -P 0xab 0 8k' "$work/inuse-$cs.qcow2"
    io -c 'write -P 0xcd 8k 512' -c abort "$work/inuse-$cs.qcow2" 2>/dev/null || true
done
img extl2-16k 16384 extended_l2=on
qemu-img bitmap --add -g 16K "$work/extl2-16k.qcow2" x
io -c 'write -P 0xab 0 4k' -c 'write -P 0xcd 100k 2k' "$work/extl2-16k.qcow2"

for f in "$work"/*.qcow2; do
    name=$(basename "$f" .qcow2)
    [[ $name == base-* ]] && continue
    rc=0
    qemu-img check -q "$f" >/dev/null 2>&1 || rc=$?
    [[ $rc == 0 ]] || { echo "qemu-img check exited with $rc on $name" >&2; exit 1; }
done

python3 - "$work" "$corpus" <<'PY'
import os, struct, sys
work, corpus = sys.argv[1], sys.argv[2]

# Operation encodings of fuzz/harness/ops.rs (decode_op).
def add(n, gbits, enabled=True): return bytes([0, n, (gbits - 9) | (0 if enabled else 0x80)])
def remove(n): return bytes([1, n])
def mark(n, off, ln): return bytes([2, n]) + struct.pack(">HH", off // 64, ln - 1)
FLUSH, ACTIVATE, INACTIVATE, FULL, CLOSE, ABANDON = b"\x03", b"\x08", b"\x09", b"\x0a", b"\x0b", b"\x0c"
def clear(n): return bytes([4, n])
def merge(s, d): return bytes([5, s, d])
def set_enabled(n, e): return bytes([6, n, 1 if e else 0])
def resize(sectors, odd=False): return bytes([7]) + struct.pack(">H", sectors | (0x8000 if odd else 0))
def tracker(off, ln): return bytes([14]) + struct.pack(">HH", off // 64, ln - 1)
def store(n, ranges, wrong=False):
    out = bytes([13, n, len(ranges) | (0x80 if wrong else 0)])
    for off, ln in ranges:
        out += struct.pack(">HH", off // 64, ln - 1)
    return out

K = 1024
sequences = {
    "lifecycle": [add(0, 9), add(1, 12), ACTIVATE, mark(0, 0, 4096), mark(1, 600 * K, 60000),
                  FLUSH, mark(0, 900 * K, 1), INACTIVATE, mark(0, 300 * K, 512), ACTIVATE,
                  FLUSH, mark(1, 10 * K, 100), INACTIVATE, CLOSE],
    "cow": [add(0, 9), add(1, 12), store(0, [(0, 1), (500 * K, 9000)]), merge(0, 1), clear(0),
            set_enabled(1, False), store(1, [(64 * K, 64 * K)]), remove(0), add(2, 16, False),
            merge(1, 2), CLOSE],
    "resize": [add(0, 10), store(0, [(1000 * K, 20000), (10, 10)]), resize(4096),
               resize(1500), resize(1501, True), ACTIVATE, mark(0, 700 * K, 5000), FULL,
               resize(3000), ABANDON, resize(2048), remove(0), resize(0), add(1, 9)],
    "refusals": [remove(3), clear(2), merge(0, 1), FLUSH, mark(1, 0, 1), add(0, 11), add(0, 12),
                 store(0, [(0, 1)], wrong=True), set_enabled(3, True), INACTIVATE, FULL, CLOSE],
    "abandon": [add(0, 9), add(1, 13), ACTIVATE, mark(0, 0, 65536), FLUSH, mark(1, 512 * K, 1),
                ABANDON, clear(0), merge(0, 1), store(1, [(0, 1)]), remove(0), add(0, 9),
                ACTIVATE, add(2, 12), mark(2, 4096, 4096), CLOSE],
    "parked": [add(0, 9), ACTIVATE, mark(0, 0, 1), INACTIVATE, mark(0, 100 * K, 1),
               store(0, [(200 * K, 1)]), clear(0), mark(0, 300 * K, 1), merge(0, 0),
               set_enabled(0, False), mark(0, 400 * K, 1), resize(1024), ACTIVATE, INACTIVATE],
    "tracker": [add(0, 9), ACTIVATE, tracker(0, 4096), add(1, 12), tracker(64 * K, 1),
                INACTIVATE, tracker(128 * K, 512), add(2, 9), tracker(192 * K, 1), remove(0),
                ACTIVATE, tracker(256 * K, 1), set_enabled(1, False), tracker(320 * K, 1),
                FULL, CLOSE, tracker(0, 1)],
}
# Cluster size byte, disk sectors - 1 (u16), sampling seed.
for cs_byte, cs_name in [(0, "512"), (1, "1k"), (3, "4k")]:
    for name, ops in sequences.items():
        head = bytes([cs_byte]) + struct.pack(">H", 2047) + bytes([len(name)])
        with open(os.path.join(corpus, "ops_crash", f"seed-{name}-{cs_name}"), "wb") as f:
            f.write(head + b"".join(ops))

tails = {
    "flush": [ACTIVATE, mark(0, 0, 65536), mark(1, 1000 * K, 9999), FLUSH, INACTIVATE],
    "cow": [add(2, 9), store(0, [(0, 1), (512 * K, 4096)]), merge(0, 2), clear(1), remove(0)],
    "abandon": [ACTIVATE, mark(0, 512 * K, 1), FLUSH, ABANDON, remove(0), remove(1), CLOSE],
    "full": [set_enabled(1, True), ACTIVATE, mark(1, 0, 1), FULL, resize(4096), add(3, 12)],
}
# One tail per image, in turn.
images = [fn for fn in sorted(os.listdir(work)) if not fn.startswith("base-")]
for k, fn in enumerate(images):
    name = fn[: -len(".qcow2")]
    data = open(os.path.join(work, fn), "rb").read()
    for tname, ops in [list(tails.items())[k % len(tails)]]:
        tail = b"".join(ops)
        assert len(tail) < 256
        with open(os.path.join(corpus, "ops_guest_data", f"seed-{name}-{tname}"), "wb") as f:
            f.write(data + tail + bytes([len(tail)]))
PY

for t in ops_crash ops_guest_data; do
    echo "$t: $(ls "$corpus/$t" | wc -l) files, $(du -sb "$corpus/$t" | cut -f1) bytes"
done
