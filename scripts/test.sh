#!/usr/bin/env bash
# Installs what the tests need when it is missing, then runs every check the project keeps:
# formatting, clippy, all tests (unit, integration, doc, benches in test mode), the library
# without default features, the examples, the loom models, and the docs. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# QEMU's tools are the oracle for the on-disk format; the tests fail (never skip) without them.
need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v nbdcopy >/dev/null 2>&1 || need+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
if [ "${#need[@]}" -gt 0 ]; then
    echo "==> installing ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
for tool in qemu-img qemu-io qemu-nbd nbdinfo; do
    command -v "$tool" >/dev/null 2>&1 || { echo "scripts/test.sh: $tool is still missing" >&2; exit 1; }
done

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
