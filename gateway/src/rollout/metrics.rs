//! Rollout metrics, per route and variant, registered at start (a counter
//! born at its first increment is invisible to `rate()`).

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};

use super::plan::{Phase, Rollout};
use crate::turn::metrics::register;

/// `moltbot_gateway_rollout_turns_total{route, variant, outcome}`: turns
/// counted for a rollout (`ok`, `error`), as judged by the controller.
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
pub static TURNS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_rollout_turns_total",
                "Turns counted for a rollout by route, variant and outcome",
            ),
            &["route", "variant", "outcome"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_rollout_transitions_total{route, event}`: transitions
/// this replica wrote (`started`, `advanced`, `paused`, `resumed`,
/// `rolled_back`, `promoted`, `aborted`).
#[allow(clippy::expect_used)]
pub static TRANSITIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_rollout_transitions_total",
                "Rollout transitions written by this gateway, by route and event",
            ),
            &["route", "event"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_rollout_canary_share_percent{route}`: the share of new
/// sessions sent to the canary now (0 once the rollout is over).
#[allow(clippy::expect_used)]
pub static SHARE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "moltbot_gateway_rollout_canary_share_percent",
                "Share of new sessions a route's rollout sends to its canary, percent",
            ),
            &["route"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_rollout_phase{route, phase}`: 1 for the phase each
/// route's rollout is in, 0 for the others.
#[allow(clippy::expect_used)]
pub static PHASE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "moltbot_gateway_rollout_phase",
                "Phase of each route's rollout (1 for the current one)",
            ),
            &["route", "phase"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_rollout_uncounted_turns_total`: rollout turns whose
/// count did not reach the store.
#[allow(clippy::expect_used)]
pub static LOST: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "moltbot_gateway_rollout_uncounted_turns_total",
            "Rollout turns whose count did not reach the rollout store",
        )
        .expect("valid metric"),
    )
});

/// Sets the gauges of `r`'s route.
pub fn publish(r: &Rollout) {
    SHARE
        .with_label_values(&[r.route.as_str()])
        .set(i64::from(r.share()));
    for phase in [
        Phase::Running,
        Phase::Paused,
        Phase::RolledBack,
        Phase::Promoted,
        Phase::Aborted,
    ] {
        PHASE
            .with_label_values(&[r.route.as_str(), phase.as_str()])
            .set(i64::from(phase == r.phase));
    }
}

/// Registers the rollout metrics at start-up.
pub fn register_all() {
    LazyLock::force(&TURNS);
    LazyLock::force(&TRANSITIONS);
    LazyLock::force(&SHARE);
    LazyLock::force(&PHASE);
    LazyLock::force(&LOST);
}
