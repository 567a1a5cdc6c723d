//! The task functions every implementation calls: the same code for parjob's backends and the
//! references, so that a ratio measures only the way the calls are run.

use std::time::Duration;

/// Rounds of [`mix`] in [`spin`]: about 1 us on the 2-core VM the targets were set on
/// (the `small` scenario's "about 1 us of work").
const SPIN_ROUNDS: u32 = 270;

/// splitmix64's finaliser: a cheap, well-mixed hash of `x`.
#[inline]
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// About 1 us of dependent arithmetic (`small`): each round needs the previous one.
pub fn spin(x: u64) -> u64 {
    let mut h = x;
    for _ in 0..SPIN_ROUNDS {
        h = mix(h);
    }
    h
}

/// The least work a task can do (`tiny`).
pub fn square(x: u64) -> u64 {
    x.wrapping_mul(x)
}

/// [`square`] over a chunk of inputs: one hand-chunked procspawn call (`tiny`, `--peers`).
pub fn square_chunk(xs: Vec<u64>) -> Vec<u64> {
    xs.into_iter().map(square).collect()
}

/// [`spin`] over a chunk of inputs: one hand-chunked procspawn call (`small`, `--peers`).
pub fn spin_chunk(xs: Vec<u64>) -> Vec<u64> {
    xs.into_iter().map(spin).collect()
}

/// The seed lesson's sum of squares, on `count` pseudo-random 32-bit integers drawn from
/// `seed` (`cpu_halves`). The integers are made inside the task, so no data travels.
pub fn sum_squares(seed: u64, count: u64) -> u64 {
    let base = mix(seed);
    (0..count)
        .map(|i| mix(base.wrapping_add(i)) & 0xFFFF_FFFF)
        .fold(0u64, |acc, x| acc.wrapping_add(x * x))
}

/// [`sum_squares`] taking `(seed, count)` as one argument, as procspawn calls take one
/// (`cpu_halves`, `--peers`).
pub fn sum_squares_of((seed, count): (u64, u64)) -> u64 {
    sum_squares(seed, count)
}

/// Sleeps `ms` milliseconds: a task that waits (`sleep_io`, `first_result`).
pub fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Sums a vector that was sent to the task whole (`big_input`).
pub fn sum_owned(values: Vec<f64>) -> f64 {
    sum_slice(&values)
}

/// Makes `n` values and returns them whole (`big_result`): the same values `big_input` sums.
pub fn make_values(n: u64) -> Vec<f64> {
    (0..n).map(|i| (i % 1000) as f64 * 0.5).collect()
}

/// Sums a part of a shared array in place (`big_input`, shared rows).
pub fn sum_shared(values: parjob::SharedSlice<f64>) -> f64 {
    sum_slice(&values)
}

/// Sums with eight independent accumulators, so the sum runs at memory speed rather than at
/// the latency of one floating-point add.
pub fn sum_slice(values: &[f64]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// Kills the process it runs in with `SIGABRT` (`crash`, process backend only).
pub fn abort_now(_: ()) -> u64 {
    std::process::abort()
}
