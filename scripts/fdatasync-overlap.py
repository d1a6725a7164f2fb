#!/usr/bin/env python3
"""Random in-place 4 KiB page writes to a 1 GiB file written whole beforehand, each batch
followed by fdatasync, for 3 s per row: one writer with 16 pages per barrier against
several writers with fewer pages each, their barriers in flight at once. How much
overlapping barriers would gain a durable group commit on this disk (docs/BENCHMARKS.md,
"The durable mode's intents").

Usage: scripts/fdatasync-overlap.py [FILE]   (FILE is created, then removed; 1 GiB)
"""
import os, random, sys, time, threading
path = sys.argv[1] if len(sys.argv) > 1 else "fdatasync-overlap.bin"
size = 1 << 30
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, size)
buf = b"\x01" * (1 << 20)
for off in range(0, size, 1 << 20):
    os.pwrite(fd, buf, off)
os.fsync(fd)
page = b"\x02" * 4096
def worker(fd, pages, secs, seed, out):
    rnd = random.Random(seed)
    n = 0
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(pages):
            os.pwrite(fd, page, rnd.randrange(0, size // 4096) * 4096)
        os.fdatasync(fd)
        n += pages
    out.append(n)
for threads, pages in [(1, 1), (1, 16), (2, 8), (4, 4), (16, 1)]:
    out = []
    ths = [threading.Thread(target=worker, args=(fd, pages, 3.0, k, out)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ths: t.start()
    for t in ths: t.join()
    dt = time.perf_counter() - t0
    print(f"{threads} threads x {pages} pages per fdatasync: {sum(out)/dt:.0f} pages/s")
os.close(fd)
os.remove(path)
