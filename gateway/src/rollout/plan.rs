//! A rollout's state and the pure rules that move it: what an operator
//! asks for ([`Plan`], validated), where the rollout stands ([`Rollout`],
//! [`Phase`]), and what the numbers of its current step decide
//! ([`decide`]). Nothing here reads a clock or a store: the controller
//! (`gateway/src/rollout/mod.rs`) hands in the time (Unix milliseconds,
//! shared by every replica) and the step's windows.

use serde::{Deserialize, Serialize};

use super::window::Window;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// New sessions go to the canary at the current step's share; steps
    /// advance on time and on clean numbers.
    Running,
    /// The share holds and no step advances; a breach still rolls back.
    Paused,
    /// A breach (or nothing else) sent every new session back to the
    /// stable model; `reason` says which.
    RolledBack,
    /// The canary won: it heads the route's candidates from now on (the
    /// configuration's candidates follow it as fallbacks) until the file
    /// names it.
    Promoted,
    /// The operator stopped it: every new session goes to the stable model.
    Aborted,
}

impl Phase {
    /// The wire name (`running`, `rolled_back`, …), also the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::RolledBack => "rolled_back",
            Self::Promoted => "promoted",
            Self::Aborted => "aborted",
        }
    }

    /// Running or paused: new sessions are still split.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// Which side of a rollout a session is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The route's configured models.
    Stable,
    /// The model being rolled out.
    Canary,
}

impl Variant {
    /// `stable` or `canary` (metrics label, store key part).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Canary => "canary",
        }
    }
}

/// What `moltbot rollout start` (`POST /admin/rollouts`) asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Route whose new sessions are split.
    pub route: String,
    /// The model rolled out (a local model or `provider/model`).
    pub to: String,
    /// Canary share of new sessions per step, in percent, ascending,
    /// ending at 100.
    #[serde(default = "default_steps")]
    pub steps: Vec<u8>,
    /// Least time at each step, in seconds.
    #[serde(default = "default_interval")]
    pub step_interval_s: f64,
    /// Canary turns a step must see before it advances, promotes or
    /// judges a breach.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Largest share of failed canary turns in a step, in [0, 1].
    #[serde(default = "default_error_rate")]
    pub max_error_rate: f64,
    /// Largest canary p95 time to first token as a multiple of the stable
    /// model's over the same step.
    #[serde(default = "default_latency_ratio")]
    pub max_latency_ratio: f64,
}

/// The seed documents' ramp: 10, 30, 50, 80, 100 %.
pub fn default_steps() -> Vec<u8> {
    vec![10, 30, 50, 80, 100]
}
fn default_interval() -> f64 {
    300.0
}
fn default_min_requests() -> u64 {
    100
}
fn default_error_rate() -> f64 {
    0.05
}
fn default_latency_ratio() -> f64 {
    1.5
}

impl Plan {
    /// Checks the plan. Errors with a message naming the field and what
    /// to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.route.is_empty() || self.to.is_empty() {
            return Err("`route` and `to` must name a route and a model".to_owned());
        }
        if self.steps.is_empty()
            || self.steps.windows(2).any(|w| w[0] >= w[1])
            || self.steps.first().is_some_and(|s| *s == 0)
            || self.steps.last() != Some(&100)
        {
            return Err(format!(
                "`steps` must rise strictly from above 0 to 100 percent (e.g. 10,30,50,80,100); got {:?}",
                self.steps
            ));
        }
        if !(self.step_interval_s.is_finite() && self.step_interval_s >= 1.0) {
            return Err("`step_interval_s` must be at least 1 second".to_owned());
        }
        if self.min_requests == 0 {
            return Err("`min_requests` must be at least 1".to_owned());
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Err("`max_error_rate` must be within [0, 1]".to_owned());
        }
        if !(self.max_latency_ratio.is_finite() && self.max_latency_ratio >= 1.0) {
            return Err("`max_latency_ratio` must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// One change of a rollout's phase or step, kept in its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `started`, `advanced`, `paused`, `resumed`, `rolled_back`,
    /// `promoted`, `aborted`.
    pub event: String,
    /// Canary share after it, in percent.
    pub share: u8,
    /// Why (a breach's figures, or who asked).
    pub reason: String,
}

/// A rollout of one route, as the store keeps it (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `ro-…`: windows and sticky assignments are keyed by it.
    pub id: String,
    /// The plan it runs.
    pub route: String,
    /// The canary model.
    pub to: String,
    /// A model an earlier rollout of this route promoted: it heads the
    /// stable side.
    pub base: Option<String>,
    /// Canary share per step, percent.
    pub steps: Vec<u8>,
    /// Least time per step, ms.
    pub step_interval_ms: u64,
    /// Canary turns per step before any judgement.
    pub min_requests: u64,
    /// Error-rate bound, [0, 1].
    pub max_error_rate: f64,
    /// p95 time-to-first-token bound, canary over stable.
    pub max_latency_ratio: f64,
    /// Index of the current step in `steps`.
    pub step: usize,
    /// When the current step began (Unix ms; moved on by a pause).
    pub step_started_ms: u64,
    /// Where it stands.
    pub phase: Phase,
    /// When it was paused (Unix ms), while paused.
    pub paused_at_ms: Option<u64>,
    /// Why it ended (rolled back, aborted, promoted).
    pub reason: Option<String>,
    /// Every transition, oldest first.
    pub history: Vec<Transition>,
    /// Bumped by every write: the store's compare-and-set checks it, so
    /// two replicas never both apply a transition.
    pub revision: u64,
}

