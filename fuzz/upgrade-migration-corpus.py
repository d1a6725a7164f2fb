#!/usr/bin/env python3
"""Upgrades fuzz/corpus/migration_stream/ inputs from stream version 7 to 8 in place.

Version 8 changed no byte of the source's frames: a shared disk's destination answers every
BEGIN and whole LOG, following or not, and each LOG it applied, in a preload report that grew
from 17 to 25 bytes (the last take applied), and its source does not switch over until BEGIN
or the last whole LOG is answered (docs/FORMAT.md, "Migration stream"). A version-7 input is
refused at its stream header or its Hello, so the corpus the fuzzer found would no longer
reach the protocol; a 17-byte preload report in an input is left as it is (it no longer
decodes, and exercises the refusal). This rewrites, per
mode (src/fuzzing.rs, `migration_stream`):
  0 (reader): the stream header's version, then each well-formed frame up to the first that
    is not; a Hello's version field reads 8; lengths and both checksums are recomputed; the
    bytes after the last well-formed frame are kept as they are;
  2 (payload decoders): a Hello payload (kind % 11 == 1);
  3 (destination over records): each `kind, len, payload` record of kind 1.
Seeds (seed-*) come from fuzz/make-migration-corpus.py and are left alone. An input that does
not parse as version 7 is left alone. Idempotent: a version-8 input is not touched.
(Version 7 had the same bytes as 6, with Reports during precopy; version 6 added the Hello's
`incremental` byte after `resume`; commits d7b085d and c737ef3 upgraded the corpus from 5 to
6 and from 6 to 7 with this script's earlier forms.)

    fuzz/upgrade-migration-corpus.py
"""
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
DIR = os.path.join(HERE, "corpus", "migration_stream")
MAGIC, OLD, NEW = 0x4442_4D4D, 7, 8
HELLO = 1


def upgrade_hello(p):
    """A version-7 Hello payload as version 8, or None if it is not one."""
    if len(p) < 4 or struct.unpack(">I", p[:4])[0] != OLD:
        return None
    return struct.pack(">I", NEW) + p[4:]


def frame(kind, flags, reserved, seq, payload):
    head = struct.pack(">BBHQI", kind, flags, reserved, seq, len(payload))
    head += struct.pack(">I", zlib.crc32(head))
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


def upgrade_stream(s):
    if len(s) < 8 or struct.unpack(">II", s[:8]) != (MAGIC, OLD):
        return None
    out, at = bytearray(struct.pack(">II", MAGIC, NEW)), 8
    while at + 20 <= len(s):
        head = s[at:at + 16]
        kind, flags, reserved, seq, n = struct.unpack(">BBHQI", head)
        if struct.unpack(">I", s[at + 16:at + 20])[0] != zlib.crc32(head):
            break
        end = at + 20 + n
        if end + 4 > len(s) or struct.unpack(">I", s[end:end + 4])[0] != zlib.crc32(s[at:end]):
            break
        payload = s[at + 20:end]
        if kind == HELLO:
            payload = upgrade_hello(payload) or payload
        out += frame(kind, flags, reserved, seq, payload)
        at = end + 4
    return bytes(out + s[at:])


def upgrade_records(s):
    out, at, changed = bytearray(), 0, False
    while at + 3 <= len(s):
        kind, n = s[at], struct.unpack(">H", s[at + 1:at + 3])[0]
        payload = s[at + 3:at + 3 + n]
        if kind == HELLO and len(payload) == n:
            new = upgrade_hello(payload)
            if new is not None and len(new) <= 0xFFFF:
                payload, changed = new, True
        out += bytes([kind]) + struct.pack(">H", len(payload)) + payload
        at += 3 + n
    return bytes(out + s[at:]) if changed else None


def upgrade(data):
    if not data:
        return None
    mode, rest = data[0], data[1:]
    if mode % 4 == 0:
        new = upgrade_stream(rest)
    elif mode % 4 == 2 and rest and rest[0] % 11 == HELLO:
        p = upgrade_hello(rest[1:])
        new = rest[:1] + p if p is not None else None
    elif mode % 4 == 3:
        new = upgrade_records(rest)
    else:
        new = None
    return None if new is None else bytes([mode]) + new


def main():
    changed = 0
    for name in sorted(os.listdir(DIR)):
        if name.startswith("seed-"):
            continue
        path = os.path.join(DIR, name)
        with open(path, "rb") as f:
            data = f.read()
        new = upgrade(data)
        if new is not None and new != data:
            with open(path, "wb") as f:
                f.write(new)
            changed += 1
    print(f"upgraded {changed} inputs in {DIR}")


if __name__ == "__main__":
    main()
