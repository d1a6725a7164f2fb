#!/usr/bin/env python3
"""Regenerates the seed corpus of the durable-mode target (fuzz/harness/durable.rs):

    fuzz/make-durable-corpus.py      # rewrites fuzz/corpus/ops_durable/seed-* and
                                     # fuzz/regressions/ops_durable/*

Hand-written operation sequences, each at 512 B, 1 KiB and 4 KiB clusters on a 1 MiB disk:
the lifecycle with crash points in activate, marks, a clear and inactivate; intents polled
and waited from several trackers; writes held in flight across checkpoints, a clear, an add
and recording switched; recording switched on and off; directory changes on an
active durable store (add, remove, store, merge, merge_from); marks and intents on the
trackers of an inactivated store (they fail) around the inactive copy-on-write operations,
and a durable activation again; preloads before activations that the image changed
since; resizes between durable activations; the typed refusals. Files made here are named seed-*; kept finds next to them are left alone.
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "ops_durable")

# Bitmap names are indexes into NAMES = ["a", "b", "c", "d"].
A, B, C, D = 0, 1, 2, 3


def u16(v):
    return struct.pack(">H", v)


def rng(off, length):
    """A range as decode_op reads it: offset / 64 and length - 1, both u16."""
    assert off % 64 == 0 and 1 <= length <= 65536
    return u16(off // 64) + u16(length - 1)


def add(name, granularity, enabled=True):
    g = granularity.bit_length() - 10  # 512 << g
    return bytes([0, name, g | (0 if enabled else 0x80)])


def remove(name):
    return bytes([1, name])


def mark(handle, off, length):
    return bytes([2, handle]) + rng(off, length)


def begin_write(handle, off, length, via_intent=False):
    return bytes([4, handle | (0x80 if via_intent else 0)]) + rng(off, length)


END_WRITE = bytes([19])


def checkpoint(name):
    return bytes([23, name])


def intent(handle, off, length):
    return bytes([5, handle]) + rng(off, length)


def poll(ticket):
    return bytes([7, ticket])


def wait(ticket):
    return bytes([8, ticket])


def commit(handle):
    return bytes([9, handle])


def new_tracker(handle, refresh=False):
    # decode_op: handle = b % 3, refresh = bit 7.
    b = 0x80 + (handle + 1) % 3 if refresh else handle
    assert b % 3 == handle
    return bytes([10, b])


FLUSH = bytes([11])


def clear(name):
    return bytes([12, name])


def set_enabled(name, enabled):
    return bytes([13, name, 1 if enabled else 0])


def store(name, marks, wrong=False):
    # decode_op: b % 5 marks, bit 7 for the wrong granularity.
    b = len(marks) if not wrong else 0x80 + (len(marks) - 0x80) % 5
    assert b % 5 == len(marks) and (b & 0x80 != 0) == wrong
    return bytes([14, name, b]) + b"".join(rng(o, n) for o, n in marks)


def merge(src, dst):
    return bytes([15, src, dst])


def merge_from(dst, granularity, marks):
    g = granularity.bit_length() - 10
    return bytes([16, dst, g | (len(marks) << 3)]) + b"".join(rng(o, n) for o, n in marks)


INACTIVATE = bytes([17])
ACTIVATE = bytes([18])
REOPEN = bytes([20])
ABANDON = bytes([21])


def crash(at):
    return bytes([22, at])


PRELOAD = bytes([24])


def resize(size, odd=False):
    assert size % 512 == 0 and 512 <= size <= 4 << 20
    return bytes([25]) + u16((size // 512 - 1) | (0x8000 if odd else 0))


K = 1024
SEQUENCES = {
    "lifecycle": [
        add(A, 4 * K),
        add(B, 64 * K, enabled=False),
        crash(3), ACTIVATE,
        crash(1), mark(0, 0, 4 * K),
        mark(1, 0, 512),
        crash(0), mark(0, 512 * K, 8 * K),
        crash(2), clear(A),
        mark(0, 64 * K, 4 * K),
        FLUSH,
        crash(1), INACTIVATE,
        REOPEN,
        ACTIVATE,
        mark(2, 1020 * K, 4 * K),
        ABANDON,
        ACTIVATE,
        mark(0, 128 * K, 64),
    ],
    "intents": [
        add(A, 512),
        add(B, 8 * K),
        ACTIVATE,
        intent(0, 4 * K, 4 * K),
        intent(1, 4 * K, 512),
        intent(1, 300 * K, 16 * K),
        poll(0),
        crash(0), commit(2),
        poll(0), poll(1), poll(0),
        intent(0, 900 * K, 100),
        crash(1), wait(0),
        new_tracker(1),
        intent(1, 0, 65536),
        clear(A),
        crash(2), wait(0),
        INACTIVATE,
    ],
    "recording": [
        add(A, 4 * K),
        add(B, 64 * K),
        ACTIVATE,
        set_enabled(A, False),
        mark(0, 16 * K, 4 * K),
        intent(1, 40 * K, 4 * K),
        set_enabled(A, True),
        poll(0),
        mark(0, 16 * K, 4 * K),
        crash(0), INACTIVATE,
        set_enabled(B, False),
        REOPEN,
        ACTIVATE,
        mark(0, 200 * K, 4 * K),
        ABANDON,
    ],
    "directory": [
        add(A, 4 * K),
        add(B, 16 * K),
        ACTIVATE,
        mark(0, 8 * K, 4 * K),
        crash(0), add(C, 512),
        mark(0, 100 * K, 4 * K),
        new_tracker(0, refresh=True),
        mark(0, 104 * K, 4 * K),
        crash(1), store(A, [(0, 4 * K), (512 * K, 100)]),
        crash(2), merge(A, B),
        crash(3), merge_from(C, 64 * K, [(64 * K, 4 * K)]),
        remove(B),
        mark(1, 700 * K, 4 * K),
        store(A, [(0, 512)], wrong=True),
        INACTIVATE,
    ],
    "inactive": [
        add(A, 4 * K),
        add(B, 64 * K),
        ACTIVATE,
        mark(0, 0, 4 * K),
        intent(1, 256 * K, 4 * K),
        INACTIVATE,
        poll(0),
        mark(0, 0, 4 * K),
        mark(0, 32 * K, 4 * K),
        crash(0), store(A, [(4 * K, 4 * K)]),
        crash(1), merge(A, B),
        clear(A),
        mark(0, 0, 4 * K),
        set_enabled(B, False),
        ACTIVATE,
        add(C, 512),
        REOPEN,
        ACTIVATE,
        mark(1, 512 * K, 512),
    ],
    "resize": [
        add(A, 4 * K),
        ACTIVATE,
        mark(0, 0, 4 * K),
        INACTIVATE,
        resize(2048 * K),
        remove(A),
        crash(5), resize(2048 * K),
        add(B, 64 * K),
        crash(2), ACTIVATE,
        mark(0, 1536 * K, 4 * K),
        INACTIVATE,
        REOPEN,
        resize(512 * K + 512, odd=True),
        crash(3), resize(512 * K),
        ACTIVATE,
        mark(1, 500 * K, 4 * K),
    ],
    "preload": [
        add(A, 4 * K),
        add(B, 512),
        PRELOAD,
        ACTIVATE,
        mark(0, 0, 4 * K),
        INACTIVATE,
        PRELOAD,
        store(A, [(64 * K, 8 * K)]),
        clear(B),
        merge_from(B, 4 * K, [(900 * K, 4 * K)]),
        crash(1), ACTIVATE,
        mark(1, 100 * K, 512),
        PRELOAD,
        REOPEN,
        store(B, [(4 * K, 512)]),
        crash(0), ACTIVATE,
        mark(0, 200 * K, 4 * K),
    ],
    "in-flight": [
        add(A, 4 * K),
        ACTIVATE,
        begin_write(0, 0, 4 * K),
        begin_write(1, 64 * K, 4 * K),
        crash(3), checkpoint(B),
        END_WRITE,
        mark(0, 128 * K, 4 * K),
        begin_write(0, 256 * K, 4 * K),
        begin_write(2, 512 * K, 4 * K, via_intent=True),
        crash(1), clear(B),
        poll(0),
        set_enabled(A, True),
        set_enabled(B, False),
        crash(2), add(C, 512),
        checkpoint(D),
        END_WRITE,
        set_enabled(C, False),
        crash(0), checkpoint(D),
        END_WRITE,
        INACTIVATE,
    ],
    "refusals": [
        mark(0, 0, 512),
        FLUSH,
        clear(A),
        ACTIVATE,
        ACTIVATE,
        mark(0, 0, 512),
        intent(0, 0, 512),
        add(A, 4 * K),
        INACTIVATE,
        INACTIVATE,
        add(A, 4 * K),
        remove(D),
        store(C, []),
        merge(A, D),
        REOPEN,
        ACTIVATE,
        mark(1, 1024 * K - 64, 512),
        intent(1, 1024 * K - 64, 512),
        commit(1),
        set_enabled(A, False),
        mark(1, 1024 * K - 64, 512),
    ],
}


# The findings of docs/FUZZING.md ("Durable-mode findings"), minimal, at 512 B clusters on a
# 1 MiB disk; each has a named test in tests/fuzz_ops_corpus.rs.
REGRESSIONS = {
    # A tracker's durable bits claimed what an inactive clear had dropped.
    "tracker-acknowledges-after-inactive-clear": [
        add(A, 4 * K),
        ACTIVATE,
        mark(0, 0, 4 * K),
        INACTIVATE,
        clear(A),
        mark(0, 0, 4 * K),
    ],
    # The fast path answered before the range check when nothing recorded.
    "mark-past-the-disk-succeeds-when-nothing-records": [
        add(A, 4 * K),
        ACTIVATE,
        set_enabled(A, False),
        mark(0, 1024 * K - 64, 512),
    ],
    # A tracker kept the bitmaps of the activation it was taken in (none here).
    "tracker-of-an-earlier-activation-after-reactivation": [
        ACTIVATE,
        mark(0, 0, 512),
        INACTIVATE,
        add(A, 512),
        ACTIVATE,
        mark(0, 160 * K, 1),
    ],
    # Intent::wait looped on a range past a disk shrunk since the intent.
    "intent-past-a-shrunk-disk-waits-forever": [
        ACTIVATE,
        mark(0, 0, 512),
        INACTIVATE,
        intent(0, 1020 * K, 512),
        resize(512 * K),
        add(A, 4 * K),
        ACTIVATE,
        poll(0),
        wait(0),
    ],
}
REGRESSION_DIR = os.path.join(HERE, "regressions", "ops_durable")


def main():
    os.makedirs(REGRESSION_DIR, exist_ok=True)
    for name, ops in REGRESSIONS.items():
        with open(os.path.join(REGRESSION_DIR, name), "wb") as f:
            f.write(bytes([0]) + u16(2047) + bytes([1]) + b"".join(ops))
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.startswith("seed-"):
            os.remove(os.path.join(OUT, f))
    n = 0
    for cs_byte, cs in ((0, 512), (1, 1024), (3, 4096)):
        for name, ops in SEQUENCES.items():
            header = bytes([cs_byte]) + u16(2047) + bytes([cs_byte * 37 + 1])
            with open(os.path.join(OUT, f"seed-{name}-{cs}"), "wb") as f:
                f.write(header + b"".join(ops))
            n += 1
    print(f"ops_durable: {n} seeds, {len(REGRESSIONS)} regressions")


if __name__ == "__main__":
    sys.exit(main())