impl Rollout {
    /// A running rollout of `plan` at its first step, started at `now_ms`,
    /// after `previous` (the route's last rollout, if any).
    pub fn start(plan: &Plan, id: String, now_ms: u64, previous: Option<&Rollout>) -> Self {
        let base = previous.and_then(Rollout::head);
        let mut r = Self {
            id,
            route: plan.route.clone(),
            to: plan.to.clone(),
            base,
            steps: plan.steps.clone(),
            step_interval_ms: (plan.step_interval_s * 1000.0).round() as u64,
            min_requests: plan.min_requests,
            max_error_rate: plan.max_error_rate,
            max_latency_ratio: plan.max_latency_ratio,
            step: 0,
            step_started_ms: now_ms,
            phase: Phase::Running,
            paused_at_ms: None,
            reason: None,
            history: Vec::new(),
            revision: previous.map_or(0, |p| p.revision),
        };
        r.note(now_ms, "started", "started by the operator".to_owned());
        r
    }

    /// The model that heads the route once this rollout is over: the
    /// canary when promoted, else the base it started from.
    pub fn head(&self) -> Option<String> {
        match self.phase {
            Phase::Promoted => Some(self.to.clone()),
            _ => self.base.clone(),
        }
    }

    /// Canary share of new sessions now, in percent (0 once over).
    pub fn share(&self) -> u8 {
        if self.phase.is_active() {
            self.steps.get(self.step).copied().unwrap_or(100)
        } else {
            0
        }
    }

    fn note(&mut self, at_ms: u64, event: &str, reason: String) {
        self.history.push(Transition {
            at_ms,
            event: event.to_owned(),
            share: self.share(),
            reason,
        });
        self.revision += 1;
    }

    /// This rollout after `decision` at `now_ms` (unchanged for
    /// [`Decision::Stay`]).
    pub fn apply(&self, decision: &Decision, now_ms: u64) -> Self {
        let mut next = self.clone();
        match decision {
            Decision::Stay => return next,
            Decision::Advance => {
                next.step += 1;
                next.step_started_ms = now_ms;
                next.note(now_ms, "advanced", format!("step {} % clean", self.share()));
            }
            Decision::Promote(reason) => {
                next.phase = Phase::Promoted;
                next.paused_at_ms = None;
                next.reason = Some(reason.clone());
                next.note(now_ms, "promoted", reason.clone());
            }
            Decision::RollBack(reason) => {
                next.phase = Phase::RolledBack;
                next.paused_at_ms = None;
                next.reason = Some(reason.clone());
                next.note(now_ms, "rolled_back", reason.clone());
            }
        }
        next
    }

    /// Pauses a running rollout. Errors (to answer 409) in any other phase.
    pub fn pause(&self, now_ms: u64) -> Result<Self, String> {
        if self.phase != Phase::Running {
            return Err(format!(
                "the rollout is {}, not running",
                self.phase.as_str()
            ));
        }
        let mut next = self.clone();
        next.phase = Phase::Paused;
        next.paused_at_ms = Some(now_ms);
        next.note(now_ms, "paused", "paused by the operator".to_owned());
        Ok(next)
    }

    /// Resumes a paused rollout; the time paused does not count towards
    /// the step. Errors in any other phase.
    pub fn resume(&self, now_ms: u64) -> Result<Self, String> {
        if self.phase != Phase::Paused {
            return Err(format!(
                "the rollout is {}, not paused",
                self.phase.as_str()
            ));
        }
        let mut next = self.clone();
        let paused_for = now_ms.saturating_sub(self.paused_at_ms.unwrap_or(now_ms));
        next.step_started_ms = self.step_started_ms.saturating_add(paused_for);
        next.phase = Phase::Running;
        next.paused_at_ms = None;
        next.note(now_ms, "resumed", "resumed by the operator".to_owned());
        Ok(next)
    }

