#!/usr/bin/env python3
"""Builds the hand-minimised ops_guest_data regressions in fuzz/regressions/ops_guest_data/
from the QEMU-made seed image fuzz/corpus/ops_guest_data/seed-data-512-cow (made by
make-ops-corpus.sh: 512-byte clusters, 1 MiB disk, guest data at 0-8 KiB, bitmap "b1" with
its table in cluster 6 and its data in cluster 5, the bitmap directory in cluster 48).

Each regression repoints one L2 entry (a guest cluster) at one of the bitmap's own clusters,
the overlap the fuzzer found from both sides, and ends with the shortest operation tail that
makes the library write that cluster in place. `python3 fuzz/make-ops-regressions.py`
rewrites them; tests/fuzz_ops_corpus.rs replays each in a named test.
"""
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
seed = open(os.path.join(here, "corpus/ops_guest_data/seed-data-512-cow"), "rb").read()
image = bytearray(seed[: len(seed) - 1 - seed[-1]])
be64 = lambda o: struct.unpack_from(">Q", image, o)[0]

l2 = be64(be64(40)) & 0x00FFFFFFFFFFFE00  # the L2 table of L1 entry 0
COPIED = 1 << 63
b1_table, b1_data, directory = 0xC00, 0xA00, 0x6000
assert be64(b1_table) == b1_data, "the seed's layout changed; update this script"

ACTIVATE, FLUSH = b"\x08", b"\x03"
def remove(name):
    return bytes([1, name])
def add(name, gbits):
    return bytes([0, name, gbits - 9])
def mark(name, off, ln):
    return bytes([2, name]) + struct.pack(">HH", off // 64, ln - 1)

def write(name, patches, ops):
    img = bytearray(image)
    for off, value in patches:
        struct.pack_into(">Q", img, off, value)
    tail = b"".join(ops)
    path = os.path.join(here, "regressions/ops_guest_data", name)
    with open(path, "wb") as f:
        f.write(bytes(img) + tail + bytes([len(tail)]))
    print(path)

# Guest cluster 0 of the disk is b1's data cluster; a mark in b1 and a flush rewrite it.
write("flush-writes-bitmap-data-over-guest-cluster",
      [(l2, COPIED | b1_data)],
      [ACTIVATE, mark(0, 300 * 1024, 1), FLUSH])
# Guest cluster 1 is b1's table, whose only entry is "all zeros": the flush allocates a data
# cluster and writes its table entry in place.
write("flush-writes-table-entry-over-guest-cluster",
      [(l2 + 8, COPIED | b1_table), (b1_table, 0)],
      [ACTIVATE, mark(0, 300 * 1024, 1), FLUSH])
# Guest cluster 2 is the bitmap directory: activate sets in_use in place.
write("activate-writes-directory-over-guest-cluster",
      [(l2 + 16, COPIED | directory)],
      [ACTIVATE])
# Guest cluster 0 of the disk is b1's data cluster; removing b1 frees it (refcount 0) and
# the next allocation (the new bitmap "a"'s table) reuses it. Names: 0 is b1, 2 is "a".
write("remove-frees-guest-cluster-then-reuses-it",
      [(l2, COPIED | b1_data)],
      [remove(0), add(2, 9)])
