#!/usr/bin/env bash
# Installs what the tests need when it is missing, then runs every check the project keeps:
# formatting, clippy, all tests (unit, integration, doc, benches in test mode), the library
# without default features, the examples, the loom models, and the docs. Exits non-zero on the first failure.
# `scripts/test.sh --tools` installs and checks the tools only.
set -euo pipefail
cd "$(dirname "$0")/.."

# QEMU's tools are the oracle for the on-disk format; the tests fail (never skip) without them.
# They are written against QEMU 10 (tests/format.rs, tests/cli.rs) and drive
# qemu-storage-daemon (tests/checkpoint.rs, tests/backup.rs); Debian bookworm's own
# qemu-utils is 7.2 without qemu-storage-daemon, so there it comes from bookworm-backports.
qemu_min=10
qemu_major() {
    qemu-img --version 2>/dev/null | sed -n 's/^qemu-img version \([0-9][0-9]*\)\..*/\1/p' | head -n 1
}
qemu_ok() {
    command -v qemu-img >/dev/null 2>&1 || return 1
    command -v qemu-storage-daemon >/dev/null 2>&1 || return 1
    local major
    major=$(qemu_major)
    [ -n "$major" ] && [ "$major" -ge "$qemu_min" ]
}
need=()
qemu=""
qemu_ok || qemu=qemu-utils
{ command -v nbdinfo && command -v nbdcopy; } >/dev/null 2>&1 || need+=(libnbd-bin)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
if [ -n "$qemu" ] || [ "${#need[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    codename=$( . /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}" ) || codename=""
    backports=()
    if [ -n "$qemu" ] && [ "$codename" = bookworm ]; then
        echo "==> adding bookworm-backports for QEMU >= $qemu_min"
        echo "deb http://deb.debian.org/debian bookworm-backports main" \
            | $sudo tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
        backports=(-t bookworm-backports)
    fi
    $sudo apt-get update -qq
    if [ -n "$qemu" ]; then
        echo "==> installing qemu-utils${backports[*]:+ ${backports[*]}}"
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${backports[@]}" qemu-utils
    fi
    if [ "${#need[@]}" -gt 0 ]; then
        echo "==> installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
    fi
fi
missing=()
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdinfo nbdcopy strace; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=("python3's nbd module (python3-libnbd)")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: still missing: ${missing[*]}" >&2
    exit 1
fi
if ! qemu_ok; then
    echo "scripts/test.sh: $(qemu-img --version | head -n 1) is older than QEMU $qemu_min, which the" \
        "tests need; install QEMU $qemu_min or later (on Debian bookworm: qemu-utils from" \
        "bookworm-backports)" >&2
    exit 1
fi
if [ "${1:-}" = "--tools" ]; then
    echo "==> the tools are in place"
    exit 0
fi

# The tests build the library and `dbm` at opt-level 1: the CLI, migration and geometry
# tests drive real workloads (the demo on a 1 TiB disk, the benchmarks' --quick modes, every
# bench target once), which at opt-level 0 took most of CI's time. Overflow checks and debug
# assertions stay on, as in any dev build.
export CARGO_PROFILE_DEV_OPT_LEVEL=1
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "==> cargo test --all-targets"
cargo test --all-targets
echo "==> cargo test --doc"
cargo test --doc
echo "==> the library alone: no default features, none of the CLI's crates"
cargo clippy --lib --no-default-features -- -D warnings
# Captured first, so that a failing cargo tree stops the script (in a pipe into grep's `if`,
# its failure read as "no CLI crate").
deps=$(cargo tree -e normal --no-default-features --prefix none)
if grep -E '^(clap|serde_json|tempfile|rand) ' <<<"$deps"; then
    echo "scripts/test.sh: the library without default features depends on a CLI crate" >&2
    exit 1
fi
echo "==> examples"
for example in examples/*.rs; do
    cargo run --quiet --example "$(basename "$example" .rs)"
done
echo "==> loom models (tests/loom.rs)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom
echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
echo "==> all checks passed"