    /// Ends an active rollout by the operator's hand: promoted, or aborted
    /// (every new session back to stable). Errors once it is over.
    pub fn finish(&self, promote: bool, now_ms: u64) -> Result<Self, String> {
        if !self.phase.is_active() {
            return Err(format!("the rollout is already {}", self.phase.as_str()));
        }
        let mut next = self.clone();
        next.phase = if promote {
            Phase::Promoted
        } else {
            Phase::Aborted
        };
        next.paused_at_ms = None;
        let (event, reason) = if promote {
            ("promoted", "promoted by the operator")
        } else {
            ("aborted", "aborted by the operator")
        };
        next.reason = Some(reason.to_owned());
        next.note(now_ms, event, reason.to_owned());
        Ok(next)
    }
}

/// A canary p95 time to first token at most this many ms above the
/// stable one is never a breach, whatever the ratio: between answers of a
/// few ms each (a cached or trivial reply) a ratio is noise, and the
/// histogram's buckets are 25 % wide (`window.rs`).
pub const LATENCY_FLOOR_MS: f64 = 50.0;

/// What a step's numbers decide.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing yet.
    Stay,
    /// On to the next step.
    Advance,
    /// The last step ended clean (the reason says so).
    Promote(String),
    /// A breach; the reason gives the figures.
    RollBack(String),
}

