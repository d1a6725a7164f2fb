#!/usr/bin/python3
"""What an incremental backup tool does over NBD, with libnbd (Debian: python3-libnbd):
connect to an export that carries a dirty bitmap (`qemu-nbd -B NAME` or
`qemu-storage-daemon --export nbd,bitmaps=[NAME]`), ask for the
`qemu:dirty-bitmap:NAME` metadata context, walk the whole disk with block status, and read
only the dirty extents, writing each at the same offset of TARGET (a copy of the last
backup). Prints the dirty extents and the bytes copied.

Usage: scripts/nbd-apply-dirty.py URI BITMAP TARGET
"""
import sys

import nbd

uri, bitmap, target = sys.argv[1], sys.argv[2], sys.argv[3]
context = "qemu:dirty-bitmap:" + bitmap
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
if not h.can_meta_context(context):
    sys.exit(f"the export has no {context} context")
size = h.get_size()
extents = []


def collect(ctx, offset, entries, err):
    if ctx != context:
        return 0
    at = offset
    for i in range(0, len(entries), 2):
        length, flags = entries[i], entries[i + 1]
        if flags & 1:
            extents.append((at, length))
        at += length
    return 0


offset = 0
max_request = 1 << 30
while offset < size:
    before = len(extents)
    reached = [offset]

    def walk(ctx, off, entries, err):
        collect(ctx, off, entries, err)
        if ctx == context:
            reached[0] = off + sum(entries[0::2])
        return 0

    h.block_status(min(max_request, size - offset), offset, walk)
    if reached[0] <= offset:
        sys.exit(f"block status made no progress at {offset}")
    offset = reached[0]

copied = 0
with open(target, "r+b") as out:
    for off, length in extents:
        end = min(off + length, size)
        pos = off
        while pos < end:
            n = min(32 << 20, end - pos)
            out.seek(pos)
            out.write(h.pread(n, pos))
            pos += n
            copied += n
for off, length in extents:
    print(f"dirty {off} {length}")
print(f"copied {copied} of {size}")
