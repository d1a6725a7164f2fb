#!/usr/bin/env python3
"""Writes the seed corpus of the migration_stream fuzz target (fuzz/corpus/migration_stream/seed-*).

An independent implementation of the "Migration stream" section of docs/FORMAT.md (struct and
zlib.crc32), so the seeds also cross-check the Rust codec: tests/migration_stream.rs runs the
reader seeds through the real destination and expects a complete migration.

    fuzz/make-migration-corpus.py

The first byte of every seed is the target's mode (src/fuzzing.rs, `migration_stream`):
0 reader, 1 RAM codec, 2 payload decoders, 3 destination over framed records (| 0x80: refuse;
| 0x40: with the disk states of src/fuzzing.rs `FuzzDisks`).
"""
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "migration_stream")

MAGIC, VERSION = 0x4442_4D4D, 8
HELLO, SECTION, SWITCHOVER, END, STARTED, REFUSED, PAGE_REQUEST, ABORT, NONCE, REPORT = range(1, 11)
RAM_ID, PS, PAGES = 1, 512, 4
MIGRATION_ID = 0x0DB1_7E57_5EED_0001


def frame(kind, seq, payload):
    head = struct.pack(">BBHQI", kind, 0, 0, seq, len(payload))
    head += struct.pack(">I", zlib.crc32(head))
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


def hello(pages=PAGES, ps=PS, states=((RAM_ID, b"ram"),)):
    max_bandwidth, nonce, resume, incremental = 0, 0, 0, 0
    return (struct.pack(">IIQQQ", VERSION, ps, pages, MIGRATION_ID, max_bandwidth)
            + nonce.to_bytes(16, "big") + resume.to_bytes(16, "big") + struct.pack(">BH", incremental, len(states))
            + b"".join(struct.pack(">IB", i, len(name)) + name for i, name in states))


def ram(entries, ps=PS):
    """entries: (index, bytes) for a page, (index, None) for a discard."""
    out = struct.pack(">II", ps, len(entries))
    for index, data in entries:
        if data is None:
            out += struct.pack(">QB", index, 2)
        elif data == bytes(ps):
            out += struct.pack(">QB", index, 1)
        else:
            out += struct.pack(">QB", index, 0) + data
    return out


def section(payload, state=RAM_ID):
    return struct.pack(">I", state) + payload


# Disk bitmap sections (stream mode), docs/FORMAT.md "Disk bitmap section payloads".
BITMAP_ID, STREAM = 3, 0x5EED_5EED_0000_0001
START, REGIONS, COMPLETE, QUERY = range(1, 5)


def bitmap_start(index, seq, name=b"b", granularity_bits=16, disk_size=1 << 30, region_size=512):
    return (struct.pack(">BHQ", START, index, seq) + struct.pack(">QBBQIH", STREAM, granularity_bits, 1, disk_size,
                                                                  region_size, len(name)) + name)


def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return out + bytes([v])


def sparse(data):
    """A region's non-zero bytes, each after the count of zero bytes before it (LEB128)."""
    out, nxt = b"", 0
    for at, b in enumerate(data):
        if b:
            out += varint(at - nxt) + bytes([b])
            nxt = at + 1
    return out


def bitmap_regions(index, seq, regions):
    """Entries (region, bytes) go raw (encoding 0), (region, bytes, "sparse") sparse (1)."""
    out = struct.pack(">BHQI", REGIONS, index, seq, len(regions))
    for r, data, *enc in regions:
        body, code = (sparse(data), 1) if enc == ["sparse"] else (data, 0)
        out += struct.pack(">QBI", r, code, len(body)) + body
    return out


def bitmap_complete(index, seq, more):
    return struct.pack(">BHQB", COMPLETE, index, seq, 1 if more else 0)


def bitmap_query():
    return struct.pack(">BHQQ", QUERY, 0, 0, STREAM)


# Shared-storage disk state sections, docs/FORMAT.md "Shared-storage disk state payloads".
SHARED_ID, STREAM_ID, LOG_ID = 4, 3, 7
BEGIN, LOG = 1, 2


def log_begin(log_id=LOG_ID):
    return struct.pack(">BQ", BEGIN, log_id)


def log_take(seq, flags, entries, log_id=LOG_ID):
    """entries: (name, table offset, region size, region count, dirty count or None, regions),
    listed (encoding 0)."""
    out = struct.pack(">BQQBH", LOG, log_id, seq, flags, len(entries))
    for name, table, rsize, rcount, dirty, regions in entries:
        dirty = (1 << 64) - 1 if dirty is None else dirty
        out += struct.pack(">H", len(name)) + name + struct.pack(">QQQQB", table, rsize, rcount, dirty, 0)
        out += struct.pack(">I", len(regions)) + b"".join(struct.pack(">Q", r) for r in regions)
    return out


