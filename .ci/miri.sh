#!/usr/bin/env bash
# Miri: parjob-core's unit tests (batches, the dispatcher, and pools that break the Pool
# contract) run under Rust's interpreter, which stops at undefined behaviour. It needs the
# nightly toolchain with the miri and rust-src components; they are installed here when
# missing. If they cannot be had (no rustup, no network, no miri for this nightly), or Miri's
# sysroot cannot be built, this prints one line saying why Miri did not run and exits 0: that
# is a fact about the machine, not about the code. Once Miri runs, any failure fails CI.
#
# Tests that cannot run under Miri (real files under /proc, megabytes of data that take
# minutes to interpret) carry `#[cfg_attr(miri, ignore)]` in the source.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() {
    echo "miri: SKIPPED, Miri could not run: $*"
    exit 0
}

command -v rustup >/dev/null 2>&1 || skip "rustup is not installed"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal --component miri,rust-src >&2 ||
        skip "rustup could not install the nightly toolchain"
fi
installed=$(rustup component list --installed --toolchain nightly 2>/dev/null || true)
if ! grep -q '^miri' <<<"$installed" || ! grep -q '^rust-src' <<<"$installed"; then
    rustup component add miri rust-src --toolchain nightly >&2 ||
        skip "rustup could not add the miri and rust-src components to nightly ($(rustup run nightly rustc --version 2>/dev/null || echo 'unknown nightly'))"
fi
# Builds Miri's own standard library once per nightly (about a minute; cached in ~/.cache/miri).
# Its dependencies come from the registry, or from ~/.cargo's cache when offline.
cargo +nightly miri setup >&2 ||
    skip "cargo +nightly miri setup failed (no registry access and nothing cached?)"

# Strict provenance: no integer-to-pointer casts, so a pointer's origin is always known.
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-strict-provenance}"
started=$SECONDS
CARGO_TARGET_DIR=target/miri cargo +nightly miri test -p parjob-core --lib
echo "miri: parjob-core's unit tests passed under Miri in $((SECONDS - started)) s (MIRIFLAGS=$MIRIFLAGS)"
