#!/usr/bin/env bash
# Regenerates the seed corpus in fuzz/corpus/ from images made by the real qemu-img and
# qemu-io (QEMU 10). Seeds are small: 512-byte and 4 KiB clusters on a 1 MiB disk (1020 KiB
# for the tail-* and ones-* images).
#
#   fuzz/make-corpus.sh            # rewrites fuzz/corpus/<target>/seed-*
#
# open_image gets whole images; header gets their cluster 0; directory, bitmap_table and
# refcount_block get the structures extracted from them, behind the parameter prefix each
# target reads (see src/fuzzing.rs):
#   directory:      nb_bitmaps (u16 BE), cluster_bits - 9 (u8), disk size (u64 BE), bytes
#   bitmap_table:   cluster_bits - 9 (u8), table_size (u32 BE), bytes
#   refcount_block: refcount_order (u8), bytes
# Files made by this script are named seed-*; minimised fuzzer finds kept next to them are
# named min-* and are left alone.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
corpus=$here/corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || {
    echo "make-corpus.sh needs qemu-img and qemu-io" >&2
    exit 1
}

for t in header directory bitmap_table refcount_block open_image; do
    mkdir -p "$corpus/$t"
    rm -f "$corpus/$t"/seed-*
done

img() { qemu-img create -q -f qcow2 -o "cluster_size=$2${3:+,$3}" "$work/$1.qcow2" 1M; }
io() { qemu-io -f qcow2 "$@" >/dev/null; }

for cs in 512 4096; do
    # A bare image.
    img "bare-$cs" "$cs"

    # Two bitmaps, one disabled, both with data.
    img "bitmaps-$cs" "$cs"
    qemu-img bitmap --add -g 4K "$work/bitmaps-$cs.qcow2" on
    qemu-img bitmap --add -g 64K "$work/bitmaps-$cs.qcow2" off
    io -c 'write -P 0xaa 0 512' -c 'write -P 0x55 600k 1k' "$work/bitmaps-$cs.qcow2"
    qemu-img bitmap --merge on "$work/bitmaps-$cs.qcow2" off
    qemu-img bitmap --disable "$work/bitmaps-$cs.qcow2" off

    # A bitmap left in_use: qemu-io aborts while the image is open read-write.
    img "inuse-$cs" "$cs"
    qemu-img bitmap --add -g 4K "$work/inuse-$cs.qcow2" crashed
    io -c 'write 0 512' -c abort "$work/inuse-$cs.qcow2" 2>/dev/null || true

    # A backing file, and a bitmap on the overlay.
    img "base-$cs" "$cs"
    qemu-img create -q -f qcow2 -o "cluster_size=$cs" -b "base-$cs.qcow2" -F qcow2 \
        "$work/backing-$cs.qcow2"
    qemu-img bitmap --add -g 8K "$work/backing-$cs.qcow2" incr
    (cd "$work" && io -c 'write 64k 512' "backing-$cs.qcow2")

    # 1-bit refcounts.
    img "refcount1-$cs" "$cs" refcount_bits=1
    qemu-img bitmap --add -g 4K "$work/refcount1-$cs.qcow2" r1
    io -c 'write 4k 512' "$work/refcount1-$cs.qcow2"
    # A disk that is not a whole number of bitmap bytes (1020 KiB: 255 bits at 4 KiB,
    # 15.9 bits at 64 KiB), with the last granule written, so the tail bits matter.
    qemu-img create -q -f qcow2 -o "cluster_size=$cs" "$work/tail-$cs.qcow2" 1020K
    qemu-img bitmap --add -g 4K "$work/tail-$cs.qcow2" t4k
    qemu-img bitmap --add -g 64K "$work/tail-$cs.qcow2" t64k
    io -c 'write 1016k 4k' -c 'write 0 512' "$work/tail-$cs.qcow2"
done

# The "all ones" table entry (raw value 1) that QEMU reads but never writes: a copy of each
# tail image whose first bitmap's first table entry says so. The data cluster it pointed
# to leaks, which qemu-img check and Image::check report.
python3 - "$work" <<'PY'
import struct, sys
work = sys.argv[1]
for cs in (512, 4096):
    data = bytearray(open(f"{work}/tail-{cs}.qcow2", "rb").read())
    at = struct.unpack_from(">I", data, 100)[0]
    while True:
        kind, length = struct.unpack_from(">II", data, at)
        if kind == 0x23852875:
            doff = struct.unpack_from(">Q", data, at + 24)[0]
            toff = struct.unpack_from(">Q", data, doff)[0]
            struct.pack_into(">Q", data, toff, 1)
            break
        at += 8 + ((length + 7) & ~7)
    open(f"{work}/ones-{cs}.qcow2", "wb").write(data)
PY

for f in "$work"/*.qcow2; do
    name=$(basename "$f" .qcow2)
    [[ $name == base-* ]] && continue
    # ones-* leaks a cluster on purpose (exit code 3); every other image must be clean.
    rc=0
    qemu-img check -q "$f" >/dev/null 2>&1 || rc=$?
    [[ $rc == 0 || ($rc == 3 && $name == ones-*) ]] || {
        echo "qemu-img check exited with $rc on $name" >&2
        exit 1
    }
    cp "$f" "$corpus/open_image/seed-$name.qcow2"
done

# Extract cluster 0, the directory, each bitmap table and the first refcount block.
python3 - "$work" "$corpus" <<'EOF'
import os, struct, sys
work, corpus = sys.argv[1], sys.argv[2]
for fn in sorted(os.listdir(work)):
    name = fn[:-len(".qcow2")]
    if name.startswith("base-"):
        continue
    data = open(os.path.join(work, fn), "rb").read()
    cb = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << cb
    size = struct.unpack_from(">Q", data, 24)[0]
    rt_off = struct.unpack_from(">Q", data, 48)[0]
    order = struct.unpack_from(">I", data, 96)[0]
    hlen = struct.unpack_from(">I", data, 100)[0]
    def put(target, suffix, blob):
        with open(os.path.join(corpus, target, f"seed-{name}{suffix}"), "wb") as out:
            out.write(blob)
    put("header", "", data[:cs])
    rb = struct.unpack_from(">Q", data, rt_off)[0] & ~0x1FF
    put("refcount_block", "", bytes([order]) + data[rb:rb + cs])
    # Walk the header extensions for the bitmaps extension (0x23852875).
    at = hlen
    while at + 8 <= cs:
        kind, length = struct.unpack_from(">II", data, at)
        if kind == 0:
            break
        if kind == 0x23852875:
            nb, _, dsize, doff = struct.unpack_from(">IIQQ", data, at + 8)
            d = data[doff:doff + dsize]
            put("directory", "", struct.pack(">HBQ", nb, cb - 9, size) + d)
            p, i = 0, 0
            while p < len(d):
                toff, tsize = struct.unpack_from(">QI", d, p)
                nsize, esize = struct.unpack_from(">HI", d, p + 18)
                table = data[toff:toff + tsize * 8]
                put("bitmap_table", f"-{i}", struct.pack(">BI", cb - 9, tsize) + table)
                p += (24 + esize + nsize + 7) & ~7
                i += 1
        at += 8 + ((length + 7) & ~7)
EOF

for t in header directory bitmap_table refcount_block open_image; do
    echo "$t: $(ls "$corpus/$t" | wc -l) files, $(du -sb "$corpus/$t" | cut -f1) bytes"
done