def disks_frames():
    """The destination's two disk states (src/fuzzing.rs, `fuzz_disk_states`): "d" on a
    shared image, preloading at BEGIN and following each LOG (bitmap "b", its table at
    0x40000, 4 bits dirty: the last LOG leaves the preloaded copy current, so the activate
    takes it without reading it); "s" taking bitmap "b2" from the stream."""
    return [
        (HELLO, hello(states=((RAM_ID, b"ram"), (STREAM_ID, b"s"), (SHARED_ID, b"d")))),
        (SECTION, section(log_begin(), SHARED_ID)),
        (SECTION, section(bitmap_start(0, 1, name=b"b2"), STREAM_ID)),
        (SECTION, section(ram([(i, page(i)) for i in range(PAGES)]))),
        (SECTION, section(bitmap_regions(0, 2, [(0, bytes([0xA5]) * 512)]), STREAM_ID)),
        (SECTION, section(log_take(1, 0, [(b"b", 0x40000, 4096, 1, None, [0])]), SHARED_ID)),
        (SWITCHOVER, b"\x00"),
        (SECTION, section(bitmap_complete(0, 3, False), STREAM_ID)),
        (SECTION, section(log_take(2, 2, [(b"b", 0x40000, 4096, 1, 4, [0])]), SHARED_ID)),
        (END, b""),
    ]


def page(i, ps=PS):
    return bytes((i * 37 + j) & 0xFF for j in range(ps)) if i != 2 else bytes(ps)


def precopy_frames():
    return [
        (HELLO, hello()),
        (SECTION, section(ram([(i, page(i)) for i in range(PAGES)]))),
        (SWITCHOVER, b"\x00"),
        (SECTION, section(ram([(1, bytes([0xEE]) * PS)]))),
        (END, b""),
    ]


def postcopy_frames():
    return [
        (HELLO, hello()),
        (SECTION, section(ram([(i, page(i)) for i in range(PAGES)]))),
        (SECTION, section(ram([(0, None), (3, None)]))),
        (SWITCHOVER, b"\x01"),
        (SECTION, section(ram([(3, bytes([0x33]) * PS), (0, bytes([0x44]) * PS)]))),
        (END, b""),
    ]


def stream(frames):
    out = struct.pack(">II", MAGIC, VERSION)
    for seq, (kind, payload) in enumerate(frames):
        out += frame(kind, seq, payload)
    return out


def records(frames):
    return b"".join(struct.pack(">BH", k, len(p)) + p for k, p in frames)


seeds = {
    "reader-precopy": b"\x00" + stream(precopy_frames()),
    "reader-postcopy": b"\x00" + stream(postcopy_frames()),
    "reader-replies": b"\x00" + stream([(NONCE, (7).to_bytes(16, "big")), (STARTED, b""), (PAGE_REQUEST, struct.pack(">IQI", RAM_ID, 3, 1)),
                                        (REFUSED, b"no room"), (ABORT, b"gone"),
                                        (REPORT, struct.pack(">IQ", 3, 17))]),
    "ram-pages": b"\x01\x00" + ram([(i, page(i)) for i in range(3)]),
    "ram-pages-4k": b"\x01\x03" + ram([(7, page(7, 4096)), (9, bytes(4096))], ps=4096),
    "ram-discards": b"\x01\x00" + ram([(0, None), (1 << 40, None)]),
    "ram-page-request": b"\x01\x00" + struct.pack(">QI", 3, 2),
    "payload-hello": b"\x02" + bytes([HELLO]) + hello(),
    "payload-section": b"\x02" + bytes([SECTION]) + section(ram([(0, page(0))])),
    "payload-switchover": b"\x02" + bytes([SWITCHOVER]) + b"\x01",
    "payload-abort": b"\x02" + bytes([ABORT]) + b"cancelled",
    "payload-report": b"\x02" + bytes([REPORT]) + struct.pack(">IQ", 3, 17),
    "payload-bitmap-start": b"\x02" + bytes([SECTION]) + section(bitmap_start(0, 1), BITMAP_ID),
    "payload-bitmap-regions": b"\x02" + bytes([SECTION])
    + section(bitmap_regions(0, 2, [(0, bytes([0xA5]) * 512), (3, bytes(512)),
                                    (5, bytes(7) + b"\x01" + bytes(292) + b"\x80" + bytes(211), "sparse")]),
              BITMAP_ID),
    "payload-bitmap-complete": b"\x02" + bytes([SECTION]) + section(bitmap_complete(0, 3, True), BITMAP_ID),
    "payload-bitmap-query": b"\x02" + bytes([SECTION]) + section(bitmap_query(), BITMAP_ID),
    "dest-precopy": b"\x03" + records(precopy_frames()),
    "dest-postcopy": b"\x03" + records(postcopy_frames()),
    "dest-refuse": b"\x83" + records(precopy_frames()),
    "dest-disks": b"\x43" + records(disks_frames()),
}

os.makedirs(OUT, exist_ok=True)
for f in os.listdir(OUT):
    if f.startswith("seed-"):
        os.remove(os.path.join(OUT, f))
for name, data in seeds.items():
    with open(os.path.join(OUT, "seed-" + name), "wb") as f:
        f.write(data)
print(f"migration_stream: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")
