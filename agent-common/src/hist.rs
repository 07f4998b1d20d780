//! Log2 histogram with linear sub-buckets (an HDR-style layout), shared by kernel and user space.
//! Values below 8 get a bucket each; above, every power of two is split into 8 equal sub-buckets, so a
//! bucket spans at most 1/8 of its lower bound: a percentile read as the bucket's midpoint is off by ≤ 6.25 %.

/// Linear sub-buckets per power of two (2^3 = 8).
pub const SUB_BITS: u32 = 3;
const SUBS: u32 = 1 << SUB_BITS;
/// Largest power of two with its own buckets; larger values fall into the last bucket.
/// 2^25 µs ≈ 33.5 s, far above any RTT a TCP connection survives.
pub const MAX_EXP: u32 = 24;
/// Number of buckets: 8 exact ones, then 8 per power of two from 2^3 to 2^MAX_EXP.
pub const HIST_BUCKETS: usize = ((MAX_EXP - 1) * SUBS) as usize;

/// floor(log2(v)) for v > 0, written as a branchy binary search so the BPF backend (no `clz`) stays short.
#[inline(always)]
const fn log2_u32(mut v: u32) -> u32 {
    let mut r = 0;
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

/// Bucket of `v`; always `< HIST_BUCKETS`, so the kernel can index without a further check failing.
#[inline(always)]
pub const fn bucket_index(v: u32) -> usize {
    if v < SUBS {
        return v as usize;
    }
    let e = log2_u32(v);
    if e > MAX_EXP {
        return HIST_BUCKETS - 1;
    }
    let sub = (v >> (e - SUB_BITS)) & (SUBS - 1);
    let idx = ((e - SUB_BITS + 1) * SUBS + sub) as usize;
    if idx < HIST_BUCKETS {
        idx
    } else {
        HIST_BUCKETS - 1
    }
}

/// Inclusive lower and exclusive upper bound of bucket `i`.
pub const fn bucket_bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    let subs = SUBS as u64;
    if i < subs {
        return (i, i + 1);
    }
    let e = i / subs + (SUB_BITS as u64) - 1;
    let sub = i % subs;
    let width = 1u64 << (e - SUB_BITS as u64);
    let lo = (subs + sub) * width;
    (lo, lo + width)
}

/// The RTT sample (µs) the kernel took between two `tcp_probe` events of one socket, from the
/// smoothed RTT each reports (`srtt_us >> 3`, before the event's segment is processed): the
/// kernel's estimator moves the smoothed RTT an eighth of the way to each sample
/// (`tcp_rtt_estimator()`: `srtt_us += m − srtt_us / 8`, kept ×8), so one sample `m` between
/// `before` and `after` is `8 · after − 7 · before`, to within 8 µs of rounding; with no estimate
/// before (`before == 0`) the first sample is the estimate itself. An estimate that fell further
/// than one sample can move it took several (or none was there to undo): the smoothed value stands
/// in. A histogram of the smoothed RTT would carry each sample on for about eight more: a flow that
/// sends a request or two a second showed a queue for seconds after it had gone, and its first
/// sample (the handshake) for as long.
#[inline(always)]
pub const fn rtt_sample_us(before: u32, after: u32) -> u32 {
    if before == 0 {
        return after;
    }
    let (b, a) = (before as u64, after as u64);
    if 8 * a < 7 * b {
        return after;
    }
    let m = 8 * a - 7 * b;
    if m > u32::MAX as u64 {
        u32::MAX
    } else if m == 0 {
        1
    } else {
        m as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact() {
        for v in 0..8u32 {
            assert_eq!(bucket_index(v), v as usize);
            assert_eq!(bucket_bounds(v as usize), (v as u64, v as u64 + 1));
        }
    }

    #[test]
    fn every_value_falls_inside_its_bucket() {
        let mut v: u32 = 1;
        while v < (1 << (MAX_EXP + 1)) {
            for probe in [
                v,
                v.saturating_add(v / 3),
                v.saturating_add(v / 2),
                v.saturating_mul(2) - 1,
            ] {
                let (lo, hi) = bucket_bounds(bucket_index(probe));
                assert!(
                    lo <= probe as u64 && (probe as u64) < hi,
                    "{probe} not in [{lo},{hi})"
                );
                assert!(
                    (hi - lo) * 8 <= lo.max(8),
                    "bucket [{lo},{hi}) wider than 1/8"
                );
            }
            v *= 2;
        }
    }

    #[test]
    fn huge_values_clamp_to_last_bucket() {
        assert_eq!(bucket_index(u32::MAX), HIST_BUCKETS - 1);
        assert_eq!(bucket_index(1 << 30), HIST_BUCKETS - 1);
    }

    #[test]
    fn buckets_are_contiguous() {
        for i in 1..HIST_BUCKETS {
            assert_eq!(
                bucket_bounds(i - 1).1,
                bucket_bounds(i).0,
                "gap before bucket {i}"
            );
        }
    }

    /// The kernel's estimator, as `tcp_rtt_estimator()` keeps it (×8) and `tcp_probe` reports it.
    struct Estimator(u32);
    impl Estimator {
        fn sample(&mut self, m: u32) {
            if self.0 == 0 {
                self.0 = m << 3;
            } else {
                let err = m as i64 - (self.0 >> 3) as i64;
                self.0 = (self.0 as i64 + err) as u32;
            }
        }
        fn reported(&self) -> u32 {
            self.0 >> 3
        }
    }

    #[test]
    fn each_sample_is_recovered_from_the_smoothed_rtt_around_it() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut est = Estimator(0);
        let mut before = est.reported();
        for k in 0..10_000 {
            // Queues that come and go: 10 ms to 300 ms, with jumps either way.
            let m = if k % 50 < 5 { 300_000 } else { 10_000 } + (next() % 40_000) as u32;
            est.sample(m);
            let after = est.reported();
            let got = rtt_sample_us(before, after);
            assert!(
                got.abs_diff(m) <= 8,
                "sample {m} µs read as {got} ({before} → {after})"
            );
            before = after;
        }
    }

    #[test]
    fn the_first_sample_is_the_estimate_and_several_fall_back_to_it() {
        let mut est = Estimator(0);
        est.sample(24_000);
        assert_eq!(rtt_sample_us(0, est.reported()), 24_000);
        // Two samples between reports that pulled the estimate down further than one can: the
        // smoothed value, not a negative or wrapped sample.
        let before = est.reported();
        est.sample(1_000);
        est.sample(1_000);
        assert_eq!(rtt_sample_us(before, est.reported()), est.reported());
        // An ACK with no sample leaves the estimate: the sample read is the estimate itself.
        assert_eq!(rtt_sample_us(20_000, 20_000), 20_000);
        assert_eq!(rtt_sample_us(u32::MAX, u32::MAX), u32::MAX);
    }
}
