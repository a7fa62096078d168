//! The numbers of one variant over one rollout step: turns answered and
//! failed, and times to first token in a histogram whose buckets grow by
//! [`GROWTH`] — counts that add up across replicas (a Redis hash of
//! counters) and give a p95 within one bucket's width.

use std::time::Duration;

/// Each bucket's upper bound is the previous one's times this: a p95 is
/// read within 25 %.
pub const GROWTH: f64 = 1.25;

/// Buckets: 1 ms × 1.25^k for k in 0..BUCKETS, the last one open-ended
/// (1.25^60 ms ≈ 11 min).
pub const BUCKETS: usize = 61;

/// One variant's turns over one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    /// Turns the variant answered.
    pub ok: u64,
    /// Turns the variant failed (every attempt on it, breaker refusals
    /// included).
    pub fail: u64,
    /// Answered turns per time-to-first-token bucket ([`bucket`]).
    pub latency: Vec<u64>,
}

/// The bucket of a time to first token: the first `k` with
/// `ttft ≤ 1.25^k` ms.
pub fn bucket(ttft: Duration) -> usize {
    let ms = ttft.as_secs_f64() * 1000.0;
    if ms <= 1.0 {
        return 0;
    }
    let k = (ms.ln() / GROWTH.ln()).ceil();
    (k as usize).min(BUCKETS - 1)
}

impl Window {
    /// Adds one turn: answered (with its time to first token) or failed.
    pub fn add(&mut self, ok: bool, ttft: Option<Duration>) {
        if ok {
            self.ok += 1;
            if let Some(t) = ttft {
                self.add_latency(bucket(t), 1);
            }
        } else {
            self.fail += 1;
        }
    }

    /// Adds `count` answered turns to bucket `k`.
    pub fn add_latency(&mut self, k: usize, count: u64) {
        if self.latency.len() <= k {
            self.latency.resize(k + 1, 0);
        }
        self.latency[k] += count;
    }

    /// Answered plus failed.
    pub fn turns(&self) -> u64 {
        self.ok + self.fail
    }

    /// Answered turns with a measured time to first token.
    pub fn answered(&self) -> u64 {
        self.latency.iter().sum()
    }

    /// Failed over all turns; 0 without turns.
    pub fn error_rate(&self) -> f64 {
        if self.turns() == 0 {
            0.0
        } else {
            self.fail as f64 / self.turns() as f64
        }
    }

    /// The 95th percentile time to first token, in ms: the upper bound of
    /// the bucket holding it. `None` without answered turns.
    pub fn p95_ms(&self) -> Option<f64> {
        let n = self.answered();
        if n == 0 {
            return None;
        }
        // The smallest bucket whose cumulative count reaches 95 % of n.
        let rank = (n as f64 * 0.95).ceil() as u64;
        let mut seen = 0;
        for (k, c) in self.latency.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(GROWTH.powi(k as i32));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_grow_by_a_quarter() {
        assert_eq!(bucket(Duration::from_micros(500)), 0);
        assert_eq!(bucket(Duration::from_millis(1)), 0);
        assert_eq!(bucket(Duration::from_micros(1_250)), 1);
        assert_eq!(bucket(Duration::from_micros(1_251)), 2);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
    }

    #[test]
    fn p95_is_read_within_a_bucket() {
        let mut w = Window::default();
        assert_eq!(w.p95_ms(), None);
        for i in 1..=100u64 {
            w.add(true, Some(Duration::from_millis(i * 10)));
        }
        w.add(false, None);
        let p95 = w.p95_ms().unwrap();
        // The true p95 is 950 ms; the bucket bound is at most 25 % above.
        assert!((950.0..=950.0 * GROWTH).contains(&p95), "{p95}");
        assert_eq!((w.turns(), w.answered()), (101, 100));
        assert!((w.error_rate() - 1.0 / 101.0).abs() < 1e-9);
    }
}