/// What `rollout`'s current step decides at `now_ms`, from the canary's
/// and the stable model's windows of that step.
///
/// - Nothing is judged before the canary has `min_requests` turns in the
///   step.
/// - Then a canary error rate above `max_error_rate`, or a canary p95 time
///   to first token above `max_latency_ratio` times the stable one (judged
///   only when the stable side also has `min_requests` answered turns in
///   the step: at 100 % few stable sessions are new; and only when more
///   than [`LATENCY_FLOOR_MS`] apart), rolls back — also while paused.
/// - Else a running rollout whose step has lasted `step_interval_ms`
///   advances, or, at the last step, is promoted.
pub fn decide(rollout: &Rollout, canary: &Window, stable: &Window, now_ms: u64) -> Decision {
    if !rollout.phase.is_active() || canary.turns() < rollout.min_requests {
        return Decision::Stay;
    }
    let share = rollout.share();
    let rate = canary.error_rate();
    if rate > rollout.max_error_rate {
        return Decision::RollBack(format!(
            "canary error rate {:.1} % over {} turns at step {share} % is above {:.1} %",
            rate * 100.0,
            canary.turns(),
            rollout.max_error_rate * 100.0
        ));
    }
    if stable.answered() >= rollout.min_requests
        && let (Some(c), Some(s)) = (canary.p95_ms(), stable.p95_ms())
        && c > s * rollout.max_latency_ratio
        && c - s > LATENCY_FLOOR_MS
    {
        return Decision::RollBack(format!(
            "canary p95 time to first token {c:.0} ms is above {:.2} × the stable {s:.0} ms at step {share} %",
            rollout.max_latency_ratio
        ));
    }
    if rollout.phase != Phase::Running
        || now_ms.saturating_sub(rollout.step_started_ms) < rollout.step_interval_ms
    {
        return Decision::Stay;
    }
    if rollout.step + 1 >= rollout.steps.len() {
        Decision::Promote(format!(
            "every step clean; last: error rate {:.1} % over {} canary turns",
            rate * 100.0,
            canary.turns()
        ))
    } else {
        Decision::Advance
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    fn plan() -> Plan {
        Plan {
            route: "default".into(),
            to: "new".into(),
            steps: vec![50, 100],
            step_interval_s: 10.0,
            min_requests: 10,
            max_error_rate: 0.05,
            max_latency_ratio: 1.5,
        }
    }

    fn window(ok: u64, fail: u64, ms: u64) -> Window {
        let mut w = Window::default();
        for _ in 0..ok {
            w.add(true, Some(Duration::from_millis(ms)));
        }
        for _ in 0..fail {
            w.add(false, None);
        }
        w
    }

    #[test]
    fn plans_are_validated() {
        assert!(plan().validate().is_ok());
        for bad in [
            Plan {
                steps: vec![50, 30, 100],
                ..plan()
            },
            Plan {
                steps: vec![10, 50],
                ..plan()
            },
            Plan {
                steps: vec![0, 100],
                ..plan()
            },
            Plan {
                step_interval_s: 0.5,
                ..plan()
            },
            Plan {
                min_requests: 0,
                ..plan()
            },
            Plan {
                max_error_rate: 1.5,
                ..plan()
            },
            Plan {
                max_latency_ratio: 0.9,
                ..plan()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nothing_is_judged_before_min_requests() {
        let r = Rollout::start(&plan(), "ro-1".into(), 0, None);
        // Nine failures of nine: still below min_requests.
        assert_eq!(
            decide(&r, &window(0, 9, 0), &window(50, 0, 100), 60_000),
            Decision::Stay
        );
        // Clean and past the interval, but too few canary turns.
        assert_eq!(
            decide(&r, &window(9, 0, 100), &window(50, 0, 100), 60_000),
            Decision::Stay
        );
    }

    #[test]
    fn a_breach_rolls_back_at_once_even_when_paused() {
        let r = Rollout::start(&plan(), "ro-1".into(), 0, None);
        let d = decide(&r, &window(9, 1, 100), &window(50, 0, 100), 1);
        assert!(
            matches!(&d, Decision::RollBack(why) if why.contains("10.0 %")),
            "{d:?}"
        );
        let paused = r.pause(1).unwrap();
        assert!(matches!(
            decide(&paused, &window(0, 10, 0), &window(0, 0, 0), 2),
            Decision::RollBack(_)
        ));
        let rolled = r.apply(&d, 5);
        assert_eq!(rolled.phase, Phase::RolledBack);
        assert_eq!(rolled.share(), 0);
        assert_eq!(rolled.history.last().unwrap().event, "rolled_back");
        assert_eq!(rolled.revision, r.revision + 1);
    }

    #[test]
    fn slow_canary_rolls_back_only_against_enough_stable_turns() {
        let r = Rollout::start(&plan(), "ro-1".into(), 0, None);
        let slow = window(20, 0, 400);
        assert!(matches!(
            decide(&r, &slow, &window(20, 0, 100), 1),
            Decision::RollBack(why) if why.contains("time to first token")
        ));
        // Too few stable turns to compare: judged on errors alone.
        assert_eq!(decide(&r, &slow, &window(5, 0, 100), 1), Decision::Stay);
        // Within the ratio.
        assert_eq!(
            decide(&r, &window(20, 0, 120), &window(20, 0, 100), 1),
            Decision::Stay
        );
        // Three times slower, but 20 ms against 7: noise, not a breach.
        assert_eq!(
            decide(&r, &window(20, 0, 20), &window(20, 0, 7), 1),
            Decision::Stay
        );
    }

    #[test]
    fn clean_steps_advance_on_time_then_promote() {
        let r = Rollout::start(&plan(), "ro-1".into(), 1_000, None);
        assert_eq!(r.share(), 50);
        let clean = window(10, 0, 100);
        assert_eq!(decide(&r, &clean, &clean, 10_999), Decision::Stay);
        assert_eq!(decide(&r, &clean, &clean, 11_000), Decision::Advance);
        let second = r.apply(&Decision::Advance, 11_000);
        assert_eq!((second.step, second.share()), (1, 100));
        assert_eq!(second.history.last().unwrap().share, 100);
        let d = decide(&second, &clean, &Window::default(), 21_000);
        assert!(matches!(d, Decision::Promote(_)), "{d:?}");
        let promoted = second.apply(&d, 21_000);
        assert_eq!(promoted.head().as_deref(), Some("new"));
        // The next rollout of the route starts from the promoted model.
        let next = Rollout::start(
            &Plan {
                to: "newer".into(),
                ..plan()
            },
            "ro-2".into(),
            30_000,
            Some(&promoted),
        );
        assert_eq!(next.base.as_deref(), Some("new"));
        assert!(next.revision > promoted.revision);
    }

    #[test]
    fn a_pause_holds_the_step_and_does_not_count() {
        let r = Rollout::start(&plan(), "ro-1".into(), 0, None);
        let clean = window(10, 0, 100);
        let paused = r.pause(5_000).unwrap();
        assert_eq!(paused.share(), 50);
        assert_eq!(decide(&paused, &clean, &clean, 60_000), Decision::Stay);
        assert!(paused.pause(6_000).is_err());
        let resumed = paused.resume(65_000).unwrap();
        // 60 s paused: the step started at 60 000 in effect, 5 s run.
        assert_eq!(resumed.step_started_ms, 60_000);
        assert_eq!(decide(&resumed, &clean, &clean, 69_999), Decision::Stay);
        assert_eq!(decide(&resumed, &clean, &clean, 70_000), Decision::Advance);
    }

    #[test]
    fn operators_finish_only_active_rollouts() {
        let r = Rollout::start(&plan(), "ro-1".into(), 0, None);
        let aborted = r.finish(false, 1).unwrap();
        assert_eq!((aborted.phase, aborted.share()), (Phase::Aborted, 0));
        assert_eq!(aborted.head(), None);
        assert!(aborted.finish(true, 2).is_err());
        assert!(aborted.resume(2).is_err());
        let promoted = r.finish(true, 1).unwrap();
        assert_eq!(promoted.head().as_deref(), Some("new"));
    }
}
