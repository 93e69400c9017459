//! What the benchmarks share: how many runs, and the median of them.

/// `UFVMM_BENCH_REPS`, or `default`; a value that is not a whole number from 1 up is
/// refused rather than ignored.
pub fn reps(default: usize) -> usize {
    match std::env::var("UFVMM_BENCH_REPS") {
        Ok(v) => {
            let n: usize = v
                .trim()
                .parse()
                .expect("UFVMM_BENCH_REPS must be a whole number");
            assert!(n >= 1, "UFVMM_BENCH_REPS must be at least 1");
            n
        }
        Err(_) => default,
    }
}

/// Median of a non-empty list (mean of the middle two for even lengths).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Smallest and largest of a non-empty list: the spread shown next to a median.
// Each bench compiles this module on its own, and not every one shows a spread.
#[allow(dead_code)]
pub fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}
