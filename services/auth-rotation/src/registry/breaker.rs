//! A circuit breaker (Nygard, "Release It!", 2007) with the semantics of
//! docs/architecture.md: 3 consecutive failures open it; after a cool-down that doubles
//! with every re-opening (capped) one half-open probe is let through; its
//! success closes the breaker, its failure re-opens it.

use std::time::{Duration, Instant};

use moltbot_proto::auth::v1::BreakerState;

/// Consecutive failures that open a closed breaker.
pub const FAILURE_THRESHOLD: u32 = 3;

/// How long a half-open probe holds the breaker's single slot. A probe
/// whose outcome is never reported (the request was cancelled, the caller
/// crashed, the lease expired) releases it after this, so an endpoint never
/// stays "retry after" forever behind an abandoned probe.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// Cool-down settings.
#[derive(Debug, Clone, Copy)]
pub struct Cooldown {
    /// First cool-down.
    pub base: Duration,
    /// Longest cool-down.
    pub max: Duration,
}

/// One breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    open: bool,
    failures: u32,
    /// Times opened in a row without a success: the cool-down exponent.
    openings: u32,
    open_until: Instant,
    /// While a half-open probe is out: when its slot is released anyway.
    probe_until: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            open: false,
            failures: 0,
            openings: 0,
            open_until: Instant::now(),
            probe_until: None,
        }
    }
}

impl Breaker {
    /// State as clients see it: an open breaker whose cool-down has passed
    /// is half-open (the next call is the probe).
    pub fn state(&self, now: Instant) -> BreakerState {
        if !self.open {
            BreakerState::Closed
        } else if now >= self.open_until {
            BreakerState::HalfOpen
        } else {
            BreakerState::Open
        }
    }

    /// Consecutive failures counted.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a call would be let through now (without taking the probe).
    /// `Err` carries the time until it might.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        match self.state(now) {
            BreakerState::Closed | BreakerState::Unspecified => Ok(()),
            BreakerState::Open => Err(self.open_until - now),
            BreakerState::HalfOpen => match self.probe_until {
                Some(until) if now < until => Err(until - now),
                _ => Ok(()),
            },
        }
    }

    /// Lets a call through (after [`Breaker::check`]); in half-open state it
    /// becomes the probe, and no other call passes until it is reported or
    /// [`PROBE_DEADLINE`] has passed.
    pub fn admit(&mut self, now: Instant) -> bool {
        let probe = self.state(now) == BreakerState::HalfOpen;
        if probe {
            self.probe_until = Some(now + PROBE_DEADLINE);
        }
        probe
    }

    /// A call succeeded: closes the breaker.
    pub fn success(&mut self) {
        *self = Self::default();
    }

    /// A call failed (5xx, timeout, connection error).
    pub fn failure(&mut self, now: Instant, cooldown: Cooldown) {
        self.probe_until = None;
        if self.open {
            // The half-open probe failed: open again for longer.
            self.openings += 1;
            self.open_until = now + Self::cooldown(cooldown, self.openings);
            return;
        }
        self.failures += 1;
        if self.failures >= FAILURE_THRESHOLD {
            self.open = true;
            self.openings = 1;
            self.open_until = now + Self::cooldown(cooldown, 1);
        }
    }

    /// A call ended in a way that says nothing about the endpoint (429,
    /// 401, a client error): a probe's slot is released.
    pub fn neutral(&mut self) {
        self.probe_until = None;
    }

    fn cooldown(c: Cooldown, openings: u32) -> Duration {
        let factor = 2u32.saturating_pow(openings.saturating_sub(1).min(16));
        c.base.saturating_mul(factor).min(c.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Cooldown = Cooldown {
        base: Duration::from_millis(100),
        max: Duration::from_millis(350),
    };

    #[test]
    fn opens_after_three_and_half_opens_after_the_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.failure(t0, C);
        b.failure(t0, C);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0, C);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(b.check(t0).is_err());
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.check(t1).is_ok());
        assert!(b.admit(t1));
        // Only one probe at a time.
        assert!(b.check(t1).is_err());
        // The probe fails: open for twice as long.
        b.failure(t1, C);
        assert!(b.check(t1 + Duration::from_millis(150)).is_err());
        let t2 = t1 + Duration::from_millis(200);
        assert!(b.check(t2).is_ok());
        b.admit(t2);
        b.success();
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn an_abandoned_probe_releases_its_slot_at_the_deadline() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURE_THRESHOLD {
            b.failure(t0, C);
        }
        let t1 = t0 + Duration::from_millis(100);
        assert!(
            b.admit(t1),
            "the first call after the cool-down is the probe"
        );
        // Never reported: others wait, but only until the deadline.
        let waiting = b.check(t1 + Duration::from_secs(1)).unwrap_err();
        assert_eq!(waiting, PROBE_DEADLINE - Duration::from_secs(1));
        let later = t1 + PROBE_DEADLINE;
        assert!(b.check(later).is_ok());
        assert!(b.admit(later), "a new probe is let through");
        // That one succeeds: traffic flows again.
        b.success();
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn a_neutral_outcome_frees_the_probe_without_closing() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURE_THRESHOLD {
            b.failure(t0, C);
        }
        let t1 = t0 + Duration::from_millis(100);
        b.admit(t1);
        b.neutral();
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.check(t1).is_ok());
    }

    #[test]
    fn cooldown_is_capped() {
        assert_eq!(Breaker::cooldown(C, 1), Duration::from_millis(100));
        assert_eq!(Breaker::cooldown(C, 2), Duration::from_millis(200));
        assert_eq!(Breaker::cooldown(C, 9), Duration::from_millis(350));
    }

    #[test]
    fn a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::default();
        b.failure(t, C);
        b.failure(t, C);
        b.success();
        b.failure(t, C);
        assert_eq!(b.state(t), BreakerState::Closed);
    }
}
