#!/usr/bin/env bash
# Fuzz smoke: every fuzz target under fuzz/ runs for FUZZ_SECONDS (10 by default; 40 s in all for the four targets: a smoke run that keeps CI short) from its
# committed corpus, with libFuzzer's allocation limit so that a decoder allocating far beyond
# its input fails as surely as one that panics. The targets are built with the coverage flags
# `cargo fuzz` uses, without its sanitizer, so CI needs no cargo-fuzz install and no nightly;
# `cargo fuzz run TARGET` (see fuzz/README.md) is the full-strength run by hand. New inputs
# found here go to a scratch copy of the corpus, not into the repository.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-10}
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^parjob-fuzz$')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=target/ci
# An explicit target keeps RUSTFLAGS off build scripts and proc macros, as cargo fuzz does.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --bins --target "$host"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $targets; do
    mkdir -p "$scratch/$target" "artifacts/$target"
    cp -r "corpus/$target/." "$scratch/$target/"
    started=$SECONDS
    "$CARGO_TARGET_DIR/$host/release/$target" "$scratch/$target" \
        -max_total_time="$seconds" -malloc_limit_mb=256 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 2>"$scratch/$target.log" || {
        tail -n 40 "$scratch/$target.log"
        echo "fuzz: $target FAILED; the input that failed is in fuzz/artifacts/$target/"
        exit 1
    }
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log")
    echo "fuzz: $target ran ${runs:-?} inputs in $((SECONDS - started)) s, no failure"
done
