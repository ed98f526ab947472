//! Timing shared by the device benchmarks.

use std::time::Instant;

/// Best of five runs of `n` calls of `f` (given the call's index), in ns per call: the
/// machine is shared, the minimum is the cost.
pub fn ns_per(n: u64, mut f: impl FnMut(u64)) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::INFINITY, f64::min)
}
